//! A real `taskflyd` process on 127.0.0.1:0 for the CLI tests, with its own data dir and HOME.
//!
//! Its address is read from its own "taskflyd listening" log line; its stderr is drained by a
//! thread for its whole life (so it never blocks on a full pipe) and kept for assertions. The
//! guard stops it with SIGTERM and waits for it, so no test leaves a daemon behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cli_run::{self, Ran};

/// How long a daemon may take to start listening or to shut down.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// How the daemon logs (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `TASKFLY_API_TOKEN`; `None` leaves it unset so the daemon makes `<data-dir>/api-token`.
    pub token: Option<String>,
    pub log_format: LogFormat,
    /// `RUST_LOG`.
    pub rust_log: String,
}

impl Default for DaemonOptions {
    fn default() -> DaemonOptions {
        DaemonOptions {
            token: Some(super::API_TOKEN.to_owned()),
            log_format: LogFormat::Json,
            rust_log: "info".to_owned(),
        }
    }
}

/// Set in the daemon's environment, to find what a test left running. Agent processes do not
/// inherit it (the local provider starts them from an allow-list environment): they are found
/// by the daemon's `HOME` instead.
pub const DAEMON_MARKER_VAR: &str = "CLI_TEST_DAEMON";

/// A running `taskflyd`.
pub struct Daemon {
    child: Option<Child>,
    /// `CLI_TEST_DAEMON=<unique>`, in the environment of the daemon.
    pub marker: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The API token the CLI must send (from the environment, or the file the daemon made).
    pub token: String,
    pub data_dir: tempfile::TempDir,
    pub home: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// Signalled when the stderr reader has read everything.
    reader_done: mpsc::Receiver<()>,
    /// How the daemon was started, so [`Daemon::restart`] can start it again in the same place.
    launch: Launch,
}

/// What a daemon is started with besides its data dir, HOME and marker.
#[derive(Debug, Clone)]
struct Launch {
    options: DaemonOptions,
    /// `--listen`: `127.0.0.1:0`, or a fixed port for a daemon that is restarted.
    listen: String,
    /// More flags (`--heartbeat-timeout 3s`, ...).
    args: Vec<String>,
}

impl Daemon {
    /// A daemon with the test API token and JSON logs at `info`.
    #[track_caller]
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    /// A daemon started with `options`; fails the test if it does not start listening.
    #[track_caller]
    pub fn start_with(options: DaemonOptions) -> Daemon {
        Daemon::launch(Launch {
            options,
            listen: "127.0.0.1:0".to_owned(),
            args: Vec::new(),
        })
    }

    /// A daemon listening on `127.0.0.1:port` (see [`free_port`]) with `args` added to its
    /// command line, so it can be stopped or killed and [restarted](Daemon::restart) at the
    /// same address, with the same data dir, HOME and marker.
    #[track_caller]
    pub fn start_on(port: u16, options: DaemonOptions, args: &[&str]) -> Daemon {
        Daemon::launch(Launch {
            options,
            listen: format!("127.0.0.1:{port}"),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        })
    }

    /// A daemon on `127.0.0.1:0` with `args` added to its command line (`--tls-cert FILE
    /// --tls-key FILE`, ...). With `--tls-cert` among them, its `url` is `https://…`.
    #[track_caller]
    pub fn start_with_args(options: DaemonOptions, args: &[&str]) -> Daemon {
        Daemon::launch(Launch {
            options,
            listen: "127.0.0.1:0".to_owned(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        })
    }

    #[track_caller]
    fn launch(launch: Launch) -> Daemon {
        let marker = format!("{DAEMON_MARKER_VAR}={}", unique_word());
        // Replaced by the first `spawn`.
        let (_, reader_done) = mpsc::channel();
        let mut daemon = Daemon {
            child: None,
            marker,
            reader_done,
            url: String::new(),
            token: launch.options.token.clone().unwrap_or_default(),
            data_dir: tempfile::tempdir().expect("temp data dir"),
            home: tempfile::tempdir().expect("temp HOME"),
            lines: Arc::new(Mutex::new(Vec::new())),
            reader: None,
            launch,
        };
        daemon.spawn();
        daemon
    }

    /// Starts the daemon process as `self.launch` says and waits until it listens. Its stderr
    /// lines are added to those of earlier runs.
    #[track_caller]
    fn spawn(&mut self) {
        let options = &self.launch.options;
        let mut command = cli_run::command("taskflyd", self.home.path());
        command
            .args(["--listen", &self.launch.listen, "--data-dir"])
            .arg(self.data_dir.path())
            .arg("--log-format")
            .arg(match options.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
            .args(&self.launch.args)
            .env("RUST_LOG", &options.rust_log)
            .env(
                DAEMON_MARKER_VAR,
                &self.marker[DAEMON_MARKER_VAR.len() + 1..],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = &options.token {
            command.env("TASKFLY_API_TOKEN", token);
        }
        let mut child = command.spawn().expect("start taskflyd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, received) = mpsc::channel();
        let (done_sender, reader_done) = mpsc::channel();
        let reader = std::thread::spawn({
            let lines = Arc::clone(&self.lines);
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("lines").push(line.clone());
                    // Nobody listens once the address is known; keep draining regardless.
                    let _ = sender.send(line);
                }
                let _ = done_sender.send(());
            }
        });
        self.child = Some(child);
        self.reader = Some(reader);
        self.reader_done = reader_done;
        let deadline = Instant::now() + START_LIMIT;
        let address = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match received.recv_timeout(left) {
                Ok(line) => {
                    if let Some(address) = listening_address(&line) {
                        break address;
                    }
                }
                Err(_) => panic!(
                    "taskflyd did not log \"taskflyd listening\" within {START_LIMIT:?}; stderr:\n{}",
                    self.stderr_lines().join("\n")
                ),
            }
        };
        let scheme = if self.launch.args.iter().any(|arg| arg == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://{address}");
        if options.token.is_none() {
            let path = self.token_file();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            self.token = text.trim().to_owned();
        }
    }

    /// Kills the daemon with SIGKILL (a crash: no shutdown code runs) and waits for it. Agent
    /// processes it started keep running. Returns its exit status.
    #[track_caller]
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("taskflyd was running");
        child.kill().expect("SIGKILL taskflyd");
        let status = child.wait().expect("wait for taskflyd");
        if self.reader_done.recv_timeout(STOP_LIMIT).is_ok() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        status
    }

    /// Stops the daemon (SIGTERM) and waits for it, keeping the guard so it can be restarted.
    /// Returns its exit status.
    #[track_caller]
    pub fn shut_down(&mut self) -> ExitStatus {
        self.terminate().expect("taskflyd was running")
    }

    /// Starts the stopped (or killed) daemon again: same listen address, data dir, HOME,
    /// marker and flags. Only for daemons made by [`Daemon::start_on`].
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        assert!(
            !self.launch.listen.ends_with(":0"),
            "a daemon on port 0 cannot be restarted at the same address; use Daemon::start_on"
        );
        self.spawn();
    }

    /// [`Daemon::restart`] with `args` instead of the flags it was started with.
    #[track_caller]
    pub fn restart_with(&mut self, args: &[&str]) {
        self.launch.args = args.iter().map(|arg| (*arg).to_owned()).collect();
        self.restart();
    }

    /// The pid of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `<data-dir>/api-token`.
    pub fn token_file(&self) -> PathBuf {
        self.data_dir.path().join("api-token")
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// `taskfly --daemon URL ARGS…` with the API token, not yet run.
    pub fn taskfly(&self, args: &[&str]) -> Command {
        let mut command = cli_run::command("taskfly", self.home.path());
        command
            .arg("--daemon")
            .arg(&self.url)
            .args(args)
            .env("TASKFLY_API_TOKEN", &self.token);
        command
    }

    /// Runs `taskfly --daemon URL ARGS…` with the API token.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> Ran {
        cli_run::run(&mut self.taskfly(args))
    }

    /// `taskfly up DIR` (no wait): the new deployment's id.
    #[track_caller]
    pub fn up(&self, project: &Path) -> String {
        let ran = cli_run::run(self.taskfly(&["up", "--output", "json"]).arg(project));
        ran.expect_success();
        let created = ran.json();
        created["deployment_id"]
            .as_str()
            .expect("deployment_id")
            .to_owned()
    }

    /// `taskfly status ID --output json`.
    #[track_caller]
    pub fn status(&self, id: &str) -> serde_json::Value {
        let ran = self.cli(&["status", id, "--output", "json"]);
        ran.expect_success();
        ran.json()
    }

    /// Polls `status` until `ready` holds for it (at most `limit`); returns that status.
    #[track_caller]
    pub fn wait_for_status(
        &self,
        id: &str,
        limit: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        cli_run::poll(limit, Duration::from_millis(50), what, || {
            let status = self.status(id);
            ready(&status).then_some(status)
        })
    }

    /// Stops the daemon (SIGTERM), waits for it, and returns its exit status and every line it
    /// wrote to stderr.
    #[track_caller]
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        let status = self.terminate().expect("taskflyd was running");
        (status, self.stderr_lines())
    }

    /// SIGTERM, then wait (SIGKILL if it does not end in time); joins the stderr reader.
    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let (sender, exited) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = sender.send(child.wait());
        });
        let status = match exited.recv_timeout(STOP_LIMIT) {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                exited.recv().ok().and_then(Result::ok)
            }
        };
        let _ = waiter.join();
        // Stderr ends with the daemon, unless a process it started still holds the pipe: then
        // the lines so far are all there is, and the reader is left to finish on its own.
        if self.reader_done.recv_timeout(STOP_LIMIT).is_ok() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        status
    }

    /// Processes other than the daemon carrying its marker or its `HOME`: agent processes,
    /// bootstraps and scripts it started (they start from an allow-list environment, which
    /// keeps `HOME` but not the marker), and CLI commands run against it.
    pub fn other_processes(&self) -> Vec<u32> {
        let own = self.child.as_ref().map(Child::id);
        let home = format!("HOME={}", self.home.path().display());
        let mut pids = super::processes_with_env(&self.marker);
        pids.extend(super::processes_with_env(&home));
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| Some(*pid) != own);
        pids
    }
}

impl Drop for Daemon {
    /// Stops the daemon, then anything of it a failed test left running (agent processes may
    /// outlive their daemon by design): SIGTERM, which lets an agent stop its script, then
    /// SIGKILL for whatever is still there.
    fn drop(&mut self) {
        self.terminate();
        for signal in [
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::Signal::SIGKILL,
        ] {
            let left = self.other_processes();
            if left.is_empty() {
                return;
            }
            for pid in &left {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                }
            }
            let deadline = Instant::now() + STOP_LIMIT;
            while !self.other_processes().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A temporary path as the `&str` the CLI takes as an argument.
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// The `nodes` of a deployment document (`GET /deployments/{id}`, `--output json`).
pub fn nodes(view: &serde_json::Value) -> &Vec<serde_json::Value> {
    view["nodes"].as_array().expect("nodes is an array")
}

impl Daemon {
    /// `taskfly up DIR --wait --output json` within `limit`, asserting the exit code; the final
    /// deployment document.
    #[track_caller]
    pub fn up_wait_json(
        &self,
        project: &Path,
        expected_code: i32,
        limit: Duration,
    ) -> serde_json::Value {
        let ran = cli_run::run_with_limit(
            &mut self.taskfly(&["up", path_str(project), "--wait", "--output", "json"]),
            limit,
        );
        ran.expect_code(expected_code);
        ran.json()
    }

    /// `taskfly down ID` within `limit`, asserting success and what it prints.
    #[track_caller]
    pub fn down(&self, id: &str, limit: Duration) -> Ran {
        let ran = cli_run::run_with_limit(&mut self.taskfly(&["down", id]), limit);
        ran.expect_success();
        assert_eq!(
            ran.stdout,
            format!("deployment {id} terminated\n"),
            "{}",
            ran.show()
        );
        ran
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released), for a daemon that must
/// come back at the same address after a restart.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("address").port()
}

/// A word no other test or run uses: process id, time and a counter.
pub fn unique_word() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}x{nanos}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `listen` address of a "taskflyd listening" line, in either log format.
pub fn listening_address(line: &str) -> Option<String> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        let fields = json.get("fields")?;
        if fields.get("message")?.as_str()? != "taskflyd listening" {
            return None;
        }
        return fields.get("listen")?.as_str().map(str::to_owned);
    }
    if !line.contains("taskflyd listening") {
        return None;
    }
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .map(str::to_owned)
}
