//! A node's state changes and what follows them: waking watchers, releasing the instance of a
//! node that ended, retrying a failed node that has attempts left.

use std::time::{Duration, SystemTime};

use super::{Live, Orchestrator, TERMINATE_ATTEMPTS};

use crate::backoff::jitter;
use crate::error::Result;
use crate::provider::InstanceRef;
use crate::state::model::{Node, NodeStatus, NodeUpdate};
use crate::sync::lock;

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
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=TERMINATE_ATTEMPTS {
            match provider.release(instance, node_id).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(instance_id, attempt, error = %crate::error::Report::new(e.as_ref()), "could not terminate instance");
                    if attempt < TERMINATE_ATTEMPTS {
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff *= 2;
                    }
                }
            }
        }
        false
    }

    /// Apply a node update, wake waiters when its deployment changed, and act on final states.
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
        if applied.node.status != applied.previous {
            tracing::info!(
                deployment_id = %applied.node.deployment_id,
                node_id = %applied.node.id,
                from = %applied.previous,
                to = %applied.node.status,
                "node state"
            );
            if applied.node.status.is_final() || applied.node.status == NodeStatus::Terminating {
                lock(&self.inner.last_seen).remove(node_id);
                lock(&self.inner.log_counts).remove(&(node_id.to_owned(), applied.node.attempt));
            }
            if matches!(
                applied.node.status,
                NodeStatus::Completed | NodeStatus::Failed
            ) {
                self.after_node_ended(&applied.node);
            }
            self.notify();
        }
        if let Some(status) = applied.deployment_changed {
            tracing::info!(deployment_id = %applied.node.deployment_id, status = %status, "deployment state");
        }
        Ok(applied)
    }

    /// Fail a node with `message` (agent lost, provisioning failed, ...).
    pub(crate) async fn node_failed(&self, node_id: &str, message: String) {
        let update = NodeUpdate::Status {
            status: NodeStatus::Failed,
            exit_code: None,
            message: Some(super::nodes::capped_message(message)),
        };
        if let Err(e) = self.update_node(node_id, update).await {
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
            let Ok(live) = this.live(&node.deployment_id).await else {
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
            if node.status == NodeStatus::Failed && node.attempt <= live.config.nodes.retries {
                this.retry_node(&live, node).await;
            }
        });
    }

    pub(crate) async fn retry_node(&self, live: &Live, node: Node) {
        let exponent = node.attempt.saturating_sub(1).min(6);
        let wait =
            (self.inner.config.retry_backoff * 2u32.pow(exponent)).min(Duration::from_secs(60));
        tracing::info!(node_id = %node.id, attempt = node.attempt + 1, wait_ms = wait.as_millis() as u64, "retrying node");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = live.cancel.cancelled() => return,
        }
        match self.update_node(&node.id, NodeUpdate::Retry).await {
            Ok(applied) => self.provision_node(live, applied.node).await,
            Err(e) => tracing::info!(node_id = %node.id, error = %e.report(), "retry abandoned"),
        }
    }
}
