//! [`MemoryStore`]: everything in memory, for embedding, `taskfly run` and tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;

use super::model::{self, Applied, Deployment, DeploymentStatus, Node, NodeUpdate};
use super::{dropped_lines_marker, node_log_cap, LogLine, LogQuery, LogStream, NewLogLine, Store};
use crate::error::{Error, Result};

/// Default cap on stored log lines per deployment.
const DEFAULT_MAX_LOG_LINES: usize = 1_000_000;

/// A [`Store`] that keeps everything in memory; lost when the process exits.
///
/// Logs are capped per node and per deployment ([`MemoryStore::max_log_lines`],
/// [`MemoryStore::max_log_lines_per_node`]; see [`Store::append_logs`]), so a chatty node
/// can exhaust neither memory nor the other nodes' share of the log.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_log_lines: usize,
    max_log_lines_per_node: Option<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    deployments: HashMap<String, Deployment>,
    nodes: HashMap<String, Node>,
    nodes_by_deployment: HashMap<String, Vec<String>>,
    provision_tokens: HashMap<[u8; 32], String>,
    auth_tokens: HashMap<[u8; 32], String>,
    logs: HashMap<String, DeploymentLog>,
    deliveries: HashMap<String, model::WebhookDelivery>,
}

#[derive(Debug, Default)]
struct DeploymentLog {
    /// Every stored line by `seq`.
    lines: BTreeMap<u64, LogLine>,
    /// Per node index, which of `lines` are its own.
    nodes: HashMap<u32, NodeLog>,
    last_seq: u64,
    /// Per node, attempt and stream, the next line number expected; lower ones are resent
    /// duplicates. (Numbers rise within each stream whichever way an agent numbers them.)
    next_line_no: HashMap<(String, u32, LogStream), u64>,
}

/// One node's lines in a [`DeploymentLog`].
#[derive(Debug, Default)]
struct NodeLog {
    /// The `seq`s of its lines, oldest first, its marker not included.
    seqs: VecDeque<u64>,
    /// The `seq` of the line saying how many of its lines were dropped, older than all `seqs`.
    marker: Option<u64>,
    dropped: u64,
}

impl NodeLog {
    /// Lines stored, its marker included.
    fn stored(&self) -> usize {
        self.seqs.len() + usize::from(self.marker.is_some())
    }
}

impl DeploymentLog {
    /// Drop the oldest `count` (at least 1, at most all) lines of node `index`: the newest
    /// of them becomes its marker, the previous marker goes.
    fn drop_oldest(&mut self, index: u32, count: usize) {
        let Some(node) = self.nodes.get_mut(&index) else {
            return;
        };
        let mut newest = None;
        for _ in 0..count.min(node.seqs.len()) {
            if let Some(seq) = node.seqs.pop_front() {
                node.dropped += 1;
                newest = self.lines.remove(&seq);
            }
        }
        let Some(mut marker) = newest else {
            return;
        };
        if let Some(old) = node.marker.take() {
            self.lines.remove(&old);
        }
        marker.stream = LogStream::Stderr;
        marker.line = dropped_lines_marker(index, node.dropped);
        node.marker = Some(marker.seq);
        self.lines.insert(marker.seq, marker);
    }

    /// Lines of node `index` to drop so it stores at most `cap` (its marker included).
    fn excess(&self, index: u32, cap: usize) -> usize {
        self.nodes.get(&index).map_or(0, |node| {
            if node.stored() > cap {
                node.seqs.len() + 1 - cap
            } else {
                0
            }
        })
    }

    /// Keep each node in `touched` within `node_cap` lines and the whole log within
    /// `deployment_cap`, dropping from the node holding the most.
    fn enforce_caps(&mut self, touched: &[u32], node_cap: usize, deployment_cap: usize) {
        for &index in touched {
            let excess = self.excess(index, node_cap);
            if excess > 0 {
                self.drop_oldest(index, excess);
            }
        }
        while self.lines.len() > deployment_cap {
            let Some((&index, node)) = self
                .nodes
                .iter()
                .filter(|(_, node)| !node.seqs.is_empty())
                .max_by_key(|(index, node)| (node.stored(), std::cmp::Reverse(**index)))
            else {
                break;
            };
            let over = self.lines.len() - deployment_cap;
            let count = over + usize::from(node.marker.is_none());
            self.drop_oldest(index, count);
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            max_log_lines: DEFAULT_MAX_LOG_LINES,
            max_log_lines_per_node: None,
        }
    }

    /// Keep at most this many log lines per deployment (default 1,000,000).
    #[must_use]
    pub fn max_log_lines(mut self, lines: usize) -> Self {
        self.max_log_lines = lines.max(1);
        self
    }

    /// Keep at most this many log lines per node (at least 2; default half of
    /// [`MemoryStore::max_log_lines`]).
    #[must_use]
    pub fn max_log_lines_per_node(mut self, lines: usize) -> Self {
        self.max_log_lines_per_node = Some(lines.max(2));
        self
    }

    fn node_cap(&self) -> usize {
        node_log_cap(self.max_log_lines_per_node, self.max_log_lines)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (every update
        // is computed on copies first), so a poisoned lock is still consistent.
        crate::sync::lock(&self.inner)
    }
}

impl Inner {
    /// Give back the memory of maps that cleanup left mostly empty: a map keeps its largest
    /// size until shrunk, so without this one 100,000-node deployment, cleaned up, would hold
    /// its maps' memory for good.
    fn shrink_if_sparse(&mut self) {
        shrink_if_sparse(&mut self.deployments);
        shrink_if_sparse(&mut self.nodes);
        shrink_if_sparse(&mut self.nodes_by_deployment);
        shrink_if_sparse(&mut self.provision_tokens);
        shrink_if_sparse(&mut self.auth_tokens);
        shrink_if_sparse(&mut self.logs);
    }
}

/// Shrinks `map` when at most a quarter of its room is used (and the room is worth giving
/// back), so a map that grows and shrinks by turns is not reallocated every time.
pub(crate) fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() <= map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

fn unknown_deployment(id: &str) -> Error {
    Error::not_found(format!("no deployment `{id}`"))
}

/// The provision and auth token indexes (hash to node id).
type TokenIndexes<'a> = (
    &'a mut HashMap<[u8; 32], String>,
    &'a mut HashMap<[u8; 32], String>,
);

fn index_tokens(
    (provision_tokens, auth_tokens): TokenIndexes<'_>,
    before: Option<&Node>,
    after: &Node,
) {
    if let Some(before) = before {
        if let Some(hash) = before.provision_token_hash {
            provision_tokens.remove(&hash);
        }
        if let Some(hash) = before.auth_token_hash {
            auth_tokens.remove(&hash);
        }
    }
    if let Some(hash) = after.provision_token_hash {
        provision_tokens.insert(hash, after.id.clone());
    }
    if let Some(hash) = after.auth_token_hash {
        auth_tokens.insert(hash, after.id.clone());
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_deployment(&self, deployment: Deployment, nodes: Vec<Node>) -> Result<()> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.deployments.contains_key(&deployment.id) {
            return Err(Error::already_exists(format!(
                "deployment `{}` already exists",
                deployment.id
            )));
        }
        // Kept by index, as `nodes` answers (a rerun's indexes may come in any order).
        let mut by_index: Vec<(u32, String)> =
            nodes.iter().map(|n| (n.index, n.id.clone())).collect();
        by_index.sort_unstable();
        let ids = by_index.into_iter().map(|(_, id)| id).collect();
        for node in nodes {
            index_tokens(
                (&mut inner.provision_tokens, &mut inner.auth_tokens),
                None,
                &node,
            );
            inner.nodes.insert(node.id.clone(), node);
        }
        inner.nodes_by_deployment.insert(deployment.id.clone(), ids);
        inner.deployments.insert(deployment.id.clone(), deployment);
        Ok(())
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        Ok(self.lock().deployments.get(id).cloned())
    }

    async fn deployments(&self) -> Result<Vec<Deployment>> {
        let mut all: Vec<Deployment> = self.lock().deployments.values().cloned().collect();
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(all)
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        Ok(self.lock().nodes.get(node_id).cloned())
    }

    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>> {
        let inner = self.lock();
        let ids = inner
            .nodes_by_deployment
            .get(deployment_id)
            .ok_or_else(|| unknown_deployment(deployment_id))?;
        Ok(ids
            .iter()
            .filter_map(|id| inner.nodes.get(id).cloned())
            .collect())
    }

    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        let inner = self.lock();
        Ok(inner
            .provision_tokens
            .get(hash)
            .and_then(|id| inner.nodes.get(id))
            .cloned())
    }

    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        let inner = self.lock();
        Ok(inner
            .auth_tokens
            .get(hash)
            .and_then(|id| inner.nodes.get(id))
            .cloned())
    }

    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> Result<Applied> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let stored = inner
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::not_found(format!("no node `{node_id}`")))?;
        let stored_deployment = inner
            .deployments
            .get_mut(&stored.deployment_id)
            .ok_or_else(|| unknown_deployment(&stored.deployment_id))?;
        // Computed on copies, so a refused update changes nothing; written back in place.
        let mut node = stored.clone();
        let mut deployment = stored_deployment.clone();
        let applied = model::apply_node_update(&mut deployment, &mut node, update, now)?;
        let tokens_changed = node.provision_token_hash != stored.provision_token_hash
            || node.auth_token_hash != stored.auth_token_hash;
        let before = std::mem::replace(stored, node);
        *stored_deployment = deployment;
        if tokens_changed {
            let tokens = (&mut inner.provision_tokens, &mut inner.auth_tokens);
            index_tokens(tokens, Some(&before), stored);
        }
        Ok(applied)
    }

    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<Deployment> {
        let mut inner = self.lock();
        let deployment = inner
            .deployments
            .get_mut(id)
            .ok_or_else(|| unknown_deployment(id))?;
        let mut next = deployment.clone();
        model::apply_deployment_status(&mut next, to, message, now)?;
        *deployment = next.clone();
        Ok(next)
    }

    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<()> {
        if let Some(node) = self.lock().nodes.get_mut(node_id) {
            if !node.status.is_final() {
                node.last_update = now;
            }
        }
        Ok(())
    }

    async fn append_logs(&self, deployment_id: &str, lines: Vec<NewLogLine>) -> Result<u64> {
        let mut inner = self.lock();
        if !inner.deployments.contains_key(deployment_id) {
            return Err(unknown_deployment(deployment_id));
        }
        let node_cap = self.node_cap();
        let log = inner.logs.entry(deployment_id.to_owned()).or_default();
        let mut touched = Vec::new();
        for line in lines {
            if let Some(line_no) = line.line_no {
                let next = log
                    .next_line_no
                    .entry((line.node_id.clone(), line.attempt, line.stream))
                    .or_insert(0);
                if line_no < *next {
                    continue;
                }
                *next = line_no + 1;
            }
            log.last_seq += 1;
            let node = log.nodes.entry(line.node_index).or_default();
            node.seqs.push_back(log.last_seq);
            if !touched.contains(&line.node_index) {
                touched.push(line.node_index);
            }
            log.lines.insert(
                log.last_seq,
                LogLine {
                    seq: log.last_seq,
                    node_id: line.node_id,
                    node_index: line.node_index,
                    stream: line.stream,
                    line: line.line,
                    timestamp: line.timestamp,
                    attempt: line.attempt,
                },
            );
        }
        log.enforce_caps(&touched, node_cap, self.max_log_lines);
        Ok(log.last_seq)
    }

    async fn last_line_no(
        &self,
        deployment_id: &str,
        node_id: &str,
        attempt: u32,
        stream: LogStream,
    ) -> Result<Option<u64>> {
        let inner = self.lock();
        let next = inner.logs.get(deployment_id).and_then(|log| {
            log.next_line_no
                .get(&(node_id.to_owned(), attempt, stream))
                .copied()
        });
        Ok(next.and_then(|next| next.checked_sub(1)))
    }

    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>> {
        let inner = self.lock();
        if !inner.deployments.contains_key(deployment_id) {
            return Err(unknown_deployment(deployment_id));
        }
        let Some(log) = inner.logs.get(deployment_id) else {
            return Ok(Vec::new());
        };
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for line in log
            .lines
            .range(query.after.saturating_add(1)..)
            .map(|(_, line)| line)
            .filter(|l| query.node_index.is_none_or(|i| l.node_index == i))
        {
            if !query.has_room(page.len(), bytes, line.line.len()) {
                break;
            }
            bytes += line.line.len();
            page.push(line.clone());
        }
        Ok(page)
    }

    async fn delete_deployment(&self, id: &str) -> Result<bool> {
        let mut inner = self.lock();
        let Some(_) = inner.deployments.remove(id) else {
            return Ok(false);
        };
        for node_id in inner.nodes_by_deployment.remove(id).unwrap_or_default() {
            if let Some(node) = inner.nodes.remove(&node_id) {
                if let Some(hash) = node.provision_token_hash {
                    inner.provision_tokens.remove(&hash);
                }
                if let Some(hash) = node.auth_token_hash {
                    inner.auth_tokens.remove(&hash);
                }
            }
        }
        inner.logs.remove(id);
        inner.deliveries.remove(id);
        inner.shrink_if_sparse();
        Ok(true)
    }

    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> Result<bool> {
        let mut inner = self.lock();
        let Some(deployment) = inner.deployments.get_mut(id) else {
            return Ok(false);
        };
        deployment.cleaned_at.get_or_insert(at);
        Ok(true)
    }

    async fn save_delivery(&self, delivery: model::WebhookDelivery) -> Result<()> {
        let mut inner = self.lock();
        if !inner.deployments.contains_key(&delivery.deployment_id) {
            return Err(Error::not_found(format!(
                "no deployment `{}`",
                delivery.deployment_id
            )));
        }
        inner
            .deliveries
            .insert(delivery.deployment_id.clone(), delivery);
        Ok(())
    }

    async fn delivery(&self, deployment_id: &str) -> Result<Option<model::WebhookDelivery>> {
        Ok(self.lock().deliveries.get(deployment_id).cloned())
    }

    async fn pending_deliveries(&self) -> Result<Vec<model::WebhookDelivery>> {
        let mut pending: Vec<model::WebhookDelivery> = self
            .lock()
            .deliveries
            .values()
            .filter(|d| d.status == model::DeliveryStatus::Pending)
            .cloned()
            .collect();
        pending.sort_by(|a, b| {
            (a.created_at, &a.deployment_id).cmp(&(b.created_at, &b.deployment_id))
        });
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn deployment(id: &str, total_nodes: u32) -> Deployment {
        Deployment {
            id: id.to_owned(),
            status: DeploymentStatus::Pending,
            cloud_provider: "local".to_owned(),
            total_nodes,
            retries: 0,
            nodes_completed: 0,
            nodes_failed: 0,
            nodes_terminated: 0,
            created_at: UNIX_EPOCH,
            updated_at: UNIX_EPOCH,
            completed_at: None,
            error_message: None,
            rerun_of: None,
            cleaned_at: None,
        }
    }

    #[tokio::test]
    async fn cleanup_of_a_large_deployment_gives_its_maps_memory_back() {
        let store = MemoryStore::new();
        store
            .create_deployment(
                deployment("dep-small", 2),
                vec![Node::new("dep-small", 0, UNIX_EPOCH)],
            )
            .await
            .unwrap();
        let nodes = (0..20_000)
            .map(|i| {
                let mut node = Node::new("dep-large", i, UNIX_EPOCH);
                let mut hash = [0u8; 32];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                node.provision_token_hash = Some(hash);
                node
            })
            .collect();
        store
            .create_deployment(deployment("dep-large", 20_000), nodes)
            .await
            .unwrap();
        assert!(store.lock().nodes.capacity() >= 20_001);
        assert!(store.delete_deployment("dep-large").await.unwrap());
        let inner = store.lock();
        assert!(inner.nodes.capacity() < 1024, "{}", inner.nodes.capacity());
        assert!(
            inner.provision_tokens.capacity() < 1024,
            "{}",
            inner.provision_tokens.capacity()
        );
        assert_eq!(inner.nodes.len(), 1, "the other deployment's node stays");
    }
}
