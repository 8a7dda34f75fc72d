//! [`MemoryStore`]: everything in memory, for embedding, `taskfly run` and tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;

use super::model::{self, Applied, Deployment, DeploymentStatus, Node, NodeUpdate};
use super::{LogLine, LogQuery, LogStream, NewLogLine, Store};
use crate::error::{BoxError, Error};

/// Default cap on stored log lines per deployment.
const DEFAULT_MAX_LOG_LINES: usize = 1_000_000;

/// A [`Store`] that keeps everything in memory; lost when the process exits.
///
/// Logs are capped per deployment (oldest lines dropped first, [`MemoryStore::max_log_lines`]),
/// so a chatty node cannot exhaust memory.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_log_lines: usize,
}

#[derive(Debug, Default)]
struct Inner {
    deployments: HashMap<String, Deployment>,
    nodes: HashMap<String, Node>,
    nodes_by_deployment: HashMap<String, Vec<String>>,
    provision_tokens: HashMap<[u8; 32], String>,
    auth_tokens: HashMap<[u8; 32], String>,
    logs: HashMap<String, DeploymentLog>,
}

#[derive(Debug, Default)]
struct DeploymentLog {
    lines: VecDeque<LogLine>,
    last_seq: u64,
    /// Per node, attempt and stream, the next line number expected; lower ones are resent
    /// duplicates. (Numbers rise within each stream whichever way an agent numbers them.)
    next_line_no: HashMap<(String, u32, LogStream), u64>,
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
        }
    }

    /// Keep at most this many log lines per deployment (default 1,000,000).
    #[must_use]
    pub fn max_log_lines(mut self, lines: usize) -> Self {
        self.max_log_lines = lines.max(1);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (every update
        // is computed on copies first), so a poisoned lock is still consistent.
        crate::sync::lock(&self.inner)
    }
}

fn unknown_deployment(id: &str) -> BoxError {
    Box::new(Error::not_found(format!("no deployment `{id}`")))
}

fn index_tokens(inner: &mut Inner, before: Option<&Node>, after: &Node) {
    if let Some(before) = before {
        if let Some(hash) = before.provision_token_hash {
            inner.provision_tokens.remove(&hash);
        }
        if let Some(hash) = before.auth_token_hash {
            inner.auth_tokens.remove(&hash);
        }
    }
    if let Some(hash) = after.provision_token_hash {
        inner.provision_tokens.insert(hash, after.id.clone());
    }
    if let Some(hash) = after.auth_token_hash {
        inner.auth_tokens.insert(hash, after.id.clone());
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_deployment(
        &self,
        deployment: Deployment,
        nodes: Vec<Node>,
    ) -> Result<(), BoxError> {
        let mut inner = self.lock();
        if inner.deployments.contains_key(&deployment.id) {
            return Err(Box::new(Error::conflict(format!(
                "deployment `{}` already exists",
                deployment.id
            ))));
        }
        let ids = nodes.iter().map(|n| n.id.clone()).collect();
        for node in nodes {
            index_tokens(&mut inner, None, &node);
            inner.nodes.insert(node.id.clone(), node);
        }
        inner.nodes_by_deployment.insert(deployment.id.clone(), ids);
        inner.deployments.insert(deployment.id.clone(), deployment);
        Ok(())
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>, BoxError> {
        Ok(self.lock().deployments.get(id).cloned())
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, BoxError> {
        let mut all: Vec<Deployment> = self.lock().deployments.values().cloned().collect();
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(all)
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>, BoxError> {
        Ok(self.lock().nodes.get(node_id).cloned())
    }

    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>, BoxError> {
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

    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>, BoxError> {
        let inner = self.lock();
        Ok(inner
            .provision_tokens
            .get(hash)
            .and_then(|id| inner.nodes.get(id))
            .cloned())
    }

    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>, BoxError> {
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
    ) -> Result<Applied, BoxError> {
        let mut inner = self.lock();
        let mut node = inner
            .nodes
            .get(node_id)
            .cloned()
            // Typed as a `BoxError` so that `?` does not box the `Box<Error>` a second time,
            // which would hide from `store_error` that this is the crate's not-found error.
            .ok_or_else(|| -> BoxError {
                Box::new(Error::not_found(format!("no node `{node_id}`")))
            })?;
        let before = node.clone();
        let mut deployment = inner
            .deployments
            .get(&node.deployment_id)
            .cloned()
            .ok_or_else(|| unknown_deployment(&node.deployment_id))?;
        let applied = model::apply_node_update(&mut deployment, &mut node, update, now)?;
        index_tokens(&mut inner, Some(&before), &node);
        inner.deployments.insert(deployment.id.clone(), deployment);
        inner.nodes.insert(node.id.clone(), node);
        Ok(applied)
    }

    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<Deployment, BoxError> {
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

    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<(), BoxError> {
        if let Some(node) = self.lock().nodes.get_mut(node_id) {
            if !node.status.is_final() {
                node.last_update = now;
            }
        }
        Ok(())
    }

    async fn append_logs(
        &self,
        deployment_id: &str,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, BoxError> {
        let mut inner = self.lock();
        if !inner.deployments.contains_key(deployment_id) {
            return Err(unknown_deployment(deployment_id));
        }
        let log = inner.logs.entry(deployment_id.to_owned()).or_default();
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
            log.lines.push_back(LogLine {
                seq: log.last_seq,
                node_id: line.node_id,
                node_index: line.node_index,
                stream: line.stream,
                line: line.line,
                timestamp: line.timestamp,
            });
        }
        while log.lines.len() > self.max_log_lines {
            log.lines.pop_front();
        }
        Ok(log.last_seq)
    }

    async fn last_line_no(
        &self,
        deployment_id: &str,
        node_id: &str,
        attempt: u32,
        stream: LogStream,
    ) -> Result<Option<u64>, BoxError> {
        let inner = self.lock();
        let next = inner.logs.get(deployment_id).and_then(|log| {
            log.next_line_no
                .get(&(node_id.to_owned(), attempt, stream))
                .copied()
        });
        Ok(next.and_then(|next| next.checked_sub(1)))
    }

    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>, BoxError> {
        let inner = self.lock();
        if !inner.deployments.contains_key(deployment_id) {
            return Err(unknown_deployment(deployment_id));
        }
        let Some(log) = inner.logs.get(deployment_id) else {
            return Ok(Vec::new());
        };
        // Lines are stored in seq order, so the cursor is found by binary search.
        let start = log.lines.partition_point(|l| l.seq <= query.after);
        Ok(log
            .lines
            .range(start..)
            .filter(|l| query.node_index.is_none_or(|i| l.node_index == i))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn delete_deployment(&self, id: &str) -> Result<bool, BoxError> {
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
        Ok(true)
    }
}
