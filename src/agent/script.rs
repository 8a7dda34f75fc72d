//! Running the user's script: how to start it (exec bit, `#!` line or `sh`), its environment,
//! its supervision until it exits, is stopped or times out, and the message a failure gets.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::node::{Ending, Node};
use super::output::{pump_lines, Stream};
use crate::api::wire;
use crate::process::{kill_group, terminate_group, GroupGuard};

/// Output lines waiting to be sent; when full, reading the script's output pauses.
const LOG_CHANNEL_CAPACITY: usize = 4096;
/// The last stderr line quoted in a failure message is cut to this many characters.
const MAX_QUOTED_CHARS: usize = 500;

/// A bundle ready to run.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) root: PathBuf,
    pub(super) script: PathBuf,
    pub(super) plan: ExecPlan,
}

impl Node<'_> {
    /// Starts the script and supervises it until it and its group are gone, shipping its output
    /// meanwhile. Returns how it ended and the last non-empty line of its stderr.
    pub(super) async fn run_script(
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
        let mut guard = GroupGuard::new(pgid);
        let _ = self.bundle_root.set(prepared.root.clone());
        self.script_group
            .store(pgid.as_raw(), std::sync::atomic::Ordering::Relaxed);

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
        guard.disarm();
        self.script_group
            .store(0, std::sync::atomic::Ordering::Relaxed);
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
}

/// The first bytes of the script, enough for a `#!` line (the kernel reads 256). Blocking: it
/// runs with the bundle's extraction, on its thread.
pub(super) fn read_head(script: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(script)?;
    let mut head = Vec::with_capacity(256);
    file.take(256).read_to_end(&mut head)?;
    Ok(head)
}

/// How to start the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ExecPlan {
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
pub(super) fn exec_plan(mode: u32, head: &[u8]) -> ExecPlan {
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

/// The script's environment: the part of `inherited` a node may have
/// ([`crate::process::is_allowed_env`]: `PATH`, `HOME`, `LANG`, ..., never the host's
/// credentials, even when the agent runs inside the daemon or a host program), then the node's
/// identity, then the node's variables from the daemon, each value byte for byte.
fn script_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    registration: &wire::RegisterResponse,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = inherited
        .into_iter()
        .filter(|(key, _)| crate::process::is_allowed_env(key))
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

/// `(exit code, message)` for a script that did not exit with 0. The quoted stderr line has
/// every value of `secrets` masked before it is cut, so a cut never leaves part of one.
pub(super) fn failure_message(
    status: ExitStatus,
    last_stderr: Option<&str>,
    secrets: &[&str],
) -> (Option<i32>, String) {
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
        let masked = mask(line.trim(), secrets);
        message.push_str(&truncate_chars(&masked, MAX_QUOTED_CHARS));
    }
    (exit_code, message)
}

/// `text` with every value of `secrets` replaced by `***`, longest first (so a secret that
/// holds another is masked whole).
fn mask(text: &str, secrets: &[&str]) -> String {
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut masked = text.to_owned();
    for secret in secrets {
        if masked.contains(secret) {
            masked = masked.replace(secret, "***");
        }
    }
    masked
}

fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests;
