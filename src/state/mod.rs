//! What the engine remembers: the model and its state machines ([`model`]), the [`Store`] trait,
//! the in-memory backend ([`MemoryStore`]) and, with the `sqlite` feature, the durable one
//! (`SqliteStore`).

#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod memory;
pub mod model;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::{Error, Result};
pub use memory::MemoryStore;
use model::{Applied, Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// `stdout` or `stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// The script's standard output.
    Stdout,
    /// The script's standard error.
    Stderr,
}

impl LogStream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }

    /// Parses `stdout` / `stderr`.
    pub fn parse(s: &str) -> Option<LogStream> {
        match s {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            _ => None,
        }
    }
}

/// Most lines in one log batch (`POST /nodes/logs`); a larger one is refused as too large,
/// so the agent splits it. A 64 KiB piece of the bootstrap script's output has at most this
/// many lines.
pub(crate) const MAX_LOG_LINES_PER_BATCH: usize = 65_536;

/// A log line to be stored; the store assigns its `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLogLine {
    /// The node that wrote it.
    pub node_id: String,
    /// Its index.
    pub node_index: u32,
    /// Which stream.
    pub stream: LogStream,
    /// The line, secrets already masked.
    pub line: String,
    /// When the node wrote it.
    pub timestamp: SystemTime,
    /// The node's attempt that wrote it.
    pub attempt: u32,
    /// Its position in that attempt's output (0-based), when the agent numbers its lines.
    /// A line whose `(node_id, attempt, line_no)` is already stored is a resent duplicate
    /// (an agent retrying a batch the engine stored just before a crash) and is dropped.
    pub line_no: Option<u64>,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// Position in the deployment's log, starting at 1, strictly increasing, never reused.
    pub seq: u64,
    /// The node that wrote it.
    pub node_id: String,
    /// Its index.
    pub node_index: u32,
    /// Which stream.
    pub stream: LogStream,
    /// The line.
    pub line: String,
    /// When the node wrote it.
    pub timestamp: SystemTime,
    /// The node's attempt that wrote it (1 unless the node was retried).
    pub attempt: u32,
}

/// Which log lines to read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogQuery {
    /// Only lines with a `seq` greater than this.
    pub after: u64,
    /// Only this node's lines.
    pub node_index: Option<u32>,
    /// At most this many lines.
    pub limit: usize,
    /// At most about this many bytes of line text: the page ends before the line that would
    /// go past it, but always holds at least one line. `None`: no byte bound.
    pub max_bytes: Option<usize>,
}

impl LogQuery {
    /// Whether a page already holding `lines` lines of `bytes` bytes of text has room for a
    /// line of `next` bytes.
    pub(crate) fn has_room(&self, lines: usize, bytes: usize, next: usize) -> bool {
        lines < self.limit
            && (lines == 0
                || self
                    .max_bytes
                    .is_none_or(|max| bytes.saturating_add(next) <= max))
    }
}

/// A node's line cap: `per_node` if set, else half the deployment's cap; at least 2 lines (its
/// marker and its newest line).
pub(crate) fn node_log_cap(per_node: Option<usize>, per_deployment: usize) -> usize {
    per_node.unwrap_or(per_deployment / 2).max(2)
}

/// The text of the one line a store keeps where it dropped a node's oldest lines to stay
/// within its caps; `dropped` counts every line of the node dropped so far. Public so that
/// other [`Store`] implementations write the same marker.
pub fn dropped_lines_marker(node_index: u32, dropped: u64) -> String {
    format!(
        "[taskfly: {dropped} earlier lines of node {node_index} were dropped here to keep the log within its line limits]"
    )
}

/// What [`Store::heartbeat`] found for a node's auth token (SPEC §4.2, heartbeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heartbeat {
    /// No node holds the token: it was never issued, a resent registration replaced it, or
    /// its node was forgotten. The request is refused (401).
    UnknownToken,
    /// The node is live ([`takes_heartbeats`]): its `last_update` is now the heartbeat's time.
    Live {
        /// The node's deployment (shared with the store where it can be, so answering
        /// copies no string).
        deployment_id: Arc<str>,
        /// The node's index in it.
        node_index: u32,
    },
    /// The node is to stop: it is final or terminating, or its deployment is terminating or
    /// terminated. It was not touched: a late heartbeat never reopens a node.
    Stop,
}

/// Whether a node in `node` state, of a deployment in `deployment` state, is live for
/// heartbeats: touched by them and told to go on. Otherwise it is told to stop. Public so
/// that every [`Store::heartbeat`] decides alike.
pub fn takes_heartbeats(node: NodeStatus, deployment: DeploymentStatus) -> bool {
    !node.is_final()
        && node != NodeStatus::Terminating
        && !matches!(
            deployment,
            DeploymentStatus::Terminating | DeploymentStatus::Terminated
        )
}

/// [`Store::heartbeat`] made of the store's other calls: its default, and the fallback of
/// stores whose fast path does not hold the node.
pub(crate) async fn heartbeat_by_parts<S: Store + ?Sized>(
    store: &S,
    auth_token_hash: &[u8; 32],
    now: SystemTime,
) -> Result<Heartbeat> {
    let Some(node) = store.node_by_auth_token(auth_token_hash).await? else {
        return Ok(Heartbeat::UnknownToken);
    };
    let deployment = store
        .deployment(&node.deployment_id)
        .await?
        .ok_or_else(|| Error::not_found("the node's deployment is gone"))?;
    if !takes_heartbeats(node.status, deployment.status) {
        return Ok(Heartbeat::Stop);
    }
    store.touch_node(&node.id, now).await?;
    Ok(Heartbeat::Live {
        deployment_id: Arc::from(node.deployment_id),
        node_index: node.index,
    })
}

/// The first index of `indexes` that is there more than once, if any.
pub(crate) fn first_repeated(indexes: &[u32]) -> Option<u32> {
    let mut seen = std::collections::HashSet::with_capacity(indexes.len());
    indexes.iter().copied().find(|&index| !seen.insert(index))
}

/// The error for a deployment given two nodes of one index.
pub(crate) fn repeated_index(deployment_id: &str, index: u32) -> crate::Error {
    crate::Error::invalid_input(format!(
        "deployment `{deployment_id}` has two nodes of index {index}"
    ))
}

/// Where deployments, nodes and logs are kept.
///
/// Every state change goes through [`Store::update_node`] and
/// [`Store::update_deployment_status`], which must apply [`model::apply_node_update`] and
/// [`model::apply_deployment_status`] atomically (under a lock or in a transaction), so all
/// backends enforce the same state machines.
///
/// Errors are the crate's [`crate::Error`], which reach the engine's caller unchanged: a
/// refused transition is the error the `model` function returned; an unknown deployment or
/// node is [`crate::Error::not_found`]; creating a deployment whose id is taken is
/// [`crate::Error::already_exists`]; any failure of the backend itself is
/// [`crate::Error::store`], with the backend's own error as its cause.
///
/// Cancellation: the engine awaits store futures to completion; a dropped future (engine
/// shutdown) must leave the store consistent, either with or without the change.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Insert a new deployment and its nodes.
    async fn create_deployment(&self, deployment: Deployment, nodes: Vec<Node>) -> Result<()>;

    /// Insert a new deployment and, for each of `node_indexes`, a new node as [`Node::new`]
    /// makes it at the deployment's `created_at`: what the engine calls for a deployment or a
    /// rerun. Refused like [`Store::create_deployment`], and also when an index is there twice
    /// ([`crate::Error::is_invalid_input`]).
    ///
    /// A store can build its own records straight from the indexes, without a [`Node`] per
    /// node in between (for 100,000 nodes, 35 MB held while the deployment is stored). This
    /// default makes the nodes and calls [`Store::create_deployment`].
    async fn create_deployment_with_indexes(
        &self,
        deployment: Deployment,
        node_indexes: &[u32],
    ) -> Result<()> {
        if let Some(index) = first_repeated(node_indexes) {
            return Err(repeated_index(&deployment.id, index));
        }
        let nodes = node_indexes
            .iter()
            .map(|&index| Node::new(&deployment.id, index, deployment.created_at))
            .collect();
        self.create_deployment(deployment, nodes).await
    }

    /// One deployment.
    async fn deployment(&self, id: &str) -> Result<Option<Deployment>>;

    /// Every deployment, newest first.
    async fn deployments(&self) -> Result<Vec<Deployment>>;

    /// One node by id.
    async fn node(&self, node_id: &str) -> Result<Option<Node>>;

    /// The nodes of a deployment, by index.
    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>>;

    /// The node holding this (unused) provision token hash.
    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>>;

    /// The node holding this auth token hash.
    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>>;

    /// Apply `update` to a node and its deployment atomically, via [`model::apply_node_update`].
    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> Result<Applied>;

    /// Move a deployment, via [`model::apply_deployment_status`].
    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<Deployment>;

    /// Record a heartbeat: the node's `last_update` becomes `now`, its state is untouched.
    /// Cheap: backends should not write to disk for it.
    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<()>;

    /// A heartbeat of the node holding this auth token hash, at `now`: finds the node,
    /// decides from its and its deployment's states whether it is live
    /// ([`takes_heartbeats`]), and if so touches it as [`Store::touch_node`] does. The node
    /// protocol's most frequent call: backends should answer it from memory, in one lookup
    /// and without copying the node. The default is made of [`Store::node_by_auth_token`],
    /// [`Store::deployment`] and [`Store::touch_node`]. A node whose deployment is missing is
    /// [`crate::Error::not_found`].
    async fn heartbeat(&self, auth_token_hash: &[u8; 32], now: SystemTime) -> Result<Heartbeat> {
        heartbeat_by_parts(self, auth_token_hash, now).await
    }

    /// Append log lines of a deployment, dropping resent duplicates (see
    /// [`NewLogLine::line_no`]); returns the `seq` of the last stored line.
    ///
    /// Stores cap the lines they keep per node and per deployment. Past a node's cap, that
    /// node's oldest lines are dropped; past the deployment's cap, the oldest lines of the
    /// node holding the most are. Either way, one line of that node's (the newest dropped,
    /// its text replaced by [`dropped_lines_marker`], stream stderr) says how many of its
    /// lines were dropped so far, and where.
    async fn append_logs(&self, deployment_id: &str, lines: Vec<NewLogLine>) -> Result<u64>;

    /// The highest line number ([`NewLogLine::line_no`]) taken for this node attempt and
    /// stream, stored or since dropped: lets the engine tell a batch resent after its node
    /// ended (already counted) from a new one. `None` when none was taken, or when the store
    /// does not keep track (this default): a batch after the end is then refused.
    async fn last_line_no(
        &self,
        _deployment_id: &str,
        _node_id: &str,
        _attempt: u32,
        _stream: LogStream,
    ) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Read log lines of a deployment, oldest first.
    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>>;

    /// Forget a deployment, its nodes and logs (and its webhook delivery). Returns whether it
    /// existed.
    async fn delete_deployment(&self, id: &str) -> Result<bool>;

    /// Record that a deployment's files were deleted (`cleaned_at`), keeping the first time
    /// when it was already marked. Returns whether it exists.
    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> Result<bool>;
    /// Record a deployment's webhook notification, replacing the one it had: pending ones are
    /// read back by a restarted engine ([`Self::pending_deliveries`]), which delivers them.
    /// The default keeps none: deliveries then do not survive a restart of the engine.
    async fn save_delivery(&self, _delivery: model::WebhookDelivery) -> Result<()> {
        Ok(())
    }

    /// A deployment's webhook notification, if it has one and the store keeps them.
    async fn delivery(&self, _deployment_id: &str) -> Result<Option<model::WebhookDelivery>> {
        Ok(None)
    }

    /// Every webhook notification still pending, oldest first.
    async fn pending_deliveries(&self) -> Result<Vec<model::WebhookDelivery>> {
        Ok(Vec::new())
    }
}
