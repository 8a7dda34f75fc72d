//! Running the real `taskfly` (and `taskflyd`) executables: a clean environment, a time limit
//! on every run, and the captured exit code, stdout and stderr.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one CLI command may take before the test fails. Generous: the machine is shared.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// A `Command` for one of this package's binaries with nothing of the developer's environment
/// that could change its behaviour: no `TASKFLY_*` variable, no `RUST_LOG`, no `NO_COLOR`, and
/// `HOME` pointed at `home` so nothing reads or writes the real `~/.taskfly`.
pub fn command(binary: &str, home: &Path) -> Command {
    let mut command = Command::new(super::bin(binary));
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("TASKFLY_") || name_text == "RUST_LOG" || name_text == "NO_COLOR" {
            command.env_remove(&name);
        }
    }
    command.env("HOME", home).stdin(Stdio::null());
    command
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Ran {
    /// The command line, for failure messages.
    pub what: String,
    /// The exit code (a death by signal fails the test when it is read).
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// The exit code; panics (showing the output) if the process died by a signal.
    pub fn code(&self) -> i32 {
        match self.status.code() {
            Some(code) => code,
            None => panic!(
                "{} died by a signal ({:?})\n{}",
                self.what,
                self.status,
                self.show()
            ),
        }
    }

    /// Asserts the exit code, showing everything the command printed when it differs.
    #[track_caller]
    pub fn expect_code(&self, expected: i32) -> &Ran {
        assert_eq!(
            self.code(),
            expected,
            "exit code of {}\n{}",
            self.what,
            self.show()
        );
        self
    }

    /// Asserts success (exit code 0).
    #[track_caller]
    pub fn expect_success(&self) -> &Ran {
        self.expect_code(0)
    }

    /// Stdout parsed as exactly one JSON document (trailing whitespace allowed, nothing else).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.stdout) {
            Ok(value) => value,
            Err(e) => panic!(
                "stdout of {} is not exactly one JSON document: {e}\n{}",
                self.what,
                self.show()
            ),
        }
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Stdout and stderr, for assertion messages.
    pub fn show(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}---", self.stdout, self.stderr)
    }
}

/// Runs `command` to its end, failing the test (after killing it) if it takes longer than
/// `limit`.
#[track_caller]
pub fn run_with_limit(command: &mut Command, limit: Duration) -> Ran {
    let what = describe(command);
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let running = Running::new(child, what);
    running.finish(limit)
}

/// Runs `command` with [`COMMAND_LIMIT`].
#[track_caller]
pub fn run(command: &mut Command) -> Ran {
    run_with_limit(command, COMMAND_LIMIT)
}

/// A started command whose stdout is read line by line while it runs.
pub struct Running {
    what: String,
    pid: i32,
    stdout_lines: mpsc::Receiver<String>,
    seen_stdout: Vec<String>,
    /// Stderr, line by line as it comes (all of it is also kept for [`Running::finish`]).
    stderr_lines: mpsc::Receiver<String>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
    exited: mpsc::Receiver<std::io::Result<ExitStatus>>,
    waiter: Option<JoinHandle<()>>,
    finished: bool,
}

impl Running {
    /// Starts `command` with stdout and stderr captured.
    #[track_caller]
    pub fn start(command: &mut Command) -> Running {
        let what = describe(command);
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Running::new(child, what)
    }

    fn new(mut child: Child, what: String) -> Running {
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (line_sender, stdout_lines) = mpsc::channel();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_sender.send(line).is_err() {
                    break;
                }
            }
        });
        let (stderr_sender, stderr_lines) = mpsc::channel();
        let stderr_reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut reader = BufReader::new(&mut stderr);
            loop {
                let start = bytes.len();
                match reader.read_until(b'\n', &mut bytes) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&bytes[start..]);
                        let _ = stderr_sender.send(line.trim_end_matches('\n').to_owned());
                    }
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let (exit_sender, exited) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = exit_sender.send(child.wait());
        });
        Running {
            what,
            pid,
            stdout_lines,
            seen_stdout: Vec::new(),
            stderr_lines,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
            exited,
            waiter: Some(waiter),
            finished: false,
        }
    }

    /// Waits (at most `limit`) for a stdout line for which `wanted` holds; returns it. Every
    /// line read on the way is kept for [`Running::finish`].
    #[track_caller]
    pub fn wait_for_line(
        &mut self,
        limit: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen_stdout.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "{}: no expected line on stdout within {limit:?}; so far:\n{}",
                        self.what,
                        self.seen_stdout.join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{}: stdout closed before the expected line; it printed:\n{}",
                    self.what,
                    self.seen_stdout.join("\n")
                ),
            }
        }
    }

    /// Waits (at most `limit`) for a stderr line for which `wanted` holds; returns it. All of
    /// stderr is still in what [`Running::finish`] returns.
    #[track_caller]
    pub fn wait_for_stderr_line(
        &mut self,
        limit: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(e) => {
                    self.kill();
                    panic!(
                        "{}: no expected line on stderr within {limit:?} ({e})",
                        self.what
                    );
                }
            }
        }
    }

    /// Sends `signal` to the process (SIGINT: what Ctrl-C sends).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal)
            .unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.what));
    }

    /// Waits (at most `limit`) for the process to end by itself, and returns what it printed.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> Ran {
        let status = match self.exited.recv_timeout(limit) {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("cannot wait for {}: {e}", self.what),
            Err(_) => {
                self.kill();
                let _ = self.exited.recv();
                self.finished = true;
                panic!("{} did not end within {limit:?}", self.what);
            }
        };
        self.finished = true;
        // The pipes close when the process (and anything it left holding them) is gone.
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        self.seen_stdout.extend(self.stdout_lines.try_iter());
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
        let mut stdout = self.seen_stdout.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Ran {
            what: self.what.clone(),
            status,
            stdout,
            stderr,
        }
    }

    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for Running {
    /// A test that failed half-way leaves no process behind.
    fn drop(&mut self) {
        if !self.finished {
            self.kill();
        }
    }
}

fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program())
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args: Vec<String> = command
        .get_args()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    format!("`{program} {}`", args.join(" "))
}

/// Polls `check` until it returns `Some`, at most `limit`, pausing `every` between tries.
/// For state that can only be observed by asking (a deployment's status, /proc); the pause is
/// the polling interval, not a guess at how long something takes.
#[track_caller]
pub fn poll<T>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// Starts `command` with its output piped, reads its stdout up to the first line `first`
/// accepts, then closes it, as `head` would; waits (at most `limit`) for the command to end.
/// Its exit status and stderr.
#[track_caller]
pub fn close_stdout_after(
    command: &mut Command,
    limit: Duration,
    first: impl Fn(&str) -> bool,
) -> (ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !first(line.trim_end()) {
        line.clear();
        let read = stdout.read_line(&mut line).expect("read stdout");
        assert_ne!(read, 0, "stdout ended before the line looked for");
    }
    drop(stdout);
    let status = poll(
        limit,
        Duration::from_millis(50),
        "the command to end",
        || child.try_wait().expect("wait"),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    (status, stderr)
}
