//! Nodes as local processes: [`LocalProvider`].

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod ssh;

use self::ssh::SshHosts;
use super::{
    Instance, InstanceKind, InstanceRef, InstanceSpec, OwnedInstance, Owner, Provider,
    ProviderSettings,
};
use crate::agent::{self, bootstrap, AgentConfig};
use crate::api::client::Client;
use crate::config::{local_settings, LocalAgent as AgentKind};
use crate::error::{BoxError, Error};
use crate::process::Sweeper;

/// The address every local node reports.
const LOCAL_ADDRESS: &str = "127.0.0.1";
/// The folder of `work_root` holding pooled instances' folders (they belong to no deployment).
const POOL_FOLDER: &str = "taskfly-pool";
/// How long a terminated script gets between SIGTERM and SIGKILL unless configured otherwise.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// An agent process or bootstrap stopping its script needs the grace period, and a little more
/// to report.
pub(super) const EXTRA_AGENT_GRACE: Duration = Duration::from_secs(2);
/// The file in a node's work directory holding the certificates its agent trusts for an
/// `https://` daemon ([`InstanceSpec::ca_pem`]).
const CA_FILE: &str = "daemon-ca.pem";
/// The variable naming its node in every script's environment.
const NODE_ID_VARIABLE: &str = "TASKFLY_NODE_ID";

/// Runs nodes on this machine (`cloud_provider: local`), or on SSH hosts when the deployment
/// lists `instance_config.local.hosts`.
///
/// Design: each node's agent runs *in this process*, as a tokio task executing
/// [`crate::agent::run`], not as a `taskfly agent` child process. That keeps 200+ nodes cheap
/// (one task each, no extra executable or process per node), and works when the library is
/// embedded in a host program that has no `taskfly` binary at hand. The agent talks to the
/// engine over the node API exactly as a remote agent does, so a local node behaves like any
/// other; agent tasks of a plain `http://` daemon share one client, and with it one pool of
/// connections. The user's script, however, is a real child process: it runs in a process group of
/// its own, inside the node's own work directory `work_root/<deployment_id>/<node_index>-<attempt>`
/// (the bundle is extracted into its `bundle/` folder unless `remote_dest_dir` is set).
/// Terminating a node cancels its agent, which stops the script's whole process group (SIGTERM,
/// then SIGKILL after the grace period) before it ends.
///
/// A deployment with `instance_config.local.agent: script` runs the shell bootstrap of
/// [`crate::agent::bootstrap`] instead, as a cloud instance would: `sh bootstrap.sh` in the
/// node's work directory (with `TMPDIR` pointing there, its own output appended to
/// `bootstrap.log`), as a process group of its own. Terminating such a node sends SIGTERM to
/// that group (the bootstrap then stops its script's group within the grace period), SIGKILL
/// after the grace period, and stops any process still carrying the node's id. With agent
/// processes ([`LocalProvider::agent_program`]) bootstraps outlive this provider as agent
/// processes do; otherwise [`Provider::shutdown`] stops them.
///
/// For an `https://` daemon, the certificates to trust ([`InstanceSpec::ca_pem`]) are
/// written to `daemon-ca.pem` in the node's work directory and given to its agent (task or
/// process) as its CA file; the shell bootstrap embeds them for curl.
///
/// With `hosts`, node `i` runs on `hosts[i % hosts.len()]`: the daemon starts the shell
/// bootstrap there with the system's `ssh` client (`BatchMode=yes`, so the host's key must be
/// known and the key need no passphrase; [`LocalProvider::ssh_options`] adds options), detached
/// in `~/.taskfly/nodes/<instance_id>/`, and terminating the node stops its processes and
/// removes that folder over ssh. Such instances (`ssh-<node_id>-<attempt>`, their address the
/// host) carry their host, user, port and key in their locator, and are also recorded in
/// `work_root/ssh-instances/` until terminated, so the leak checks find them even when the
/// engine's state was lost ([`Provider::owned_instances`]). At [`Provider::shutdown`] they
/// are terminated unless agents run as processes (a daemon), as local bootstraps are.
/// Calls to one host (user, host, port and key) share one OpenSSH master connection, its
/// control socket in `work_root/cm/`, at most 8 calls at once per host; a master ends after
/// 60 s without a call, and [`Provider::shutdown`] stops them all (unless the
/// [`LocalProvider::ssh_options`] set `ControlMaster`, `ControlPath` or `ControlPersist`: then
/// every call connects as those say).
///
/// Instance ids are `local-<node_id>-<attempt>`, their locator the node id (whose scripts
/// carry `TASKFLY_NODE_ID`, so terminating finds what a killed agent left). Agent failures are logged with `tracing`
/// (node id and message); they never panic, and the engine notices the node through its status
/// reports or the heartbeat timeout.
///
/// ```no_run
/// # async fn example() {
/// use std::time::Duration;
/// use taskfly::LocalProvider;
///
/// let provider = LocalProvider::new("/var/lib/taskfly/nodes".into())
///     .grace_period(Duration::from_secs(5));
/// # let _ = provider;
/// # }
/// ```
pub struct LocalProvider {
    work_root: PathBuf,
    grace_period: Duration,
    runner: Runner,
    agents: Arc<Mutex<HashMap<String, LocalAgent>>>,
    tracker: TaskTracker,
    /// Parent of every agent's cancellation token: cancelled by [`Provider::shutdown`] and on drop.
    shutdown: CancellationToken,
    /// Nodes on SSH hosts.
    ssh: SshHosts,
    /// Scans of `/proc`, shared by the terminates under way.
    sweeper: Sweeper,
    /// The client agent tasks of a plain `http://` daemon share (its URL, the client): one
    /// pool of connections for all of them.
    agent_client: Mutex<Option<(String, Client)>>,
}

/// How node agents run.
#[derive(Debug, Clone)]
enum Runner {
    /// A tokio task in this process.
    Task,
    /// A process of its own: `program args…`, configured through [`agent::AgentConfig::from_env`]'s
    /// variables. Survives this process (a restarted engine carries on with it).
    Process {
        program: PathBuf,
        args: Vec<std::ffi::OsString>,
    },
}

/// One node's agent, as the provider tracks it.
struct LocalAgent {
    /// Stops the agent (and so the script). Unused for agent processes, which get SIGTERM.
    cancel: CancellationToken,
    /// Cancelled once the agent's task (or process) has ended, however it ended.
    finished: CancellationToken,
    /// The agent process, when agents run as processes or the node runs the shell bootstrap.
    pid: Option<i32>,
    /// The node runs the shell bootstrap (`agent: script`): a process, whatever the runner.
    bootstrap: bool,
}

impl LocalProvider {
    /// A provider keeping every node's files under `work_root` (created as needed).
    pub fn new(work_root: PathBuf) -> LocalProvider {
        LocalProvider {
            ssh: SshHosts::new(&work_root),
            sweeper: Sweeper::new(&[NODE_ID_VARIABLE, agent::ENV_INSTANCE_ID]),
            work_root,
            grace_period: DEFAULT_GRACE_PERIOD,
            runner: Runner::Task,
            agents: Arc::new(Mutex::new(HashMap::new())),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            agent_client: Mutex::new(None),
        }
    }

    /// Sets how long a terminated node's script gets between SIGTERM and SIGKILL (10 s by
    /// default).
    #[must_use]
    pub fn grace_period(mut self, grace_period: Duration) -> LocalProvider {
        self.grace_period = grace_period;
        self
    }

    /// Options for every `ssh` call to a node's host, each passed as `-o OPTION`
    /// (`UserKnownHostsFile=/etc/taskfly/known_hosts`, `ProxyJump=bastion`, …). They add to
    /// the daemon user's own SSH configuration; `BatchMode=yes` always applies. A
    /// `ControlMaster`, `ControlPath` or `ControlPersist` among them replaces the provider's
    /// own master connection per host.
    #[must_use]
    pub fn ssh_options(
        mut self,
        options: impl IntoIterator<Item = impl Into<String>>,
    ) -> LocalProvider {
        self.ssh
            .set_options(options.into_iter().map(Into::into).collect());
        self
    }

    /// Run each node's agent as a process of its own, `program args…`, instead of a task in
    /// this process. The program must run the agent with [`agent::AgentConfig::from_env`]
    /// (`taskfly agent` and `taskflyd agent` do). Agent processes outlive this process: a
    /// daemon that crashes or restarts finds its nodes still running, and a restarted engine
    /// can still terminate them (they are found again through `/proc`). Each agent's output
    /// goes to `agent.log` in its work directory.
    #[must_use]
    pub fn agent_program(
        mut self,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString>>,
    ) -> LocalProvider {
        self.runner = Runner::Process {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        };
        self
    }

    /// The client an agent task of a daemon at `daemon_url` talks through: without a CA file
    /// to trust, the one all of them share (created by the first); with one, `None`: the
    /// agent makes its own.
    fn agent_client(
        &self,
        daemon_url: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Option<Client>, Error> {
        if ca_file.is_some() {
            return Ok(None);
        }
        let mut shared = crate::sync::lock(&self.agent_client);
        if let Some((url, client)) = shared.as_ref() {
            if url == daemon_url {
                return Ok(Some(client.clone()));
            }
        }
        let client = Client::new(daemon_url, None)?;
        *shared = Some((daemon_url.to_owned(), client.clone()));
        Ok(Some(client))
    }

    fn agents(&self) -> MutexGuard<'_, HashMap<String, LocalAgent>> {
        // The map stays consistent even if a holder panicked: every update is a single call.
        crate::sync::lock(&self.agents)
    }
}

impl fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalProvider")
            .field("work_root", &self.work_root)
            .field("grace_period", &self.grace_period)
            .field("agents", &self.agents().len())
            .finish_non_exhaustive()
    }
}

impl Drop for LocalProvider {
    /// Stops every agent still running, so no script outlives the provider. Their tasks finish
    /// on the runtime; call [`Provider::shutdown`] to wait for them.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[async_trait]
impl Provider for LocalProvider {
    /// Creates the node's work directory and starts its agent. Cancel-safe: the agent is
    /// started in one step after the only await.
    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        if self.shutdown.is_cancelled() {
            return Err(Error::shutting_down("the local provider is shutting down").into());
        }
        let local = local_settings(&spec.settings)?;
        // A pooled instance (`PooledProvider`) serves many nodes: its folder is named after
        // its slot.
        let (folder, node_folder) = match &spec.owner {
            Owner::Node {
                deployment_id,
                node_index,
                attempt,
                ..
            } => (deployment_id.as_str(), format!("{node_index}-{attempt}")),
            Owner::Pool { slot } => (POOL_FOLDER, slot.clone()),
        };
        if !is_plain_name(folder) || !is_plain_name(&node_folder) {
            return Err(Error::invalid_input(format!(
                "deployment id {folder:?} cannot name a directory"
            ))
            .into());
        }
        if !local.hosts.is_empty() {
            return self.ssh.provision(&spec, &local, self.grace_period).await;
        }
        let node_id = spec.owner.name().to_owned();
        let instance_id = format!("local-{node_id}-{}", spec.owner.attempt());
        let work_dir = self.work_root.join(folder).join(node_folder);
        // Private to the daemon's user (0700): it holds the node's files and, for a bootstrap,
        // its provision token. Set again on a folder left by an earlier run. One trip to a
        // blocking thread for both.
        let created = {
            let work_dir = work_dir.clone();
            tokio::task::spawn_blocking(move || create_private_dir(&work_dir)).await
        };
        created
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot create the node's work directory {}",
                        work_dir.display()
                    ),
                    e,
                )
            })?;
        // Written before anything starts, so cancelling here leaves only a file behind.
        let ca_file = match &spec.ca_pem {
            Some(pem) => {
                let path = work_dir.join(CA_FILE);
                tokio::fs::write(&path, pem)
                    .await
                    .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
                Some(path)
            }
            None => None,
        };

        let cancel = self.shutdown.child_token();
        let finished = CancellationToken::new();
        let mut agents = self.agents();
        if agents
            .get(&instance_id)
            .is_some_and(|agent| !agent.finished.is_cancelled())
        {
            return Err(Error::already_exists(format!(
                "instance {instance_id} is already running"
            ))
            .into());
        }
        let bootstrap = local.agent == AgentKind::Script;
        let pid = match &self.runner {
            _ if bootstrap => {
                let mut child = spawn_bootstrap(&spec, &instance_id, &work_dir, self.grace_period)?;
                let pid = child.id().and_then(|id| i32::try_from(id).ok());
                // Reap the bootstrap when it ends. At shutdown, agent processes are left running
                // (they carry on with a restarted engine), and so are bootstraps among them;
                // otherwise the bootstrap and its script are stopped, as agent tasks are.
                let (reaped, stop) = (finished.clone(), self.shutdown.clone());
                let stop_at_shutdown = matches!(self.runner, Runner::Task).then(|| {
                    (
                        node_id.clone(),
                        self.grace_period + EXTRA_AGENT_GRACE,
                        self.sweeper.clone(),
                    )
                });
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = child.wait() => reaped.cancel(),
                        () = stop.cancelled() => {
                            if let Some((node_id, grace, sweeper)) = stop_at_shutdown {
                                if let Some(pid) = pid {
                                    stop_bootstrap(&sweeper, pid, &node_id, grace).await;
                                }
                                let _ = child.wait().await;
                                reaped.cancel();
                            }
                        }
                    }
                });
                pid
            }
            Runner::Task => {
                let mut agent_config = AgentConfig::new(
                    spec.daemon_url.clone(),
                    spec.provision_token.expose().to_owned(),
                    work_dir,
                )
                .grace_period(self.grace_period);
                let client = self.agent_client(&spec.daemon_url, ca_file.as_deref())?;
                agent_config.ca_file = ca_file;
                // Spawned while the map is locked, so `terminate` never sees an entry without
                // its task.
                self.tracker.spawn(run_agent(
                    node_id.clone(),
                    instance_id.clone(),
                    agent_config,
                    client,
                    cancel.clone(),
                    finished.clone(),
                ));
                None
            }
            Runner::Process { program, args } => {
                let mut child = spawn_agent_process(
                    program,
                    args,
                    &spec,
                    &instance_id,
                    &work_dir,
                    ca_file.as_deref(),
                    self.grace_period,
                )?;
                let pid = child.id().and_then(|id| i32::try_from(id).ok());
                // Reap the process when it ends; at shutdown, leave it running (it carries on
                // with a restarted engine) and stop waiting.
                let (reaped, stop) = (finished.clone(), self.shutdown.clone());
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = child.wait() => reaped.cancel(),
                        () = stop.cancelled() => {}
                    }
                });
                pid
            }
        };
        agents.insert(
            instance_id.clone(),
            LocalAgent {
                cancel,
                finished,
                pid,
                bootstrap,
            },
        );
        drop(agents);
        tracing::debug!(instance_id = %instance_id, "started a local node");
        Ok(Instance {
            reference: InstanceRef {
                id: instance_id,
                locator: node_id,
            },
            ip_address: Some(LOCAL_ADDRESS.to_string()),
        })
    }

    /// Cancels the node's agent and waits until it has ended, its script's process group
    /// included. An unknown or already terminated instance is fine.
    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        if ssh::is_ssh_instance(&instance.id) {
            return self.ssh.terminate(instance, self.grace_period).await;
        }
        let instance_id = instance.id.as_str();
        let bootstrap = self
            .agents()
            .get(instance_id)
            .is_some_and(|agent| agent.bootstrap);
        if bootstrap || matches!(self.runner, Runner::Process { .. }) {
            return self.terminate_process(instance).await;
        }
        let tokens = self
            .agents()
            .get(instance_id)
            .map(|agent| (agent.cancel.clone(), agent.finished.clone()));
        let Some((cancel, finished)) = tokens else {
            return Ok(());
        };
        cancel.cancel();
        finished.cancelled().await;
        let mut agents = self.agents();
        if agents
            .get(instance_id)
            .is_some_and(|agent| agent.finished.is_cancelled())
        {
            agents.remove(instance_id);
        }
        Ok(())
    }

    /// The agent a node runs (`instance_config.local.agent`): a pooled Rust agent never runs
    /// a node asking for the shell bootstrap, nor the reverse. On SSH hosts, the host, port,
    /// user and key: a pooled instance serves only nodes meant for its host.
    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        let local = local_settings(settings)?;
        if !local.hosts.is_empty() {
            return Ok(ssh::instance_kind(&local, owner));
        }
        let agent = match local.agent {
            AgentKind::Rust => "rust",
            AgentKind::Script => "script",
        };
        Ok(InstanceKind::new(format!("local {agent}")))
    }

    fn name(&self) -> &str {
        "local"
    }

    /// Nodes on SSH hosts not yet terminated (the others are found through `/proc` when
    /// needed, or end with this process).
    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        self.ssh.owned().await
    }

    /// Stops every agent and waits until all of them, and their scripts, have ended. Nodes on
    /// SSH hosts are terminated too, unless agents run as processes (they carry on with a
    /// restarted engine); either way, every SSH master connection is stopped.
    async fn shutdown(&self) {
        self.shutdown.cancel();
        if matches!(self.runner, Runner::Task) {
            self.terminate_ssh_instances().await;
        }
        self.ssh.stop_masters().await;
        self.tracker.close();
        self.tracker.wait().await;
        self.agents().clear();
    }
}

impl LocalProvider {
    /// Whether an agent (or bootstrap) this provider started for `instance_id` still runs on
    /// this machine: tracked and not ended, or, for agent processes started before a
    /// restart, found through `/proc`. Nodes on SSH hosts are not looked at (`false`).
    pub async fn is_running(&self, instance_id: &str) -> bool {
        let tracked = self
            .agents()
            .get(instance_id)
            .map(|agent| !agent.finished.is_cancelled());
        match (tracked, &self.runner) {
            (Some(running), _) => running,
            (None, Runner::Process { .. }) if !ssh::is_ssh_instance(instance_id) => {
                let entry = format!("{}={instance_id}", agent::ENV_INSTANCE_ID);
                !self.sweeper.fresh().await.pids_with_env(&entry).is_empty()
            }
            (None, _) => false,
        }
    }

    /// Terminates every recorded node on an SSH host, at most a few at once (the ssh calls
    /// are limited anyway); failures are logged, and the records kept for the leak checks.
    async fn terminate_ssh_instances(&self) {
        let owned = match self.ssh.owned().await {
            Ok(owned) => owned,
            Err(error) => {
                tracing::warn!(error = %crate::error::Report::new(error.as_ref()), "cannot list the nodes on SSH hosts to stop them");
                return;
            }
        };
        let stops = owned.iter().map(|owned| async move {
            let instance = &owned.instance;
            if let Err(error) = self.ssh.terminate(instance, self.grace_period).await {
                tracing::warn!(instance_id = %instance.id, error = %crate::error::Report::new(error.as_ref()), "cannot stop a node on its SSH host");
            }
        });
        futures_util::future::join_all(stops).await;
    }

    /// Terminate an agent process (or a node's bootstrap) and whatever its script left: SIGTERM
    /// to the agent (which stops its script's group gracefully), SIGKILL after the grace period,
    /// then any process still carrying the node's id (a script orphaned by a killed agent) is
    /// stopped too.
    async fn terminate_process(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        let instance_id = instance.id.as_str();
        let tracked = self
            .agents()
            .get(instance_id)
            .map(|agent| (agent.pid, agent.finished.clone()));
        let agent_pids: Vec<i32> = match &tracked {
            Some((pid, finished)) if !finished.is_cancelled() => pid.iter().copied().collect(),
            Some(_) => Vec::new(),
            None => {
                let entry = format!("{}={instance_id}", agent::ENV_INSTANCE_ID);
                self.sweeper.fresh().await.pids_with_env(&entry)
            }
        };
        let agent_grace = self.grace_period + EXTRA_AGENT_GRACE;
        let left = self.sweeper.stop_groups(&agent_pids, agent_grace).await;
        // The locator is the node id its scripts carry (empty for a node of taskfly 0.1).
        if !instance.locator.is_empty() {
            let entry = format!("{NODE_ID_VARIABLE}={}", instance.locator);
            let orphans = self.sweeper.fresh().await.groups_with_env(&entry);
            let orphans_left = self.sweeper.stop_groups(&orphans, self.grace_period).await;
            if !orphans_left.is_empty() {
                return Err(std::io::Error::other(format!(
                    "processes of {instance_id} survived SIGKILL (groups {orphans_left:?})"
                ))
                .into());
            }
        }
        if !left.is_empty() {
            return Err(std::io::Error::other(format!(
                "the agent of {instance_id} survived SIGKILL (group {left:?})"
            ))
            .into());
        }
        self.agents().remove(instance_id);
        Ok(())
    }
}

/// Stops a node's bootstrap at shutdown: SIGTERM to its group, SIGKILL after `grace`, then the
/// same to any process still carrying the node's id (a script left by a killed bootstrap).
async fn stop_bootstrap(sweeper: &Sweeper, pgid: i32, node_id: &str, grace: Duration) {
    let mut left = sweeper.stop_groups(&[pgid], grace).await;
    let entry = format!("{NODE_ID_VARIABLE}={node_id}");
    let orphans = sweeper.fresh().await.groups_with_env(&entry);
    left.extend(sweeper.stop_groups(&orphans, grace).await);
    if !left.is_empty() {
        tracing::warn!(node_id = %node_id, groups = ?left, "processes of a node survived SIGKILL");
    }
}

/// Start the shell bootstrap for one node: `sh bootstrap.sh` in its work directory (the script
/// written there with mode 0600: it holds the provision token), in a process group of its own,
/// its output appended to `bootstrap.log`.
fn spawn_bootstrap(
    spec: &InstanceSpec,
    instance_id: &str,
    work_dir: &std::path::Path,
    grace_period: Duration,
) -> Result<tokio::process::Child, BoxError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let script = bootstrap::bootstrap_script(
        &spec.daemon_url,
        spec.provision_token.expose(),
        spec.ca_pem.as_deref(),
    )?;
    let script_path = work_dir.join("bootstrap.sh");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&script_path)
        .and_then(|mut file| file.write_all(script.as_bytes()));
    written.map_err(|e| Error::io(format!("cannot write {}", script_path.display()), e))?;
    let (log, log_err) = open_log(&work_dir.join("bootstrap.log"))?;
    let mut command = tokio::process::Command::new("sh");
    command
        .arg(&script_path)
        .current_dir(work_dir)
        // The daemon's own environment stays with the daemon (the bootstrap also drops every
        // TASKFLY_* variable before it runs the script).
        .env_clear()
        .envs(crate::process::allowed_env())
        .env("TMPDIR", work_dir)
        .env(agent::ENV_GRACE_MS, grace_period.as_millis().to_string())
        .env(agent::ENV_INSTANCE_ID, instance_id)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    command
        .spawn()
        .map_err(|e| Error::io("cannot start the node bootstrap with sh", e).into())
}

/// A private log file (mode 0600) opened for appending, twice: for a child's stdout and
/// stderr.
fn open_log(path: &std::path::Path) -> Result<(std::fs::File, std::fs::File), BoxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io(format!("cannot share {}", path.display()), e))?;
    Ok((log, log_err))
}

/// Start an agent process for one node, in a process group of its own, its output appended to
/// `agent.log` in its work directory.
fn spawn_agent_process(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    spec: &InstanceSpec,
    instance_id: &str,
    work_dir: &std::path::Path,
    ca_file: Option<&std::path::Path>,
    grace_period: Duration,
) -> Result<tokio::process::Child, BoxError> {
    let (log, log_err) = open_log(&work_dir.join("agent.log"))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(work_dir)
        // The daemon's own environment stays with the daemon: the agent, and so the script,
        // start from the allow-list, and the agent logs as the daemon does (RUST_LOG).
        .env_clear()
        .envs(crate::process::allowed_env())
        .envs(std::env::var_os("RUST_LOG").map(|filter| ("RUST_LOG", filter)))
        .env(agent::ENV_DAEMON_URL, &spec.daemon_url)
        .env(agent::ENV_PROVISION_TOKEN, spec.provision_token.expose())
        .env(agent::ENV_WORK_DIR, work_dir)
        .env(agent::ENV_GRACE_MS, grace_period.as_millis().to_string())
        .env(agent::ENV_INSTANCE_ID, instance_id)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(path) = ca_file {
        command.env(agent::ENV_CA_FILE, path);
    }
    command.spawn().map_err(|e| {
        Error::io(
            format!("cannot start the agent program {}", program.display()),
            e,
        )
        .into()
    })
}

/// One node's agent task: runs the agent (through `client` when given) and logs how it ended;
/// `finished` is cancelled when the task ends, even by a panic.
async fn run_agent(
    node_id: String,
    instance_id: String,
    config: AgentConfig,
    client: Option<Client>,
    cancel: CancellationToken,
    finished: CancellationToken,
) {
    let _finished = finished.drop_guard();
    let ran = match client {
        Some(client) => agent::run_with_client(config, client, cancel).await,
        None => agent::run(config, cancel).await,
    };
    match ran {
        Ok(report) => tracing::debug!(
            node_id = %node_id,
            instance_id = %instance_id,
            status = %report.status,
            exit_code = ?report.exit_code,
            "local node agent ended"
        ),
        Err(error) => tracing::warn!(
            node_id = %node_id,
            instance_id = %instance_id,
            error = %error.report(),
            "local node agent failed"
        ),
    }
}

/// Creates `dir` and its missing parents, and gives `dir` mode 0700 whether it was created now
/// or left by an earlier run (blocking).
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Whether `name` can be one directory level: not empty, no separator, not `.` or `..`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests;
