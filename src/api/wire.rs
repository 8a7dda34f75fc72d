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
    Deployment(DeploymentEvent),
    /// `event: node`.
    Node(Box<NodeEvent>),
    /// `event: reload`: events were missed; read the state again.
    Reload(ReloadEvent),
}
