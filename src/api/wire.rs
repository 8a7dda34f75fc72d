//! The JSON bodies of the HTTP API (SPEC §4): the only place with serde derives for the wire.
//!
//! Shared by the server, the typed [`crate::Client`] and the node agent, so the three cannot
//! drift apart. Internal types are converted to and from these explicitly.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::state::model::{DeploymentStatus, NodeStatus};

/// `{"error": "...", "details": [...]}`, the body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line saying what went wrong.
    pub error: String,
    /// Every individual problem (validation errors), possibly empty.
    #[serde(default)]
    pub details: Vec<String>,
}

/// 202 answer to `POST /deployments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentCreated {
    /// The new deployment's id.
    pub deployment_id: String,
    /// Its state (`pending`).
    pub status: DeploymentStatus,
    /// How many nodes it will run.
    pub nodes: u32,
    /// Where to follow it: `/api/v1/deployments/{id}`.
    pub status_url: String,
    /// For a rerun: the deployment whose nodes it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// For a rerun: the indexes of the nodes it runs, ascending (absent otherwise: a new
    /// deployment runs `0..nodes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_indexes: Vec<u32>,
}

/// One node in [`DeploymentView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeView {
    /// `<deployment id>-<index>`.
    pub node_id: String,
    /// 0-based index.
    pub node_index: u32,
    /// Its state (SPEC §3).
    pub status: NodeStatus,
    /// Which attempt this is (1 unless retried).
    #[serde(default = "one")]
    pub attempt: u32,
    /// The provider's instance id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The instance's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// RFC 3339 time of the last state change or heartbeat.
    pub last_update: String,
    /// Exit code of the script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// RFC 3339 (milliseconds): when the current attempt's script started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 (milliseconds): when the current attempt ended (completed, failed or
    /// terminated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Seconds the script ran, to the millisecond; absent until the attempt has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Seconds the current attempt spent in each phase it has left.
    #[serde(default)]
    pub phases: NodePhases,
    /// While it is `provisioning`: why its instance still waits in the provider's queue
    /// (Slurm's reason, like `Priority` or `Resources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_reason: Option<String>,
    /// What its script used, from its heartbeats (omitted until one reported it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<NodeResources>,
}

/// The seconds (to the millisecond) a node's current attempt spent in each phase, in
/// [`NodeView`]. A phase lasts until the next one the node entered; the phase it is still in,
/// and a phase not entered (yet, or skipped), are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodePhases {
    /// Waiting for and creating its instance (`provisioning`, a scheduler's queue included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_s: Option<f64>,
    /// The instance booting and its agent registering (`booting`, `registering`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booting_s: Option<f64>,
    /// Fetching and extracting the worker bundle (`downloading_assets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloading_s: Option<f64>,
    /// The script's run (`running_script`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_s: Option<f64>,
}

/// A node's resources as its heartbeats reported them (SPEC §4.2); each value is omitted
/// until known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeResources {
    /// CPU use of the script's process tree since the previous heartbeat, in percent of one
    /// CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the script's process tree, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The highest `rss_bytes` reported, kept after the node ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// Disk space of the node's bundle folder, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// RFC 3339 time of the newest reading.
    pub sampled_at: String,
}

fn one() -> u32 {
    1
}

/// `GET /deployments/{id}`; also the final document of `taskfly run --output json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentView {
    /// Its id.
    pub deployment_id: String,
    /// Its state (SPEC §3).
    pub status: DeploymentStatus,
    /// `local` or `aws`.
    pub cloud_provider: String,
    /// `nodes.count`.
    pub total_nodes: u32,
    /// Nodes completed.
    pub nodes_completed: u32,
    /// Nodes failed with no retry left.
    pub nodes_failed: u32,
    /// Nodes terminated (by `down`) before they ended; 0 from an older daemon, which does not
    /// send it.
    #[serde(default)]
    pub nodes_terminated: u32,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// RFC 3339, once final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Every node, by index. Empty in summaries (`GET /deployments`).
    #[serde(default)]
    pub nodes: Vec<NodeView>,
    /// For a rerun: the deployment whose nodes it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// Wall time in seconds, to the millisecond, from its creation until it became final;
    /// absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// `nodes.retries`: a `failed` node whose `attempt` is at most this is waiting to be
    /// tried again (omitted when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// RFC 3339: when its files were deleted (`taskfly cleanup`); its record stays until it
    /// is forgotten. Omitted while the files are there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleaned_at: Option<String>,
    /// Its webhook notification (`notify:`), once its final state made one; not in summaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyView>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where a deployment's webhook notification stands (`notify` of a deployment view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NotifyView {
    /// `pending` (being tried), `delivered` or `failed` (given up after an hour).
    pub status: String,
    /// Tries so far.
    pub attempts: u32,
    /// Why the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// RFC 3339 time the receiver took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
}

/// `POST /cleanup/all`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CleanupAll {
    /// Deployments whose files were deleted.
    pub cleaned_count: u32,
    /// Deployments whose files could not be deleted.
    pub failed_count: u32,
}

/// `POST /cleanup/forget`: the final deployments whose records were deleted (or, with
/// `dry_run`, would be).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Forgotten {
    /// How many were forgotten (would be, with `dry_run`).
    pub forgotten_count: u32,
    /// Their ids, newest first.
    pub deployment_ids: Vec<String>,
    /// Deployments that could not be forgotten (their files could not be deleted).
    pub failed_count: u32,
    /// True when nothing was deleted: the answer says what would be.
    pub dry_run: bool,
}

/// One stored log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogLineView {
    /// Position in the deployment's log; strictly increasing.
    pub seq: u64,
    /// The node that wrote it.
    pub node_id: String,
    /// Its index.
    #[serde(default)]
    pub node_index: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its newline; secrets masked as `***`.
    pub line: String,
    /// RFC 3339.
    pub timestamp: String,
    /// The node's attempt that wrote it (1 unless the node was retried).
    #[serde(default = "one")]
    pub attempt: u32,
}

/// `GET /deployments/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogsPage {
    /// Lines after the cursor, oldest first.
    pub logs: Vec<LogLineView>,
    /// Pass as `after` to get the lines that follow.
    pub next: u64,
}

/// `GET /stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Deployments known.
    pub total_deployments: u64,
    /// Nodes of those deployments.
    pub total_nodes: u64,
    /// Deployments per state name.
    pub deployment_status: BTreeMap<String, u64>,
    /// Seconds since the engine started.
    pub uptime_seconds: u64,
    /// The instance pools (`taskflyd --pool-max`), one per pooled provider.
    #[serde(default)]
    pub pools: Vec<PoolStats>,
}

/// One instance pool in `GET /stats` (see [`crate::PooledProvider`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// The `cloud_provider` it serves.
    pub provider: String,
    /// Its settings.
    pub max_instances: u64,
    /// Idle instances are not retired below this count.
    pub min_instances: u64,
    /// Idle instances are retired after this long.
    pub idle_timeout_s: u64,
    /// Spares kept ready beyond those in use.
    pub provision_ahead: u64,
    /// Instances it runs now: busy, idle and starting.
    pub instances: u64,
    /// Instances being started.
    pub launching: u64,
    /// Instances assigned a node.
    pub busy: u64,
    /// Instances waiting for work (spares included).
    pub idle: u64,
    /// Instances whose agent has not asked for work yet (still booting), idle or busy.
    #[serde(default)]
    pub booting: u64,
    /// Instances started since the engine started.
    pub launched_total: u64,
    /// Nodes given an instance another node had used.
    pub reused_total: u64,
    /// Nodes given a spare (an instance started ahead of need).
    pub spares_used_total: u64,
    /// Instances terminated by the pool (idle timeout, lost agent, room, shutdown).
    pub retired_total: u64,
}

/// `POST /nodes/register` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The single-use token the node was provisioned with.
    pub provision_token: String,
    /// A random value the agent picks once per registration and sends again with every resend
    /// of it: a registration whose answer was lost, resent with the same token and nonce, gets
    /// the node's assignment again (with a new auth token). At most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// `POST /nodes/register` answer: everything the agent needs to run its slice.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RegisterResponse {
    /// Bearer token for every later node call.
    pub auth_token: String,
    /// The deployment.
    pub deployment_id: String,
    /// This node.
    pub node_id: String,
    /// This node's index.
    pub node_index: u32,
    /// The environment the script runs with (secrets included: this goes to the node only).
    pub env: BTreeMap<String, String>,
    /// `remote_script_to_run`, relative to the bundle root.
    pub script: String,
    /// `remote_dest_dir`, or none for a fresh per-node work dir.
    pub dest_dir: Option<String>,
    /// How often to call `/nodes/heartbeat`, in whole seconds (at least 1), for agents older
    /// than `heartbeat_interval_ms`.
    pub heartbeat_interval_s: u64,
    /// How often to call `/nodes/heartbeat`, in milliseconds: always well below the daemon's
    /// heartbeat timeout, also when that is under two seconds. Absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// `nodes.timeout` in seconds: the agent kills the script after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// The agent registered with a pooled instance's token (see [`crate::PooledProvider`]):
    /// once this node has ended, it clears the node's files and registers again (with
    /// `next_token`) for its next assignment, instead of exiting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// The names of the variables of `env` that hold secrets: the agent masks their values in
    /// what it reports (before it cuts a failure message, so no part of one is left).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_names: Vec<String>,
    /// For a pooled instance: the token to register with next time. The one this registration
    /// used no longer works, so a token read from the instance's user data (which anything on
    /// the instance can read) is worthless once the first node has registered. A secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// `outputs` of `taskfly.yml`: the files, globs and folders (relative to the bundle
    /// folder) the agent packs and uploads (`POST /nodes/outputs`) once the script has ended,
    /// before its final report. Empty (and absent) when the node sends nothing back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

impl RegisterResponse {
    /// How often to heartbeat: `heartbeat_interval_ms`, else `heartbeat_interval_s` (at least
    /// 1 s) from an older daemon.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        match self.heartbeat_interval_ms {
            Some(ms) => std::time::Duration::from_millis(ms.max(1)),
            None => std::time::Duration::from_secs(self.heartbeat_interval_s.max(1)),
        }
    }
}

impl std::fmt::Debug for RegisterResponse {
    /// Leaves out the token and the environment, which hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("deployment_id", &self.deployment_id)
            .field("node_id", &self.node_id)
            .field("node_index", &self.node_index)
            .field("script", &self.script)
            .field("dest_dir", &self.dest_dir)
            .field("heartbeat_interval_s", &self.heartbeat_interval_s)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .finish_non_exhaustive()
    }
}

/// `POST /nodes/heartbeat` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Free-form numbers the agent wants to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<String, serde_json::Value>>,
}

/// `POST /nodes/heartbeat` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HeartbeatResponse {
    /// Always `ok`.
    pub status: String,
    /// The daemon wants the script stopped (terminate request, node no longer wanted).
    pub shutdown: bool,
}

/// `POST /nodes/status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// `downloading_assets`, `running_script`, `completed` or `failed`.
    pub status: NodeStatus,
    /// Why, for failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The script's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// One line in [`LogsRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLineIn {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line without its newline.
    pub line: String,
    /// RFC 3339; the daemon's clock when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// This line's number for recognising resent lines, when the batch's `offset` does not
    /// give it (the sh agent numbers lines by their byte position in their stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_no: Option<u64>,
}

/// `POST /nodes/logs` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsRequest {
    /// Lines in the order they were written.
    pub lines: Vec<LogLineIn>,
    /// How many lines this agent sent before this batch (in this attempt). Lets the daemon
    /// drop a batch resent after a connection broke, so no line is stored twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// `{"status": "ok"}` for health and accepted node calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatusOk {
    /// `ok`.
    pub status: String,
}

impl StatusOk {
    /// `{"status": "ok"}`.
    pub fn new() -> StatusOk {
        StatusOk {
            status: "ok".to_owned(),
        }
    }
}

impl Default for StatusOk {
    fn default() -> StatusOk {
        StatusOk::new()
    }
}

/// `DELETE /deployments/{id}` (202) and `POST /deployments/{id}/cleanup` (200).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentAction {
    /// The deployment.
    pub deployment_id: String,
    /// `terminating` (a terminate request) or `cleaned` (a cleanup).
    pub status: String,
}

impl DeploymentView {
    /// Whether the deployment has reached `completed`, `failed` or `terminated`.
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// Whether `node` failed but has a retry left: it is waiting to be started again, and
    /// counts as neither failed nor finished.
    pub fn is_retrying(&self, node: &NodeView) -> bool {
        node.status == NodeStatus::Failed && node.attempt <= self.retries && !self.is_final()
    }
}

/// The statuses travel as their SPEC §3 names (`running_script`, ...), the names
/// `as_str` and `FromStr` of the model use, so the wire and the store cannot disagree.
macro_rules! serde_by_name {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_by_name!(DeploymentStatus, NodeStatus);

/// `POST /deployments/{id}/rerun` request: which nodes of a finished deployment to run again.
/// An empty body means `{"nodes": "failed"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RerunRequest {
    /// `"failed"` (the default) or a list of node indexes.
    #[serde(default)]
    pub nodes: RerunSelection,
}

impl RerunRequest {
    /// A request for `nodes`.
    pub fn new(nodes: RerunSelection) -> RerunRequest {
        RerunRequest { nodes }
    }
}

/// The nodes of a [`RerunRequest`]: `"failed"` (every node that did not complete) or a list
/// of node indexes such as `[1, 4]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RerunSelection {
    /// `"failed"`: every node that failed or was terminated.
    #[default]
    Failed,
    /// These node indexes.
    Indexes(Vec<u32>),
}

impl Serialize for RerunSelection {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RerunSelection::Failed => serializer.serialize_str("failed"),
            RerunSelection::Indexes(indexes) => indexes.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for RerunSelection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Selection;

        impl<'de> serde::de::Visitor<'de> for Selection {
            type Value = RerunSelection;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#""failed" or a list of node indexes like [1, 4]"#)
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RerunSelection, E> {
                if value == "failed" {
                    Ok(RerunSelection::Failed)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(value), &self))
                }
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RerunSelection, A::Error> {
                let mut indexes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(index) = seq.next_element::<u32>()? {
                    indexes.push(index);
                }
                Ok(RerunSelection::Indexes(indexes))
            }
        }

        deserializer.deserialize_any(Selection)
    }
}

/// The answer to `POST /nodes/outputs`: what the daemon stored of the node's outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputsStored {
    /// Always `ok`.
    pub status: String,
    /// Regular files stored.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// `event: deployment` of `GET /api/v1/events` (SPEC §4.1): a deployment was accepted or
/// changed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentEvent {
    /// The deployment after the change, without its nodes.
    pub deployment: DeploymentView,
}

/// `event: node` of `GET /api/v1/events`: a node changed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeEvent {
    /// Its deployment after the change (state and counters), without its nodes.
    pub deployment: DeploymentView,
    /// The node after the change.
    pub node: NodeView,
    /// The state it left.
    pub previous: NodeStatus,
}

/// `event: reload` of `GET /api/v1/events`: events were missed (a resume from an id no longer
/// held, or a reader that fell too far behind); read the state again. Later events follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReloadEvent {
    /// Why, for people.
    pub reason: String,
}

/// One event of `GET /api/v1/events`, as [`crate::Client::events`] reads it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// `event: deployment`.
    Deployment(Box<DeploymentEvent>),
    /// `event: node`.
    Node(Box<NodeEvent>),
    /// `event: reload`: events were missed; read the state again.
    Reload(ReloadEvent),
}
