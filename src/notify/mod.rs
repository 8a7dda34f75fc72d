//! Webhook notifications (`notify:`, SPEC §1): when a deployment reaches a final state
//! its `taskfly.yml` names, the daemon POSTs a JSON summary to the webhook, signed with the
//! `notify.secret`, and tries again with backoff for up to an hour.
//!
//! The engine makes the body once ([`body`]) and hands a [`WebhookDelivery`] to the
//! [`Notifier`], which keeps it in the store (so a restarted daemon delivers it) and sends it
//! from a task of its own: a slow or dead receiver never holds up the engine. How a body
//! travels is a [`Transport`]'s business (the API module's HTTP client), so this module knows
//! no HTTP library.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::pause_after;
use crate::state::model::{DeliveryStatus, Deployment, Node, NodeStatus, WebhookDelivery};
use crate::state::Store;
use crate::sync::lock;

/// How long a notification is tried before it is given up.
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(60 * 60);

/// Longest pause between two tries.
const RETRY_CAP: Duration = Duration::from_secs(5 * 60);

/// How long one try may take, connection included.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Failed nodes listed in a body, at most (the counts cover them all).
pub(crate) const MAX_FAILED_NODES: usize = 100;

/// The header carrying the body's signature.
pub(crate) const SIGNATURE_HEADER: &str = "X-TaskFly-Signature";

/// Sends one notification. Implemented by the API's HTTP client.
#[async_trait]
pub(crate) trait Transport: Send + Sync + 'static {
    /// POST `body` (JSON) to `url` with `headers`; the receiver's status code, or why no answer
    /// came. Must give up within [`ATTEMPT_TIMEOUT`]. The error must not quote the URL.
    async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> Result<u16, String>;
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` with `secret`.
pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The JSON body telling that `deployment` ended (SPEC §1, `notify`): its id, state, counts, failed
/// nodes with their errors (the first [`MAX_FAILED_NODES`]), wall time and dashboard URL.
pub(crate) fn body(deployment: &Deployment, nodes: &[Node], dashboard_url: &str) -> String {
    let failed: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Failed)
        .collect();
    let failed_nodes: Vec<serde_json::Value> = failed
        .iter()
        .take(MAX_FAILED_NODES)
        .map(|n| {
            serde_json::json!({
                "node_id": n.id,
                "node_index": n.index,
                "attempt": n.attempt,
                "exit_code": n.exit_code,
                "error_message": n.error_message,
            })
        })
        .collect();
    let ended = deployment.completed_at.unwrap_or(deployment.updated_at);
    let duration_s = ended
        .duration_since(deployment.created_at)
        .unwrap_or_default()
        .as_secs_f64();
    serde_json::json!({
        "event": "deployment.finished",
        "deployment_id": deployment.id,
        "status": deployment.status.as_str(),
        "cloud_provider": deployment.cloud_provider,
        "total_nodes": deployment.total_nodes,
        "nodes_completed": deployment.nodes_completed,
        "nodes_failed": deployment.nodes_failed,
        "nodes_terminated": deployment.nodes_terminated,
        "error_message": deployment.error_message,
        "failed_nodes": failed_nodes,
        "failed_nodes_omitted": failed.len().saturating_sub(MAX_FAILED_NODES),
        "created_at": humantime::format_rfc3339_millis(deployment.created_at).to_string(),
        "completed_at": humantime::format_rfc3339_millis(ended).to_string(),
        "duration_s": (duration_s * 1000.0).round() / 1000.0,
        "dashboard_url": dashboard_url,
    })
    .to_string()
}

/// Delivers the engine's webhook notifications from a task of its own.
pub(crate) struct Notifier {
    store: Arc<dyn Store>,
    transport: OnceLock<Arc<dyn Transport>>,
    /// Pending notifications, and those settled in this process (for the deployment view
    /// when the store keeps none), by deployment id.
    deliveries: Mutex<HashMap<String, WebhookDelivery>>,
    wake: Notify,
    first_pause: Duration,
}

impl Notifier {
    pub(crate) fn new(store: Arc<dyn Store>, first_pause: Duration) -> Notifier {
        Notifier {
            store,
            transport: OnceLock::new(),
            deliveries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            first_pause,
        }
    }

    /// Start sending through `transport` (the first one given stays).
    pub(crate) fn set_transport(&self, transport: Arc<dyn Transport>) {
        if self.transport.set(transport).is_ok() {
            self.wake.notify_one();
        }
    }

    /// Queue a new notification: stored first (a restarted daemon finds it), then tried at once.
    pub(crate) async fn enqueue(&self, delivery: WebhookDelivery) {
        if let Err(e) = self.store.save_delivery(delivery.clone()).await {
            tracing::error!(deployment_id = %delivery.deployment_id, error = %e.report(), "cannot store a webhook notification; it is tried, but lost if the daemon stops first");
        }
        lock(&self.deliveries).insert(delivery.deployment_id.clone(), delivery);
        self.wake.notify_one();
    }

    /// A deployment's notification, as this process or the store knows it.
    pub(crate) async fn delivery(&self, deployment_id: &str) -> Option<WebhookDelivery> {
        if let Some(known) = lock(&self.deliveries).get(deployment_id) {
            return Some(known.clone());
        }
        self.store.delivery(deployment_id).await.ok().flatten()
    }

    /// Forget a cleaned-up deployment's notification.
    pub(crate) fn forget(&self, deployment_id: &str) {
        lock(&self.deliveries).remove(deployment_id);
    }

    /// Deliver notifications until `cancel` fires: first those a previous run left pending
    /// (tried at once), then each new one, each failure tried again after a growing pause.
    pub(crate) async fn run(&self, cancel: CancellationToken) {
        match self.store.pending_deliveries().await {
            Ok(pending) => {
                let now = SystemTime::now();
                let mut deliveries = lock(&self.deliveries);
                for mut delivery in pending {
                    delivery.next_attempt_at = now;
                    deliveries
                        .entry(delivery.deployment_id.clone())
                        .or_insert(delivery);
                }
            }
            Err(e) => {
                tracing::error!(error = %e.report(), "cannot read pending webhook notifications")
            }
        }
        loop {
            let wait = match self.transport.get() {
                None => None,
                Some(transport) => {
                    for delivery in self.due(SystemTime::now()) {
                        tokio::select! {
                            () = self.attempt(transport.as_ref(), delivery) => {}
                            () = cancel.cancelled() => return,
                        }
                    }
                    self.next_due()
                        .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                }
            };
            let pause = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = pause => {}
                () = self.wake.notified() => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    fn due(&self, now: SystemTime) -> Vec<WebhookDelivery> {
        let mut due: Vec<WebhookDelivery> = lock(&self.deliveries)
            .values()
            .filter(|d| d.status == DeliveryStatus::Pending && d.next_attempt_at <= now)
            .cloned()
            .collect();
        due.sort_by_key(|d| d.created_at);
        due
    }

    fn next_due(&self) -> Option<SystemTime> {
        lock(&self.deliveries)
            .values()
            .filter(|d| d.status == DeliveryStatus::Pending)
            .map(|d| d.next_attempt_at)
            .min()
    }

    /// One try of `delivery`, its outcome stored.
    async fn attempt(&self, transport: &dyn Transport, mut delivery: WebhookDelivery) {
        let mut headers = vec![("Content-Type", "application/json".to_owned())];
        if let Some(signature) = &delivery.signature {
            headers.push((SIGNATURE_HEADER, signature.clone()));
        }
        let answer = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            transport.post(&delivery.url, &headers, delivery.body.as_bytes()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())));
        let now = SystemTime::now();
        delivery.attempts += 1;
        match answer {
            Ok(code) if (200..300).contains(&code) => {
                delivery.status = DeliveryStatus::Delivered;
                delivery.delivered_at = Some(now);
                tracing::info!(deployment_id = %delivery.deployment_id, attempts = delivery.attempts, "webhook notification delivered");
            }
            failed => {
                let error = match failed {
                    Ok(code) => format!("the receiver answered HTTP {code}"),
                    Err(error) => error,
                };
                let pause = pause_after(self.first_pause, RETRY_CAP, delivery.attempts);
                let given_up = now
                    .duration_since(delivery.created_at)
                    .is_ok_and(|spent| spent + pause > GIVE_UP_AFTER);
                if given_up {
                    delivery.status = DeliveryStatus::Failed;
                    tracing::warn!(deployment_id = %delivery.deployment_id, attempts = delivery.attempts, %error, "webhook notification given up after an hour");
                } else {
                    delivery.next_attempt_at = now + pause;
                    tracing::info!(deployment_id = %delivery.deployment_id, attempts = delivery.attempts, %error, retry_in_ms = pause.as_millis() as u64, "webhook notification failed; trying again");
                }
                delivery.last_error = Some(error);
            }
        }
        if let Err(e) = self.store.save_delivery(delivery.clone()).await {
            // Cleaned up meanwhile, or the store failed: the copy here still counts.
            tracing::debug!(deployment_id = %delivery.deployment_id, error = %e.report(), "cannot store a webhook notification's state");
        }
        let mut deliveries = lock(&self.deliveries);
        if let Some(kept) = deliveries.get_mut(&delivery.deployment_id) {
            *kept = delivery;
        }
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
