//! The sshd the tests of nodes on ssh hosts (`instance_config.local.hosts`) run their nodes
//! through: `scripts/test.sh` starts one listening on 127.0.0.1 and 127.0.0.2, and names it in
//! `TASKFLY_TEST_SSH_PORT`, `TASKFLY_TEST_SSH_KEY` (a client key it accepts),
//! `TASKFLY_TEST_SSH_KNOWN_HOSTS` (its host key, for both addresses) and
//! `TASKFLY_TEST_SSH_USER` (the user running the tests, so the nodes are processes this test
//! can see in /proc).
//!
//! With `TASKFLY_REQUIRE_SSH=1` (the test script sets it) a missing or unusable sshd fails
//! these tests; without it, they say they were not run and pass.
//!
//! Nothing here needs, or writes to, the `~/.ssh` of the user running the tests: every ssh
//! command is given the test's key and known_hosts file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The hosts the test sshd listens on.
pub const HOSTS: [&str; 2] = ["127.0.0.1", "127.0.0.2"];

/// The test sshd: where it listens and how to log in.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub port: u16,
    /// A private key (no passphrase) in the sshd's authorized_keys.
    pub key: PathBuf,
    /// A known_hosts file holding the sshd's host key for `[127.0.0.1]:PORT` and
    /// `[127.0.0.2]:PORT`.
    pub known_hosts: PathBuf,
    pub user: String,
}

impl SshTarget {
    /// The test sshd, checked to accept this key on both hosts; `None` when the tests should
    /// not run. Panics when the test script asked for sshd and it is missing or unusable.
    pub fn from_env(test: &str) -> Option<SshTarget> {
        let required = std::env::var("TASKFLY_REQUIRE_SSH").is_ok_and(|v| v == "1");
        let names = [
            "TASKFLY_TEST_SSH_PORT",
            "TASKFLY_TEST_SSH_KEY",
            "TASKFLY_TEST_SSH_KNOWN_HOSTS",
            "TASKFLY_TEST_SSH_USER",
        ];
        let values = names.map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
        let missing: Vec<&str> = names
            .iter()
            .zip(&values)
            .filter_map(|(name, value)| value.is_none().then_some(*name))
            .collect();
        let [Some(port), Some(key), Some(known_hosts), Some(user)] = values else {
            assert!(
                !required,
                "TASKFLY_REQUIRE_SSH=1 but the test sshd is not named (missing: {}): start one \
                 (scripts/test.sh does) and name it there",
                missing.join(", ")
            );
            eprintln!(
                "{test}: NOT RUN: set TASKFLY_TEST_SSH_PORT, TASKFLY_TEST_SSH_KEY, \
                 TASKFLY_TEST_SSH_KNOWN_HOSTS and TASKFLY_TEST_SSH_USER to a test sshd, or run \
                 scripts/test.sh"
            );
            return None;
        };
        let target = SshTarget {
            port: port
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("TASKFLY_TEST_SSH_PORT={port:?} is not a port: {e}")),
            key: PathBuf::from(key),
            known_hosts: PathBuf::from(known_hosts),
            user,
        };
        // Once per test binary: every test of the run uses the same sshd.
        static USABLE: OnceLock<Result<(), String>> = OnceLock::new();
        if let Err(problem) = USABLE.get_or_init(|| target.check()) {
            panic!("the test sshd (TASKFLY_TEST_SSH_*) is unusable: {problem}");
        }
        Some(target)
    }

    /// Logs in on every host and runs `true`.
    fn check(&self) -> Result<(), String> {
        for host in HOSTS {
            let output = self.ssh(host, "true");
            if !output.status.success() {
                return Err(format!(
                    "`ssh -p {} {}@{host} true` failed ({}): {}",
                    self.port,
                    self.user,
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// The `instance_config:` lines of a `taskfly.yml` running its nodes on `hosts` with this
    /// user, `key` and port.
    pub fn instance_config_yml(&self, hosts: &[&str], key: &Path) -> String {
        format!(
            "instance_config:\n  local:\n    hosts: [{}]\n    ssh_user: {}\n    \
             ssh_key_path: {}\n    ssh_port: {}\n",
            hosts.join(", "),
            yaml_string(&self.user),
            yaml_string(&key.to_string_lossy()),
            self.port
        )
    }

    /// The ssh options trusting exactly the test sshd's host key (for
    /// `LocalProvider::ssh_options`).
    pub fn ssh_options(&self) -> Vec<String> {
        ssh_options_for(&self.known_hosts)
    }

    /// The `taskflyd` flags giving it [`SshTarget::ssh_options`].
    pub fn daemon_args(&self) -> Vec<String> {
        daemon_args_for(&self.known_hosts)
    }

    /// Runs `command` on `host` through the real ssh client, as the provider would: the
    /// test's key and known_hosts, no prompt.
    pub fn ssh(&self, host: &str, command: &str) -> std::process::Output {
        let mut ssh = Command::new("ssh");
        ssh.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        for option in self.ssh_options() {
            ssh.arg("-o").arg(option);
        }
        ssh.arg("-i")
            .arg(&self.key)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-l")
            .arg(&self.user)
            .arg("--")
            .arg(host)
            .arg(command)
            .stdin(Stdio::null());
        ssh.output()
            .unwrap_or_else(|e| panic!("cannot run ssh to {host}: {e}"))
    }

    /// The entries of `~/.taskfly/nodes/` of the ssh user on `host` (none when it does not
    /// exist), sorted.
    #[track_caller]
    pub fn node_dirs(&self, host: &str) -> Vec<String> {
        let output = self.ssh(
            host,
            r#"cd "$HOME/.taskfly/nodes" 2>/dev/null || exit 0; ls -1A"#,
        );
        assert!(
            output.status.success(),
            "cannot list ~/.taskfly/nodes on {host} ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        sorted_lines(&output.stdout)
    }

    /// The node directories on `host` of the deployment `deployment_id` (named by their
    /// instance ids, `ssh-<deployment_id>-<node_index>-<attempt>`).
    #[track_caller]
    pub fn deployment_dirs(&self, host: &str, deployment_id: &str) -> Vec<String> {
        let prefix = format!("ssh-{deployment_id}-");
        self.node_dirs(host)
            .into_iter()
            .filter(|name| name.starts_with(&prefix))
            .collect()
    }

    /// The entries of one node directory (`~/.taskfly/nodes/<instance_id>/`) on `host`, sorted;
    /// `None` when it does not exist.
    #[track_caller]
    pub fn node_dir_entries(&self, host: &str, instance_id: &str) -> Option<Vec<String>> {
        assert_shell_word(instance_id);
        let output = self.ssh(
            host,
            &format!(r#"cd "$HOME/.taskfly/nodes/{instance_id}" 2>/dev/null || exit 7; ls -1A"#),
        );
        match output.status.code() {
            Some(0) => Some(sorted_lines(&output.stdout)),
            Some(7) => None,
            _ => panic!(
                "cannot list ~/.taskfly/nodes/{instance_id} on {host} ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }

    /// Stops whatever a failed test left of the deployment `deployment_id` on the ssh hosts:
    /// each node directory's process group (from its `pid` file) and the directory itself, then
    /// any process carrying `TASKFLY_DEPLOYMENT_ID=<deployment_id>`. Nothing of another test
    /// is touched.
    pub fn remove_leftovers(&self, deployment_id: &str) {
        assert_shell_word(deployment_id);
        for host in HOSTS {
            let _ = self.ssh(
                host,
                &format!(
                    r#"cd "$HOME/.taskfly/nodes" 2>/dev/null || exit 0
for d in ssh-{deployment_id}-*; do
  [ -d "$d" ] || continue
  p=$(cat "$d/pid" 2>/dev/null)
  case $p in '' | *[!0-9]*) ;; *) kill -KILL "-$p" "$p" 2>/dev/null ;; esac
  rm -rf "$d"
done"#
                ),
            );
        }
        kill_processes_with_env(&format!("TASKFLY_DEPLOYMENT_ID={deployment_id}"));
    }
}

/// Calls [`SshTarget::remove_leftovers`] for its deployment when dropped, so a test failing
/// half-way leaves no node running on the ssh hosts (the daemon's own guard knows only its
/// local agent processes). Does nothing when the test left nothing.
pub struct RemoveLeftovers<'a> {
    pub target: &'a SshTarget,
    pub deployment_id: String,
}

impl Drop for RemoveLeftovers<'_> {
    fn drop(&mut self) {
        self.target.remove_leftovers(&self.deployment_id);
    }
}

/// [`SshTarget::ssh_options`] with another known_hosts file.
pub fn ssh_options_for(known_hosts: &Path) -> Vec<String> {
    vec![
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "StrictHostKeyChecking=yes".to_owned(),
    ]
}

/// [`SshTarget::daemon_args`] with another known_hosts file: `--ssh-option OPTION` for each
/// of [`ssh_options_for`].
pub fn daemon_args_for(known_hosts: &Path) -> Vec<String> {
    ssh_options_for(known_hosts)
        .into_iter()
        .flat_map(|option| ["--ssh-option".to_owned(), option])
        .collect()
}

/// Live processes carrying `TASKFLY_NODE_ID=<node_id>`: the node's script and anything it
/// started (the nodes run as the user running the tests, on this machine).
pub fn node_processes(node_id: &str) -> Vec<u32> {
    super::processes_with_env(&format!("TASKFLY_NODE_ID={node_id}"))
}

/// Generates a fresh ed25519 key pair (no passphrase) at `dir/name`, one no sshd accepts;
/// returns the private key's path.
pub fn generate_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let output = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "taskfly-test-unknown",
            "-f",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ssh-keygen: {e}"));
    assert!(
        output.status.success(),
        "ssh-keygen failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    path
}

/// SIGKILL to every process whose environment holds `variable` (`NAME=value`), until none is
/// left (bounded).
fn kill_processes_with_env(variable: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = super::processes_with_env(variable);
        if left.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in left {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `text` as a double-quoted YAML string (YAML accepts JSON strings).
fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("json string")
}

/// Panics unless `word` is safe to put in a shell command unquoted (ids are `[A-Za-z0-9-]`).
#[track_caller]
fn assert_shell_word(word: &str) {
    assert!(
        !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "not a plain id: {word:?}"
    );
}

/// The non-empty lines of a command's output, sorted.
fn sorted_lines(output: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(output)
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// Live processes whose command line names `path` (in one of its arguments), with their
/// command lines: ssh clients and masters using a control socket in that folder.
pub fn processes_naming(path: &Path) -> Vec<(u32, String)> {
    let needle = path.as_os_str().as_encoded_bytes();
    let mut found: Vec<(u32, String)> = super::processes()
        .filter_map(|(pid, dir)| {
            // A zombie's command line is empty: it names nothing.
            let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
            cmdline.windows(needle.len()).any(|w| w == needle).then(|| {
                let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                (pid, shown.trim_end().to_owned())
            })
        })
        .collect();
    found.sort();
    found
}

/// The ssh master connections (`ssh -N -o ControlMaster=yes …`) with their control socket in
/// `dir`: their pids, sorted.
pub fn masters_in(dir: &Path) -> Vec<u32> {
    processes_naming(dir)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("ControlMaster=yes"))
        .map(|(pid, _)| pid)
        .collect()
}

/// The entries of `dir` (control sockets), sorted; none when it does not exist.
pub fn sockets_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
