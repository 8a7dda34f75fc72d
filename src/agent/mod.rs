//! The node agent: what runs on every node, as `taskfly agent` on a remote machine or as a
//! tokio task of the [`crate::LocalProvider`].
//!
//! [`run`] registers with the daemon, downloads and extracts the worker bundle, runs the user's
//! script with the node's environment, streams its output line by line, heartbeats, and
//! reports how the script ended (SPEC §2). On a pooled instance (the daemon's answer says
//! `pooled`) it then clears the node's files and registers again for the next node.
//!
//! The code, one concern per module: this one holds the configuration, the report and the
//! registration loop; `node` a registered node's life and its calls to the daemon; `files` the
//! bundle's download, extraction and removal; `script` starting and supervising the script
//! (its process group is stopped through `crate::process`); `output` the script's lines and
//! their shipping; `heartbeat` the heartbeats. [`bootstrap`] is the same agent in `sh`.
//!
//! Invariants:
//! - The script runs in a process group of its own; whenever the agent stops it (daemon
//!   shutdown request, cancellation, time-out) or the script's leader exits, the whole group is
//!   killed, and the agent returns only once the group is gone.
//! - The script's environment is the agent's own minus every `TASKFLY_*` variable (the daemon's
//!   API token must not leak into user code), plus the node's variables, set directly on the
//!   process: no shell ever evaluates a value.
//! - No token and no environment value is ever logged.
//! - Every node of a pooled instance starts as on a fresh agent: its own stop token, time limit
//!   and heartbeat interval, an environment built from its own registration only, and a bundle
//!   directory from which the previous node's files are gone.
//! - Every concurrent piece (heartbeats, output readers, log shipping) is a future joined by
//!   [`run`]; nothing is spawned and forgotten.

pub mod bootstrap;
#[cfg(test)]
pub(crate) mod fake_daemon;
mod files;
mod heartbeat;
mod node;
mod output;
mod outputs;
mod script;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::client::{Client, Registration};
use crate::api::wire;
use crate::error::{Error, Result};
use crate::state::model::NodeStatus;

use self::files::{remove_quietly, BundleFiles, ASSETS_FILE};
use self::node::Node;

/// How long a stopped script gets between SIGTERM and SIGKILL unless configured otherwise.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// The shortest time between two registrations of a pooled instance. The daemon holds a
/// registration for up to about 20 s before answering "no work yet"; one that answers at once
/// again and again must not make the agent spin.
const MIN_REGISTER_INTERVAL: Duration = Duration::from_secs(1);

/// Environment variable naming the daemon URL, for [`AgentConfig::from_env`].
pub const ENV_DAEMON_URL: &str = "TASKFLY_AGENT_DAEMON_URL";
/// Environment variable holding the provision token, for [`AgentConfig::from_env`]. An
/// environment variable rather than an argument, so it does not show in `ps`.
pub const ENV_PROVISION_TOKEN: &str = "TASKFLY_AGENT_PROVISION_TOKEN";
/// Environment variable naming the work directory, for [`AgentConfig::from_env`].
pub const ENV_WORK_DIR: &str = "TASKFLY_AGENT_WORK_DIR";
/// Environment variable with the grace period in milliseconds, for [`AgentConfig::from_env`].
pub const ENV_GRACE_MS: &str = "TASKFLY_AGENT_GRACE_MS";
/// Environment variable with the instance id the agent serves: lets the local provider find
/// its agent processes again after a restart.
pub const ENV_INSTANCE_ID: &str = "TASKFLY_AGENT_INSTANCE_ID";
/// Environment variable naming a PEM file of the certificates to trust for an `https://`
/// daemon, for [`AgentConfig::from_env`].
pub const ENV_CA_FILE: &str = "TASKFLY_AGENT_CA_FILE";

/// What the agent needs to know to serve one node.
#[derive(Clone)]
pub struct AgentConfig {
    /// The daemon's API base URL (`http://host:port`), as handed to the node.
    pub daemon_url: String,
    /// The token the node registers with: single-use, or a pooled instance's token used for
    /// every node the instance serves. A secret: `Debug` hides it.
    pub provision_token: String,
    /// A directory of the agent's own: the bundle is downloaded here, and extracted into
    /// `work_dir/bundle` unless the deployment names a `remote_dest_dir`.
    pub work_dir: PathBuf,
    /// How long a stopped script gets between SIGTERM and SIGKILL (10 s by default).
    pub grace_period: Duration,
    /// For an `https://` daemon: a PEM file of the certificates to trust (a private CA, or the
    /// daemon's self-signed certificate) instead of the platform's trust store. Needs the
    /// `tls` feature; without it, [`run`] refuses a CA file.
    pub ca_file: Option<PathBuf>,
}

impl AgentConfig {
    /// The configuration of an agent registering at `daemon_url` with `provision_token` and
    /// working in `work_dir`, with the default grace period.
    pub fn new(
        daemon_url: impl Into<String>,
        provision_token: impl Into<String>,
        work_dir: impl Into<PathBuf>,
    ) -> AgentConfig {
        AgentConfig {
            daemon_url: daemon_url.into(),
            provision_token: provision_token.into(),
            work_dir: work_dir.into(),
            grace_period: DEFAULT_GRACE_PERIOD,
            ca_file: None,
        }
    }

    /// Sets the PEM file of the certificates to trust for an `https://` daemon.
    #[must_use]
    pub fn ca_file(mut self, ca_file: impl Into<PathBuf>) -> AgentConfig {
        self.ca_file = Some(ca_file.into());
        self
    }

    /// Sets how long a stopped script gets between SIGTERM and SIGKILL.
    #[must_use]
    pub fn grace_period(mut self, grace_period: Duration) -> AgentConfig {
        self.grace_period = grace_period;
        self
    }

    /// The configuration an agent process was started with by the local provider
    /// ([`crate::LocalProvider::agent_program`]): [`ENV_DAEMON_URL`], [`ENV_PROVISION_TOKEN`],
    /// [`ENV_WORK_DIR`] and optionally [`ENV_GRACE_MS`] and [`ENV_CA_FILE`]. `None` when the
    /// first is not set.
    pub fn from_env() -> Result<Option<AgentConfig>> {
        let Ok(daemon_url) = std::env::var(ENV_DAEMON_URL) else {
            return Ok(None);
        };
        let missing = |name: &str| Error::invalid_input(format!("{name} is not set"));
        let token = std::env::var(ENV_PROVISION_TOKEN).map_err(|_| missing(ENV_PROVISION_TOKEN))?;
        let work_dir = std::env::var_os(ENV_WORK_DIR).ok_or_else(|| missing(ENV_WORK_DIR))?;
        let mut config = AgentConfig::new(daemon_url, token, PathBuf::from(work_dir));
        if let Ok(ms) = std::env::var(ENV_GRACE_MS) {
            let ms: u64 = ms.parse().map_err(|_| {
                Error::invalid_input(format!("{ENV_GRACE_MS}: expected milliseconds, got `{ms}`"))
            })?;
            config = config.grace_period(Duration::from_millis(ms));
        }
        if let Some(ca_file) = std::env::var_os(ENV_CA_FILE).filter(|v| !v.is_empty()) {
            config = config.ca_file(PathBuf::from(ca_file));
        }
        Ok(Some(config))
    }
}

impl fmt::Debug for AgentConfig {
    /// Leaves out the provision token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("daemon_url", &self.daemon_url)
            .field("work_dir", &self.work_dir)
            .field("grace_period", &self.grace_period)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// How a node ended, as far as its agent knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    /// The node's id; empty if the agent served no node (cancelled before it could register,
    /// or its pooled instance retired before any assignment).
    pub node_id: String,
    /// The script's exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// `Completed`, `Failed`, or `Terminated` (stopped by the daemon or by cancellation, in which
    /// case nothing was reported to the daemon).
    pub status: NodeStatus,
    /// Why it failed, as reported to the daemon. It may quote the script's last stderr line,
    /// which may hold a secret: show it to the node's owner, do not log it in a daemon.
    pub message: Option<String>,
}

impl AgentReport {
    fn terminated(node_id: &str) -> AgentReport {
        AgentReport {
            node_id: node_id.to_string(),
            exit_code: None,
            status: NodeStatus::Terminated,
            message: None,
        }
    }
}

/// [`run`] until it ends or the process gets SIGINT or SIGTERM, which stop the script
/// gracefully (as a terminate request does). For agent processes: `taskfly agent`, `taskflyd agent`.
pub async fn run_until_signal(config: AgentConfig) -> Result<AgentReport> {
    use tokio::signal::unix::{signal, SignalKind};
    let cancel = CancellationToken::new();
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("cannot listen for SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("cannot listen for SIGINT", e))?;
    let agent = run(config, cancel.clone());
    tokio::pin!(agent);
    tokio::select! {
        report = &mut agent => return report,
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    cancel.cancel();
    agent.await
}

/// The client the agent talks to the daemon with, trusting the configured CA file if any.
fn daemon_client(config: &AgentConfig) -> Result<Client> {
    let client = Client::new(&config.daemon_url, None)?;
    match &config.ca_file {
        None => Ok(client),
        #[cfg(feature = "tls")]
        Some(ca_file) => client.with_ca_file(ca_file),
        #[cfg(not(feature = "tls"))]
        Some(ca_file) => Err(Error::invalid_input(format!(
            "the CA file {} was given, but this build of taskfly was built without TLS support \
             (the `tls` feature)",
            ca_file.display()
        ))),
    }
}

/// Serves the nodes the daemon assigns to this agent, from registration to final report.
///
/// Registers with `config.provision_token` and serves the node the daemon assigns. When the
/// answer is not `pooled`, that one node is all: `run` returns its report. A pooled instance's
/// agent goes on once the node has ended (completed, failed, timed out, or stopped by the
/// daemon): it removes the node's files (the bundle directory, or only its contents if it
/// existed before the node), logs "node finished; waiting for the next assignment" and
/// registers again, with the answer's `next_token` (the token used is then spent). "No work
/// yet" (204, after the daemon held the request
/// up to about 20 s) is followed by another registration; "retired" (410) ends the loop, as
/// does a 401 once a node has been served (the daemon forgot the instance, for example after a
/// restart). `run` then returns the last node's report, or a `terminated` report with an
/// empty node id if it served none.
///
/// Returns once the script and every process of its group are gone. Cancelling `cancel` stops
/// the script (SIGTERM to its group, SIGKILL after the grace period) and returns a `terminated`
/// report without reporting a final state to the daemon, which is terminating the node itself;
/// cancelled while waiting for an assignment, it returns the last report at once.
/// A failure before the script runs (download, extraction, missing script) is reported to the
/// daemon as `failed` and returned as a `failed` report.
///
/// Errors: the daemon refused the first registration or could not be reached (after about two
/// minutes of retries), a state report could not be delivered, or a pooled node's files could
/// not be removed (the next node would not start clean, so no next node is taken).
///
/// Prefer cancelling over dropping the future: a dropped future still kills the script's group,
/// but sends nothing more to the daemon.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<AgentReport> {
    let client = daemon_client(&config)?;
    run_with_client(config, client, cancel).await
}

/// [`run`], talking to the daemon through `client` (of `config.daemon_url`, trusting what
/// `config.ca_file` says): the local provider's agent tasks share one, and with it one pool of
/// connections, instead of opening connections of their own.
pub(crate) async fn run_with_client(
    config: AgentConfig,
    client: Client,
    cancel: CancellationToken,
) -> Result<AgentReport> {
    let mut last_report: Option<AgentReport> = None;
    // A pooled instance's token changes at every registration (`next_token`).
    let mut token = config.provision_token.clone();
    let last_or_none =
        |last: Option<AgentReport>| last.unwrap_or_else(|| AgentReport::terminated(""));
    loop {
        let asked = Instant::now();
        let answer = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(last_or_none(last_report)),
            answer = client.register_for_work(&token) => answer,
        };
        let registration = match answer {
            Ok(Registration::Assigned(registration)) => registration,
            Ok(Registration::NoWork) => {
                tracing::debug!("no work from the daemon yet; asking again");
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Ok(last_or_none(last_report)),
                    () = tokio::time::sleep_until(asked + MIN_REGISTER_INTERVAL) => {}
                }
                continue;
            }
            Ok(Registration::Retired { reason }) => {
                tracing::info!(%reason, "the daemon retired this instance; the agent stops");
                return Ok(last_or_none(last_report));
            }
            Err(error) if error.is_unauthorized() && last_report.is_some() => {
                tracing::warn!(
                    error = %error.report(),
                    "the daemon no longer knows this instance; the agent stops"
                );
                return Ok(last_or_none(last_report));
            }
            Err(error) => return Err(error),
        };
        let pooled = registration.pooled;
        if let Some(next) = &registration.next_token {
            token.clone_from(next);
        }
        let (report, files) = serve_node(&config, &client, registration, &cancel).await;
        if !pooled || cancel.is_cancelled() {
            return report;
        }
        if let Some(files) = files {
            files.remove().await?;
        }
        remove_quietly(&config.work_dir.join(ASSETS_FILE)).await;
        let report = report?;
        tracing::info!(
            node_id = %report.node_id,
            "node finished; waiting for the next assignment"
        );
        last_report = Some(report);
    }
}

/// Serves one registered node to its end. Also returns where its bundle went, once it was
/// extracted, for a pooled instance to clear.
async fn serve_node(
    config: &AgentConfig,
    client: &Client,
    registration: wire::RegisterResponse,
    cancel: &CancellationToken,
) -> (Result<AgentReport>, Option<BundleFiles>) {
    tracing::info!(
        node_id = %registration.node_id,
        deployment_id = %registration.deployment_id,
        pooled = registration.pooled,
        "registered with the daemon"
    );
    let node = Node {
        client: client.clone().with_token(registration.auth_token.clone()),
        // Each node gets a stop token of its own: a stop asked for one node ends that node
        // only, not the pooled instance's next one.
        stop: cancel.child_token(),
        cancel: cancel.clone(),
        config,
        registration,
        bundle_files: std::sync::OnceLock::new(),
        script_group: std::sync::atomic::AtomicI32::new(0),
        bundle_root: std::sync::OnceLock::new(),
    };
    let finished = CancellationToken::new();
    let (report, ()) = tokio::join!(
        async {
            let report = node.serve().await;
            finished.cancel();
            report
        },
        node.heartbeat_loop(&finished),
    );
    if let Ok(report) = &report {
        tracing::info!(
            node_id = %report.node_id,
            status = %report.status,
            exit_code = ?report.exit_code,
            "node finished"
        );
    }
    (report, node.bundle_files.into_inner())
}
