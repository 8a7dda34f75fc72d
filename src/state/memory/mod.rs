//! [`MemoryStore`]: everything in memory, for embedding, `taskfly run` and tests.
//!
//! Laid out for deployments of 100,000 nodes: each deployment holds its nodes in one vector
//! of compact records ([`NodeRecord`]) in index order and its log in one vector of compact
//! lines ([`log::DeploymentLog`]); node ids are not kept (the engine names nodes
//! `<deployment id>-<index>`, which is parsed back), and the token indexes point at a record
//! by deployment and position instead of holding a copy of the node id. [`Node`]s are made on
//! the way out.

mod log;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

use super::model::{self, Applied, Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate};
use super::{
    node_log_cap, takes_heartbeats, Heartbeat, LogLine, LogQuery, LogStream, NewLogLine, Store,
};
use crate::error::{Error, Result};
use log::{canonical_index, DeploymentLog};

/// Default cap on stored log lines per deployment.
const DEFAULT_MAX_LOG_LINES: usize = 1_000_000;

/// A [`Store`] that keeps everything in memory; lost when the process exits.
///
/// Logs are capped per node and per deployment ([`MemoryStore::max_log_lines`],
/// [`MemoryStore::max_log_lines_per_node`]; see [`Store::append_logs`]), so a chatty node
/// can exhaust neither memory nor the other nodes' share of the log.
///
/// Memory, per node of a deployment kept (running or finished, until it is forgotten): its
/// record (224 bytes), about 75 bytes per token index entry (at most two), its strings
/// (instance id, locator and address, an error message), and its log: 56 bytes per line plus
/// its text, and about 120 bytes per node that wrote any. A finished node with one log line
/// measured 0.85 – 1.06 KB of RSS with the allocator's overhead (BENCHMARKS.md, "Memory at
/// 100,000 nodes"). When a deployment ends its log gives back the room it reserved to grow;
/// forgetting it ([`Store::delete_deployment`]) frees all of it, and shrinks the store's maps
/// once they are mostly empty; the provision token index also shrinks as nodes register and
/// use their tokens up. Creating a deployment from its node indexes
/// ([`Store::create_deployment_with_indexes`], as the engine does) builds the records
/// directly: nothing but the records is allocated for its nodes, where
/// [`Store::create_deployment`] briefly holds the given `Node`s (352 bytes each and their
/// ids) besides.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_log_lines: usize,
    max_log_lines_per_node: Option<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By id. Ids are drawn by the engine (`dep-` and 64 random bits), so hashed cheaply
    /// ([`crate::auth::DrawnKeys`]): every node request looks its deployment up.
    deployments: HashMap<Arc<str>, Entry, crate::auth::DrawnKeys>,
    /// Nodes whose id is not `<deployment id>-<index>` (never the engine's own): by id.
    odd_node_ids: HashMap<Box<str>, NodeKey>,
    provision_tokens: HashMap<[u8; 32], NodeKey>,
    /// Looked up by every node request: hashed cheaply ([`crate::auth::DrawnKeys`]).
    auth_tokens: HashMap<[u8; 32], NodeKey, crate::auth::DrawnKeys>,
    deliveries: HashMap<String, model::WebhookDelivery>,
}

/// One deployment with its nodes and log.
#[derive(Debug)]
struct Entry {
    deployment: Deployment,
    /// Its nodes, by ascending index.
    nodes: Vec<NodeRecord>,
    log: DeploymentLog,
}

/// Where a node is: its deployment, and its position in that deployment's `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeKey {
    deployment: Arc<str>,
    position: u32,
}

/// A [`Node`] as the store keeps it: no ids (see the module's doc), strings boxed to their
/// length, times packed. 224 bytes, against 352 for a `Node` and its id copies.
#[derive(Debug)]
struct NodeRecord {
    /// The node's id, when it is not `<deployment id>-<index>`.
    odd_id: Option<Box<str>>,
    index: u32,
    attempt: u32,
    status: NodeStatus,
    exit_code: Option<i32>,
    /// `last_update` and `times`.
    clock: Clock,
    provision_token_hash: Option<[u8; 32]>,
    auth_token_hash: Option<[u8; 32]>,
    instance_id: Option<Box<str>>,
    instance_locator: Option<Box<str>>,
    ip_address: Option<Box<str>>,
    error_message: Option<Box<str>>,
}

fn boxed(text: &Option<String>) -> Option<Box<str>> {
    text.as_deref().map(Box::from)
}

/// `stored`, set to `text` unless it already holds it (no reallocation for the unchanged).
fn set_boxed(stored: &mut Option<Box<str>>, text: &Option<String>) {
    if stored.as_deref() != text.as_deref() {
        *stored = boxed(text);
    }
}

impl NodeRecord {
    fn new(node: &Node, deployment_id: &str) -> NodeRecord {
        let canonical = canonical_index(deployment_id, &node.id) == Some(node.index);
        NodeRecord {
            odd_id: (!canonical).then(|| Box::from(node.id.as_str())),
            index: node.index,
            attempt: node.attempt,
            status: node.status,
            exit_code: node.exit_code,
            clock: Clock::new(node.last_update, &node.times),
            provision_token_hash: node.provision_token_hash,
            auth_token_hash: node.auth_token_hash,
            instance_id: boxed(&node.instance_id),
            instance_locator: boxed(&node.instance_locator),
            ip_address: boxed(&node.ip_address),
            error_message: boxed(&node.error_message),
        }
    }

    /// A new node's record, as [`Node::new`] makes it (built without one: see
    /// [`Store::create_deployment_with_indexes`]).
    fn fresh(index: u32, now: SystemTime) -> NodeRecord {
        NodeRecord {
            odd_id: None,
            index,
            attempt: 1,
            status: NodeStatus::Pending,
            exit_code: None,
            clock: Clock::new(now, &model::PhaseTimes::default()),
            provision_token_hash: None,
            auth_token_hash: None,
            instance_id: None,
            instance_locator: None,
            ip_address: None,
            error_message: None,
        }
    }

    /// The node, of deployment `deployment_id`.
    fn to_node(&self, deployment_id: &str) -> Node {
        let text = |s: &Option<Box<str>>| s.as_deref().map(str::to_owned);
        let (last_update, times) = self.clock.get();
        Node {
            id: match &self.odd_id {
                Some(id) => id.to_string(),
                None => model::node_id(deployment_id, self.index),
            },
            deployment_id: deployment_id.to_owned(),
            index: self.index,
            status: self.status,
            attempt: self.attempt,
            instance_id: text(&self.instance_id),
            instance_locator: text(&self.instance_locator),
            ip_address: text(&self.ip_address),
            last_update,
            exit_code: self.exit_code,
            error_message: text(&self.error_message),
            provision_token_hash: self.provision_token_hash,
            auth_token_hash: self.auth_token_hash,
            times,
            queue_reason: None,
        }
    }

    /// Takes on what an update changed in `node` (its ids never change).
    fn update_from(&mut self, node: &Node) {
        self.attempt = node.attempt;
        self.status = node.status;
        self.exit_code = node.exit_code;
        self.clock = Clock::new(node.last_update, &node.times);
        self.provision_token_hash = node.provision_token_hash;
        self.auth_token_hash = node.auth_token_hash;
        set_boxed(&mut self.instance_id, &node.instance_id);
        set_boxed(&mut self.instance_locator, &node.instance_locator);
        set_boxed(&mut self.ip_address, &node.ip_address);
        set_boxed(&mut self.error_message, &node.error_message);
    }
}

/// A node's `last_update` and phase times, packed as nanoseconds since the Unix epoch plus
/// one (0 for none): 56 bytes instead of 96. Times that do not fit (before 1970, after 2554)
/// are kept as they are, so every time reads back exactly as it was stored.
#[derive(Debug)]
enum Clock {
    /// `last_update`, then the phase times in [`model::PhaseTimes`]' order.
    Packed([u64; 6]),
    Unpacked(Box<(SystemTime, model::PhaseTimes)>),
}

impl Clock {
    fn new(last_update: SystemTime, times: &model::PhaseTimes) -> Clock {
        let phases = [
            times.provisioning_at,
            times.booting_at,
            times.downloading_at,
            times.started_at,
            times.finished_at,
        ];
        let mut packed = [0; 6];
        let fits = std::iter::once(Some(last_update))
            .chain(phases)
            .zip(&mut packed)
            .all(|(time, slot)| match time {
                None => true,
                Some(time) => pack_time(time).map(|nanos| *slot = nanos).is_some(),
            });
        if fits {
            Clock::Packed(packed)
        } else {
            Clock::Unpacked(Box::new((last_update, *times)))
        }
    }

    fn get(&self) -> (SystemTime, model::PhaseTimes) {
        match self {
            Clock::Packed(packed) => {
                let [last_update, provisioning, booting, downloading, started, finished] =
                    packed.map(unpack_time);
                let times = model::PhaseTimes {
                    provisioning_at: provisioning,
                    booting_at: booting,
                    downloading_at: downloading,
                    started_at: started,
                    finished_at: finished,
                };
                (last_update.unwrap_or(SystemTime::UNIX_EPOCH), times)
            }
            Clock::Unpacked(unpacked) => **unpacked,
        }
    }

    fn set_last_update(&mut self, now: SystemTime) {
        match (&mut *self, pack_time(now)) {
            (Clock::Packed(packed), Some(nanos)) => packed[0] = nanos,
            _ => {
                let (_, times) = self.get();
                *self = Clock::new(now, &times);
            }
        }
    }
}

/// `time` as nanoseconds since the Unix epoch plus one, if that fits in a `u64`.
fn pack_time(time: SystemTime) -> Option<u64> {
    let nanos = time.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_nanos();
    u64::try_from(nanos.checked_add(1)?).ok()
}

fn unpack_time(packed: u64) -> Option<SystemTime> {
    let nanos = packed.checked_sub(1)?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

impl Entry {
    /// The position of node `index` in `nodes`.
    fn position(&self, index: u32) -> Option<usize> {
        // Indexes are usually 0..n, so the node sits at its index; a rerun's are not.
        let guess = index as usize;
        if self.nodes.get(guess).is_some_and(|n| n.index == index) {
            return Some(guess);
        }
        self.nodes.binary_search_by_key(&index, |n| n.index).ok()
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
    /// Where node `node_id` is.
    fn key_of(&self, node_id: &str) -> Option<NodeKey> {
        if let Some(key) = self.odd_node_ids.get(node_id) {
            return Some(key.clone());
        }
        let (deployment_id, _) = node_id.rsplit_once('-')?;
        let (deployment, entry) = self.deployments.get_key_value(deployment_id)?;
        let index = canonical_index(deployment_id, node_id)?;
        let position = entry.position(index)?;
        entry.nodes[position].odd_id.is_none().then(|| NodeKey {
            deployment: Arc::clone(deployment),
            position: position as u32,
        })
    }

    /// Stores a new deployment with its nodes' records, in any order.
    fn insert(&mut self, deployment: Deployment, mut records: Vec<NodeRecord>) -> Result<()> {
        if self.deployments.contains_key(deployment.id.as_str()) {
            return Err(Error::already_exists(format!(
                "deployment `{}` already exists",
                deployment.id
            )));
        }
        // Kept by index, as `nodes` answers (a rerun's indexes may come in any order).
        records.sort_unstable_by_key(|r| r.index);
        if let Some(pair) = records
            .windows(2)
            .find(|pair| pair[0].index == pair[1].index)
        {
            return Err(super::repeated_index(&deployment.id, pair[0].index));
        }
        let id: Arc<str> = Arc::from(deployment.id.as_str());
        for (position, record) in records.iter().enumerate() {
            let key = NodeKey {
                deployment: Arc::clone(&id),
                position: position as u32,
            };
            if let Some(odd) = &record.odd_id {
                self.odd_node_ids.insert(odd.clone(), key.clone());
            }
            let tokens = (&mut self.provision_tokens, &mut self.auth_tokens);
            let hashes = (record.provision_token_hash, record.auth_token_hash);
            index_tokens(tokens, &key, (None, None), hashes);
        }
        self.deployments.insert(
            id,
            Entry {
                deployment,
                nodes: records,
                log: DeploymentLog::default(),
            },
        );
        Ok(())
    }

    /// The node at `key`, as a [`Node`].
    fn node_at(&self, key: &NodeKey) -> Option<Node> {
        let entry = self.deployments.get(&key.deployment)?;
        let record = entry.nodes.get(key.position as usize)?;
        Some(record.to_node(&key.deployment))
    }

    /// Give back the memory of maps that cleanup left mostly empty: a map keeps its largest
    /// size until shrunk, so without this one 100,000-node deployment, cleaned up, would hold
    /// its maps' memory for good.
    fn shrink_if_sparse(&mut self) {
        shrink_if_sparse(&mut self.deployments);
        shrink_if_sparse(&mut self.odd_node_ids);
        shrink_if_sparse(&mut self.provision_tokens);
        shrink_if_sparse(&mut self.auth_tokens);
        shrink_if_sparse(&mut self.deliveries);
    }
}

/// Shrinks `map` when at most a quarter of its room is used (and the room is worth giving
/// back), so a map that grows and shrinks by turns is not reallocated every time.
pub(crate) fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 1024 && map.len() <= map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

fn unknown_deployment(id: &str) -> Error {
    Error::not_found(format!("no deployment `{id}`"))
}

/// The provision and auth token indexes (hash to node).
type TokenIndexes<'a> = (
    &'a mut HashMap<[u8; 32], NodeKey>,
    &'a mut HashMap<[u8; 32], NodeKey, crate::auth::DrawnKeys>,
);

/// Moves the entries of the node at `key` in the token indexes from its hashes `before`
/// (none for a new node) to its hashes `after`.
fn index_tokens(
    (provision_tokens, auth_tokens): TokenIndexes<'_>,
    key: &NodeKey,
    before: (Option<[u8; 32]>, Option<[u8; 32]>),
    after: (Option<[u8; 32]>, Option<[u8; 32]>),
) {
    if let Some(hash) = before.0 {
        if provision_tokens.get(&hash) == Some(key) {
            provision_tokens.remove(&hash);
        }
    }
    if let Some(hash) = before.1 {
        if auth_tokens.get(&hash) == Some(key) {
            auth_tokens.remove(&hash);
        }
    }
    if let Some(hash) = after.0 {
        provision_tokens.insert(hash, key.clone());
    }
    if let Some(hash) = after.1 {
        auth_tokens.insert(hash, key.clone());
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_deployment(&self, deployment: Deployment, nodes: Vec<Node>) -> Result<()> {
        if let Some(stray) = nodes.iter().find(|n| n.deployment_id != deployment.id) {
            return Err(Error::invalid_input(format!(
                "node `{}` belongs to deployment `{}`, not to `{}`",
                stray.id, stray.deployment_id, deployment.id
            )));
        }
        let records = nodes
            .iter()
            .map(|node| NodeRecord::new(node, &deployment.id))
            .collect();
        drop(nodes);
        self.lock().insert(deployment, records)
    }

    async fn create_deployment_with_indexes(
        &self,
        deployment: Deployment,
        node_indexes: &[u32],
    ) -> Result<()> {
        let created_at = deployment.created_at;
        let records = node_indexes
            .iter()
            .map(|&index| NodeRecord::fresh(index, created_at))
            .collect();
        self.lock().insert(deployment, records)
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        Ok(self
            .lock()
            .deployments
            .get(id)
            .map(|entry| entry.deployment.clone()))
    }

    async fn deployments(&self) -> Result<Vec<Deployment>> {
        let mut all: Vec<Deployment> = self
            .lock()
            .deployments
            .values()
            .map(|entry| entry.deployment.clone())
            .collect();
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(all)
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        let inner = self.lock();
        Ok(inner.key_of(node_id).and_then(|key| inner.node_at(&key)))
    }

    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>> {
        let inner = self.lock();
        let (id, entry) = inner
            .deployments
            .get_key_value(deployment_id)
            .ok_or_else(|| unknown_deployment(deployment_id))?;
        Ok(entry.nodes.iter().map(|r| r.to_node(id)).collect())
    }

    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        let inner = self.lock();
        Ok(inner
            .provision_tokens
            .get(hash)
            .and_then(|key| inner.node_at(key)))
    }

    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        let inner = self.lock();
        Ok(inner
            .auth_tokens
            .get(hash)
            .and_then(|key| inner.node_at(key)))
    }

    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> Result<Applied> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let not_found = || Error::not_found(format!("no node `{node_id}`"));
        let key = inner.key_of(node_id).ok_or_else(not_found)?;
        let entry = inner
            .deployments
            .get_mut(&key.deployment)
            .ok_or_else(|| unknown_deployment(&key.deployment))?;
        let record = entry
            .nodes
            .get_mut(key.position as usize)
            .ok_or_else(not_found)?;
        // Computed on copies, so a refused update changes nothing; written back in place.
        let mut node = record.to_node(&key.deployment);
        let mut deployment = entry.deployment.clone();
        let applied = model::apply_node_update(&mut deployment, &mut node, update, now)?;
        let before = (record.provision_token_hash, record.auth_token_hash);
        let after = (node.provision_token_hash, node.auth_token_hash);
        record.update_from(&node);
        entry.deployment = deployment;
        if applied
            .deployment_changed
            .is_some_and(DeploymentStatus::is_final)
        {
            entry.log.shrink();
        }
        if before != after {
            let tokens = (&mut inner.provision_tokens, &mut inner.auth_tokens);
            index_tokens(tokens, &key, before, after);
            // Provision tokens are used up as nodes register: their index, as large as the
            // deployment when every node waited at once, need not stay so until it is
            // forgotten (7.5 MB at 100,000 nodes).
            shrink_if_sparse(&mut inner.provision_tokens);
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
        let entry = inner
            .deployments
            .get_mut(id)
            .ok_or_else(|| unknown_deployment(id))?;
        let mut next = entry.deployment.clone();
        model::apply_deployment_status(&mut next, to, message, now)?;
        entry.deployment = next.clone();
        if to.is_final() {
            entry.log.shrink();
        }
        Ok(next)
    }

    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<()> {
        let mut inner = self.lock();
        let Some(key) = inner.key_of(node_id) else {
            return Ok(());
        };
        let record = inner
            .deployments
            .get_mut(&key.deployment)
            .and_then(|entry| entry.nodes.get_mut(key.position as usize));
        if let Some(record) = record {
            if !record.status.is_final() {
                record.clock.set_last_update(now);
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, auth_token_hash: &[u8; 32], now: SystemTime) -> Result<Heartbeat> {
        // Two lookups (token, deployment), no copy of the node or its deployment.
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(key) = inner.auth_tokens.get(auth_token_hash) else {
            return Ok(Heartbeat::UnknownToken);
        };
        let entry = inner
            .deployments
            .get_mut(&key.deployment)
            .ok_or_else(|| unknown_deployment(&key.deployment))?;
        let Some(record) = entry.nodes.get_mut(key.position as usize) else {
            return Ok(Heartbeat::UnknownToken);
        };
        if !takes_heartbeats(record.status, entry.deployment.status) {
            return Ok(Heartbeat::Stop);
        }
        record.clock.set_last_update(now);
        Ok(Heartbeat::Live {
            deployment_id: Arc::clone(&key.deployment),
            node_index: record.index,
        })
    }

    async fn append_logs(&self, deployment_id: &str, lines: Vec<NewLogLine>) -> Result<u64> {
        let node_cap = self.node_cap();
        let mut inner = self.lock();
        let entry = inner
            .deployments
            .get_mut(deployment_id)
            .ok_or_else(|| unknown_deployment(deployment_id))?;
        let id = &entry.deployment.id;
        Ok(entry.log.append(id, lines, node_cap, self.max_log_lines))
    }

    async fn last_line_no(
        &self,
        deployment_id: &str,
        node_id: &str,
        attempt: u32,
        stream: LogStream,
    ) -> Result<Option<u64>> {
        let inner = self.lock();
        let Some(entry) = inner.deployments.get(deployment_id) else {
            return Ok(None);
        };
        let log = &entry.log;
        let index = canonical_index(deployment_id, node_id)
            .filter(|&index| log.has_canonical_id(index))
            .or_else(|| log.index_of_odd_node_id(node_id));
        Ok(index.and_then(|index| log.last_line_no(index, attempt, stream)))
    }

    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>> {
        let inner = self.lock();
        let entry = inner
            .deployments
            .get(deployment_id)
            .ok_or_else(|| unknown_deployment(deployment_id))?;
        Ok(entry.log.page(deployment_id, &query))
    }

    async fn delete_deployment(&self, id: &str) -> Result<bool> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some((id, entry)) = inner.deployments.remove_entry(id) else {
            return Ok(false);
        };
        for (position, record) in entry.nodes.iter().enumerate() {
            let key = NodeKey {
                deployment: Arc::clone(&id),
                position: position as u32,
            };
            let tokens = (&mut inner.provision_tokens, &mut inner.auth_tokens);
            let hashes = (record.provision_token_hash, record.auth_token_hash);
            index_tokens(tokens, &key, hashes, (None, None));
            if let Some(odd) = &record.odd_id {
                inner.odd_node_ids.remove(odd);
            }
        }
        drop(entry);
        inner.deliveries.remove(&*id);
        inner.shrink_if_sparse();
        Ok(true)
    }

    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> Result<bool> {
        let mut inner = self.lock();
        let Some(entry) = inner.deployments.get_mut(id) else {
            return Ok(false);
        };
        entry.deployment.cleaned_at.get_or_insert(at);
        Ok(true)
    }

    async fn save_delivery(&self, delivery: model::WebhookDelivery) -> Result<()> {
        let mut inner = self.lock();
        if !inner
            .deployments
            .contains_key(delivery.deployment_id.as_str())
        {
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
        assert!(store.lock().provision_tokens.capacity() >= 20_000);
        assert!(store.delete_deployment("dep-large").await.unwrap());
        let inner = store.lock();
        assert!(
            inner.provision_tokens.capacity() < 1024,
            "{}",
            inner.provision_tokens.capacity()
        );
        assert_eq!(
            inner.deployments["dep-small"].nodes.len(),
            1,
            "the other deployment's node stays"
        );
    }

    #[tokio::test]
    async fn the_provision_token_index_shrinks_as_nodes_register() {
        let store = MemoryStore::new();
        let total = 20_000;
        let hash = |i: u32, kind: u8| {
            let mut hash = [kind; 32];
            hash[..4].copy_from_slice(&i.to_le_bytes());
            hash
        };
        let nodes = (0..total)
            .map(|i| {
                let mut node = Node::new("dep-booting", i, UNIX_EPOCH);
                node.status = NodeStatus::Booting;
                node.provision_token_hash = Some(hash(i, 1));
                node
            })
            .collect();
        let booting = Deployment {
            status: DeploymentStatus::Provisioning,
            ..deployment("dep-booting", total)
        };
        store.create_deployment(booting, nodes).await.unwrap();
        assert!(store.lock().provision_tokens.capacity() >= 20_000);
        for i in 0..total {
            let registered = NodeUpdate::Registered {
                auth_token_hash: hash(i, 2),
            };
            store
                .update_node(&format!("dep-booting-{i}"), registered, UNIX_EPOCH)
                .await
                .unwrap();
        }
        let inner = store.lock();
        assert!(inner.provision_tokens.is_empty());
        assert!(
            inner.provision_tokens.capacity() <= 1024 * 4,
            "{}",
            inner.provision_tokens.capacity()
        );
        assert_eq!(inner.auth_tokens.len(), 20_000, "the auth tokens stay");
    }

    #[test]
    fn node_records_are_compact_and_keep_every_time_exactly() {
        assert!(
            std::mem::size_of::<NodeRecord>() <= 224,
            "{}",
            std::mem::size_of::<NodeRecord>()
        );
        let now = UNIX_EPOCH + std::time::Duration::new(1_765_000_000, 123_456_789);
        let mut node = Node::new("dep-times", 0, now);
        node.times.booting_at = Some(now);
        node.times.finished_at = Some(UNIX_EPOCH);
        let record = NodeRecord::new(&node, "dep-times");
        assert!(matches!(record.clock, Clock::Packed(_)));
        assert_eq!(record.to_node("dep-times"), node);
        // Times a u64 of nanoseconds cannot hold are kept as they are.
        let early = UNIX_EPOCH - std::time::Duration::from_nanos(1);
        let late = UNIX_EPOCH + std::time::Duration::from_secs(600 * 365 * 24 * 3600);
        for time in [early, late] {
            let mut odd = node.clone();
            odd.times.started_at = Some(time);
            let mut record = NodeRecord::new(&odd, "dep-times");
            assert!(matches!(record.clock, Clock::Unpacked(_)));
            assert_eq!(record.to_node("dep-times"), odd);
            record.clock.set_last_update(time);
            assert_eq!(record.clock.get().0, time);
        }
        let mut record = NodeRecord::new(&node, "dep-times");
        record.clock.set_last_update(early);
        assert_eq!(record.clock.get(), (early, node.times));
    }

    #[tokio::test]
    async fn nodes_named_otherwise_than_the_engine_names_them_are_found_updated_and_forgotten() {
        let store = MemoryStore::new();
        let mut odd = Node::new("dep-odd", 1, UNIX_EPOCH);
        odd.id = "worker-a".to_owned();
        // An id that looks like another node's: index 2 of the deployment, but it is node 0.
        let mut lookalike = Node::new("dep-odd", 0, UNIX_EPOCH);
        lookalike.id = "dep-odd-2".to_owned();
        let plain = Node::new("dep-odd", 3, UNIX_EPOCH);
        store
            .create_deployment(
                deployment("dep-odd", 3),
                vec![odd.clone(), lookalike.clone(), plain.clone()],
            )
            .await
            .unwrap();
        assert_eq!(store.node("worker-a").await.unwrap(), Some(odd));
        assert_eq!(store.node("dep-odd-2").await.unwrap(), Some(lookalike));
        assert_eq!(store.node("dep-odd-3").await.unwrap(), Some(plain));
        assert_eq!(
            store.node("dep-odd-1").await.unwrap(),
            None,
            "named worker-a"
        );
        assert_eq!(store.node("dep-odd-03").await.unwrap(), None);
        assert_eq!(store.node("dep-odd-+3").await.unwrap(), None);
        let applied = store
            .update_node(
                "worker-a",
                NodeUpdate::ProvisionToken { hash: [7; 32] },
                UNIX_EPOCH,
            )
            .await
            .unwrap();
        assert_eq!(applied.node.id, "worker-a");
        let found = store.node_by_provision_token(&[7; 32]).await.unwrap();
        assert_eq!(found.map(|n| n.id), Some("worker-a".to_owned()));
        assert!(store.delete_deployment("dep-odd").await.unwrap());
        assert!(store.lock().odd_node_ids.is_empty());
        assert_eq!(store.node("worker-a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_node_over_its_log_cap_keeps_its_newest_lines_and_the_dropped_ones_go() {
        let store = MemoryStore::new().max_log_lines_per_node(3);
        store
            .create_deployment(
                deployment("dep-chatty", 2),
                vec![
                    Node::new("dep-chatty", 0, UNIX_EPOCH),
                    Node::new("dep-chatty", 1, UNIX_EPOCH),
                ],
            )
            .await
            .unwrap();
        let line = |index: u32, n: u32| NewLogLine {
            node_id: format!("dep-chatty-{index}"),
            node_index: index,
            stream: LogStream::Stdout,
            line: format!("line {n}"),
            timestamp: UNIX_EPOCH,
            attempt: 1,
            line_no: None,
        };
        store
            .append_logs("dep-chatty", vec![line(1, 0)])
            .await
            .unwrap();
        for n in 0..500 {
            store
                .append_logs("dep-chatty", vec![line(0, n)])
                .await
                .unwrap();
        }
        let all = store
            .logs(
                "dep-chatty",
                LogQuery {
                    limit: 100,
                    ..LogQuery::default()
                },
            )
            .await
            .unwrap();
        let texts: Vec<(&str, &str)> = all
            .iter()
            .map(|l| (l.node_id.as_str(), l.line.as_str()))
            .collect();
        let marker = crate::state::dropped_lines_marker(0, 498);
        assert_eq!(
            texts,
            [
                ("dep-chatty-1", "line 0"),
                ("dep-chatty-0", marker.as_str()),
                ("dep-chatty-0", "line 498"),
                ("dep-chatty-0", "line 499"),
            ]
        );
        // The dropped lines do not linger: they are taken out as they pile up.
        let inner = store.lock();
        let log = &inner.deployments["dep-chatty"].log;
        assert!(log.capacity_used() < 100, "{}", log.capacity_used());
    }
}
