//! The engine's side of the node protocol (SPEC §4, node endpoints). A node is identified by
//! its bearer token alone, so it can only ever read and change its own deployment's data.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::Orchestrator;
use crate::auth;
use crate::error::{Error, Result};
use crate::provider::pool::Claim;
use crate::state::model::{
    Assignment, LogBatch, Node, NodeResources, NodeStatus, NodeUpdate, Registration,
    ResourceSample, StatusReport,
};
use crate::state::{Heartbeat, LogStream, NewLogLine, MAX_LOG_LINES_PER_BATCH};
use crate::sync::lock;

/// How a node is being registered.
enum Registered {
    /// With its provision token, for the first time; the registration key when the agent sent
    /// a nonce.
    First(Option<[u8; 32]>),
    /// Resent with the same token and nonce: the registration key it was found by.
    Resent([u8; 32]),
    /// Given to a pooled instance.
    Pooled,
}

impl Orchestrator {
    /// The node holding the auth token of this hash ([`auth::hash_token`]).
    pub(crate) async fn authenticate_node(&self, token_hash: &[u8; 32]) -> Result<Node> {
        self.inner()
            .store
            .node_by_auth_token(token_hash)
            .await?
            .ok_or_else(|| Error::unauthorized("unknown node token"))
    }

    /// `POST /nodes/register`: trade the single-use provision token for an auth token and the
    /// node's assignment. A pooled instance's token (see [`crate::PooledProvider`]) is traded
    /// for the assignment of the node its pool gives it, held while it has none.
    ///
    /// An agent that sends a `nonce` may resend its registration when the answer was lost (a
    /// broken connection, a daemon restart): the same token and nonce get the node's assignment
    /// again, with a new auth token, as long as the node is not final. The token alone, or with
    /// another nonce, works once.
    pub(crate) async fn register_node(
        &self,
        token: &str,
        nonce: Option<&str>,
    ) -> Result<Registration<Assignment>> {
        let store = &self.inner().store;
        let token_hash = auth::hash_token(token);
        if let Some(node) = store.node_by_provision_token(&token_hash).await? {
            let registered = Registered::First(nonce.map(|n| auth::registration_key(token, n)));
            return Ok(Registration::Assigned(
                self.register(node, registered).await?,
            ));
        }
        if let Some(nonce) = nonce {
            let resend_key = auth::registration_key(token, nonce);
            if let Some(node) = store.node_by_provision_token(&resend_key).await? {
                tracing::info!(node_id = %node.id, "registration resent; a new auth token replaces the lost one");
                return Ok(Registration::Assigned(
                    self.register(node, Registered::Resent(resend_key)).await?,
                ));
            }
        }
        for (_, pool) in self.pools() {
            let provision_token = match pool.claim(&token_hash).await {
                Claim::Unknown => continue,
                Claim::Wait => return Ok(Registration::NoWork),
                Claim::Retired => {
                    return Ok(Registration::Retired {
                        reason: "the pool retired this instance; its agent stops".to_owned(),
                    })
                }
                Claim::Assigned(provision_token) => provision_token,
            };
            let node = store
                .node_by_provision_token(&auth::hash_token(&provision_token))
                .await;
            let registered = match node {
                Ok(Some(node)) => self.register(node, Registered::Pooled).await,
                Ok(None) => Err(Error::terminated("the node was terminated meanwhile")),
                Err(e) => Err(e),
            };
            return match registered {
                Ok(mut response) => {
                    response.next_token = pool.rotate(&token_hash)?;
                    Ok(Registration::Assigned(response))
                }
                Err(e) => {
                    // The node no longer wants an instance: this one waits for the next.
                    tracing::info!(error = %e.report(), "a pooled instance could not take its node");
                    pool.not_taken(&token_hash);
                    if e.is_conflict() || e.is_not_found() {
                        Ok(Registration::NoWork)
                    } else {
                        Err(e)
                    }
                }
            };
        }
        Err(Error::unauthorized(
            "unknown or already used provision token",
        ))
    }

    /// Register `node`: its auth token and assignment.
    async fn register(&self, node: Node, how: Registered) -> Result<Assignment> {
        let live = self.live(&node.deployment_id).await?;
        let auth_token = auth::new_token()?;
        let auth_token_hash = auth::hash_token(&auth_token);
        let pooled = matches!(how, Registered::Pooled);
        let update = match how {
            Registered::First(Some(resend_key)) => NodeUpdate::RegisteredWithNonce {
                auth_token_hash,
                resend_key,
            },
            Registered::First(None) | Registered::Pooled => {
                NodeUpdate::Registered { auth_token_hash }
            }
            Registered::Resent(resend_key) => NodeUpdate::RegistrationResent {
                resend_key,
                auth_token_hash,
            },
        };
        let applied = self.update_node(&node.id, update).await?;
        self.seen_node(&node);
        let node_env = live
            .metadata
            .node_env(&node.deployment_id, &node.id, node.index);
        let env = node_env
            .vars()
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        let secret_names = node_env
            .vars()
            .iter()
            .filter(|v| v.secret)
            .map(|v| v.name.clone())
            .collect();
        Ok(Assignment {
            auth_token,
            deployment_id: node.deployment_id.clone(),
            node_id: node.id.clone(),
            node_index: applied.node.index,
            env,
            secret_names,
            script: live.config.remote_script_to_run.clone(),
            dest_dir: live.config.remote_dest_dir.clone(),
            heartbeat_interval: self.inner().config.effective_heartbeat_interval(),
            timeout: live
                .config
                .nodes
                .timeout
                .map(|t| std::time::Duration::from_secs(t.as_secs().max(1))),
            pooled,
            next_token: None,
            outputs: live.config.outputs.clone(),
        })
    }

    /// `GET /nodes/assets`: the node's worker bundle (one file per deployment): in memory
    /// when it is at most [`SMALL_BUNDLE_BYTES`], read once per running deployment; otherwise
    /// the file to stream, shared with the downloads under way ([`crate::bundle::serve`]).
    pub(crate) async fn node_assets(&self, node: &Node) -> Result<NodeAssets> {
        let gone = || Error::not_found("this deployment's bundle is gone (cleaned up)");
        let live = self.live(&node.deployment_id).await.map_err(|e| {
            if e.is_not_found() {
                gone()
            } else {
                e
            }
        })?;
        let path = self.worker_bundle_path(&node.deployment_id);
        let small = live
            .small_bundle
            .get_or_try_init(|| read_if_small(&path))
            .await
            .map_err(|_| gone())?;
        if let Some(bytes) = small {
            return Ok(NodeAssets::InMemory(bytes.clone()));
        }
        let shared = live.bundle_downloads.open(&path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                gone()
            } else {
                // The answer names no path of the daemon's; its log does.
                tracing::error!(path = %path.display(), error = %e, "cannot open a worker bundle");
                Error::io("cannot open this deployment's worker bundle", e)
            }
        })?;
        Ok(NodeAssets::Shared(shared))
    }

    /// `POST /nodes/heartbeat` of the node holding the auth token of this hash
    /// ([`auth::hash_token`]): notes it alive if it is live, in one store call
    /// ([`crate::Store::heartbeat`]). Returns the live node, for [`Self::node_resources`];
    /// `None` when it is to stop. An unknown token is [`Error::unauthorized`].
    pub(crate) async fn node_heartbeat(&self, token_hash: &[u8; 32]) -> Result<Option<LiveNode>> {
        let now = SystemTime::now();
        match self.inner().store.heartbeat(token_hash, now).await? {
            Heartbeat::UnknownToken => Err(Error::unauthorized("unknown node token")),
            Heartbeat::Stop => Ok(None),
            Heartbeat::Live {
                deployment_id,
                node_index,
            } => {
                self.seen((Arc::clone(&deployment_id), node_index));
                Ok(Some(LiveNode {
                    deployment_id,
                    index: node_index,
                    at: now,
                }))
            }
        }
    }

    /// What a live node's script uses, as its heartbeat reported (SPEC §4.2).
    pub(crate) fn node_resources(&self, node: &LiveNode, sample: ResourceSample) {
        let mut resources = lock(&self.inner().resources);
        let by_index = match resources.get_mut(&*node.deployment_id) {
            Some(by_index) => by_index,
            None => resources.entry(node.deployment_id.to_string()).or_default(),
        };
        let known = by_index.get(&node.index).copied();
        by_index.insert(node.index, NodeResources::updated(known, sample, node.at));
    }

    /// Note that the node of `key` was heard from now (a heartbeat of a known node allocates
    /// nothing here).
    fn seen(&self, key: SeenKey) {
        let now = tokio::time::Instant::now();
        lock(&self.inner().last_seen).insert(key, now);
    }

    /// [`Self::seen`] for `node`.
    fn seen_node(&self, node: &Node) {
        self.seen((Arc::from(node.deployment_id.as_str()), node.index));
    }

    /// `POST /nodes/status`: the agent's progress and final result.
    pub(crate) async fn node_status(&self, node: &Node, report: StatusReport) -> Result<()> {
        let status = report.status;
        if !matches!(
            status,
            NodeStatus::DownloadingAssets
                | NodeStatus::RunningScript
                | NodeStatus::Completed
                | NodeStatus::Failed
        ) {
            return Err(Error::invalid_input(format!(
                "a node may report downloading_assets, running_script, completed or failed, not {status}"
            )));
        }
        let live = self.live(&node.deployment_id).await?;
        let message = report.message.map(|m| capped_message(live.mask(&m)));
        self.update_node(
            &node.id,
            NodeUpdate::Status {
                status,
                exit_code: report.exit_code,
                message,
            },
        )
        .await?;
        if !status.is_final() {
            self.seen_node(node);
        }
        Ok(())
    }

    /// Refuse a batch of `lines` lines that is too large ([`MAX_LOG_LINES_PER_BATCH`]) or
    /// would take the node past [`MAX_LOG_LINES_PER_SECOND`]: the agent splits it or sends
    /// it again a moment later.
    fn admit_log_lines(&self, node: &Node, lines: usize) -> Result<()> {
        if lines > MAX_LOG_LINES_PER_BATCH {
            return Err(Error::too_large(format!(
                "a log batch of {lines} lines is over the limit of {MAX_LOG_LINES_PER_BATCH}; send fewer lines per request"
            )));
        }
        let now = tokio::time::Instant::now();
        let mut counts = lock(&self.inner().log_counts);
        let volume = counts
            .entry((node.id.clone(), node.attempt))
            .or_insert_with(|| LogVolume::new(now));
        if now.duration_since(volume.second_started) >= std::time::Duration::from_secs(1) {
            volume.second_started = now;
            volume.in_second = 0;
        }
        let lines = lines as u64;
        if volume.in_second > 0 && volume.in_second + lines > MAX_LOG_LINES_PER_SECOND {
            return Err(Error::rate_limited(format!(
                "node {} sent more than {MAX_LOG_LINES_PER_SECOND} log lines within a second; send them again in a moment",
                node.index
            )));
        }
        volume.in_second += lines;
        Ok(())
    }

    /// Whether `batch` is to be stored: yes while the node's attempt runs. Once it has ended
    /// (completed, failed or terminated) a batch resent after a lost answer, every line of it
    /// numbered and already taken, is answered as taken and stores nothing; any other batch is
    /// refused (409): a node's output ends with it, and a late batch gets no fresh budget.
    pub(crate) async fn accepts_logs_from(&self, node: &Node, batch: &LogBatch) -> Result<bool> {
        if !node.status.is_final() {
            return Ok(true);
        }
        let refused = || {
            Error::already_final(format!(
                "node {} is {}: it takes no more log lines",
                node.id, node.status
            ))
        };
        let mut last_taken: Vec<(LogStream, Option<u64>)> = Vec::new();
        for (i, line) in batch.lines.iter().enumerate() {
            let number = line
                .line_no
                .or(batch.offset.map(|first| first + i as u64))
                .ok_or_else(refused)?;
            let last = match last_taken.iter().find(|(stream, _)| *stream == line.stream) {
                Some((_, last)) => *last,
                None => {
                    let last = self
                        .inner()
                        .store
                        .last_line_no(&node.deployment_id, &node.id, node.attempt, line.stream)
                        .await?;
                    last_taken.push((line.stream, last));
                    last
                }
            };
            if last.is_none_or(|last| number > last) {
                return Err(refused());
            }
        }
        Ok(false)
    }

    /// Keep a node attempt's stored lines under the per-node limit: past it, lines are
    /// dropped and one line says so. Counted in memory (a restart starts counting again).
    fn limit_log_volume(&self, node: &Node, lines: &mut Vec<NewLogLine>) {
        let limit = self.inner().config.max_log_lines_per_node;
        let mut counts = lock(&self.inner().log_counts);
        let volume = counts
            .entry((node.id.clone(), node.attempt))
            .or_insert_with(|| LogVolume::new(tokio::time::Instant::now()));
        let count = &mut volume.accepted;
        if *count > limit {
            lines.clear();
            return;
        }
        let room = usize::try_from(limit - *count).unwrap_or(usize::MAX);
        if lines.len() > room {
            let template = lines[0].clone();
            lines.truncate(room);
            lines.push(NewLogLine {
                stream: LogStream::Stderr,
                line: format!("[taskfly: this node reached its limit of {limit} log lines; later lines are dropped]"),
                line_no: None,
                ..template
            });
            *count = limit + 1;
        } else {
            *count += lines.len() as u64;
        }
    }

    /// `POST /nodes/logs`: store the lines, secrets masked.
    pub(crate) async fn node_logs(&self, node: &Node, batch: LogBatch) -> Result<()> {
        self.admit_log_lines(node, batch.lines.len())?;
        let live = self.live(&node.deployment_id).await?;
        let now = SystemTime::now();
        let mut lines = Vec::with_capacity(batch.lines.len());
        for (i, line) in batch.lines.into_iter().enumerate() {
            let stream = line.stream;
            let timestamp = line.timestamp.unwrap_or(now);
            let mut text = live.mask(&line.line);
            cut_text(
                &mut text,
                self.inner().config.max_log_line_bytes,
                " [line cut]",
            );
            lines.push(NewLogLine {
                node_id: node.id.clone(),
                node_index: node.index,
                stream,
                line: text,
                timestamp,
                attempt: node.attempt,
                line_no: line.line_no.or(batch.offset.map(|first| first + i as u64)),
            });
        }
        self.limit_log_volume(node, &mut lines);
        if lines.is_empty() {
            return Ok(());
        }
        self.inner()
            .store
            .append_logs(&node.deployment_id, lines)
            .await?;
        Ok(())
    }
}

/// Whom [`Orchestrator`]'s last-seen times are of: a node's deployment and index. (Node ids
/// are `<deployment id>-<index>`, [`node_id`]; keyed this way, a heartbeat's store answer
/// is the key, and no id string is made for it.)
pub(crate) type SeenKey = (Arc<str>, u32);

/// The id of node `index` of `deployment_id`, as [`Node::new`] names every node.
pub(crate) fn node_id(deployment_id: &str, index: u32) -> String {
    format!("{deployment_id}-{index}")
}

/// A live node that sent a heartbeat ([`Orchestrator::node_heartbeat`]).
#[derive(Debug)]
pub(crate) struct LiveNode {
    deployment_id: Arc<str>,
    index: u32,
    /// When its heartbeat arrived.
    at: SystemTime,
}

/// Largest worker bundle kept in memory while its deployment runs; larger ones are streamed
/// from their file to each node.
pub(crate) const SMALL_BUNDLE_BYTES: u64 = 256 * 1024;

/// A node's worker bundle, as `GET /nodes/assets` sends it.
pub(crate) enum NodeAssets {
    /// A small bundle, sent with the answer's headers.
    InMemory(bytes::Bytes),
    /// A large bundle, streamed in chunks shared with the other downloads under way.
    Shared(std::sync::Arc<crate::bundle::serve::SharedBundle>),
}

/// The file's bytes if it holds at most [`SMALL_BUNDLE_BYTES`], `None` if it is larger.
async fn read_if_small(path: &Path) -> std::io::Result<Option<bytes::Bytes>> {
    if tokio::fs::metadata(path).await?.len() > SMALL_BUNDLE_BYTES {
        return Ok(None);
    }
    let bytes = tokio::fs::read(path).await?;
    let small = u64::try_from(bytes.len()).is_ok_and(|length| length <= SMALL_BUNDLE_BYTES);
    Ok(small.then(|| bytes::Bytes::from(bytes)))
}

/// Log lines a node may send within a second (SPEC: limits); past it, its log posts are
/// refused (429) until the second is over.
pub(crate) const MAX_LOG_LINES_PER_SECOND: u64 = 100_000;

/// What the engine counts of a node attempt's log lines.
#[derive(Debug)]
pub(crate) struct LogVolume {
    /// Lines accepted in all, for [`crate::Config::max_log_lines_per_node`].
    accepted: u64,
    /// When the current one-second window began, and the lines sent in it.
    second_started: tokio::time::Instant,
    in_second: u64,
}

impl LogVolume {
    fn new(now: tokio::time::Instant) -> LogVolume {
        LogVolume {
            accepted: 0,
            second_started: now,
            in_second: 0,
        }
    }
}

/// Most bytes of a stored failure message (SPEC §limits); longer ones are cut and marked.
pub(crate) const MAX_MESSAGE_BYTES: usize = 2048;

/// A failure message as stored: at most [`MAX_MESSAGE_BYTES`] and a short mark. Secrets must
/// be masked before, so a cut never leaves part of one unmasked.
pub(crate) fn capped_message(mut message: String) -> String {
    cut_text(&mut message, MAX_MESSAGE_BYTES, " [cut]");
    message
}

/// Cut `text` to at most `max` bytes on a character boundary, then append `mark`.
fn cut_text(text: &mut String, max: usize, mark: &str) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_is_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE_BYTES);
        let capped = capped_message(message);
        assert!(
            capped.len() <= MAX_MESSAGE_BYTES + " [cut]".len(),
            "{}",
            capped.len()
        );
        assert!(capped.ends_with("é [cut]"));
        assert_eq!(capped_message("short".to_owned()), "short");
    }
}
