//! The monitor: fails nodes silent past the heartbeat timeout and nodes that never registered
//! within the boot timeout; runs the periodic retention, leak and termination checks.

use std::time::{Duration, SystemTime};

use super::{Orchestrator, EXPIRY_CHECK};

use crate::state::model::NodeStatus;
use crate::sync::lock;

impl Orchestrator {
    /// Watch registered nodes: fail those silent past the heartbeat timeout and those that
    /// never registered within the boot timeout.
    pub(super) fn spawn_monitor(&self) {
        let this = self.clone();
        let period = (self.inner.config.heartbeat_timeout / 4).max(Duration::from_millis(50));
        self.inner.tasks.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut expiry = tokio::time::interval(EXPIRY_CHECK);
            expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => this.check_silent_nodes().await,
                    _ = expiry.tick() => {
                        this.expire_old_deployments().await;
                        this.reconcile_orphans().await;
                        this.retry_stuck_terminations().await;
                    }
                    () = this.inner.cancel.cancelled() => return,
                }
            }
        });
    }

    pub(super) async fn check_silent_nodes(&self) {
        let timeout = self.inner.config.heartbeat_timeout;
        let now = tokio::time::Instant::now();
        let silent: Vec<String> = lock(&self.inner.last_seen)
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in silent {
            lock(&self.inner.last_seen).remove(&node_id);
            tracing::warn!(node_id = %node_id, "heartbeat timeout");
            self.node_failed(&node_id, "heartbeat timeout".to_owned())
                .await;
        }
        let boot_deadline = SystemTime::now().checked_sub(self.inner.config.boot_timeout);
        let Some(boot_deadline) = boot_deadline else {
            return;
        };
        let live: Vec<String> = lock(&self.inner.live).keys().cloned().collect();
        for id in live {
            match self.inner.store.deployment(&id).await {
                Ok(Some(d)) if !d.status.is_final() => {}
                _ => continue,
            }
            let Ok(nodes) = self.inner.store.nodes(&id).await else {
                continue;
            };
            for node in nodes {
                if node.status == NodeStatus::Booting && node.last_update < boot_deadline {
                    let message = format!(
                        "the node did not register within {}",
                        humantime::format_duration(self.inner.config.boot_timeout)
                    );
                    self.node_failed(&node.id, message).await;
                }
            }
        }
    }
}
