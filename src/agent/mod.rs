//! The node agent: what runs on every node, as `taskfly agent` on a remote machine or as a
//! tokio task of the [`crate::LocalProvider`].
//!
//! [`run`] registers with the daemon, downloads and extracts the worker bundle, runs the user's
//! script with the node's environment, streams its output line by line, heartbeats, and
//! reports how the script ended (SPEC §2). On a pooled instance (the daemon's answer says
//! `pooled`) it then clears the node's files and registers again for the next node.
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

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::client::{Client, Registration};
use crate::api::wire;
use crate::bundle::{extract_bundle, BundleLimits};
use crate::error::{Error, Result};
use crate::state::model::NodeStatus;

/// How long a stopped script gets between SIGTERM and SIGKILL unless configured otherwise.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// The longest output line sent as one line; longer ones are split.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// A batch of output lines is sent when it has this many lines...
const BATCH_LINES: usize = 200;
/// ...or when its first line is this old, or when the script's output ends.
const BATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Output lines waiting to be sent; when full, reading the script's output pauses.
const LOG_CHANNEL_CAPACITY: usize = 4096;
/// Once cancelled, each remaining call to the daemon gets at most this long.
const AFTER_CANCEL_BUDGET: Duration = Duration::from_secs(3);
/// After the script's group is gone, its output is read for at most this long (a process that
/// left the group may still hold the pipes open).
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGKILL, how long to wait for the group to disappear before giving up with a warning.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How often to check whether the group is gone.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The last stderr line quoted in a failure message is cut to this many characters.
const MAX_QUOTED_CHARS: usize = 500;
/// The name of the downloaded worker bundle inside the work directory, removed once extracted.
const ASSETS_FILE: &str = ".taskfly-assets.tar.gz";
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
                    %error,
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

/// One registered node.
struct Node<'a> {
    config: &'a AgentConfig,
    registration: wire::RegisterResponse,
    /// Authenticated with the node token.
    client: Client,
    /// Cancellation from the agent's owner.
    cancel: CancellationToken,
    /// Fired by `cancel` or by a heartbeat answer asking the node to stop.
    stop: CancellationToken,
    /// What to remove of the bundle once the node has ended, set just before extracting it.
    bundle_files: std::sync::OnceLock<BundleFiles>,
}

/// A bundle ready to run.
#[derive(Debug)]
struct Prepared {
    root: PathBuf,
    script: PathBuf,
    plan: ExecPlan,
}

/// Why the script's supervision ended.
#[derive(Debug)]
enum Ending {
    /// The script's leader exited by itself.
    Exited(ExitStatus),
    /// The daemon asked the node to stop, or the agent was cancelled.
    Stopped,
    /// `nodes.timeout` elapsed.
    TimedOut(Duration),
}

impl Node<'_> {
    fn node_id(&self) -> &str {
        &self.registration.node_id
    }

    /// Everything after registration.
    async fn serve(&self) -> Result<AgentReport> {
        if let Err(error) = self.report(NodeStatus::DownloadingAssets, None, None).await {
            return self.stopped_or(error);
        }
        let prepared = match self.prepare().await {
            Ok(Some(prepared)) => prepared,
            Ok(None) => return Ok(AgentReport::terminated(self.node_id())),
            Err(problem) => {
                tracing::warn!(node_id = %self.node_id(), "cannot run the script: {problem}");
                return self.fail(problem, None).await;
            }
        };
        if self.stop.is_cancelled() {
            return Ok(AgentReport::terminated(self.node_id()));
        }
        if let Err(error) = self.report(NodeStatus::RunningScript, None, None).await {
            return self.stopped_or(error);
        }
        tracing::info!(node_id = %self.node_id(), script = %self.registration.script, "running the script");
        let (ending, last_stderr) = match self.run_script(&prepared).await {
            Ok(outcome) => outcome,
            Err(problem) => {
                tracing::warn!(node_id = %self.node_id(), "cannot run the script: {problem}");
                return self.fail(problem, None).await;
            }
        };
        match ending {
            Ending::Stopped => Ok(AgentReport::terminated(self.node_id())),
            Ending::TimedOut(limit) => {
                let message = format!("timed out after {}", humantime::format_duration(limit));
                self.fail(message, None).await
            }
            Ending::Exited(status) if status.success() => {
                if let Err(error) = self.report(NodeStatus::Completed, None, Some(0)).await {
                    return self.stopped_or(error);
                }
                Ok(AgentReport {
                    node_id: self.node_id().to_string(),
                    exit_code: Some(0),
                    status: NodeStatus::Completed,
                    message: None,
                })
            }
            Ending::Exited(status) => {
                let (exit_code, message) = failure_message(status, last_stderr.as_deref());
                self.fail(message, exit_code).await
            }
        }
    }

    /// Reports `failed` with `message` and returns the matching report. The message is not
    /// logged: it may quote the script's stderr, which may hold a secret; the daemon masks
    /// secrets before it stores or shows it.
    async fn fail(&self, message: String, exit_code: Option<i32>) -> Result<AgentReport> {
        tracing::info!(node_id = %self.node_id(), exit_code = ?exit_code, "node failed");
        if let Err(error) = self
            .report(NodeStatus::Failed, Some(message.clone()), exit_code)
            .await
        {
            return self.stopped_or(error);
        }
        Ok(AgentReport {
            node_id: self.node_id().to_string(),
            exit_code,
            status: NodeStatus::Failed,
            message: Some(message),
        })
    }

    /// A report the daemon did not take is an error, unless the node is being stopped anyway.
    fn stopped_or(&self, error: Error) -> Result<AgentReport> {
        if self.stop.is_cancelled() {
            Ok(AgentReport::terminated(self.node_id()))
        } else {
            Err(error)
        }
    }

    async fn report(
        &self,
        status: NodeStatus,
        message: Option<String>,
        exit_code: Option<i32>,
    ) -> Result<()> {
        let request = wire::StatusRequest {
            status,
            message,
            exit_code,
        };
        self.call(self.client.report_status(&request)).await
    }

    /// Runs a daemon call; once the agent is cancelled the call gets only a short while more, so
    /// an agent whose daemon is gone (daemon shutdown) still ends promptly.
    async fn call<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(call);
        tokio::select! {
            biased;
            answer = &mut call => return answer,
            () = self.cancel.cancelled() => {}
        }
        match tokio::time::timeout(AFTER_CANCEL_BUDGET, call).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::transport(
                "gave up waiting for the daemon: the agent is shutting down",
            )),
        }
    }

    /// Downloads, extracts and checks the bundle. `Ok(None)`: stopped meanwhile. `Err`: why the
    /// node cannot run, for the `failed` report.
    async fn prepare(&self) -> std::result::Result<Option<Prepared>, String> {
        let work_dir = &self.config.work_dir;
        tokio::fs::create_dir_all(work_dir).await.map_err(|e| {
            format!(
                "cannot create the work directory {}: {e}",
                work_dir.display()
            )
        })?;
        let archive = work_dir.join(ASSETS_FILE);
        let downloaded = tokio::select! {
            () = self.stop.cancelled() => None,
            downloaded = self.client.download_assets(&archive) => Some(downloaded),
        };
        let bytes = match downloaded {
            None => {
                remove_quietly(&archive).await;
                return Ok(None);
            }
            Some(Ok(bytes)) => bytes,
            Some(Err(error)) => {
                remove_quietly(&archive).await;
                return Err(format!("cannot download the assets: {error}"));
            }
        };
        tracing::debug!(node_id = %self.node_id(), bytes, "downloaded the assets");

        let dest = bundle_dir(work_dir, self.registration.dest_dir.as_deref());
        // Whether the extraction creates the directory or fills an empty one decides what goes
        // once the node has ended; a directory it refuses (not empty) is left as it is.
        let planned = {
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || BundleFiles::plan(&dest)).await
        };
        if let Ok(Some(files)) = planned {
            let _ = self.bundle_files.set(files);
        }
        let extracted = {
            let archive = archive.clone();
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&archive)
                    .map_err(|e| format!("cannot open the downloaded assets: {e}"))?;
                extract_bundle(io::BufReader::new(file), &dest, &BundleLimits::default())
                    .map_err(|e| format!("cannot extract the bundle into {}: {e}", dest.display()))
            })
            .await
        };
        remove_quietly(&archive).await;
        let summary = match extracted {
            Ok(result) => result?,
            Err(e) => return Err(format!("the extraction of the bundle failed: {e}")),
        };
        tracing::debug!(
            node_id = %self.node_id(),
            files = summary.files.len(),
            bytes = summary.total_bytes,
            "extracted the bundle"
        );

        let root = tokio::fs::canonicalize(&dest)
            .await
            .map_err(|e| format!("cannot open the bundle directory {}: {e}", dest.display()))?;
        let name = &self.registration.script;
        let script = resolve_script(&root, name)?;
        let metadata = match tokio::fs::metadata(&script).await {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!("script {name} not found in the bundle"))
            }
            Err(e) => return Err(format!("cannot read script {name}: {e}")),
        };
        if !metadata.is_file() {
            return Err(format!("script {name} is not a regular file"));
        }
        let head = read_head(&script)
            .await
            .map_err(|e| format!("cannot read script {name}: {e}"))?;
        let plan = exec_plan(metadata.permissions().mode(), &head);
        Ok(Some(Prepared { root, script, plan }))
    }

    /// Starts the script and supervises it until it and its group are gone, shipping its output
    /// meanwhile. Returns how it ended and the last non-empty line of its stderr.
    async fn run_script(
        &self,
        prepared: &Prepared,
    ) -> std::result::Result<(Ending, Option<String>), String> {
        let env = script_env(std::env::vars_os(), &self.registration);
        let name = &self.registration.script;
        let mut child = start_script(prepared, &env)
            .await
            .map_err(|e| format!("cannot start script {name}: {e}"))?;
        let Some(pgid) = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
        else {
            return Err(format!("cannot start script {name}: it has no process id"));
        };
        let mut guard = GroupGuard { pgid: Some(pgid) };

        let (sender, receiver) = mpsc::channel(LOG_CHANNEL_CAPACITY);
        let group_gone = CancellationToken::new();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let supervise = async {
            let ending = self.supervise(&mut child, pgid).await;
            group_gone.cancel();
            ending
        };
        let (ending, _, last_stderr, ()) = tokio::join!(
            supervise,
            pump_lines(stdout, Stream::Stdout, sender.clone(), &group_gone),
            pump_lines(stderr, Stream::Stderr, sender, &group_gone),
            self.ship_logs(receiver),
        );
        guard.pgid = None;
        let ending = ending.map_err(|e| format!("lost track of script {name}: {e}"))?;
        Ok((ending, last_stderr))
    }

    /// Waits for the script to exit, to be stopped, or to time out, and makes sure its whole
    /// group is gone afterwards.
    async fn supervise(&self, child: &mut Child, pgid: Pid) -> io::Result<Ending> {
        let limit = self
            .registration
            .timeout_s
            .filter(|seconds| *seconds > 0)
            .map(Duration::from_secs);
        let deadline = async {
            match limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let ending = tokio::select! {
            status = child.wait() => {
                // The leader is gone; whatever it left running in its group goes too.
                kill_group(pgid).await;
                return status.map(Ending::Exited);
            }
            () = self.stop.cancelled() => {
                tracing::info!(node_id = %self.node_id(), "stopping the script");
                Ending::Stopped
            }
            () = deadline => Ending::TimedOut(limit.unwrap_or_default()),
        };
        terminate_group(child, pgid, self.config.grace_period).await?;
        Ok(ending)
    }

    /// Sends output lines to the daemon in batches until both streams have ended.
    async fn ship_logs(&self, mut receiver: mpsc::Receiver<wire::LogLineIn>) {
        let mut batch = Vec::new();
        let mut flush_at: Option<Instant> = None;
        // Lines handed to the daemon so far: numbers every batch, so a resent batch is
        // recognised and stored once.
        let mut sent = 0u64;
        loop {
            let next = tokio::select! {
                line = receiver.recv() => line,
                () = sleep_until(flush_at) => {
                    self.send_batch(&mut batch, &mut sent).await;
                    flush_at = None;
                    continue;
                }
            };
            match next {
                Some(line) => {
                    if batch.is_empty() {
                        flush_at = Some(Instant::now() + BATCH_INTERVAL);
                    }
                    batch.push(line);
                    if batch.len() >= BATCH_LINES {
                        self.send_batch(&mut batch, &mut sent).await;
                        flush_at = None;
                    }
                }
                None => {
                    self.send_batch(&mut batch, &mut sent).await;
                    return;
                }
            }
        }
    }

    async fn send_batch(&self, batch: &mut Vec<wire::LogLineIn>, sent: &mut u64) {
        if batch.is_empty() {
            return;
        }
        let request = wire::LogsRequest {
            lines: std::mem::take(batch),
            offset: Some(*sent),
        };
        *sent += request.lines.len() as u64;
        if let Err(error) = self.call(self.client.send_logs(&request)).await {
            tracing::warn!(
                node_id = %self.node_id(),
                lines = request.lines.len(),
                error = %error,
                "could not send output lines to the daemon; they are lost"
            );
        }
    }

    /// Heartbeats every `heartbeat_interval_s` until `finished`; an answer with `shutdown: true`
    /// stops the script.
    ///
    /// A heartbeat still unanswered at the next tick is given up for a fresh one. While the
    /// daemon is away the client's pauses between tries grow to 10 s, longer than a short
    /// heartbeat timeout: a restarted daemon would then fail this live node before its next
    /// try. A fresh heartbeat each interval reaches it within about one interval instead.
    async fn heartbeat_loop(&self, finished: &CancellationToken) {
        let period = Duration::from_secs(self.registration.heartbeat_interval_s.max(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = finished.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let answer = tokio::select! {
                () = finished.cancelled() => return,
                answer = tokio::time::timeout(period, self.call(self.client.heartbeat())) => answer,
            };
            match answer {
                Ok(Ok(answer)) if answer.shutdown => {
                    if !self.stop.is_cancelled() {
                        tracing::info!(node_id = %self.node_id(), "the daemon asked this node to stop");
                        self.stop.cancel();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(node_id = %self.node_id(), error = %error, "heartbeat failed");
                }
                Err(_) => {
                    tracing::warn!(node_id = %self.node_id(), "heartbeat unanswered for one interval; sending a new one");
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove a temporary file");
        }
    }
}

/// The files of a pooled node's bundle to remove once the node has ended, so that the next
/// node extracts into the same clean directory a fresh agent would.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BundleFiles {
    /// The extraction creates the bundle directory: remove this, the outermost directory it
    /// creates (the bundle directory itself, or the first of its parents that did not exist).
    Created(PathBuf),
    /// The bundle directory exists and is empty: remove what is in it, never the directory.
    Contents(PathBuf),
}

impl BundleFiles {
    /// What the extraction into `dest` will leave behind, judged before it starts. `None` when
    /// `dest` is not an empty directory: the extraction refuses it, and nothing there is the
    /// node's.
    fn plan(dest: &Path) -> Option<BundleFiles> {
        match std::fs::metadata(dest) {
            Ok(metadata) if metadata.is_dir() => {
                let mut entries = std::fs::read_dir(dest).ok()?;
                if entries.next().is_some() {
                    return None;
                }
                std::fs::canonicalize(dest).ok().map(BundleFiles::Contents)
            }
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BundleFiles::created(dest),
            Err(_) => None,
        }
    }

    /// For a `dest` that does not exist: the outermost missing directory on its way, resolved
    /// through the deepest one that exists. `None` when the missing part of the path climbs
    /// with `..`: where it leads is not known before it exists (`/missing/../tmp` is `/tmp`
    /// once `/missing` has been created), so nothing is removed rather than the wrong thing.
    fn created(dest: &Path) -> Option<BundleFiles> {
        let existing = dest.ancestors().skip(1).find(|ancestor| {
            // An empty ancestor is the current directory of a relative path.
            ancestor.as_os_str().is_empty() || std::fs::symlink_metadata(ancestor).is_ok()
        });
        let outermost = existing.and_then(|existing| {
            let missing = dest.strip_prefix(existing).ok()?;
            let mut components = missing.components();
            let first = match components.next()? {
                Component::Normal(name) => name,
                _ => return None,
            };
            if !components.all(|c| matches!(c, Component::Normal(_))) {
                return None;
            }
            let base = if existing.as_os_str().is_empty() {
                std::env::current_dir().ok()?
            } else {
                std::fs::canonicalize(existing).ok()?
            };
            Some(base.join(first))
        });
        outermost.map(BundleFiles::Created)
    }

    /// Removes the files. Errors: something could not be removed; the next node would not
    /// start clean.
    async fn remove(self) -> Result<()> {
        match tokio::task::spawn_blocking(move || self.remove_now()).await {
            Ok(removed) => removed,
            Err(e) => Err(Error::io(
                "cannot remove the previous node's files",
                io::Error::other(e.to_string()),
            )),
        }
    }

    fn remove_now(&self) -> Result<()> {
        let failed = |path: &Path, e: io::Error| {
            Error::io(
                format!(
                    "cannot remove the previous node's files in {}",
                    path.display()
                ),
                e,
            )
        };
        match self {
            BundleFiles::Created(dir) => {
                if is_protected(dir) {
                    return Err(refuse_protected(dir));
                }
                remove_tree(dir).map_err(|e| failed(dir, e))
            }
            BundleFiles::Contents(dir) => {
                match std::fs::symlink_metadata(dir) {
                    Ok(metadata) if metadata.is_dir() => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    // The script put something else in the directory's place: whatever that
                    // leads to is not the node's to empty.
                    Ok(_) => {
                        return Err(failed(dir, io::Error::other("it is no longer a directory")))
                    }
                    Err(e) => return Err(failed(dir, e)),
                }
                if is_protected(dir) {
                    return Err(refuse_protected(dir));
                }
                let entries = std::fs::read_dir(dir).map_err(|e| failed(dir, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| failed(dir, e))?;
                    remove_tree(&entry.path()).map_err(|e| failed(dir, e))?;
                }
                Ok(())
            }
        }
    }
}

/// `/` and the home directory are never removed or emptied, whatever a deployment names.
fn is_protected(dir: &Path) -> bool {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .and_then(|home| std::fs::canonicalize(home).ok());
    canonical.parent().is_none() || home.is_some_and(|home| home == canonical)
}

fn refuse_protected(dir: &Path) -> Error {
    Error::io(
        format!(
            "will not remove the previous node's files in {}",
            dir.display()
        ),
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "it is the root or the home directory",
        ),
    )
}

/// Removes `path` (a file, a link, or a directory with everything in it), without following
/// links. A directory the script made read-only is made writable and the removal tried again.
fn remove_tree(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !metadata.is_dir() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_owner_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

/// Gives the owner full access to `dir` and every directory below it (links not followed), as
/// far as it can.
fn make_owner_writable(dir: &Path) {
    let Ok(metadata) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !metadata.is_dir() {
        return;
    }
    let mode = metadata.permissions().mode() | 0o700;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_owner_writable(&entry.path());
        }
    }
}

/// Where the bundle goes: `remote_dest_dir` (a leading `~/` meaning the home directory,
/// relative paths taken from the work directory), else `work_dir/bundle`.
fn bundle_dir(work_dir: &Path, dest_dir: Option<&str>) -> PathBuf {
    let Some(dest) = dest_dir.map(str::trim).filter(|d| !d.is_empty()) else {
        return work_dir.join("bundle");
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let expanded = match (dest.strip_prefix("~/"), dest == "~", home) {
        (Some(rest), _, Some(home)) => home.join(rest),
        (None, true, Some(home)) => home,
        _ => PathBuf::from(dest),
    };
    work_dir.join(expanded)
}

/// The script's path inside the bundle; refuses an absolute path or one climbing out with `..`.
fn resolve_script(root: &Path, script: &str) -> std::result::Result<PathBuf, String> {
    let relative = Path::new(script);
    let mut has_name = false;
    for component in relative.components() {
        match component {
            Component::Normal(_) => has_name = true,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(format!(
                    "script path {script} must be relative to the bundle and stay inside it"
                ))
            }
        }
    }
    if !has_name {
        return Err("the deployment names no script to run".to_string());
    }
    Ok(root.join(relative))
}

/// The first bytes of the script, enough for a `#!` line (the kernel reads 256).
async fn read_head(script: &Path) -> io::Result<Vec<u8>> {
    let mut file = tokio::fs::File::open(script).await?;
    let mut head = Vec::with_capacity(256);
    (&mut file).take(256).read_to_end(&mut head).await?;
    Ok(head)
}

/// How to start the script.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExecPlan {
    /// It has an execute bit: exec it.
    Direct,
    /// Not executable, but it starts with `#!`: run that interpreter on it, with the line's
    /// optional argument (one argument, as the kernel does).
    Interpreter {
        program: OsString,
        argument: Option<OsString>,
    },
    /// Neither: `sh script`.
    Shell,
}

/// Chooses how to run a script with permission bits `mode` whose file starts with `head`.
fn exec_plan(mode: u32, head: &[u8]) -> ExecPlan {
    if mode & 0o111 != 0 {
        return ExecPlan::Direct;
    }
    let Some(rest) = head.strip_prefix(b"#!") else {
        return ExecPlan::Shell;
    };
    let line = rest.split(|byte| *byte == b'\n').next().unwrap_or_default();
    let line = line.trim_ascii();
    if line.is_empty() {
        return ExecPlan::Shell;
    }
    let (program, argument) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(at) => (&line[..at], line[at..].trim_ascii()),
        None => (line, &[][..]),
    };
    ExecPlan::Interpreter {
        program: OsStr::from_bytes(program).to_os_string(),
        argument: (!argument.is_empty()).then(|| OsStr::from_bytes(argument).to_os_string()),
    }
}

/// The script's environment: `inherited` minus every `TASKFLY_*` variable, then the node's
/// identity, then the node's variables from the daemon, each value byte for byte.
fn script_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    registration: &wire::RegisterResponse,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = inherited
        .into_iter()
        .filter(|(key, _)| !key.as_bytes().starts_with(b"TASKFLY_"))
        .collect();
    let identity = [
        ("TASKFLY_DEPLOYMENT_ID", registration.deployment_id.clone()),
        ("TASKFLY_NODE_ID", registration.node_id.clone()),
        ("TASKFLY_NODE_INDEX", registration.node_index.to_string()),
    ];
    for (key, value) in identity {
        env.insert(key.into(), value.into());
    }
    for (key, value) in &registration.env {
        env.insert(key.into(), value.into());
    }
    env
}

/// Starts the prepared script. An executable file the kernel cannot exec (a script with an
/// execute bit but no `#!` line) is run with `sh`, as POSIX shells do.
async fn start_script(
    prepared: &Prepared,
    env: &BTreeMap<OsString, OsString>,
) -> io::Result<Child> {
    let started = spawn_retrying_busy(&mut script_command(prepared, &prepared.plan, env)).await;
    match started {
        Err(e)
            if prepared.plan == ExecPlan::Direct
                && e.raw_os_error() == Some(Errno::ENOEXEC as i32) =>
        {
            spawn_retrying_busy(&mut script_command(prepared, &ExecPlan::Shell, env)).await
        }
        started => started,
    }
}

/// The command that runs the prepared script as `plan` says: in the bundle root, with exactly
/// `env`, no stdin, piped output, in a new process group, killed if the handle is dropped.
fn script_command(
    prepared: &Prepared,
    plan: &ExecPlan,
    env: &BTreeMap<OsString, OsString>,
) -> Command {
    let mut command = match plan {
        ExecPlan::Direct => Command::new(&prepared.script),
        ExecPlan::Interpreter { program, argument } => {
            let mut command = Command::new(program);
            command.args(argument).arg(&prepared.script);
            command
        }
        ExecPlan::Shell => {
            let mut command = Command::new("sh");
            command.arg(&prepared.script);
            command
        }
    };
    command
        .current_dir(&prepared.root)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Spawns `command`, retrying briefly on ETXTBSY: with many nodes extracting and starting
/// scripts in one process, another thread's fork may still hold a just-written script open.
async fn spawn_retrying_busy(command: &mut Command) -> io::Result<Child> {
    let mut attempt = 0u64;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            spawned => return spawned,
        }
    }
}

/// `(exit code, message)` for a script that did not exit with 0.
fn failure_message(status: ExitStatus, last_stderr: Option<&str>) -> (Option<i32>, String) {
    let (exit_code, mut message) = match (status.code(), status.signal()) {
        (Some(code), _) => (Some(code), format!("exited with code {code}")),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {signal}"));
            (None, format!("killed by signal {name}"))
        }
        (None, None) => (None, format!("ended with {status}")),
    };
    if let Some(line) = last_stderr {
        message.push_str(": ");
        message.push_str(&truncate_chars(line.trim(), MAX_QUOTED_CHARS));
    }
    (exit_code, message)
}

fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Reads one output stream to its end, sending each line to the shipper. Stops early when the
/// script's group has been gone for [`OUTPUT_DRAIN_TIMEOUT`] (a process outside the group still
/// holds the pipe). Returns the last non-empty line.
async fn pump_lines<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: Stream,
    sender: mpsc::Sender<wire::LogLineIn>,
    group_gone: &CancellationToken,
) -> Option<String> {
    let mut reader = reader?;
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut lines = Vec::new();
    let mut last = None;
    let mut buffer = vec![0u8; 16 * 1024];
    let drain_deadline = async {
        group_gone.cancelled().await;
        tokio::time::sleep(OUTPUT_DRAIN_TIMEOUT).await;
    };
    tokio::pin!(drain_deadline);
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buffer) => read,
            () = &mut drain_deadline => {
                tracing::warn!(
                    stream = stream.name(),
                    "a process outside the script's group keeps its output open; no longer reading it"
                );
                break;
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => splitter.push(&buffer[..n], &mut lines),
            Err(e) => {
                tracing::warn!(stream = stream.name(), error = %e, "cannot read the script's output");
                break;
            }
        }
        if !forward(&sender, stream, &mut lines, &mut last).await {
            return last;
        }
    }
    splitter.finish(&mut lines);
    forward(&sender, stream, &mut lines, &mut last).await;
    last
}

/// Sends `lines` to the shipper; false if it is gone.
async fn forward(
    sender: &mpsc::Sender<wire::LogLineIn>,
    stream: Stream,
    lines: &mut Vec<String>,
    last: &mut Option<String>,
) -> bool {
    let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    for line in lines.drain(..) {
        if !line.trim().is_empty() {
            *last = Some(line.clone());
        }
        let line = wire::LogLineIn {
            stream: stream.name().to_string(),
            line,
            timestamp: Some(timestamp.clone()),
            line_no: None,
        };
        if sender.send(line).await.is_err() {
            return false;
        }
    }
    true
}

/// Cuts a byte stream into lines: strips `\n` and `\r\n`, decodes lossy UTF-8, and splits a line
/// longer than `max` bytes into pieces of at most `max` bytes (at a character boundary when the
/// line is valid UTF-8), so nothing is lost and no line is unbounded.
struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    fn new(max: usize) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            max: max.max(4),
        }
    }

    /// Adds `data`, appending every line it completes to `out`.
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(at) = data.iter().position(|byte| *byte == b'\n') {
            self.pending.extend_from_slice(&data[..at]);
            if self.pending.last() == Some(&b'\r') {
                self.pending.pop();
            }
            self.split_long(0, out);
            out.push(String::from_utf8_lossy(&self.pending).into_owned());
            self.pending.clear();
            data = &data[at + 1..];
        }
        self.pending.extend_from_slice(data);
        // One byte more is kept back: it may be the `\r` of a `\r\n` still to come.
        self.split_long(1, out);
    }

    /// Ends the stream: a last line without a newline is still a line.
    fn finish(&mut self, out: &mut Vec<String>) {
        if self.pending.is_empty() {
            return;
        }
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        self.split_long(0, out);
        out.push(String::from_utf8_lossy(&self.pending).into_owned());
        self.pending.clear();
    }

    fn split_long(&mut self, keep_back: usize, out: &mut Vec<String>) {
        while self.pending.len() > self.max + keep_back {
            let at = char_boundary_before(&self.pending, self.max);
            out.push(String::from_utf8_lossy(&self.pending[..at]).into_owned());
            self.pending.drain(..at);
        }
    }
}

/// The largest index `<= max` (and at least `max - 3`) that does not fall inside a UTF-8
/// character of `bytes`; `max` itself if there is none. `bytes` is longer than `max`.
fn char_boundary_before(bytes: &[u8], max: usize) -> usize {
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|at| *at > 0 && bytes[*at] & 0xC0 != 0x80)
        .unwrap_or(max)
}

/// Kills the script's group with SIGKILL if it is dropped while still armed, so a dropped
/// agent future leaves nothing running.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Sends `signal` to every process of the group; a group already gone is not an error.
fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pgid = pgid.as_raw(),
            signal = signal.as_str(),
            error = %e,
            "cannot signal the script's process group"
        ),
    }
}

/// Stops a running script: SIGTERM to its whole group, up to `grace` for the group to exit,
/// then SIGKILL to whatever is left. Returns the leader's exit status once the leader is reaped
/// and the group is gone.
async fn terminate_group(child: &mut Child, pgid: Pid, grace: Duration) -> io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    let leader = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => None,
    };
    if leader.is_some() {
        // The leader is gone; give the rest of its group the remainder of the grace period.
        wait_for_group_exit(pgid, deadline, false).await;
    }
    signal_group(pgid, Signal::SIGKILL);
    let status = match leader {
        Some(status) => status,
        None => child.wait().await?,
    };
    ensure_group_gone(pgid).await;
    Ok(status)
}

/// Kills whatever is left of a group whose leader has exited and been reaped.
async fn kill_group(pgid: Pid) {
    signal_group(pgid, Signal::SIGKILL);
    ensure_group_gone(pgid).await;
}

async fn ensure_group_gone(pgid: Pid) {
    let deadline = Instant::now() + GROUP_EXIT_WAIT;
    if !wait_for_group_exit(pgid, deadline, true).await {
        tracing::warn!(
            pgid = pgid.as_raw(),
            "processes of the script's group are still there after SIGKILL"
        );
    }
}

/// Polls until no process of the group runs, or `deadline`; true if the group is gone.
/// With `ignore_zombies`, processes that are dead but not yet reaped by their parent count as
/// gone (orphans wait for init to reap them, which some container inits do late).
async fn wait_for_group_exit(pgid: Pid, deadline: Instant, ignore_zombies: bool) -> bool {
    loop {
        if !group_alive(pgid, ignore_zombies).await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL_INTERVAL.min(deadline - now)).await;
    }
}

async fn group_alive(pgid: Pid, ignore_zombies: bool) -> bool {
    match killpg(pgid, None) {
        // ESRCH: no process has that group; EPERM: the id now belongs to someone else's group.
        Err(_) => false,
        Ok(()) if ignore_zombies => tokio::task::spawn_blocking(move || has_live_member(pgid))
            .await
            .unwrap_or(true),
        Ok(()) => true,
    }
}

/// Whether a process of group `pgid` is alive (not a zombie), from `/proc`. Without a readable
/// `/proc`, every process counts as alive.
fn has_live_member(pgid: Pid) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, group)) = parse_proc_stat(&stat) {
            if group == pgid.as_raw() && state != 'Z' && state != 'X' {
                return true;
            }
        }
    }
    false
}

/// `(state, process group)` from a `/proc/<pid>/stat` line: `pid (comm) state ppid pgrp ...`.
fn parse_proc_stat(stat: &str) -> Option<(char, i32)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    pub(crate) fn registration(env: &[(&str, &str)]) -> wire::RegisterResponse {
        wire::RegisterResponse {
            auth_token: "node-token".into(),
            deployment_id: "dep".into(),
            node_id: "dep-1".into(),
            node_index: 1,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            script: "setup.sh".into(),
            dest_dir: None,
            heartbeat_interval_s: 1,
            timeout_s: None,
            pooled: false,
            next_token: None,
        }
    }

    fn lines(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn exec_plan_follows_execute_bits_then_shebang_then_sh() {
        assert_eq!(exec_plan(0o755, b"#!/bin/bash\n"), ExecPlan::Direct);
        assert_eq!(exec_plan(0o100, b"echo hi\n"), ExecPlan::Direct);
        assert_eq!(
            exec_plan(0o644, b"#!/usr/bin/env python3\nprint(1)\n"),
            ExecPlan::Interpreter {
                program: "/usr/bin/env".into(),
                argument: Some("python3".into()),
            }
        );
        assert_eq!(
            exec_plan(0o644, b"#! /bin/bash  -e -u \r\necho\n"),
            ExecPlan::Interpreter {
                program: "/bin/bash".into(),
                argument: Some("-e -u".into()),
            }
        );
        assert_eq!(
            exec_plan(0o600, b"#!/bin/sh"),
            ExecPlan::Interpreter {
                program: "/bin/sh".into(),
                argument: None,
            }
        );
        assert_eq!(exec_plan(0o644, b"echo hi\n"), ExecPlan::Shell);
        assert_eq!(exec_plan(0o644, b"#!\n"), ExecPlan::Shell);
        assert_eq!(exec_plan(0o644, b""), ExecPlan::Shell);
    }

    #[test]
    fn env_drops_taskfly_variables_and_keeps_values_byte_for_byte() {
        let tricky = "it's \"quoted\" $HOME `id` \\ \n second line ";
        let inherited = vec![
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
            (
                OsString::from("TASKFLY_API_TOKEN"),
                OsString::from("daemon-secret"),
            ),
            (
                OsString::from("TASKFLY_DATA_DIR"),
                OsString::from("/var/lib"),
            ),
            (OsString::from("OVERRIDDEN"), OsString::from("old")),
            (OsString::from("taskfly_lower"), OsString::from("kept")),
            (
                OsString::from("RAW"),
                OsString::from(OsStr::from_bytes(b"\xff\xfe")),
            ),
        ];
        let registration = registration(&[
            ("TRICKY", tricky),
            ("OVERRIDDEN", "new"),
            ("TASKFLY_TOTAL_NODES", "3"),
        ]);
        let env = script_env(inherited, &registration);
        let get = |key: &str| env.get(OsStr::new(key)).cloned();
        assert_eq!(get("TASKFLY_API_TOKEN"), None);
        assert_eq!(get("TASKFLY_DATA_DIR"), None);
        assert_eq!(get("PATH"), Some("/usr/bin:/bin".into()));
        assert_eq!(get("taskfly_lower"), Some("kept".into()));
        assert_eq!(get("RAW"), Some(OsStr::from_bytes(b"\xff\xfe").into()));
        assert_eq!(get("TRICKY"), Some(tricky.into()));
        assert_eq!(get("OVERRIDDEN"), Some("new".into()));
        assert_eq!(get("TASKFLY_DEPLOYMENT_ID"), Some("dep".into()));
        assert_eq!(get("TASKFLY_NODE_ID"), Some("dep-1".into()));
        assert_eq!(get("TASKFLY_NODE_INDEX"), Some("1".into()));
        assert_eq!(get("TASKFLY_TOTAL_NODES"), Some("3".into()));
    }

    #[test]
    fn lines_are_split_stripped_and_capped() {
        assert_eq!(
            lines(&[b"one\ntw", b"o\r\n", b"\nthree"], 64),
            ["one", "two", "", "three"]
        );
        assert_eq!(lines(&[b"a\r", b"\nb\n"], 64), ["a", "b"]);
        assert_eq!(lines(&[b"bad \xff byte\n"], 64), ["bad \u{fffd} byte"]);
        assert_eq!(lines(&[b""], 64), Vec::<String>::new());
        // A long line is cut into pieces of at most `max` bytes; nothing is lost.
        assert_eq!(lines(&[b"abcdefghij", b"k\n"], 4), ["abcd", "efgh", "ijk"]);
        // A piece never cuts a multi-byte character in two.
        let text = "ééééé\n";
        let pieces = lines(&[text.as_bytes()], 5);
        assert_eq!(pieces, ["éé", "éé", "é"]);
        // A line of exactly `max` bytes whose `\r\n` arrives later stays one line.
        assert_eq!(lines(&[b"abcd\r", b"\n"], 4), ["abcd"]);
        // The real cap.
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let pieces = lines(&[&long, b"\n"], MAX_LINE_BYTES);
        assert_eq!(
            pieces.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
        );
    }

    #[test]
    fn scripts_must_stay_inside_the_bundle() {
        let root = Path::new("/b");
        assert_eq!(
            resolve_script(root, "setup.sh").expect("plain"),
            PathBuf::from("/b/setup.sh")
        );
        assert_eq!(
            resolve_script(root, "./bin/run.sh").expect("nested"),
            PathBuf::from("/b/./bin/run.sh")
        );
        for bad in ["/etc/passwd", "../x.sh", "bin/../../x.sh", "", "."] {
            assert!(resolve_script(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bundle_dir_defaults_to_the_work_dir() {
        let work = Path::new("/w/node");
        assert_eq!(bundle_dir(work, None), PathBuf::from("/w/node/bundle"));
        assert_eq!(bundle_dir(work, Some(" ")), PathBuf::from("/w/node/bundle"));
        assert_eq!(
            bundle_dir(work, Some("/opt/job")),
            PathBuf::from("/opt/job")
        );
        assert_eq!(bundle_dir(work, Some("job")), PathBuf::from("/w/node/job"));
    }

    #[test]
    fn failure_messages_name_the_code_or_signal_and_the_last_stderr_line() {
        let (code, message) = failure_message(ExitStatus::from_raw(3 << 8), Some("boom"));
        assert_eq!(code, Some(3));
        assert_eq!(message, "exited with code 3: boom");
        let (code, message) = failure_message(ExitStatus::from_raw(9), Some("dying"));
        assert_eq!(code, None);
        assert_eq!(message, "killed by signal SIGKILL: dying");
        let (_, message) = failure_message(ExitStatus::from_raw(1 << 8), None);
        assert_eq!(message, "exited with code 1");
        let long = "y".repeat(2000);
        let (_, message) = failure_message(ExitStatus::from_raw(1 << 8), Some(&long));
        assert!(message.chars().count() < 600);
    }

    #[test]
    fn proc_stat_lines_are_parsed() {
        assert_eq!(
            parse_proc_stat("123 (sleep) S 1 120 120 0 -1"),
            Some(('S', 120))
        );
        assert_eq!(
            parse_proc_stat("7 (a (weird) name) Z 1 99 99"),
            Some(('Z', 99))
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    /// Spawns `sh -c script` in a process group of its own.
    fn spawn_group(script: &str) -> (Child, Pid) {
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh");
        let pgid = Pid::from_raw(i32::try_from(child.id().expect("pid")).expect("pid fits"));
        (child, pgid)
    }

    /// Asserts that no process of the group is left: none alive at once, and (once init has
    /// reaped the orphaned zombies) none at all as `killpg(pgid, None)` sees it.
    async fn assert_group_gone(pgid: Pid) {
        assert!(!has_live_member(pgid), "a process of the group still runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match killpg(pgid, None) {
                Err(Errno::ESRCH) => return,
                Err(e) => panic!("killpg: {e}"),
                Ok(()) => {
                    assert!(Instant::now() < deadline, "group {pgid} still exists");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until the group's processes have started (the background `sleep` exists).
    async fn wait_for_members(pgid: Pid, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let members = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter_map(|stat| parse_proc_stat(&stat))
                .filter(|(_, group)| *group == pgid.as_raw())
                .count();
            if members >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the group never got {count} processes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn terminating_kills_the_whole_process_group() {
        let (mut child, pgid) = spawn_group("sleep 100 & sleep 100");
        wait_for_members(pgid, 2).await;
        let started = Instant::now();
        let status = terminate_group(&mut child, pgid, Duration::from_secs(5))
            .await
            .expect("terminated");
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "SIGTERM was enough"
        );
        assert_group_gone(pgid).await;
    }

    #[tokio::test]
    async fn processes_ignoring_sigterm_are_killed_after_the_grace_period() {
        let (mut child, pgid) = spawn_group("trap '' TERM; sleep 100 & sleep 100; exit 0");
        wait_for_members(pgid, 2).await;
        let started = Instant::now();
        let status = terminate_group(&mut child, pgid, Duration::from_millis(300))
            .await
            .expect("terminated");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
        assert_group_gone(pgid).await;
    }

    #[tokio::test]
    async fn children_left_behind_by_the_leader_are_killed() {
        let (mut child, pgid) = spawn_group("sleep 100 & exit 0");
        let status = child.wait().await.expect("leader exits");
        assert!(status.success());
        assert!(
            group_alive(pgid, true).await,
            "the background sleep still runs"
        );
        kill_group(pgid).await;
        assert_group_gone(pgid).await;
    }

    #[tokio::test]
    async fn scripts_start_by_exec_bit_shebang_or_sh() {
        let root = tempfile::tempdir().expect("tempdir");
        let cases: [(&str, &str, u32); 4] = [
            ("exec.sh", "#!/bin/sh\necho \"direct $0\"\n", 0o755),
            ("plain-exec.sh", "echo \"no shebang $WHO\"\n", 0o755),
            (
                "shebang.sh",
                "#!/bin/sh -e\necho \"interpreted $WHO\"\n",
                0o644,
            ),
            ("plain.sh", "echo \"by sh $(pwd)\"\n", 0o600),
        ];
        let env: BTreeMap<OsString, OsString> = [
            (OsString::from("WHO"), OsString::from("me")),
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
        ]
        .into();
        let root_path = std::fs::canonicalize(root.path()).expect("canonical");
        let mut outputs = Vec::new();
        for (name, text, mode) in cases {
            let script = root_path.join(name);
            std::fs::write(&script, text).expect("write");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            let head = read_head(&script).await.expect("head");
            let prepared = Prepared {
                root: root_path.clone(),
                script: script.clone(),
                plan: exec_plan(mode, &head),
            };
            let child = start_script(&prepared, &env).await.expect("started");
            let output = child.wait_with_output().await.expect("output");
            assert!(output.status.success(), "{name}: {output:?}");
            outputs.push(String::from_utf8_lossy(&output.stdout).trim().to_string());
        }
        assert_eq!(
            outputs,
            [
                format!("direct {}", root_path.join("exec.sh").display()),
                "no shebang me".to_string(),
                "interpreted me".to_string(),
                format!("by sh {}", root_path.display()),
            ]
        );
    }

    // ----- end to end against a fake daemon -----

    /// What the fake daemon serves and what it received.
    #[derive(Default)]
    pub(crate) struct Daemon {
        pub(crate) statuses: Vec<wire::StatusRequest>,
        pub(crate) lines: Vec<wire::LogLineIn>,
        pub(crate) shutdown: bool,
        pub(crate) bundle: Vec<u8>,
        pub(crate) registration: Option<wire::RegisterResponse>,
        /// Answers to registrations, in order; once used up, `registration` answers.
        pub(crate) register_answers: std::collections::VecDeque<RegisterAnswer>,
        /// The token of every registration, in order.
        pub(crate) register_tokens: Vec<String>,
        /// Whether this path existed at each registration, when set.
        pub(crate) register_probe: Option<PathBuf>,
        pub(crate) probe_seen: Vec<bool>,
        /// Notified when a registration is held by [`RegisterAnswer::Hold`].
        pub(crate) held: Arc<tokio::sync::Notify>,
        /// Notified (all waiters) after every status or log call is recorded.
        pub(crate) recorded: Arc<tokio::sync::Notify>,
    }

    impl Daemon {
        /// Waits (at most 20 s) until `condition` holds of what the daemon recorded.
        pub(crate) async fn wait_until(
            daemon: &Mutex<Daemon>,
            what: &str,
            condition: impl Fn(&Daemon) -> bool,
        ) {
            let recorded = daemon.lock().expect("lock").recorded.clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let next = recorded.notified();
                tokio::pin!(next);
                next.as_mut().enable();
                if condition(&daemon.lock().expect("lock")) {
                    return;
                }
                assert!(
                    tokio::time::timeout_at(deadline, next).await.is_ok(),
                    "timed out waiting until {what}"
                );
            }
        }
    }

    /// One answer of the fake daemon to a registration.
    pub(crate) enum RegisterAnswer {
        /// 200 with this work order; the daemon then serves `bundle` and answers heartbeats
        /// with `shutdown`.
        Assign {
            registration: Box<wire::RegisterResponse>,
            bundle: Vec<u8>,
            shutdown: bool,
        },
        /// 204: no work yet.
        NoWork,
        /// 410: the instance is retired.
        Gone,
        /// 401: unknown token.
        Unauthorized,
        /// Never answers (a long poll that does not end).
        Hold,
    }

    fn empty_response(status: u16, body: &'static [u8]) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body)))
            .expect("response")
    }

    /// Answers a registration from the daemon's queue, else with its one `registration`.
    /// `None`: hold the request forever.
    fn answer_registration(daemon: &mut Daemon, body: &[u8]) -> Option<Response<Full<Bytes>>> {
        let request: wire::RegisterRequest = serde_json::from_slice(body).expect("register");
        daemon.register_tokens.push(request.provision_token);
        if let Some(probe) = &daemon.register_probe {
            let seen = probe.exists();
            daemon.probe_seen.push(seen);
        }
        let answer = match daemon.register_answers.pop_front() {
            None => daemon.registration.clone().expect("registration"),
            Some(RegisterAnswer::Assign {
                registration,
                bundle,
                shutdown,
            }) => {
                daemon.bundle = bundle;
                daemon.shutdown = shutdown;
                *registration
            }
            Some(RegisterAnswer::NoWork) => return Some(empty_response(204, b"")),
            Some(RegisterAnswer::Gone) => {
                return Some(empty_response(410, br#"{"error":"instance retired"}"#))
            }
            Some(RegisterAnswer::Unauthorized) => {
                return Some(empty_response(401, br#"{"error":"unknown token"}"#))
            }
            Some(RegisterAnswer::Hold) => {
                daemon.held.notify_one();
                return None;
            }
        };
        let answer = serde_json::to_vec(&answer).expect("json");
        Some(Response::new(Full::new(Bytes::from(answer))))
    }

    /// A fake daemon on 127.0.0.1:0 implementing the node endpoints.
    pub(crate) async fn fake_daemon(
        daemon: Arc<Mutex<Daemon>>,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let daemon = daemon.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let daemon = daemon.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let authorized = request
                                .headers()
                                .get("authorization")
                                .is_some_and(|v| v == "Bearer node-token");
                            let body = request.into_body().collect().await?.to_bytes();
                            if path == "/api/v1/nodes/register" {
                                let answer =
                                    answer_registration(&mut daemon.lock().expect("lock"), &body);
                                return match answer {
                                    Some(response) => Ok(response),
                                    None => std::future::pending().await,
                                };
                            }
                            let mut daemon = daemon.lock().expect("lock");
                            let answer = match path.as_str() {
                                _ if !authorized => {
                                    return Ok::<_, hyper::Error>(
                                        Response::builder()
                                            .status(401)
                                            .body(Full::new(Bytes::from_static(
                                                br#"{"error":"bad token"}"#,
                                            )))
                                            .expect("response"),
                                    )
                                }
                                "/api/v1/nodes/assets" => daemon.bundle.clone(),
                                "/api/v1/nodes/heartbeat" => {
                                    format!(r#"{{"status":"ok","shutdown":{}}}"#, daemon.shutdown)
                                        .into_bytes()
                                }
                                "/api/v1/nodes/status" => {
                                    daemon
                                        .statuses
                                        .push(serde_json::from_slice(&body).expect("status"));
                                    daemon.recorded.notify_waiters();
                                    br#"{"status":"ok"}"#.to_vec()
                                }
                                "/api/v1/nodes/logs" => {
                                    let logs: wire::LogsRequest =
                                        serde_json::from_slice(&body).expect("logs");
                                    daemon.lines.extend(logs.lines);
                                    daemon.recorded.notify_waiters();
                                    br#"{"status":"ok"}"#.to_vec()
                                }
                                other => panic!("unexpected path {other}"),
                            };
                            Ok(Response::new(Full::new(Bytes::from(answer))))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, task)
    }

    /// A gzip-compressed tar with `setup.sh` (mode 0644) holding `script`.
    pub(crate) fn bundle(script: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(script.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "setup.sh", script.as_bytes())
            .expect("append");
        builder.into_inner().expect("tar").finish().expect("gzip")
    }

    async fn run_against(
        script: &str,
        env: &[(&str, &str)],
        timeout_s: Option<u64>,
        shutdown: bool,
    ) -> (AgentReport, Daemon, tempfile::TempDir) {
        let mut registration = registration(env);
        registration.timeout_s = timeout_s;
        let daemon = Arc::new(Mutex::new(Daemon {
            bundle: bundle(script),
            registration: Some(registration),
            shutdown,
            ..Daemon::default()
        }));
        let (url, server) = fake_daemon(daemon.clone()).await;
        let work = tempfile::tempdir().expect("tempdir");
        let config = AgentConfig::new(url, "provision", work.path().join("node"))
            .grace_period(Duration::from_millis(300));
        let report = run(config, CancellationToken::new()).await.expect("agent");
        server.abort();
        let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
        (report, daemon, work)
    }

    fn statuses(daemon: &Daemon) -> Vec<&str> {
        daemon.statuses.iter().map(|s| s.status.as_str()).collect()
    }

    #[tokio::test]
    async fn a_failing_script_is_reported_with_its_code_output_and_environment() {
        let tricky = "a 'b' \"c\" $HOME `id`";
        let script = "#!/bin/sh\nprintf '%s\\n' \"$TRICKY\"\necho \"token=${TASKFLY_API_TOKEN:-none} node=$TASKFLY_NODE_ID\"\nprintf 'x\\r\\n'\necho oops >&2\necho boom >&2\nexit 3\n";
        let (report, daemon, _work) = run_against(script, &[("TRICKY", tricky)], None, false).await;
        assert_eq!(report.status, NodeStatus::Failed);
        assert_eq!(report.exit_code, Some(3));
        assert_eq!(
            statuses(&daemon),
            ["downloading_assets", "running_script", "failed"]
        );
        let last = daemon.statuses.last().expect("final status");
        assert_eq!(last.message.as_deref(), Some("exited with code 3: boom"));
        assert_eq!(last.exit_code, Some(3));
        let stdout: Vec<&str> = daemon
            .lines
            .iter()
            .filter(|l| l.stream == "stdout")
            .map(|l| l.line.as_str())
            .collect();
        assert_eq!(stdout, [tricky, "token=none node=dep-1", "x"]);
        let stderr: Vec<&str> = daemon
            .lines
            .iter()
            .filter(|l| l.stream == "stderr")
            .map(|l| l.line.as_str())
            .collect();
        assert_eq!(stderr, ["oops", "boom"]);
    }

    #[tokio::test]
    async fn a_successful_script_completes() {
        let (report, daemon, work) =
            run_against("echo done > result.txt\n", &[], None, false).await;
        assert_eq!(report.status, NodeStatus::Completed);
        assert_eq!(report.exit_code, Some(0));
        assert_eq!(
            statuses(&daemon),
            ["downloading_assets", "running_script", "completed"]
        );
        let result = std::fs::read_to_string(work.path().join("node/bundle/result.txt"))
            .expect("the script ran in the bundle root");
        assert_eq!(result, "done\n");
        assert!(!work.path().join("node").join(ASSETS_FILE).exists());
    }

    #[tokio::test]
    async fn a_script_past_its_timeout_fails() {
        let (report, daemon, _work) =
            run_against("sleep 100 & sleep 100\n", &[], Some(1), false).await;
        assert_eq!(report.status, NodeStatus::Failed);
        assert_eq!(report.exit_code, None);
        assert_eq!(
            daemon.statuses.last().and_then(|s| s.message.as_deref()),
            Some("timed out after 1s")
        );
    }

    #[tokio::test]
    async fn a_shutdown_request_terminates_without_a_final_report() {
        let (report, daemon, _work) =
            run_against("echo started\nsleep 100\n", &[], None, true).await;
        assert_eq!(report.status, NodeStatus::Terminated);
        let statuses = statuses(&daemon);
        assert!(
            !statuses.contains(&"completed") && !statuses.contains(&"failed"),
            "{statuses:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_script_fails_before_running() {
        let mut registration = registration(&[]);
        registration.script = "nope.sh".into();
        let daemon = Arc::new(Mutex::new(Daemon {
            bundle: bundle("echo hi\n"),
            registration: Some(registration),
            ..Daemon::default()
        }));
        let (url, server) = fake_daemon(daemon.clone()).await;
        let work = tempfile::tempdir().expect("tempdir");
        let report = run(
            AgentConfig::new(url, "provision", work.path()),
            CancellationToken::new(),
        )
        .await
        .expect("agent");
        server.abort();
        assert_eq!(report.status, NodeStatus::Failed);
        assert_eq!(
            report.message.as_deref(),
            Some("script nope.sh not found in the bundle")
        );
        let daemon = daemon.lock().expect("lock");
        assert_eq!(statuses(&daemon), ["downloading_assets", "failed"]);
    }

    #[tokio::test]
    async fn cancelling_stops_the_script() {
        let daemon = Arc::new(Mutex::new(Daemon {
            bundle: bundle("echo up\nsleep 100\n"),
            registration: Some(registration(&[])),
            ..Daemon::default()
        }));
        let (url, server) = fake_daemon(daemon.clone()).await;
        let work = tempfile::tempdir().expect("tempdir");
        let cancel = CancellationToken::new();
        let config = AgentConfig::new(url, "provision", work.path())
            .grace_period(Duration::from_millis(200));
        let agent = tokio::spawn(run(config, cancel.clone()));
        Daemon::wait_until(&daemon, "the script starts", |d| {
            d.lines.iter().any(|l| l.line == "up")
        })
        .await;
        cancel.cancel();
        let report = agent.await.expect("joined").expect("agent");
        server.abort();
        assert_eq!(report.status, NodeStatus::Terminated);
        assert_eq!(report.node_id, "dep-1");
        assert_eq!(
            statuses(&daemon.lock().expect("lock")),
            ["downloading_assets", "running_script"]
        );
    }

    // ----- pooled instances -----

    fn pooled(node_index: u32, env: &[(&str, &str)]) -> wire::RegisterResponse {
        let mut registration = registration(env);
        registration.node_id = format!("dep-{node_index}");
        registration.node_index = node_index;
        registration.pooled = true;
        registration
    }

    fn assign(registration: wire::RegisterResponse, script: &str) -> RegisterAnswer {
        RegisterAnswer::Assign {
            registration: Box::new(registration),
            bundle: bundle(script),
            shutdown: false,
        }
    }

    /// Runs an agent with the instance token `pool-token` against a fake daemon answering
    /// registrations with `answers`.
    async fn run_pooled(
        answers: Vec<RegisterAnswer>,
    ) -> (Result<AgentReport>, Daemon, tempfile::TempDir) {
        let work = tempfile::tempdir().expect("tempdir");
        let daemon = Arc::new(Mutex::new(Daemon {
            register_answers: answers.into(),
            register_probe: Some(work.path().join("node/bundle")),
            ..Daemon::default()
        }));
        let (url, server) = fake_daemon(daemon.clone()).await;
        let config = AgentConfig::new(url, "pool-token", work.path().join("node"))
            .grace_period(Duration::from_millis(300));
        let report = run(config, CancellationToken::new()).await;
        server.abort();
        let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
        (report, daemon, work)
    }

    fn stdout(daemon: &Daemon) -> Vec<&str> {
        daemon
            .lines
            .iter()
            .filter(|l| l.stream == "stdout")
            .map(|l| l.line.as_str())
            .collect()
    }

    #[tokio::test]
    async fn a_pooled_agent_serves_node_after_node_until_retired() {
        // The first node leaves files behind, one in a directory it made read-only.
        let first = "echo one\necho one > first.txt\nmkdir sub\necho x > sub/f\nchmod 555 sub\n";
        let second = "echo \"first=${FIRST:-unset} second=$SECOND node=$TASKFLY_NODE_ID\"\nls -A\n";
        let (report, daemon, work) = run_pooled(vec![
            assign(pooled(1, &[("FIRST", "one")]), first),
            RegisterAnswer::NoWork,
            assign(pooled(2, &[("SECOND", "two")]), second),
            RegisterAnswer::Gone,
        ])
        .await;
        let report = report.expect("retired is not an error");
        assert_eq!(report.node_id, "dep-2");
        assert_eq!(report.status, NodeStatus::Completed);
        assert!(daemon.register_answers.is_empty());
        assert_eq!(daemon.register_tokens, ["pool-token"; 4]);
        // The bundle directory the agent created was gone at every registration after a node.
        assert_eq!(daemon.probe_seen, [false; 4]);
        assert_eq!(
            statuses(&daemon),
            [
                "downloading_assets",
                "running_script",
                "completed",
                "downloading_assets",
                "running_script",
                "completed"
            ]
        );
        // The second node saw its own variables only, and a bundle of its own only.
        assert_eq!(
            stdout(&daemon),
            ["one", "first=unset second=two node=dep-2", "setup.sh"]
        );
        assert!(work.path().join("node").is_dir());
        assert!(!work.path().join("node/bundle").exists());
        assert!(!work.path().join("node").join(ASSETS_FILE).exists());
    }

    #[tokio::test]
    async fn every_pooled_node_gets_its_own_time_limit_and_stop() {
        let mut timed = pooled(1, &[]);
        timed.timeout_s = Some(1);
        let stopped = RegisterAnswer::Assign {
            registration: Box::new(pooled(2, &[])),
            bundle: bundle("echo started\nsleep 100\n"),
            shutdown: true,
        };
        let (report, daemon, _work) = run_pooled(vec![
            assign(timed, "sleep 100\n"),
            stopped,
            assign(pooled(3, &[]), "sleep 2\necho third\n"),
            RegisterAnswer::Gone,
        ])
        .await;
        let report = report.expect("agent");
        assert_eq!(report.node_id, "dep-3");
        assert_eq!(report.status, NodeStatus::Completed, "{report:?}");
        let ends: Vec<_> = daemon
            .statuses
            .iter()
            .filter(|s| s.status.is_final())
            .map(|s| (s.status.as_str(), s.message.as_deref()))
            .collect();
        assert_eq!(
            ends,
            [("failed", Some("timed out after 1s")), ("completed", None)]
        );
        assert_eq!(stdout(&daemon).last(), Some(&"third"));
        assert_eq!(daemon.probe_seen, [false; 4]);
    }

    #[tokio::test]
    async fn an_agent_that_is_not_pooled_serves_one_node_and_keeps_its_files() {
        let (report, daemon, work) = run_pooled(vec![
            assign(registration(&[]), "echo done > result.txt\n"),
            RegisterAnswer::Gone,
        ])
        .await;
        let report = report.expect("agent");
        assert_eq!(report.status, NodeStatus::Completed);
        assert_eq!(daemon.register_tokens.len(), 1);
        assert!(work.path().join("node/bundle/result.txt").is_file());
    }

    #[tokio::test]
    async fn a_forgotten_pooled_instance_stops_with_its_last_report() {
        let (report, daemon, _work) = run_pooled(vec![
            assign(pooled(1, &[]), "exit 4\n"),
            RegisterAnswer::Unauthorized,
        ])
        .await;
        let report = report.expect("a 401 after a node ends the loop");
        assert_eq!(report.node_id, "dep-1");
        assert_eq!(report.status, NodeStatus::Failed);
        assert_eq!(report.exit_code, Some(4));
        assert_eq!(daemon.register_tokens.len(), 2);

        // Refused at the first registration, it is an error as ever.
        let (report, _, _work) = run_pooled(vec![RegisterAnswer::Unauthorized]).await;
        let error = report.expect_err("unknown token");
        assert!(error.is_unauthorized(), "{error}");
    }

    #[tokio::test]
    async fn cancelling_ends_the_wait_for_an_assignment() {
        for answers in [
            vec![RegisterAnswer::Hold],
            vec![assign(pooled(1, &[]), "echo done\n"), RegisterAnswer::Hold],
        ] {
            let served = answers.len() > 1;
            let work = tempfile::tempdir().expect("tempdir");
            let daemon = Arc::new(Mutex::new(Daemon {
                register_answers: answers.into(),
                ..Daemon::default()
            }));
            let held = daemon.lock().expect("lock").held.clone();
            let (url, server) = fake_daemon(daemon.clone()).await;
            let cancel = CancellationToken::new();
            let agent = tokio::spawn(run(
                AgentConfig::new(url, "pool-token", work.path()),
                cancel.clone(),
            ));
            held.notified().await;
            cancel.cancel();
            let report = tokio::time::timeout(Duration::from_secs(5), agent)
                .await
                .expect("the agent stops promptly")
                .expect("joined")
                .expect("agent");
            server.abort();
            if served {
                assert_eq!(report.node_id, "dep-1");
                assert_eq!(report.status, NodeStatus::Completed);
            } else {
                assert_eq!(report, AgentReport::terminated(""));
            }
        }
    }

    #[test]
    fn bundle_files_to_remove_are_what_the_extraction_makes() {
        let temp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(temp.path()).expect("canonical");

        // Missing parents: the outermost one the extraction creates goes.
        let nested = root.join("a/b/c");
        let plan = BundleFiles::plan(&nested).expect("plan");
        assert_eq!(plan, BundleFiles::Created(root.join("a")));
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(nested.join("f"), "x").expect("write");
        plan.remove_now().expect("removed");
        assert!(!root.join("a").exists());
        assert!(root.is_dir());

        // A directory that exists, empty, stays; what is in it goes, links not followed.
        let outside = root.join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep.txt"), "keep").expect("write");
        let existing = root.join("pre");
        std::fs::create_dir(&existing).expect("mkdir");
        let plan = BundleFiles::plan(&existing).expect("plan");
        assert_eq!(plan, BundleFiles::Contents(existing.clone()));
        std::fs::create_dir(existing.join("ro")).expect("mkdir");
        std::fs::write(existing.join("ro/f"), "x").expect("write");
        std::fs::set_permissions(existing.join("ro"), std::fs::Permissions::from_mode(0o555))
            .expect("chmod");
        std::fs::write(existing.join(".hidden"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, existing.join("link")).expect("symlink");
        plan.remove_now().expect("removed");
        assert!(existing.is_dir());
        assert_eq!(std::fs::read_dir(&existing).expect("read").count(), 0);
        assert!(outside.join("keep.txt").is_file());

        // A directory the extraction refuses is not the node's.
        assert_eq!(BundleFiles::plan(&root), None);
        assert_eq!(BundleFiles::plan(&outside.join("keep.txt")), None);

        // `..` resolved through a directory that exists; not through one that does not.
        assert_eq!(
            BundleFiles::plan(&outside.join("../job")),
            Some(BundleFiles::Created(root.join("job")))
        );
        assert_eq!(BundleFiles::plan(&root.join("nope/../job")), None);

        // A directory replaced by a link is not followed.
        let replaced = root.join("replaced");
        std::fs::create_dir(&replaced).expect("mkdir");
        let plan = BundleFiles::plan(&replaced).expect("plan");
        std::fs::remove_dir(&replaced).expect("rmdir");
        std::os::unix::fs::symlink(&outside, &replaced).expect("symlink");
        plan.remove_now().expect_err("not a directory any more");
        assert!(outside.join("keep.txt").is_file());

        assert!(is_protected(Path::new("/")));
        if let Some(home) = std::env::var_os("HOME").filter(|h| Path::new(h).is_dir()) {
            assert!(is_protected(Path::new(&home)));
        }
        assert!(!is_protected(&root));
    }
}
