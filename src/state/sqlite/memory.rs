//! What [`super::SqliteStore`] keeps in memory besides the file: the live nodes and
//! deployments as their rows hold them (so the node protocol's reads, by token on every
//! request, need no call to the writer thread), and the heartbeat times not yet written.
//!
//! Invariant: a node or deployment held here is exactly what its row holds (times truncated to
//! the millisecond, as stored). Only the writer thread changes rows, and it changes this copy
//! after the transaction that wrote them has committed and before it answers the caller, so a
//! read from memory sees every answered write and nothing uncommitted. The bound: one copy of
//! each node that is not in a final state and has been read or written since the store was
//! opened, and of each deployment that is not final.

use std::collections::HashMap;
use std::time::SystemTime;

use super::{from_ms, to_ms};
use crate::state::model::{Deployment, Node};
use crate::state::Heartbeat as Beat;

/// See the module's documentation.
#[derive(Default)]
pub(super) struct Memory {
    /// Last-seen times of live nodes, newer than (or equal to) what their rows hold. An entry
    /// exists only for a node that exists and is not final; whoever writes a node's row or
    /// deletes it removes its entry.
    pub(super) heartbeats: HashMap<String, Heartbeat>,
    /// Nodes not in a final state, by id.
    nodes: HashMap<String, Node>,
    /// Deployments not in a final state, by id.
    deployments: HashMap<String, Deployment>,
    /// The ids of the nodes in `nodes` by their provision token hash, and by their auth token
    /// hash.
    provision_tokens: HashMap<[u8; 32], String>,
    auth_tokens: HashMap<[u8; 32], String, crate::auth::DrawnKeys>,
}

/// A live node's last heartbeat.
pub(super) struct Heartbeat {
    pub(super) deployment_id: String,
    /// The last heartbeat's time.
    pub(super) seen: SystemTime,
    /// The node's `last_update` as its row holds it.
    pub(super) stored_ms: i64,
}

/// The nodes and deployments one transaction of the writer has written, to be remembered once
/// it has committed; the later writes of the same transaction read them from here.
#[derive(Default)]
pub(crate) struct Pending {
    pub(super) nodes: HashMap<String, Node>,
    pub(super) deployments: HashMap<String, Deployment>,
}

/// `time` as the file holds it: truncated to the millisecond.
fn as_stored(time: SystemTime) -> SystemTime {
    from_ms(to_ms(time)).unwrap_or(time)
}

impl Memory {
    /// The node, as its row holds it, if held here.
    pub(super) fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// The deployment, as its row holds it, if held here.
    pub(super) fn deployment(&self, id: &str) -> Option<&Deployment> {
        self.deployments.get(id)
    }

    /// The held node whose provision token hash is `hash`.
    pub(super) fn node_by_provision_token(&self, hash: &[u8; 32]) -> Option<&Node> {
        self.provision_tokens
            .get(hash)
            .and_then(|id| self.nodes.get(id))
    }

    /// The held node whose auth token hash is `hash`.
    pub(super) fn node_by_auth_token(&self, hash: &[u8; 32]) -> Option<&Node> {
        self.auth_tokens.get(hash).and_then(|id| self.nodes.get(id))
    }

    /// [`crate::Store::heartbeat`] answered from memory: the node holding the auth token
    /// `hash`, told to stop or touched in memory, when it and its deployment are held here
    /// and its heartbeat is not due to be written (see [`super::SqliteStore`]); `None`
    /// otherwise, for the caller to take the path through the file.
    pub(super) fn heartbeat(&mut self, hash: &[u8; 32], now: SystemTime) -> Option<Beat> {
        let node = self
            .auth_tokens
            .get(hash)
            .and_then(|id| self.nodes.get(id))?;
        let deployment = self.deployments.get(&node.deployment_id)?;
        if !crate::state::takes_heartbeats(node.status, deployment.status) {
            return Some(Beat::Stop);
        }
        let now_ms = to_ms(now);
        match self.heartbeats.get_mut(&node.id) {
            Some(heartbeat)
                if now_ms.saturating_sub(heartbeat.stored_ms) <= super::HEARTBEAT_FLUSH_MS =>
            {
                heartbeat.seen = now;
            }
            Some(_) => return None,
            None => {
                let stored_ms = to_ms(node.last_update);
                if now_ms.saturating_sub(stored_ms) > super::HEARTBEAT_FLUSH_MS {
                    return None;
                }
                let heartbeat = Heartbeat {
                    deployment_id: node.deployment_id.clone(),
                    seen: now,
                    stored_ms,
                };
                self.heartbeats.insert(node.id.clone(), heartbeat);
            }
        }
        Some(Beat::Live {
            deployment_id: std::sync::Arc::from(node.deployment_id.as_str()),
            node_index: node.index,
        })
    }

    /// Shows the newest heartbeat of each node as its `last_update`.
    pub(super) fn overlay_heartbeats(&self, nodes: &mut [Node]) {
        if self.heartbeats.is_empty() {
            return;
        }
        for node in nodes {
            if let Some(heartbeat) = self.heartbeats.get(&node.id) {
                node.last_update = heartbeat.seen;
            }
        }
    }

    /// Holds `node`, just read from or written to its row, while it is not final.
    pub(super) fn remember_node(&mut self, mut node: Node) {
        node.last_update = as_stored(node.last_update);
        let times = &mut node.times;
        for time in [
            &mut times.provisioning_at,
            &mut times.booting_at,
            &mut times.downloading_at,
            &mut times.started_at,
            &mut times.finished_at,
        ] {
            *time = time.map(as_stored);
        }
        // Most writes change neither whether the node is held nor its tokens: the copy is
        // replaced where it is, and the token indexes stay as they are.
        if let Some(held) = self.nodes.get_mut(&node.id) {
            if !node.status.is_final()
                && held.provision_token_hash == node.provision_token_hash
                && held.auth_token_hash == node.auth_token_hash
            {
                *held = node;
                return;
            }
        }
        self.forget_node(&node.id);
        if node.status.is_final() {
            return;
        }
        if let Some(hash) = node.provision_token_hash {
            self.provision_tokens.insert(hash, node.id.clone());
        }
        if let Some(hash) = node.auth_token_hash {
            self.auth_tokens.insert(hash, node.id.clone());
        }
        self.nodes.insert(node.id.clone(), node);
    }

    /// Stops holding the node `id` (and its token hashes).
    pub(super) fn forget_node(&mut self, id: &str) {
        let Some(node) = self.nodes.remove(id) else {
            return;
        };
        if let Some(hash) = node.provision_token_hash {
            self.provision_tokens.remove(&hash);
        }
        if let Some(hash) = node.auth_token_hash {
            self.auth_tokens.remove(&hash);
        }
    }

    /// Holds `deployment`, just read from or written to its row, while it is not final.
    pub(super) fn remember_deployment(&mut self, mut deployment: Deployment) {
        if deployment.status.is_final() {
            self.deployments.remove(&deployment.id);
            return;
        }
        deployment.created_at = as_stored(deployment.created_at);
        deployment.updated_at = as_stored(deployment.updated_at);
        deployment.completed_at = deployment.completed_at.map(as_stored);
        deployment.cleaned_at = deployment.cleaned_at.map(as_stored);
        match self.deployments.get_mut(&deployment.id) {
            Some(held) => *held = deployment,
            None => {
                self.deployments.insert(deployment.id.clone(), deployment);
            }
        }
    }

    /// Stops holding the deployment `id`.
    pub(super) fn forget_deployment(&mut self, id: &str) {
        self.deployments.remove(id);
    }

    /// Forgets everything of the deployment `id`, which was deleted.
    pub(super) fn forget_deleted_deployment(&mut self, id: &str) {
        self.deployments.remove(id);
        let nodes: Vec<String> = self
            .nodes
            .values()
            .filter(|node| node.deployment_id == id)
            .map(|node| node.id.clone())
            .collect();
        for node_id in nodes {
            self.forget_node(&node_id);
        }
        self.heartbeats
            .retain(|_, heartbeat| heartbeat.deployment_id != id);
        super::super::memory::shrink_if_sparse(&mut self.nodes);
        super::super::memory::shrink_if_sparse(&mut self.provision_tokens);
        super::super::memory::shrink_if_sparse(&mut self.auth_tokens);
        super::super::memory::shrink_if_sparse(&mut self.heartbeats);
    }

    /// Takes in what a committed transaction wrote: the rows now hold the nodes' newest
    /// times, and a node may be final, so their heartbeats are checked against the rows again.
    pub(super) fn committed(&mut self, pending: Pending) {
        for (id, node) in pending.nodes {
            self.heartbeats.remove(&id);
            self.remember_node(node);
        }
        for (_, deployment) in pending.deployments {
            self.remember_deployment(deployment);
        }
    }

    /// The node's row now holds `stored_ms` as its `last_update` (a heartbeat was saved).
    pub(super) fn heartbeat_saved(&mut self, node_id: &str, stored_ms: i64) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.last_update = from_ms(stored_ms).unwrap_or(node.last_update);
        }
    }
}
