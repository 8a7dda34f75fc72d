//! A node's state changes and what follows them: waking watchers, releasing the instance of a
//! node that ended, retrying a failed node that has attempts left.

use std::time::{Duration, SystemTime};

use super::{Live, Orchestrator, TERMINATE_ATTEMPTS};

use crate::backoff::Backoff;
use crate::error::Result;
use crate::provider::InstanceRef;
use crate::state::model::{Node, NodeStatus, NodeUpdate};
use crate::sync::lock;

/// First pause before a failed store write of a node update is tried again.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between tries of a failed store write.
const STORE_RETRY_CAP: Duration = Duration::from_secs(5);

impl Orchestrator {
    /// Release a node's instance (terminated, or back in its pool), trying a few times with
    /// backoff; returns whether the provider confirmed the node no longer runs there.
    pub(super) async fn release_instance(
        &self,
        live: &Live,
        instance: &InstanceRef,
        node_id: &str,
    ) -> bool {
        let instance_id = instance.id.as_str();
        let Ok(provider) = self.provider_for(&live.config) else {
            return false;
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        for attempt in 1..=TERMINATE_ATTEMPTS {
            let released = provider.release(instance, node_id).await;
            self.inner.metrics.provider_call(
                live.config.cloud_provider.as_str(),
                "release",
                released.is_ok(),
            );
            match released {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(instance_id, attempt, error = %crate::error::Report::new(e.as_ref()), "could not terminate instance");
                    if attempt < TERMINATE_ATTEMPTS {
                        tokio::time::sleep(backoff.next_pause()).await;
                    }
                }
            }
        }
        false
    }

    /// Apply a node update, wake waiters when its deployment's summary may have changed, and
    /// act on final states.
    pub(crate) async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
    ) -> Result<crate::state::model::Applied> {
        let applied = self
            .inner
            .store
            .update_node(node_id, update, SystemTime::now())
            .await?;
        let changed = applied.node.status != applied.previous;
        let ended = changed
            && matches!(
                applied.node.status,
                NodeStatus::Completed | NodeStatus::Failed
            );
        if changed {
            self.inner
                .metrics
                .node_changed(applied.previous, &applied.node);
            tracing::info!(
                deployment_id = %applied.node.deployment_id,
                node_id = %applied.node.id,
                from = %applied.previous,
                to = %applied.node.status,
                "node state"
            );
            if applied.node.status == NodeStatus::Booting || applied.previous == NodeStatus::Booting
            {
                self.watch_boot(&applied.node);
            }
            if applied.node.status.is_final() || applied.node.status == NodeStatus::Terminating {
                let key = (
                    std::sync::Arc::from(applied.node.deployment_id.as_str()),
                    applied.node.index,
                );
                lock(&self.inner.last_seen).remove(&key);
                lock(&self.inner.log_counts).remove(&(node_id.to_owned(), applied.node.attempt));
            }
            if ended {
                self.after_node_ended(&applied.node);
            }
            self.inner.events.publish(super::events::Change::Node {
                node: Box::new(applied.node.clone()),
                previous: applied.previous,
                deployment: applied.deployment.clone(),
            });
        }
        // Waiters follow the deployment's summary (its state and node counters): only a node
        // reaching a final state or the deployment's own move can change it, so only those
        // wake them, not every step of every node.
        if (changed && applied.node.status.is_final()) || applied.deployment_changed.is_some() {
            self.notify();
        }
        if let Some(status) = applied.deployment_changed {
            tracing::info!(deployment_id = %applied.node.deployment_id, status = %status, "deployment state");
            self.publish_deployment(applied.deployment.clone());
            if status.is_final() {
                self.deployment_ended(&applied.node.deployment_id, status);
            }
            // A node that ended is forgotten after its release (see `after_node_ended`).
            if status.is_final() && !ended {
                self.forget_final(&applied.node.deployment_id);
            }
        }
        Ok(applied)
    }

    /// Apply a node update the engine must not lose (a failure, a retry): a store error is
    /// tried again with backoff until the store takes it. Ends with the store's answer, a
    /// refusal (the node moved on: conflict, not found), or, at engine shutdown, the last
    /// error (the node is then left as stored, and a restarted engine resumes it).
    pub(super) async fn update_node_until_stored(
        &self,
        node_id: &str,
        update: NodeUpdate,
    ) -> Result<crate::state::model::Applied> {
        let mut backoff = Backoff::new(STORE_RETRY_FIRST, STORE_RETRY_CAP);
        loop {
            match self.update_node(node_id, update.clone()).await {
                Err(e) if e.is_store() => {
                    let wait = backoff.next_pause();
                    tracing::warn!(node_id, error = %e, wait_ms = wait.as_millis() as u64, "cannot store a node update; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.inner.cancel.cancelled() => return Err(e),
                    }
                }
                answer => return answer,
            }
        }
    }

    /// Fail a node with `message` (agent lost, provisioning failed, ...). A store error is
    /// tried again until the failure is recorded, so the node never stays unwatched.
    pub(crate) async fn node_failed(&self, node_id: &str, message: String) {
        let update = NodeUpdate::Status {
            status: NodeStatus::Failed,
            exit_code: None,
            message: Some(super::nodes::capped_message(message)),
        };
        if let Err(e) = self.update_node_until_stored(node_id, update).await {
            if !e.is_invalid_transition() {
                tracing::error!(node_id, error = %e.report(), "cannot record node failure");
            }
        }
    }

    /// A node completed or failed: terminate its instance and, if it may, retry it.
    pub(super) fn after_node_ended(&self, node: &Node) {
        let this = self.clone();
        let node = node.clone();
        self.inner.tasks.spawn(async move {
            let Some(live) = this.live_until_loaded(&node.deployment_id).await else {
                return;
            };
            if let Some(instance) = node.instance() {
                let (releasing, live_for_release) = (this.clone(), live.clone());
                let node_id = node.id.clone();
                let release = live.releases.track_future(async move {
                    releasing
                        .release_instance(&live_for_release, &instance, &node_id)
                        .await
                });
                release.await;
            }
            let deployment_id = node.deployment_id.clone();
            if node.status == NodeStatus::Failed && node.attempt <= live.config.nodes.retries {
                this.retry_node(&live, node).await;
            }
            drop(live);
            this.forget_if_final(&deployment_id).await;
        });
    }

    /// The deployment's settings, read again with backoff while they cannot be (an I/O or
    /// store error): a node that ended must still have its instance released and its retry
    /// made. `None` once the deployment's files are gone (cleaned up) or at engine shutdown.
    async fn live_until_loaded(&self, id: &str) -> Option<std::sync::Arc<Live>> {
        let mut backoff = Backoff::new(STORE_RETRY_FIRST, STORE_RETRY_CAP);
        loop {
            match self.live(id).await {
                Ok(live) => return Some(live),
                Err(e) if e.is_not_found() => return None,
                Err(e) => {
                    let wait = backoff.next_pause();
                    tracing::warn!(deployment_id = %id, error = %e, wait_ms = wait.as_millis() as u64, "cannot load a deployment; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.inner.cancel.cancelled() => return None,
                    }
                }
            }
        }
    }

    pub(crate) async fn retry_node(&self, live: &Live, node: Node) {
        let exponent = node.attempt.saturating_sub(1).min(6);
        let wait =
            (self.inner.config.retry_backoff * 2u32.pow(exponent)).min(Duration::from_secs(60));
        tracing::info!(node_id = %node.id, attempt = node.attempt + 1, wait_ms = wait.as_millis() as u64, "retrying node");
        // A terminate request ends the wait for good; engine shutdown leaves the node failed
        // with its retry left, which a restarted engine makes.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = live.cancel.cancelled() => return,
            () = self.inner.cancel.cancelled() => return,
        }
        match self
            .update_node_until_stored(&node.id, NodeUpdate::Retry)
            .await
        {
            Ok(applied) => self.provision_node(live, applied.node.id).await,
            Err(e) => tracing::info!(node_id = %node.id, error = %e.report(), "retry abandoned"),
        }
    }
}
