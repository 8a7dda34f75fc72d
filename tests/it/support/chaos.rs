//! Helpers for the reliability tests (issue 11), driving only the binaries: a bare `taskflyd`
//! started with a chosen environment and data dir, a node's own token read from its work
//! folder, raw HTTP requests over loopback TCP, connections that never finish their body, and
//! the daemon's memory as /proc shows it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::cli_daemon::{listening_address, Daemon};
use super::cli_run::{self, Ran};

/// How long a bare daemon may take to listen, or to exit when it must.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long one raw request may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// What a bare daemon did after it was started.
pub enum Started {
    /// It listens on this `http://127.0.0.1:PORT`.
    Listening(String),
    /// It ended by itself with this status.
    Exited(ExitStatus),
}

/// A `taskflyd` started with a given data dir and extra environment variables (which
/// [`Daemon`] cannot set), with JSON logs at `info` and the test API token. Stopped with
/// SIGTERM (SIGKILL if it lingers) when dropped.
pub struct BareDaemon {
    child: Option<Child>,
    pub url: String,
    pub home: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
}

impl BareDaemon {
    /// Starts `taskflyd --listen 127.0.0.1:0 --data-dir DATA_DIR ARGS…` with `env` added, and
    /// waits until it listens or exits.
    #[track_caller]
    pub fn start(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (BareDaemon, Started) {
        let home = tempfile::tempdir().expect("temp HOME");
        let mut command = cli_run::command("taskflyd", home.path());
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env("TASKFLY_API_TOKEN", super::API_TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start taskflyd");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (sender, received) = mpsc::channel();
        std::thread::spawn({
            let lines = Arc::clone(&lines);
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("lines").push(line.clone());
                    let _ = sender.send(Some(line));
                }
                let _ = sender.send(None);
            }
        });
        let mut daemon = BareDaemon {
            child: Some(child),
            url: String::new(),
            home,
            lines,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match received.recv_timeout(left) {
                Ok(Some(line)) => {
                    if let Some(address) = listening_address(&line) {
                        daemon.url = format!("http://{address}");
                        let url = daemon.url.clone();
                        return (daemon, Started::Listening(url));
                    }
                }
                Ok(None) => {
                    let status = daemon.wait_exit(START_LIMIT);
                    return (daemon, Started::Exited(status));
                }
                Err(_) => panic!(
                    "taskflyd neither listened nor exited within {START_LIMIT:?}; stderr:\n{}",
                    daemon.stderr_lines().join("\n")
                ),
            }
        }
    }

    /// Waits (at most `limit`) for the daemon to end by itself.
    #[track_caller]
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("taskflyd was started");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for taskflyd") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("taskflyd did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Runs `taskfly --daemon URL ARGS…` with the test API token.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> Ran {
        let mut command = cli_run::command("taskfly", self.home.path());
        command
            .arg("--daemon")
            .arg(&self.url)
            .args(args)
            .env("TASKFLY_API_TOKEN", super::API_TOKEN);
        cli_run::run(&mut command)
    }
}

impl Drop for BareDaemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + START_LIMIT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The work folder of node `index`'s first attempt: `<data-dir>/work/<id>/<index>-1`.
pub fn work_dir(daemon: &Daemon, id: &str, index: u32) -> PathBuf {
    daemon
        .data_dir
        .path()
        .join("work")
        .join(id)
        .join(format!("{index}-1"))
}

/// The last warning or error in the `agent.log` of node `index`'s first attempt (the Rust
/// agent's own log), or the last line if none; for failure messages.
pub fn agent_log_tail(daemon: &Daemon, id: &str, index: u32) -> String {
    let path = work_dir(daemon, id, index).join("agent.log");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return format!("(no {})", path.display());
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|line| line.contains("WARN") || line.contains("ERROR"))
        .or(lines.last())
        .map(|line| line.chars().take(400).collect())
        .unwrap_or_default()
}

/// The node token of a node run by the shell bootstrap (`agent: script`), read from the
/// registration answer it keeps in its private folder (`<work>/taskfly-node.*/.taskfly/reg`,
/// `TASKFLY_AUTH_TOKEN='…'`): a file the node's own script can read too.
#[track_caller]
pub fn node_token(daemon: &Daemon, id: &str, index: u32) -> String {
    let work = work_dir(daemon, id, index);
    let entries =
        std::fs::read_dir(&work).unwrap_or_else(|e| panic!("read {}: {e}", work.display()));
    let reg = entries
        .flatten()
        .find(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("taskfly-node.")
        })
        .map(|entry| entry.path().join(".taskfly").join("reg"))
        .unwrap_or_else(|| panic!("no taskfly-node.* folder in {}", work.display()));
    let text =
        std::fs::read_to_string(&reg).unwrap_or_else(|e| panic!("read {}: {e}", reg.display()));
    text.lines()
        .find_map(|line| line.strip_prefix("TASKFLY_AUTH_TOKEN="))
        .map(|value| value.trim_matches('\'').to_owned())
        .unwrap_or_else(|| panic!("no TASKFLY_AUTH_TOKEN in {}", reg.display()))
}

/// An answer read from a raw connection.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub body: String,
}

/// Sends one HTTP/1.1 request (`Connection: close`) over a fresh loopback connection and reads
/// the whole answer.
#[track_caller]
pub fn raw_request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawAnswer {
    let address = super::hostile_http::socket_address(url);
    let mut stream = TcpStream::connect_timeout(&address, ANSWER_LIMIT).expect("connect");
    stream
        .set_read_timeout(Some(ANSWER_LIMIT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(ANSWER_LIMIT))
        .expect("write timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
    // The daemon may answer (413, 409…) and close before it read everything.
    let _ = stream.write_all(body);
    // A daemon that answers early may reset the connection after its answer: what was read
    // before the reset is the answer.
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        assert!(!answer.is_empty(), "{method} {path}: no answer: {e}");
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {text:.300}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    RawAnswer { status, body }
}

/// `POST /api/v1/nodes/logs?stream=stdout` with a `text/plain` body and a node token.
#[track_caller]
pub fn post_text_logs(url: &str, token: &str, body: &[u8]) -> RawAnswer {
    let bearer = format!("Bearer {token}");
    raw_request(
        url,
        "POST",
        "/api/v1/nodes/logs?stream=stdout",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "text/plain"),
        ],
        body,
    )
}

/// `count` connections that each send a request's headers and the first bytes of a body that
/// never comes: `POST /api/v1/nodes/register` (no token needed) announcing 1000 bytes. Kept
/// open as long as the returned streams live.
#[track_caller]
pub fn slow_bodies(url: &str, count: usize) -> Vec<TcpStream> {
    let address: SocketAddr = super::hostile_http::socket_address(url);
    let head = format!(
        "POST /api/v1/nodes/register HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"provision_token\":\""
    );
    (0..count)
        .map(|i| {
            let mut stream = TcpStream::connect_timeout(&address, ANSWER_LIMIT)
                .unwrap_or_else(|e| panic!("slow connection {i}: {e}"));
            stream
                .set_write_timeout(Some(ANSWER_LIMIT))
                .expect("write timeout");
            // Accepted or only queued by the kernel: either way the bytes are sent.
            stream
                .write_all(head.as_bytes())
                .unwrap_or_else(|e| panic!("slow connection {i}: {e}"));
            stream
        })
        .collect()
}

/// This process' soft limit of open files, from `/proc/self/limits` (the `nix` crate is built
/// without its `resource` feature, so the test checks the limit rather than raising it).
#[track_caller]
pub fn open_files_limit() -> u64 {
    let text = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    text.lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no open-files limit in /proc/self/limits:\n{text}"))
}

/// A `VmXxx:` field of `/proc/<pid>/status`, in KiB.
#[track_caller]
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
}

/// `taskfly logs ID --output json`, grouped by node index: [(stream, line)] in stored order.
#[track_caller]
pub fn lines_by_node(daemon: &Daemon, id: &str) -> BTreeMap<u64, Vec<(String, String)>> {
    let ran = daemon.cli(&["logs", id, "--output", "json"]);
    ran.expect_success();
    let logs = ran.json();
    let mut by_node: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    for line in logs["logs"].as_array().expect("logs is an array") {
        by_node
            .entry(line["node_index"].as_u64().expect("node_index"))
            .or_default()
            .push((
                line["stream"].as_str().expect("stream").to_owned(),
                line["line"].as_str().expect("line").to_owned(),
            ));
    }
    by_node
}

/// The stdout lines of `lines`.
pub fn stdout(lines: &[(String, String)]) -> Vec<&str> {
    lines
        .iter()
        .filter(|(stream, _)| stream == "stdout")
        .map(|(_, line)| line.as_str())
        .collect()
}

/// Polls the daemon's stderr until a line contains every one of `words` (at most `limit`).
#[track_caller]
pub fn wait_for_log(daemon: &Daemon, limit: Duration, words: &[&str]) -> String {
    cli_run::poll(limit, Duration::from_millis(50), &words.join(" "), || {
        daemon
            .stderr_lines()
            .into_iter()
            .find(|line| words.iter().all(|word| line.contains(word)))
    })
}

/// The permission bits of `path`.
#[track_caller]
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
