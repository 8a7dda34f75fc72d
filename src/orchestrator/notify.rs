//! A deployment that ended is told to its webhook (`notify:`, SPEC §1): the notification is
//! made here and handed to the [`crate::notify::Notifier`], which delivers it on its own task.

use std::sync::Arc;
use std::time::SystemTime;

use super::Orchestrator;
use crate::notify::{self, Transport};
use crate::state::model::{DeliveryStatus, DeploymentStatus, WebhookDelivery};

impl Orchestrator {
    /// Send webhook notifications through `transport` (the API's HTTP client, given by the
    /// server that serves this engine); until then they wait.
    pub(crate) fn set_webhook_transport(&self, transport: Arc<dyn Transport>) {
        self.inner.notifier.set_transport(transport);
    }

    /// Deployment `id` reached `status`, a final state: notify its webhook if its `notify:`
    /// asks for this state. On a task of its own: the caller is the engine's hot path.
    pub(crate) fn deployment_ended(&self, id: &str, status: DeploymentStatus) {
        self.inner.metrics.deployment_ended(id);
        let this = self.clone();
        let id = id.to_owned();
        self.spawn_tracked(async move {
            if let Err(e) = this.make_notification(&id, status).await {
                tracing::error!(deployment_id = %id, error = %e.report(), "cannot make the webhook notification");
            }
        });
    }

    pub(super) async fn make_notification(
        &self,
        id: &str,
        status: DeploymentStatus,
    ) -> crate::Result<()> {
        // Not `live`: the deployment is final, and its settings may already be dropped.
        let live = match self.peek_live(id).await {
            Ok(live) => live,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(settings) = live.config.notify.as_ref() else {
            return Ok(());
        };
        if !settings.on.contains(&status) {
            return Ok(());
        }
        let detail = self.deployment(id).await?;
        let dashboard = format!(
            "{}/ui/deployments/{id}",
            self.advertise_url().trim_end_matches('/')
        );
        let body = notify::body(&detail.deployment, &detail.nodes, &dashboard);
        let now = SystemTime::now();
        let delivery = WebhookDelivery {
            deployment_id: id.to_owned(),
            url: settings.webhook.clone(),
            signature: settings
                .secret
                .as_deref()
                .map(|secret| notify::sign(secret, body.as_bytes())),
            body,
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_error: None,
            created_at: now,
            next_attempt_at: now,
            delivered_at: None,
        };
        self.inner.notifier.enqueue(delivery).await;
        Ok(())
    }
}
