//! Nodes on SSH hosts: the part of [`super::LocalProvider`] that serves
//! `instance_config.local.hosts`.
//!
//! A host needs only what the shell bootstrap needs (`sh`, `curl`, `tar`, `gzip`, `setsid`)
//! and an SSH login; no TaskFly binary. The daemon runs the system's `ssh` client, so the
//! user's own SSH set-up applies (`~/.ssh/config`, `known_hosts`, agents, jump hosts), with
//! `BatchMode=yes`: it never asks for a password or to trust an unknown host key.
//!
//! Provisioning a node is one `sh` program run over `ssh` (its text is fixed; the only
//! value in it, the instance id, is checked to be a plain word) creates the node's directory
//! `~/.taskfly/nodes/<instance_id>/` (mode 0700), writes the bootstrap received on its
//! standard input there (it holds the provision token, so it never appears on a command line),
//! and starts it detached with `setsid`, recording its process group in `pid`. Terminating is
//! another program: SIGTERM to that group (the bootstrap stops its script's own group
//! within the grace period), SIGKILL after it, SIGKILL to any process of the user still
//! carrying `TASKFLY_NODE_ID=<node_id>` (a script left by a killed bootstrap, found through
//! `/proc`), then the directory is removed. Nothing of the node is left on the host. The
//! starts (and the stops) queued for one host at the same time run in one ssh session
//! ([`batch`]): each session costs the host a login shell.
//!
//! An instance's locator ([`InstanceRef::locator`]) is its record: host, port, user, key,
//! deployment and node, as JSON. The engine stores it on the node's row, so terminating needs
//! nothing else. The daemon also keeps each record in `<work_root>/ssh-instances/<id>.json`,
//! written before the `ssh` call and removed once the instance is terminated: the leak checks
//! ([`Provider::owned_instances`](crate::Provider::owned_instances)) list every instance not
//! yet terminated from those files, even after the engine's state was lost (a crash between
//! the `ssh` call and the node's row, a deleted state database).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use self::batch::{Job, Launch, Queue, Stop};
use self::master::{Host, Login, Masters, Via};

mod batch;
mod master;

use super::EXTRA_AGENT_GRACE;
use crate::agent::bootstrap;
use crate::config::LocalConfig;
use crate::error::{BoxError, Error};
use crate::provider::{
    is_plain_word, Instance, InstanceKind, InstanceRef, InstanceSpec, InstanceState, OwnedBy,
    OwnedInstance, Owner, ProviderError,
};

/// Instance ids of nodes on SSH hosts start with this.
const ID_PREFIX: &str = "ssh-";
/// The folder of `work_root` holding a record per instance.
const RECORDS: &str = "ssh-instances";
/// How long `ssh` may take to connect.
const CONNECT_TIMEOUT_S: u32 = 15;
/// How long a call may take beyond its own work (connecting, logging in).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The exit status of `ssh` itself failing (connection, authentication, host key).
const SSH_FAILED: i32 = 255;

/// Starts a node's bootstrap on the host: the instance id is `$1`; the grace period (ms) `$2`;
/// the bootstrap's text comes on standard input. The bootstrap gets the variables a local one
/// gets (`agent::ENV_GRACE_MS`, `agent::ENV_INSTANCE_ID`) and `TMPDIR` in the node's folder,
/// where it keeps its files and extracts the bundle. Run again for a node whose bootstrap
/// runs (a call made twice: [`SshHosts::call`]), it starts nothing more.
const LAUNCH: &str = r#"set -u
umask 077
for t in setsid curl tar gzip; do
  command -v "$t" >/dev/null 2>&1 || { echo "$t is not installed on this host; the node bootstrap needs sh, curl, tar, gzip and setsid" >&2; exit 3; }
done
d="$HOME/.taskfly/nodes/$1"
p=$(cat "$d/pid" 2>/dev/null) || p=
case $p in '' | *[!0-9]*) ;; *) if kill -0 "$p" 2>/dev/null; then echo "started $p"; exit 0; fi ;; esac
mkdir -p "$d" || exit 3
if ! cat >"$d/bootstrap.sh"; then rm -rf "$d"; exit 3; fi
cd "$d" || exit 3
TMPDIR="$d" TASKFLY_AGENT_GRACE_MS="$2" TASKFLY_AGENT_INSTANCE_ID="$1" setsid sh bootstrap.sh </dev/null >>bootstrap.log 2>&1 &
echo $! >pid
echo "started $!"
"#;

/// Stops a node and removes its directory: the instance id is `$1`, the node id `$2`, how long
/// the bootstrap may take to end, in tenths of a second, `$3`. Processes left with the node's id are found in one
/// `grep -z` over `/proc/*/environ` (GNU grep; else one `tr | grep` per process). This
/// program's own environment never holds the node's id.
const TERMINATE: &str = r#"set -u
d="$HOME/.taskfly/nodes/$1"
p=$(cat "$d/pid" 2>/dev/null) || p=
case $p in '' | *[!0-9]*) p= ;; esac
if [ -n "$p" ] && kill -TERM -"$p" 2>/dev/null; then
  n=0
  while kill -0 -"$p" 2>/dev/null && [ "$n" -lt "$3" ]; do
    sleep 0.1 2>/dev/null || sleep 1
    n=$((n + 1))
  done
  kill -KILL -"$p" 2>/dev/null
fi
if printf 'a\0' | grep -qxzF a 2>/dev/null; then
  left=$(grep -lsxzF "TASKFLY_NODE_ID=$2" /proc/[0-9]*/environ)
else
  left=$(for e in /proc/[0-9]*/environ; do
    tr '\0' '\n' <"$e" 2>/dev/null | grep -qxF "TASKFLY_NODE_ID=$2" && echo "$e"
  done)
fi
for e in $left; do
  q=${e#/proc/}
  kill -KILL "${q%/environ}" 2>/dev/null
done
rm -rf "$d" || exit 3
echo terminated
"#;

/// Where an instance runs, and for whom: what the daemon records of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    deployment_id: String,
    node_id: String,
    host: String,
    port: u16,
    user: String,
    /// The private key, `~` already expanded.
    key_path: Option<PathBuf>,
}

impl Record {
    fn target(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// Who logs in where: what one master connection serves.
    fn login(&self) -> Login {
        Login {
            user: self.user.clone(),
            host: self.host.clone(),
            port: self.port,
            key_path: self.key_path.clone(),
        }
    }
}

/// The SSH side of the local provider.
pub(super) struct SshHosts {
    work_root: PathBuf,
    records: PathBuf,
    options: Vec<String>,
    /// One master connection, and a cap on calls, per login.
    masters: Masters,
}

/// Whether `instance_id` names a node on an SSH host.
pub(super) fn is_ssh_instance(instance_id: &str) -> bool {
    instance_id.starts_with(ID_PREFIX)
}

/// The deployment id a pool slot's record names: it belongs to no deployment.
const POOL_RECORD: &str = "taskfly-pool";

/// The host `owner` runs on, as `user@host:port`, and its key: what a pool must match on.
pub(super) fn instance_kind(local: &LocalConfig, owner: &Owner) -> InstanceKind {
    let record = record_for(local, owner);
    let key = record
        .key_path
        .as_deref()
        .map_or_else(|| "default".to_owned(), |path| path.display().to_string());
    InstanceKind::new(format!("ssh {} key {key}", record.target()))
}

fn record_for(local: &LocalConfig, owner: &Owner) -> Record {
    // A pool slot starts on the first host, as its template's first node would.
    let (deployment_id, node_index) = match owner {
        Owner::Node {
            deployment_id,
            node_index,
            ..
        } => (deployment_id.clone(), *node_index),
        Owner::Pool { .. } => (POOL_RECORD.to_owned(), 0),
    };
    // Validation guarantees hosts is not empty here and sets a user with hosts.
    let host = &local.hosts[node_index as usize % local.hosts.len()];
    Record {
        deployment_id,
        node_id: owner.name().to_owned(),
        host: host.clone(),
        port: local.ssh_port,
        user: local.ssh_user.clone().unwrap_or_default(),
        key_path: local.ssh_key_path.as_deref().map(expand_home),
    }
}

/// `~` and `~/…` taken from the daemon's home directory.
fn expand_home(path: &str) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match path.strip_prefix('~') {
        Some("") => home().unwrap_or_else(|| PathBuf::from(path)),
        Some(rest) if rest.starts_with('/') => match home() {
            Some(home) => home.join(&rest[1..]),
            None => PathBuf::from(path),
        },
        _ => PathBuf::from(path),
    }
}

/// What one `ssh` call gave back.
#[derive(Debug, Clone)]
pub(super) struct Output {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<std::process::Output> for Output {
    fn from(output: std::process::Output) -> Output {
        Output {
            status: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `ssh` with the options every call and master share, logging in as `login` says; the
/// caller adds its own options, then `--`, the host and the command.
fn ssh_command(options: &[String], login: &Login) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("ssh");
    command
        .args(["-o", "BatchMode=yes"])
        .args(["-o", &format!("ConnectTimeout={CONNECT_TIMEOUT_S}")])
        .args([
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]);
    for option in options {
        command.arg("-o").arg(option);
    }
    command.arg("-p").arg(login.port.to_string());
    if let Some(key) = &login.key_path {
        command
            .arg("-i")
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes"]);
    }
    command
        .arg("-l")
        .arg(&login.user)
        // The daemon's own secrets stay with the daemon.
        .env_remove("TASKFLY_API_TOKEN")
        .kill_on_drop(true);
    command
}

impl SshHosts {
    pub(super) fn new(work_root: &Path) -> SshHosts {
        // Absolute, so control sockets are found whatever the current directory.
        let work_root = std::path::absolute(work_root).unwrap_or_else(|_| work_root.to_owned());
        SshHosts {
            records: work_root.join(RECORDS),
            masters: Masters::new(&work_root, &[]),
            work_root,
            options: Vec::new(),
        }
    }

    pub(super) fn set_options(&mut self, options: Vec<String>) {
        self.masters = Masters::new(&self.work_root, &options);
        self.options = options;
    }

    /// Stops every master connection (the provider's shutdown); calls made later connect one
    /// by one.
    pub(super) async fn stop_masters(&self) {
        self.masters.stop_all().await;
    }

    /// Starts the node's bootstrap on its host. The record is written first, so an instance
    /// whose `ssh` call is cut short (a dropped future kills the client) is still found by
    /// the leak checks.
    pub(super) async fn provision(
        &self,
        spec: &InstanceSpec,
        local: &LocalConfig,
        grace_period: Duration,
    ) -> Result<Instance, BoxError> {
        let instance_id = format!("{ID_PREFIX}{}-{}", spec.owner.name(), spec.owner.attempt());
        if !is_plain_word(&instance_id) {
            return Err(Error::invalid_input(format!(
                "node id {:?} cannot name a directory on an SSH host",
                spec.owner.name()
            ))
            .into());
        }
        let script = bootstrap::bootstrap_script(
            &spec.daemon_url,
            spec.provision_token.expose(),
            spec.ca_pem.as_deref(),
        )?;
        let record = record_for(local, &spec.owner);
        let locator = serde_json::to_string(&record)
            .map_err(|e| Error::io("cannot encode an SSH instance record", e.into()))?;
        self.write_record(&instance_id, &record).await?;
        let launch = Launch {
            instance_id: instance_id.clone(),
            grace_ms: grace_period.as_millis().to_string(),
            script: script.into(),
        };
        let ran = self
            .batched(&record, |host| &host.launches, launch, Duration::ZERO)
            .await;
        let started = match ran {
            Ok(output) if output.status == Some(0) && output.stdout.starts_with("started ") => {
                Ok(())
            }
            Ok(output) => Err(failure(&record, "start the node", &output)),
            Err(error) => Err(error),
        };
        if let Err(error) = started {
            // Either nothing was started (ssh failed before the program ran), or the program
            // stopped before starting the bootstrap and removed what it made.
            self.remove_record(&instance_id).await;
            return Err(error);
        }
        tracing::debug!(instance_id = %instance_id, host = %record.host, "started a node over SSH");
        Ok(Instance {
            reference: InstanceRef {
                id: instance_id,
                locator,
            },
            ip_address: Some(record.host),
        })
    }

    /// Stops the node and removes its files on the host, then its record. The host is the
    /// locator's; an instance recorded before locators existed (empty) is looked up in the
    /// records. Unknown instances (never started, or already terminated) are fine.
    pub(super) async fn terminate(
        &self,
        instance: &InstanceRef,
        grace_period: Duration,
    ) -> Result<(), BoxError> {
        let instance_id = instance.id.as_str();
        let record = if instance.locator.is_empty() {
            self.read_record(instance_id).await?
        } else {
            Some(
                serde_json::from_str::<Record>(&instance.locator).map_err(|e| {
                    Error::invalid_input(format!("{instance_id} has an invalid SSH locator: {e}"))
                })?,
            )
        };
        let Some(record) = record else {
            return Ok(());
        };
        // The bootstrap gets the grace period to stop its script, and a little more to end.
        let bootstrap_grace = grace_period + EXTRA_AGENT_GRACE;
        let stop = Stop {
            instance_id: instance_id.to_owned(),
            node_id: record.node_id.clone(),
            tenths: (bootstrap_grace.as_millis() / 100).to_string(),
        };
        let output = self
            .batched(&record, |host| &host.stops, stop, bootstrap_grace)
            .await?;
        if output.status != Some(0) || output.stdout.trim() != "terminated" {
            return Err(failure(&record, "terminate the node", &output));
        }
        self.remove_record(instance_id).await;
        tracing::debug!(instance_id = %instance_id, host = %record.host, "terminated a node over SSH");
        Ok(())
    }

    /// Every instance started and not yet terminated, from the records.
    pub(super) async fn owned(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        let mut owned = Vec::new();
        for instance_id in self.recorded().await? {
            if let Some(record) = self.read_record(&instance_id).await? {
                let locator = serde_json::to_string(&record)
                    .map_err(|e| Error::io("cannot encode an SSH instance record", e.into()))?;
                let owner = if record.deployment_id == POOL_RECORD {
                    OwnedBy::Pool
                } else {
                    OwnedBy::Deployment {
                        deployment_id: record.deployment_id,
                        node_id: Some(record.node_id),
                    }
                };
                owned.push(OwnedInstance {
                    instance: InstanceRef {
                        id: instance_id,
                        locator,
                    },
                    owner,
                    state: InstanceState::Running,
                });
            }
        }
        Ok(owned)
    }

    /// The ids of every recorded instance.
    async fn recorded(&self) -> Result<Vec<String>, BoxError> {
        let mut entries = match tokio::fs::read_dir(&self.records).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::io(format!("cannot list {}", self.records.display()), e).into())
            }
        };
        let mut ids = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| Error::io(format!("cannot list {}", self.records.display()), e))?
        {
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                if is_ssh_instance(id) && is_plain_word(id) {
                    ids.push(id.to_owned());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Runs `job` on the record's host, in one session with the other jobs of its kind
    /// queued for that host ([`batch`]): its output, as if run alone. `work` is how long one
    /// job may take, beyond [`CALL_TIMEOUT`].
    async fn batched<J: Job>(
        &self,
        record: &Record,
        queue: impl Fn(&Host) -> &Queue<J>,
        job: J,
        work: Duration,
    ) -> Result<Output, BoxError> {
        let host = self.masters.host(&record.login());
        let queue = queue(&host);
        loop {
            let (queued, answer) = queue.enqueue(job.clone());
            let turn = queue
                .turns
                .acquire()
                .await
                .map_err(|_| Error::shutting_down("the local provider is shutting down"))?;
            let Some(batch) = queued.take_batch() else {
                // Another caller took this job into its batch.
                drop(turn);
                match answer.await {
                    Ok(answer) => return answer.map_err(Into::into),
                    // That batch was dropped before it answered: queue again (both programs
                    // may run twice for a node).
                    Err(_) => continue,
                }
            };
            return self.run_batch(record, batch, work).await;
        }
    }

    /// Runs the jobs of `batch` (its first is the caller's) in one session, answers the
    /// others and returns the first's output.
    async fn run_batch<J: Job>(
        &self,
        record: &Record,
        batch: Vec<batch::Taken<J>>,
        work: Duration,
    ) -> Result<Output, BoxError> {
        if let [only] = batch.as_slice() {
            let (remote, input) = only.job.alone();
            return self.call(record, &remote, input, work).await;
        }
        let jobs: Vec<J> = batch.iter().map(|t| t.job.clone()).collect();
        let program = J::program(&jobs, batch::random_delimiter);
        let session = self
            .call(record, batch::BATCH_COMMAND, Some(program.as_bytes()), work)
            .await;
        tracing::debug!(host = %record.host, nodes = jobs.len(), "ran a batch of nodes in one ssh session");
        // The first job is the caller's: its output is returned, not sent.
        let others = batch.into_iter().skip(1);
        match session {
            Ok(session) => {
                let mut outputs = batch::parse(&jobs, &session).into_iter();
                let first = outputs.next().unwrap_or(session);
                for (taken, output) in others.zip(outputs) {
                    let _ = taken.answer.send(Ok(output));
                }
                Ok(first)
            }
            Err(error) => {
                let shared = match error.downcast_ref::<ProviderError>() {
                    Some(error) => error.clone(),
                    None => ProviderError {
                        code: "SshFailed".to_owned(),
                        message: error.to_string(),
                        retryable: true,
                    },
                };
                for taken in others {
                    let _ = taken.answer.send(Err(shared.clone()));
                }
                Err(error)
            }
        }
    }

    /// Runs the shell command `remote` on the record's host, feeding it `input`, through the
    /// host's master connection ([`master`]), at most [`master::SESSIONS_PER_HOST`] at once
    /// per host. `work` is how long the command itself may take, beyond [`CALL_TIMEOUT`].
    async fn call(
        &self,
        record: &Record,
        remote: &str,
        input: Option<&[u8]>,
        work: Duration,
    ) -> Result<Output, BoxError> {
        let login = record.login();
        let host = self.masters.host(&login);
        let _session = host
            .sessions
            .acquire()
            .await
            .map_err(|_| Error::shutting_down("the local provider is shutting down"))?;
        let via = match self.masters.via(&host, &login, &self.options).await {
            Ok(via) => via,
            // The master could not log in: a call of its own would not either.
            Err(output) => return Ok(output),
        };
        let output = self.run(record, &via, remote, input, work).await?;
        if output.status == Some(SSH_FAILED) && via != Via::Direct {
            // The master has logged in before: ssh failing now is the connection's doing.
            tracing::info!(host = %record.host, stderr = %output.stderr.trim(), "an ssh call through the host's master connection failed; stopping the master and calling again on a connection of its own");
            self.masters.stop(&host).await;
            return self.run(record, &Via::Direct, remote, input, work).await;
        }
        Ok(output)
    }

    /// One `ssh` process running `remote` on the record's host, `via` its master or not.
    async fn run(
        &self,
        record: &Record,
        via: &Via,
        remote: &str,
        input: Option<&[u8]>,
        work: Duration,
    ) -> Result<Output, BoxError> {
        let mut command = ssh_command(&self.options, &record.login());
        if let Via::Master(control_path) = via {
            command
                .args(["-o", "ControlMaster=no"])
                .arg("-o")
                .arg(format!("ControlPath={}", control_path.display()));
        }
        command
            .arg("--")
            .arg(&record.host)
            .arg(remote)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| Error::io("cannot run ssh (is the OpenSSH client installed?)", e))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A host that closes early shows in ssh's status and stderr, not here.
            let _ = stdin.write_all(input).await;
            drop(stdin);
        }
        let output = tokio::time::timeout(CALL_TIMEOUT + work, child.wait_with_output())
            .await
            .map_err(|_| ProviderError {
                code: "SshTimeout".to_owned(),
                message: format!(
                    "ssh to {} did not finish within {} s",
                    record.target(),
                    (CALL_TIMEOUT + work).as_secs()
                ),
                retryable: true,
            })?
            .map_err(|e| Error::io("cannot read from ssh", e))?;
        Ok(Output::from(output))
    }

    fn record_path(&self, instance_id: &str) -> PathBuf {
        self.records.join(format!("{instance_id}.json"))
    }

    /// Writes the record whole (a temporary file renamed over it), mode 0600.
    async fn write_record(&self, instance_id: &str, record: &Record) -> Result<(), BoxError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let (dir, path) = (self.records.clone(), self.record_path(instance_id));
        let text = serde_json::to_vec(record)
            .map_err(|e| Error::io("cannot encode an SSH instance record", e.into()))?;
        let written = tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let partial = path.with_extension("json.partial");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        written.map_err(|e| {
            Error::io(
                format!("cannot record {instance_id} in {}", self.records.display()),
                e,
            )
            .into()
        })
    }

    async fn read_record(&self, instance_id: &str) -> Result<Option<Record>, BoxError> {
        if !is_ssh_instance(instance_id) || !is_plain_word(instance_id) {
            return Ok(None);
        }
        let path = self.record_path(instance_id);
        match tokio::fs::read(&path).await {
            Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|e| {
                Error::invalid_input(format!("{} is not a valid record: {e}", path.display()))
                    .into()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e).into()),
        }
    }

    async fn remove_record(&self, instance_id: &str) {
        let path = self.record_path(instance_id);
        if let Err(e) = tokio::fs::remove_file(&path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an SSH instance record");
            }
        }
    }
}

/// `program` run by `sh -c` with `args`, as one shell command line.
pub(super) fn remote_command(program: &str, args: &[&str]) -> String {
    let mut remote = format!("sh -c {} taskfly-node", bootstrap::sh_quote(program));
    for arg in args {
        remote.push(' ');
        remote.push_str(&bootstrap::sh_quote(arg));
    }
    remote
}

/// A failed call as an error naming the host, what was tried and what ssh (or the host)
/// said. Connection failures may pass, so they are retryable; the rest are not.
fn failure(record: &Record, what: &str, output: &Output) -> BoxError {
    let said = output
        .stderr
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty() && !line.starts_with("Warning: Permanently added"))
        .unwrap_or("no message")
        .to_owned();
    let status = match output.status {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_owned(),
    };
    let hint = if said.contains("Host key verification failed") {
        " (add the host's key to the daemon's known_hosts, e.g. with ssh-keyscan, or pass \
         taskflyd --ssh-option)"
    } else if said.contains("Permission denied") {
        " (check instance_config.local.ssh_user and ssh_key_path)"
    } else {
        ""
    };
    let transient = [
        "Connection refused",
        "Connection timed out",
        "Connection reset",
        "Connection closed",
        "No route to host",
        "Temporary failure in name resolution",
        "kex_exchange_identification",
    ];
    let retryable = output.status == Some(SSH_FAILED) && transient.iter().any(|t| said.contains(t));
    Box::new(ProviderError {
        code: if output.status == Some(SSH_FAILED) {
            "SshFailed".to_owned()
        } else {
            "SshHostFailed".to_owned()
        },
        message: format!(
            "cannot {what} on {} over ssh ({status}): {said}{hint}",
            record.target()
        ),
        retryable,
    })
}

#[cfg(test)]
mod tests;
