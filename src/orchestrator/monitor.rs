//! The monitor: fails nodes silent past the heartbeat timeout and nodes that never registered
//! within the boot timeout; runs the periodic retention, leak and termination checks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Orchestrator, EXPIRY_CHECK};

use crate::state::model::{Node, NodeStatus};
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
        let silent: Vec<super::nodes::SeenKey> = lock(&self.inner.last_seen)
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > timeout)
            .map(|(key, _)| key.clone())
            .collect();
        for key in silent {
            lock(&self.inner.last_seen).remove(&key);
            let node_id = super::nodes::node_id(&key.0, key.1);
            tracing::warn!(node_id = %node_id, "heartbeat timeout");
            self.node_failed(&node_id, "heartbeat timeout".to_owned())
                .await;
        }
        self.fail_nodes_past_boot_timeout().await;
    }

    /// Fail the nodes in `booting` whose agent did not register within the boot timeout. Only
    /// the nodes whose deadline passed are read ([`BootDeadlines`]), never a deployment's
    /// whole node list.
    async fn fail_nodes_past_boot_timeout(&self) {
        let now = SystemTime::now();
        let expired = lock(&self.inner.boot_deadlines).take_expired(now);
        for node_id in expired {
            let Ok(Some(node)) = self.inner.store.node(&node_id).await else {
                continue;
            };
            if node.status != NodeStatus::Booting {
                continue;
            }
            if !self.boot_timed_out(&node, now) {
                // Still booting, but its clock started again (a retry): watch the new deadline.
                self.watch_boot(&node);
                continue;
            }
            let message = format!(
                "the node did not register within {}",
                humantime::format_duration(self.inner.config.boot_timeout)
            );
            self.node_failed(&node.id, message).await;
        }
    }

    /// Whether a node in `booting` has waited longer than the boot timeout for its agent:
    /// the one judgement, per node, of what the boot timeout fails.
    pub(super) fn boot_timed_out(&self, node: &Node, now: SystemTime) -> bool {
        node.last_update
            .checked_add(self.inner.config.boot_timeout)
            .is_some_and(|deadline| deadline <= now)
    }

    /// Watch a node that entered `booting` (or was found there after a restart) for the boot
    /// timeout, or stop watching one that left it.
    pub(super) fn watch_boot(&self, node: &Node) {
        let mut deadlines = lock(&self.inner.boot_deadlines);
        if node.status != NodeStatus::Booting {
            deadlines.remove(&node.id);
            return;
        }
        match node.last_update.checked_add(self.inner.config.boot_timeout) {
            Some(deadline) => deadlines.insert(&node.id, deadline),
            // A boot timeout too large to add never passes.
            None => deadlines.remove(&node.id),
        }
    }
}

/// The nodes in `booting` by the time their agent must have registered by, so the monitor
/// finds the late ones without reading every node. Each node is kept once (its id shared by
/// both indexes); entries leave when the node leaves `booting` or its deadline is taken.
#[derive(Debug, Default)]
pub(crate) struct BootDeadlines {
    by_deadline: BTreeSet<(SystemTime, Arc<str>)>,
    by_node: HashMap<Arc<str>, SystemTime>,
}

impl BootDeadlines {
    /// Watch `node_id` until `deadline`, replacing any earlier deadline of it.
    fn insert(&mut self, node_id: &str, deadline: SystemTime) {
        self.remove(node_id);
        let node_id: Arc<str> = Arc::from(node_id);
        self.by_deadline.insert((deadline, Arc::clone(&node_id)));
        self.by_node.insert(node_id, deadline);
    }

    /// Stop watching `node_id`.
    fn remove(&mut self, node_id: &str) {
        if let Some((node_id, deadline)) = self.by_node.remove_entry(node_id) {
            self.by_deadline.remove(&(deadline, node_id));
        }
        // As a large deployment's nodes register, give the memory back.
        crate::state::memory::shrink_if_sparse(&mut self.by_node);
    }

    /// Remove and return the nodes whose deadline is `now` or earlier, earliest first.
    fn take_expired(&mut self, now: SystemTime) -> Vec<Arc<str>> {
        let mut expired = Vec::new();
        while let Some(first) = self.by_deadline.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, node_id)) = self.by_deadline.pop_first() {
                self.by_node.remove(&node_id);
                expired.push(node_id);
            }
        }
        crate::state::memory::shrink_if_sparse(&mut self.by_node);
        expired
    }

    /// How many nodes are watched.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_node.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn deadlines_come_out_once_earliest_first_and_leave_with_their_node() {
        let mut deadlines = BootDeadlines::default();
        deadlines.insert("c", at(30));
        deadlines.insert("a", at(10));
        deadlines.insert("b", at(20));
        deadlines.insert("gone", at(5));
        deadlines.remove("gone");
        // A new deadline replaces the old one.
        deadlines.insert("b", at(40));
        assert!(deadlines.take_expired(at(9)).is_empty());
        let expired = deadlines.take_expired(at(30));
        assert_eq!(
            expired.iter().map(|id| &**id).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert!(deadlines.take_expired(at(30)).is_empty(), "taken once");
        assert_eq!(deadlines.len(), 1);
        deadlines.remove("b");
        assert_eq!(deadlines.len(), 0);
        assert!(deadlines.by_deadline.is_empty());
    }
}
