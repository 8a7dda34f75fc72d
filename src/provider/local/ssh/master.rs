//! One multiplexed connection per SSH host: the OpenSSH `ControlMaster`s behind every call of
//! [`super::SshHosts`].
//!
//! Calls to one login (user, host, port and key: [`Login`]) share one master connection, so
//! only the first pays for the key exchange and the login. Its control socket is
//! `<work_root>/cm/<16 hex digits>`, a hash of the login, so the path stays short however long
//! the work root is (a Unix socket's path holds at most 107 bytes, and ssh first binds a name
//! 17 bytes longer); with a work root too long even for that, calls connect one by one.
//!
//! - A master is started on the first call to its login: `ssh -N -o ControlMaster=yes -o
//!   ControlPersist=60s`, which returns once it has logged in and leaves the master running in
//!   the background. What that ssh says when it cannot log in is the call's answer, and the
//!   answer of every call that was waiting for that start.
//! - Before each call the master's socket must accept a connection; a master that died (host
//!   rebooted, network, killed) is started again there and then.
//! - A call through a master that fails as ssh itself (exit status 255) is made once more
//!   over a connection of its own, and the master is stopped, to be started again by the next
//!   call.
//! - A master ends by itself after [`IDLE`] without a call (OpenSSH's `ControlPersist`), so
//!   even a daemon killed outright leaves none for long. [`Masters::stop_all`] (the provider's
//!   shutdown) stops every master at once with `ssh -O exit`, those an earlier, killed run
//!   left in the folder included; a socket left at a path about to be used is stopped first.
//! - At most [`SESSIONS_PER_HOST`] calls run at once per login (sshd's `MaxSessions` allows 10
//!   sessions per connection by default); logins are served in parallel.
//!
//! The user's own options win: a `ControlMaster`, `ControlPath` or `ControlPersist` among
//! `LocalProvider::ssh_options` turns all of this off but the cap, and every call connects as
//! those options say.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::batch::{Launch, Queue, Stop};
use super::{ssh_command, Output, CALL_TIMEOUT};

/// At most this many calls at once per login: sshd's `MaxSessions` is 10 per connection by
/// default, and a few are left for the user's own sessions.
pub(super) const SESSIONS_PER_HOST: usize = 8;
/// A master with no call for this long ends by itself (`ControlPersist`).
pub(super) const IDLE: Duration = Duration::from_secs(60);
/// The folder of `work_root` holding the control sockets.
pub(super) const FOLDER: &str = "cm";
/// The longest control path: 107 bytes fit a Unix socket's address, and ssh first binds the
/// path followed by `.` and 16 random characters.
const MAX_CONTROL_PATH: usize = 107 - 17;
/// The options by which the user takes multiplexing into their own hands (lower case).
const USER_MULTIPLEXING: [&str; 3] = ["controlmaster", "controlpath", "controlpersist"];
/// How long a stopped master may take to remove its socket.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Who logs in where, with which key: what one master connection serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Login {
    pub(super) user: String,
    pub(super) host: String,
    pub(super) port: u16,
    /// The private key, `~` already expanded; `None` for ssh's own choice.
    pub(super) key_path: Option<PathBuf>,
}

/// How one call reaches its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Via {
    /// Through the master listening on this control socket.
    Master(PathBuf),
    /// Over a connection of its own (as the user's options say).
    Direct,
}

/// The control socket of `login`'s master in `dir`: 16 hex digits of a SHA-256 of the login.
/// `None` when the path would not fit a Unix socket's address, or holds what ssh's
/// configuration would read as more than a path (whitespace, quotes, `%` tokens).
pub(super) fn control_path(dir: &Path, login: &Login) -> Option<PathBuf> {
    let mut hash = Sha256::new();
    for part in [login.user.as_bytes(), login.host.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(login.port.to_be_bytes());
    match &login.key_path {
        Some(key) => {
            hash.update([1]);
            hash.update(key.as_os_str().as_bytes());
        }
        None => hash.update([0]),
    }
    let name: String = hash.finalize()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let path = dir.join(name);
    let bytes = path.as_os_str().as_bytes();
    let plain = !bytes
        .iter()
        .any(|b| b.is_ascii_whitespace() || b"\"'%\\".contains(b));
    (plain && bytes.len() <= MAX_CONTROL_PATH).then_some(path)
}

/// Whether the user's `ssh_options` set up multiplexing themselves (`ControlMaster`,
/// `ControlPath` or `ControlPersist`, in any case, as `Name=value` or `Name value`).
pub(super) fn user_multiplexes(options: &[String]) -> bool {
    options.iter().any(|option| {
        let name = option
            .trim_start()
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        USER_MULTIPLEXING.contains(&name.as_str())
    })
}

/// One login's share of the calls: its cap and its master.
#[derive(Debug)]
pub(super) struct Host {
    /// One permit per call under way.
    pub(super) sessions: Semaphore,
    /// The master's control socket; `None` when calls connect one by one.
    control_path: Option<PathBuf>,
    /// Locked while the master is checked, started or stopped.
    master: tokio::sync::Mutex<MasterState>,
    /// Node starts waiting to be run in a batch session.
    pub(super) launches: Queue<Launch>,
    /// Node stops waiting to be run in a batch session.
    pub(super) stops: Queue<Stop>,
}

/// What a [`Host`] knows of its master.
#[derive(Debug, Default)]
struct MasterState {
    /// This provider started the master at `control_path` and has not stopped it since.
    started: bool,
    /// The last start that could not log in, and when it ended: calls that were waiting for
    /// it take its answer rather than each trying again in turn (a host that does not answer
    /// would otherwise hold them up one `ConnectTimeout` after another).
    failed: Option<(tokio::time::Instant, Output)>,
}

/// Every login's [`Host`], and where their sockets live.
#[derive(Debug)]
pub(super) struct Masters {
    /// `<work_root>/cm`; `None` when the user's options multiplex.
    dir: Option<PathBuf>,
    hosts: Mutex<HashMap<Login, Arc<Host>>>,
    /// Set by [`Masters::stop_all`]: no master is started after it.
    stopped: AtomicBool,
}

/// What starting a master gave.
enum Started {
    Yes,
    /// ssh could not log in: its answer.
    Failed(Output),
    /// Not usable for a reason of its own (said in the string): calls connect one by one.
    Unusable(String),
}

impl Masters {
    /// Masters with their sockets in `work_root/cm`, unless `options` multiplex themselves.
    pub(super) fn new(work_root: &Path, options: &[String]) -> Masters {
        Masters {
            dir: (!user_multiplexes(options)).then(|| work_root.join(FOLDER)),
            hosts: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
        }
    }

    /// The share of `login`, made on first use.
    pub(super) fn host(&self, login: &Login) -> Arc<Host> {
        let mut hosts = crate::sync::lock(&self.hosts);
        Arc::clone(hosts.entry(login.clone()).or_insert_with(|| {
            let control_path = self.dir.as_deref().and_then(|dir| {
                let path = control_path(dir, login);
                if path.is_none() {
                    tracing::warn!(dir = %dir.display(), "this work directory's path is too long (or not plain) for an ssh control socket: every ssh call connects on its own");
                }
                path
            });
            Arc::new(Host {
                sessions: Semaphore::new(SESSIONS_PER_HOST),
                control_path,
                master: tokio::sync::Mutex::new(MasterState::default()),
                launches: Queue::default(),
                stops: Queue::default(),
            })
        }))
    }

    /// How the next call to `host` goes: through its master, started or restarted if need be.
    /// `Err` holds ssh's answer when the master could not log in (the call would fail alike).
    pub(super) async fn via(
        &self,
        host: &Host,
        login: &Login,
        options: &[String],
    ) -> Result<Via, Output> {
        let Some(path) = &host.control_path else {
            return Ok(Via::Direct);
        };
        let asked = tokio::time::Instant::now();
        let mut master = host.master.lock().await;
        if master.started && is_listening(path).await {
            return Ok(Via::Master(path.clone()));
        }
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(Via::Direct);
        }
        if let Some((at, output)) = &master.failed {
            if *at >= asked {
                return Err(output.clone());
            }
        }
        if master.started {
            tracing::info!(host = %login.host, "the ssh master connection to this host ended; starting another");
            master.started = false;
        }
        match start(login, options, path).await {
            Started::Yes => {
                master.started = true;
                master.failed = None;
                tracing::debug!(host = %login.host, control_path = %path.display(), "started an ssh master connection");
                Ok(Via::Master(path.clone()))
            }
            Started::Failed(output) => {
                master.failed = Some((tokio::time::Instant::now(), output.clone()));
                Err(output)
            }
            Started::Unusable(why) => {
                tracing::warn!(host = %login.host, reason = %why, "cannot keep an ssh master connection to this host; this call connects on its own");
                Ok(Via::Direct)
            }
        }
    }

    /// Stops `host`'s master (a call through it failed), so the next call starts another.
    pub(super) async fn stop(&self, host: &Host) {
        let mut master = host.master.lock().await;
        if let (true, Some(path)) = (master.started, &host.control_path) {
            stop_master(path).await;
        }
        master.started = false;
    }

    /// Stops every master: those this provider started and any socket an earlier run left in
    /// the folder. Calls made after this connect one by one.
    pub(super) async fn stop_all(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let Some(dir) = &self.dir else {
            return;
        };
        let hosts: Vec<Arc<Host>> = crate::sync::lock(&self.hosts).values().cloned().collect();
        for host in hosts {
            self.stop(&host).await;
        }
        let mut left = Vec::new();
        if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                left.push(entry.path());
            }
        }
        for path in left {
            stop_master(&path).await;
        }
        // Empty now, unless something else put files there.
        let _ = tokio::fs::remove_dir(dir).await;
    }
}

/// Whether a master listens on `path`: a connection to it is accepted (and closed at once,
/// which the master takes as a client that left).
async fn is_listening(path: &Path) -> bool {
    tokio::net::UnixStream::connect(path).await.is_ok()
}

/// Starts `login`'s master on `path`, after stopping whatever an earlier run left there.
async fn start(login: &Login, options: &[String], path: &Path) -> Started {
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt as _;
        let created = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
        if let Err(e) = created {
            return Started::Unusable(format!("cannot create {}: {e}", dir.display()));
        }
    }
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        stop_master(path).await;
    }
    let mut command = ssh_command(options, login);
    command
        .arg("-N")
        .args(["-o", "ControlMaster=yes"])
        .arg("-o")
        .arg(format!("ControlPersist={}s", IDLE.as_secs()))
        .arg("-o")
        .arg(format!("ControlPath={}", path.display()))
        .arg("--")
        .arg(&login.host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Started::Unusable(format!("cannot run ssh: {e}")),
    };
    // ssh returns once it has logged in and left the master in the background. One that
    // does not (it could not listen on the socket and kept the session for itself) is killed
    // when the wait is given up (`kill_on_drop`).
    let output = match tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Started::Unusable(format!("cannot read from ssh: {e}")),
        Err(_) => {
            return Started::Unusable(format!(
                "ssh -N -o ControlMaster=yes did not return within {} s",
                CALL_TIMEOUT.as_secs()
            ))
        }
    };
    let output = Output::from(output);
    if output.status != Some(0) {
        return Started::Failed(output);
    }
    if !is_listening(path).await {
        return Started::Unusable(format!(
            "ssh logged in but nothing listens on {}: {}",
            path.display(),
            output.stderr.trim()
        ));
    }
    Started::Yes
}

/// Asks the master on `path` to exit (`ssh -O exit`) and waits, a little, until it has
/// removed its socket; removes a socket nothing listens on.
async fn stop_master(path: &Path) {
    if is_listening(path).await {
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(["-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("ControlPath={}", path.display()))
            .args(["-O", "exit", "--", "taskfly-master"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(STOP_LIMIT, command.output()).await {
            Ok(Ok(output)) if output.status.success() => {
                let deadline = tokio::time::Instant::now() + STOP_LIMIT;
                while tokio::fs::symlink_metadata(path).await.is_ok()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(Ok(output)) => tracing::warn!(
                control_path = %path.display(),
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "cannot stop an ssh master connection"
            ),
            Ok(Err(e)) => {
                tracing::warn!(control_path = %path.display(), error = %e, "cannot run ssh -O exit")
            }
            Err(_) => {
                tracing::warn!(control_path = %path.display(), "ssh -O exit did not return in time")
            }
        }
    }
    // A socket nothing listens on (its master was killed) is only a file.
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(control_path = %path.display(), error = %e, "cannot remove an ssh control socket");
        }
    }
}
