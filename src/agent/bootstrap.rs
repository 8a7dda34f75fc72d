//! The node bootstrap: a POSIX `sh` script that serves a node exactly as the Rust agent
//! ([`crate::agent::run`]) does, for machines where no `taskfly` binary is installed.
//!
//! [`bootstrap_script`] renders it for one node. A cloud provider hands it to the instance as
//! its user-data; the local provider runs it instead of the Rust agent when a deployment says
//! `instance_config.local.agent: script`, so both agents pass the same tests. It needs `sh`
//! (dash, busybox ash and bash are tested), `curl`, `tar` and `gzip`, plus utilities every
//! Linux has (coreutils or busybox): `env`, `sed`, `grep`, `tr`, `head -c`, `tail`, `wc`,
//! `date +%s`, `sleep`, and `setsid` to give the script a process group of its own (without
//! it, stopping a node signals the script's own process only, not its children). It talks to
//! the daemon alone (never to an instance metadata service): everything it needs is in the
//! script or comes from the daemon, so it runs the same anywhere. The daemon's answers go
//! through a private directory under `$TMPDIR` (mode 0700, removed at exit); the bundle is
//! extracted beside it, or into `remote_dest_dir`, and kept.
//!
//! On a pooled instance (a registration answer with `TASKFLY_POOLED='1'`) the script serves
//! node after node: once a node has ended in any way but a signal to the bootstrap, it clears
//! the node's files and registers again, with the token the answer gave
//! (`TASKFLY_NEXT_TOKEN`). Clearing empties the work
//! directory (back to a fresh bootstrap's) and removes a bundle root that it made, or empties
//! one that existed; it never clears `/`, the home directory or a directory holding the work
//! directory (those keep the bundle's files). A `204` answer to registration means no work yet
//! (a long poll: it asks again at once); `410`, or `401` once it has served a node, means the
//! pool let the instance go, and the script exits with status 0.
//!
//! Where it differs from the Rust agent, for want of a shell primitive:
//! - An exit status above 128 is reported as a death by that signal (`killed by signal
//!   SIGKILL`), as `sh` cannot tell it from `exit 137`.
//! - The quoted last stderr line is cut at 500 bytes rather than 500 characters; a message that
//!   is not UTF-8 is sent again with its ASCII characters only.
//! - The argument of a `#!` line has its runs of blanks squeezed to one space.
//! - Output lines are dated by the daemon on arrival and are not numbered, so a batch resent
//!   after a lost answer can be stored twice.
//!
//! Invariants:
//! - The script embeds exactly three values, the daemon URL, the provision token and the CA
//!   certificates for an https daemon (or nothing), each validated and single-quoted (`'`
//!   written as `'\''`). No value from `taskfly.yml` is in it.
//! - The node's assignment comes from `POST /nodes/register?format=sh`
//!   (`registration_env`): one assignment per line, every value single-quoted by the daemon.
//!   The script sources that file only in subshells (the node's variables never reach its own
//!   shell or `curl`) and evaluates nothing else from the daemon.
//! - The rendered script stays far below EC2's 16 KiB user-data limit.

use std::fmt::Write as _;

use crate::api::wire;
use crate::error::{Error, Result};

/// The script, with comments for its readers; [`bootstrap_script`] renders it.
const TEMPLATE: &str = include_str!("bootstrap.sh");
/// Where the template takes the daemon URL.
const URL_SLOT: &str = "@DAEMON_URL@";
/// Where the template takes the provision token.
const TOKEN_SLOT: &str = "@PROVISION_TOKEN@";
/// Where the template takes the PEM certificates curl trusts for the daemon (empty for none).
const CA_SLOT: &str = "@CA_PEM@";
/// The largest user-data EC2 accepts, which the rendered script must stay under.
pub(crate) const USER_DATA_LIMIT: usize = 16 * 1024;

/// The bootstrap script for one node: it registers at `daemon_url` with `provision_token` and
/// then serves the node to its end, as [`crate::agent::run`] does (on a pooled instance, one
/// node after another, as the registration answers tell it).
///
/// For an `https://` daemon, `ca_pem` holds the PEM certificates to trust for it (a private
/// CA, or the daemon's self-signed certificate: [`crate::InstanceSpec::ca_pem`]). The script
/// writes them to a private file (mode 0600) and passes it to curl as `--cacert`, so curl
/// trusts them alone. With `None`, curl uses the system's trust store.
///
/// A provider that starts machines of its own passes this as the machine's start-up script
/// (EC2 user-data, cloud-init). The script is a secret while the provision token is unused.
///
/// Errors ([`Error::is_invalid_input`]): `daemon_url` is not an `http://` or `https://` URL
/// with a host, `provision_token` is not a hexadecimal token, as the engine issues them,
/// `ca_pem` is not PEM `CERTIFICATE` blocks, or the script would pass EC2's 16 KiB user-data
/// limit (a very long URL, or many certificates).
///
/// ```
/// let script = taskfly::agent::bootstrap::bootstrap_script(
///     "http://10.0.0.2:8080",
///     "00112233445566778899aabbccddeeff",
///     None,
/// )
/// .expect("valid values");
/// assert!(script.starts_with("#!/bin/sh\n"));
/// assert!(script.len() < 16 * 1024, "EC2 takes at most 16 KiB of user-data");
/// ```
pub fn bootstrap_script(
    daemon_url: &str,
    provision_token: &str,
    ca_pem: Option<&str>,
) -> Result<String> {
    check_url(daemon_url)?;
    check_token(provision_token)?;
    if let Some(pem) = ca_pem {
        check_certificates_pem(pem)?;
    }
    let mut script = String::with_capacity(TEMPLATE.len() / 2);
    for (number, line) in TEMPLATE.lines().enumerate() {
        // Comments, blank lines and indentation are for the template's readers only; no
        // quoted string of the template spans lines, so dropping them changes nothing.
        let line = if number == 0 { line } else { line.trim_start() };
        if number > 0 && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        script.push_str(line);
        script.push('\n');
    }
    // The values go in last, so the line filtering above never sees them; the URL, the only
    // one that may hold `@`, goes in after the others, so no slot is ever looked for in it.
    let script = script
        .replacen(CA_SLOT, &sh_quote(ca_pem.unwrap_or_default()), 1)
        .replacen(TOKEN_SLOT, &sh_quote(provision_token), 1)
        .replacen(URL_SLOT, &sh_quote(daemon_url), 1);
    if script.len() >= USER_DATA_LIMIT {
        return Err(Error::invalid_input(format!(
            "the node bootstrap would be {} bytes, over the {USER_DATA_LIMIT}-byte user-data limit: the daemon URL or the CA certificates are too long",
            script.len()
        )));
    }
    Ok(script)
}

/// `value` as one `sh` word that stands for exactly `value`: single-quoted, each `'` written as
/// `'\''`. Inside single quotes nothing is special (no `$`, backquote, backslash or newline
/// processing), so no value can become code.
pub(crate) fn sh_quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// The answer to `POST /nodes/register?format=sh`: the registration as `sh` assignments, one
/// per line, every value quoted by [`sh_quote`]. First the values the bootstrap itself uses,
/// not exported: `TASKFLY_NEXT_TOKEN` (a pooled instance's next token, or empty; always the
/// first line, which the bootstrap drops before the node's script runs), `TASKFLY_AUTH_TOKEN`,
/// `TASKFLY_SCRIPT`, `TASKFLY_DEST_DIR` (empty for none), `TASKFLY_HEARTBEAT_INTERVAL_S`,
/// `TASKFLY_TIMEOUT_S` (empty for none), `TASKFLY_POOLED` (`1` when the bootstrap registers
/// again once the node has ended, else empty); then `export NAME='value'` for each variable of
/// the node's environment.
///
/// Errors: an environment variable name that is not a shell name (the engine validates names
/// when a deployment is created, so this is a second line of defence: a name is code).
pub(crate) fn registration_env(registration: &wire::RegisterResponse) -> Result<String> {
    let mut text = String::new();
    let controls = [
        // First, on a line of its own (a hex token or empty): the bootstrap drops this line
        // before the node's script runs.
        (
            "TASKFLY_NEXT_TOKEN",
            registration.next_token.clone().unwrap_or_default(),
        ),
        ("TASKFLY_AUTH_TOKEN", registration.auth_token.clone()),
        ("TASKFLY_SCRIPT", registration.script.clone()),
        (
            "TASKFLY_DEST_DIR",
            registration.dest_dir.clone().unwrap_or_default(),
        ),
        (
            "TASKFLY_HEARTBEAT_INTERVAL_S",
            registration.heartbeat_interval_s.to_string(),
        ),
        (
            "TASKFLY_TIMEOUT_S",
            registration
                .timeout_s
                .map(|t| t.to_string())
                .unwrap_or_default(),
        ),
        (
            "TASKFLY_POOLED",
            if registration.pooled { "1" } else { "" }.to_owned(),
        ),
    ];
    for (name, value) in controls {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{name}={}", sh_quote(&value));
    }
    for (name, value) in &registration.env {
        if !is_shell_name(name) {
            return Err(Error::invalid_input(format!(
                "environment variable name {name:?} is not a shell name"
            )));
        }
        let _ = writeln!(text, "export {name}={}", sh_quote(value));
    }
    Ok(text)
}

/// Whether `name` matches `[A-Za-z_][A-Za-z0-9_]*`.
fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An `http://` or `https://` URL with a host and no whitespace or control characters.
fn check_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let host_present = rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !host_present || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid_input(format!(
            "the daemon URL for nodes must be an http:// or https:// URL, not {url:?}"
        )));
    }
    Ok(())
}

/// One or more PEM `CERTIFICATE` blocks, nothing else: every line a BEGIN or END line or
/// base64 text.
fn check_certificates_pem(pem: &str) -> Result<()> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = 0;
    let mut inside = false;
    for line in pem.lines().map(str::trim_end) {
        let well_formed = match line {
            BEGIN if !inside => {
                inside = true;
                true
            }
            END if inside => {
                inside = false;
                blocks += 1;
                true
            }
            "" => !inside,
            text => {
                inside
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
            }
        };
        if !well_formed {
            return Err(Error::invalid_input(
                "the CA certificates for the node must be PEM CERTIFICATE blocks only",
            ));
        }
    }
    if blocks == 0 || inside {
        return Err(Error::invalid_input(
            "the CA certificates for the node must be PEM CERTIFICATE blocks only",
        ));
    }
    Ok(())
}

/// A non-empty hexadecimal token of at most 256 digits.
fn check_token(token: &str) -> Result<()> {
    if token.is_empty() || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid_input(
            "a provision token must be hexadecimal digits",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// Runs `script` with `sh -c` and returns its stdout.
    fn sh(script: &str) -> Vec<u8> {
        let output = Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("sh runs");
        assert!(output.status.success(), "{script}: {output:?}");
        output.stdout
    }

    /// Values that break naive quoting.
    fn hostile_values() -> Vec<String> {
        [
            "plain",
            "",
            "it's",
            "''",
            "'\\''",
            "say \"hi\"",
            "$(touch PWNED_SUB)",
            "${HOME}",
            "`touch PWNED_BT`",
            "line one\nline two\n",
            "\n",
            "a; touch PWNED_SEMI; echo b",
            "back\\slash \\\\ \\n",
            "héllo ✓ — 日本",
            "tab\there | & > < * ? ~ ! #",
            "trailing space ",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    #[test]
    fn quoted_values_come_back_exactly_from_sh() {
        let dir = tempfile::tempdir().expect("tempdir");
        for value in hostile_values() {
            let script = format!(
                "cd {} && printf %s {}",
                dir.path().display(),
                sh_quote(&value)
            );
            assert_eq!(sh(&script), value.as_bytes(), "{value:?}");
        }
        assert!(
            std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
            "a value was evaluated"
        );
    }

    #[test]
    fn the_registration_answer_sources_to_the_exact_values() {
        let values = hostile_values();
        let env: BTreeMap<String, String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("VAR_{i}"), v.clone()))
            .collect();
        let registration = wire::RegisterResponse {
            auth_token: "abc123".into(),
            deployment_id: "dep".into(),
            node_id: "dep-0".into(),
            node_index: 0,
            env,
            script: "it's \"my\" $(script).sh".into(),
            dest_dir: None,
            heartbeat_interval_s: 10,
            timeout_s: Some(120),
            pooled: false,
            next_token: None,
        };
        let text = registration_env(&registration).expect("valid names");
        assert!(
            text.starts_with("TASKFLY_NEXT_TOKEN=''\nTASKFLY_AUTH_TOKEN='abc123'\n"),
            "{text}"
        );
        assert!(text.contains("TASKFLY_DEST_DIR=''\n"), "{text}");
        assert!(text.contains("TASKFLY_TIMEOUT_S='120'\n"), "{text}");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("reg");
        std::fs::write(&file, &text).expect("write");
        // Every exported variable reaches a child process byte for byte; the control values
        // are set but not exported.
        for (i, value) in values.iter().enumerate() {
            let script = format!(
                "cd {dir} && . {file} && sh -c 'printf %s \"$VAR_{i}\"; printf %s \"${{TASKFLY_AUTH_TOKEN:-unset}}\" >&2'",
                dir = dir.path().display(),
                file = file.display()
            );
            let output = Command::new("sh")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("sh");
            assert!(output.status.success(), "{output:?}");
            assert_eq!(output.stdout, value.as_bytes(), "VAR_{i}");
            assert_eq!(output.stderr, b"unset");
        }
        let script = format!(". {} && printf %s \"$TASKFLY_SCRIPT\"", file.display());
        assert_eq!(sh(&script), registration.script.as_bytes());
        assert!(
            std::fs::read_dir(dir.path()).expect("dir").count() == 1,
            "a value was evaluated"
        );
    }

    #[test]
    fn a_name_that_is_not_a_shell_name_is_refused() {
        let registration = wire::RegisterResponse {
            auth_token: "abc".into(),
            deployment_id: "dep".into(),
            node_id: "dep-0".into(),
            node_index: 0,
            env: [("X;touch y".to_owned(), "v".to_owned())].into(),
            script: "setup.sh".into(),
            dest_dir: Some("/opt/job".into()),
            heartbeat_interval_s: 1,
            timeout_s: None,
            pooled: false,
            next_token: None,
        };
        let error = registration_env(&registration).expect_err("refused");
        assert!(error.is_invalid_input(), "{error}");
        assert!(is_shell_name("_A1") && is_shell_name("path"));
        assert!(!is_shell_name("") && !is_shell_name("1A") && !is_shell_name("A-B"));
    }

    #[test]
    fn the_rendered_script_is_small_parses_and_holds_the_values_quoted() {
        let url = "https://ec2-203-0-113-25.us-west-2.compute.amazonaws.com:8443";
        let script = bootstrap_script(url, TOKEN, None).expect("rendered");
        assert!(script.starts_with("#!/bin/sh\n"));
        // Well under the limit, which leaves room for a long URL and CA certificates.
        assert!(
            script.len() < 10 * 1024,
            "the rendered script is {} bytes",
            script.len()
        );
        assert!(script.len() < USER_DATA_LIMIT);
        assert!(!script.contains(URL_SLOT) && !script.contains(TOKEN_SLOT));
        assert!(script.contains(&format!("tf_url='{url}'\n")));
        assert!(script.contains(&format!("tf_ptoken='{TOKEN}'\n")));
        // It talks to the daemon only, never to an instance metadata service.
        assert!(!script.contains("169.254.169.254"));
        assert!(!script.contains("fd00:ec2::254"));
        // Nothing from the daemon is evaluated.
        assert!(!script.contains("eval"));
        let checked = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .expect("sh -n");
        assert!(checked.status.success(), "{checked:?}");
    }

    #[test]
    fn hostile_urls_parse_and_come_out_exactly() {
        for url in [
            "http://h/'$(touch${IFS}PWNED)'",
            "https://example.com:8443/base/",
            "http://h/`id`;\"x\"\\",
        ] {
            let script = bootstrap_script(url, TOKEN, None).expect("rendered");
            let checked = Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .expect("sh -n");
            assert!(checked.status.success(), "{url}: {checked:?}");
            // The assignment line, run on its own, yields the URL byte for byte.
            let line = script
                .lines()
                .find(|l| l.starts_with("tf_url="))
                .expect("the URL line");
            assert_eq!(
                sh(&format!("{line}\nprintf %s \"$tf_url\"")),
                url.as_bytes()
            );
        }
    }

    #[test]
    fn bad_urls_and_tokens_are_refused() {
        for url in [
            "",
            "ftp://h",
            "http://",
            "http:///path",
            "127.0.0.1:8080",
            "http://h/a b",
            "http://h/\n",
        ] {
            let error = bootstrap_script(url, TOKEN, None).expect_err(url);
            assert!(error.is_invalid_input(), "{url}: {error}");
        }
        let long = format!("http://h/{}", "a".repeat(10_000));
        let error = bootstrap_script(&long, TOKEN, None).expect_err("too long");
        assert!(
            error.is_invalid_input() && error.to_string().contains("16384"),
            "{error}"
        );
        for token in ["", "xyz", "abc'", "00 11", &"a".repeat(257)] {
            let error = bootstrap_script("http://h", token, None).expect_err(token);
            assert!(error.is_invalid_input(), "{token}: {error}");
        }
    }

    #[test]
    fn ca_certificates_are_embedded_exactly_and_checked() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAbC+/9=\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nZm9vYmFy\n-----END CERTIFICATE-----\n";
        let script = bootstrap_script("https://10.0.0.2:8443", TOKEN, Some(pem)).expect("rendered");
        let checked = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .expect("sh -n");
        assert!(checked.status.success(), "{checked:?}");
        // The assignment, run on its own, yields the certificates byte for byte; the script
        // hands them to curl as its only trusted CAs.
        let start = script.find("tf_ca='").expect("the CA assignment");
        let end = start + script[start..].find("'\n").expect("its end") + 1;
        assert_eq!(
            sh(&format!("{}\nprintf %s \"$tf_ca\"", &script[start..end])),
            pem.as_bytes()
        );
        assert!(script.contains("cacert = \"ca.pem\""));
        // Without certificates the value is empty, and curl keeps its own trust store.
        let plain = bootstrap_script("https://10.0.0.2:8443", TOKEN, None).expect("rendered");
        assert!(plain.contains("tf_ca=''\n"), "{plain}");

        for bad in [
            "",
            "not pem",
            "-----BEGIN CERTIFICATE-----\nZm9v\n",
            "-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n",
            "-----BEGIN CERTIFICATE-----\n'; touch PWNED; '\n-----END CERTIFICATE-----\n",
        ] {
            let error = bootstrap_script("https://h", TOKEN, Some(bad)).expect_err(bad);
            assert!(error.is_invalid_input(), "{bad:?}: {error}");
        }
        let huge = "-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n".repeat(500);
        let error = bootstrap_script("https://h", TOKEN, Some(&huge)).expect_err("too long");
        assert!(error.to_string().contains("16384"), "{error}");
    }

    #[test]
    fn the_template_has_its_slots_once_and_no_multiline_strings() {
        assert_eq!(TEMPLATE.matches(URL_SLOT).count(), 1);
        assert_eq!(TEMPLATE.matches(TOKEN_SLOT).count(), 1);
        assert_eq!(TEMPLATE.matches(CA_SLOT).count(), 1);
        // Dropping comment lines and indentation is safe only if no single-quoted string
        // spans lines: every code line has an even number of single quotes.
        for (number, line) in TEMPLATE.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with('#') {
                continue;
            }
            assert_eq!(
                code.matches('\'').count() % 2,
                0,
                "line {}: {line}",
                number + 1
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // The node protocol, played by a fake daemon: pooled instances serve node after node
    // -----------------------------------------------------------------------------------------

    /// How long a bootstrap run may take before the test kills it and fails.
    const RUN_LIMIT: Duration = Duration::from_secs(90);

    /// What the fake daemon answers the next registration with.
    enum Answer {
        /// The assignment of the node with this auth token (200).
        Node(&'static str),
        /// No work yet (204).
        NoWork,
        /// The pool retired the instance (410).
        Retired,
        /// The daemon does not know the token (401).
        Unknown,
    }

    /// One node of the fake daemon, and what its agent told it.
    struct FakeNode {
        registration: wire::RegisterResponse,
        bundle: Vec<u8>,
        /// What heartbeats answer.
        shutdown: bool,
        /// Each status report, in order: its status, exit code and message.
        statuses: Vec<(String, Option<i64>, Option<String>)>,
        /// Each log piece taken: stream, offset, text.
        logs: Vec<(String, u64, String)>,
    }

    impl FakeNode {
        /// The text of `stream` as shipped, pieces in offset order.
        fn output(&self, stream: &str) -> String {
            let mut pieces: Vec<_> = self.logs.iter().filter(|l| l.0 == stream).collect();
            pieces.sort_by_key(|l| l.1);
            pieces.iter().map(|l| l.2.as_str()).collect()
        }

        /// The status of each report, in order.
        fn status_names(&self) -> Vec<&str> {
            self.statuses.iter().map(|s| s.0.as_str()).collect()
        }
    }

    struct FakeState {
        /// The answers registration gives, in order; once they are used up, 404.
        answers: VecDeque<Answer>,
        /// The HTTP status of each registration answer given.
        registrations: Vec<u16>,
        /// The nodes by auth token.
        nodes: BTreeMap<String, FakeNode>,
        /// The token registration takes: the rendered one, then each answer's `next_token`.
        token: String,
    }

    /// A daemon on 127.0.0.1 that speaks the node protocol from a script: registration answers
    /// come from a list, the node calls are recorded. Each connection is answered on a thread
    /// of its own and closed.
    struct FakeDaemon {
        url: String,
        state: Arc<Mutex<FakeState>>,
    }

    impl FakeDaemon {
        fn start(answers: Vec<Answer>, nodes: Vec<FakeNode>) -> FakeDaemon {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            let state = Arc::new(Mutex::new(FakeState {
                answers: answers.into(),
                registrations: Vec::new(),
                token: TOKEN.to_owned(),
                nodes: nodes
                    .into_iter()
                    .map(|n| (n.registration.auth_token.clone(), n))
                    .collect(),
            }));
            let shared = Arc::clone(&state);
            // The listener lives as long as the test process; each connection ends with its
            // answer.
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = Arc::clone(&shared);
                    std::thread::spawn(move || serve_connection(stream, &state));
                }
            });
            FakeDaemon { url, state }
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().expect("fake daemon state")
        }
    }

    /// Reads one request and answers it.
    fn serve_connection(stream: TcpStream, state: &Mutex<FakeState>) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut length = 0;
        let mut bearer = String::new();
        let mut expect_continue = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "authorization" => {
                    bearer = value.strip_prefix("Bearer ").unwrap_or("").to_owned();
                }
                "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        let mut writer = stream;
        if expect_continue {
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let target = request_line.split(' ').nth(1).unwrap_or("").to_owned();
        let (status, content_type, answer) = respond(state, &target, &bearer, &body);
        let mut head = format!("HTTP/1.1 {status} Fake\r\nConnection: close\r\n");
        if status != 204 {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                answer.len()
            ));
        }
        head.push_str("\r\n");
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&answer);
    }

    /// The fake daemon's answer to one request: status, content type, body.
    fn respond(
        state: &Mutex<FakeState>,
        target: &str,
        bearer: &str,
        body: &[u8],
    ) -> (u16, &'static str, Vec<u8>) {
        const JSON: &str = "application/json";
        let error = |status, text: &str| {
            (
                status,
                JSON,
                format!("{{\"error\":\"{text}\"}}").into_bytes(),
            )
        };
        let mut state = state.lock().expect("fake daemon state");
        let Some(route) = target.strip_prefix("/api/v1/nodes/") else {
            return error(404, "no such route");
        };
        if route == "register?format=sh" {
            let request: Option<wire::RegisterRequest> = serde_json::from_slice(body).ok();
            if request.is_none_or(|r| r.provision_token != state.token) {
                return error(401, "not the provision token");
            }
            let answer = match state.answers.pop_front() {
                Some(Answer::Node(token)) => {
                    let registration = &state.nodes[token].registration;
                    let text = registration_env(registration).expect("the registration as sh");
                    if let Some(next) = registration.next_token.clone() {
                        state.token = next;
                    }
                    (200, "text/plain; charset=utf-8", text.into_bytes())
                }
                Some(Answer::NoWork) => (204, "", Vec::new()),
                Some(Answer::Retired) => error(410, "the pool retired this instance"),
                Some(Answer::Unknown) => error(401, "unknown provision token"),
                None => error(404, "no more answers"),
            };
            state.registrations.push(answer.0);
            return answer;
        }
        let Some(node) = state.nodes.get_mut(bearer) else {
            return error(401, "unknown node token");
        };
        let ok = (200, JSON, b"{}".to_vec());
        match route
            .split_once('?')
            .map_or((route, ""), |(path, query)| (path, query))
        {
            ("assets", _) => (200, "application/gzip", node.bundle.clone()),
            ("heartbeat", _) => (
                200,
                JSON,
                format!("{{\"shutdown\":{}}}", node.shutdown).into_bytes(),
            ),
            ("status", _) => {
                let report: serde_json::Value =
                    serde_json::from_slice(body).expect("a status report");
                node.statuses.push((
                    report["status"].as_str().unwrap_or_default().to_owned(),
                    report["exit_code"].as_i64(),
                    report["message"].as_str().map(str::to_owned),
                ));
                ok
            }
            ("logs", query) => {
                let mut stream = String::new();
                let mut offset = 0;
                for pair in query.split('&') {
                    match pair.split_once('=') {
                        Some(("stream", value)) => stream = value.to_owned(),
                        Some(("offset", value)) => offset = value.parse().expect("an offset"),
                        _ => {}
                    }
                }
                let text = String::from_utf8_lossy(body).into_owned();
                node.logs.push((stream, offset, text));
                ok
            }
            _ => error(404, "no such route"),
        }
    }

    /// A gzipped tar of `files` (path, text), as a deployment's bundle.
    fn bundle(files: &[(&str, &str)]) -> Vec<u8> {
        let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut archive = tar::Builder::new(gzip);
        for (path, text) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            archive
                .append_data(&mut header, path, text.as_bytes())
                .expect("append");
        }
        archive
            .into_inner()
            .and_then(flate2::write::GzEncoder::finish)
            .expect("the bundle")
    }

    /// A node whose bundle holds `run.sh` (`script`, run through its `#!` line) and `files`,
    /// extracted into `dest_dir`, with `env` besides `TASKFLY_NODE_ID`.
    fn fake_node(
        token: &str,
        script: &str,
        files: &[(&str, &str)],
        dest_dir: Option<&str>,
        env: &[(&str, &str)],
        pooled: bool,
    ) -> FakeNode {
        let node_id = format!("dep-{token}");
        let mut env: BTreeMap<String, String> = env
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        env.insert("TASKFLY_NODE_ID".into(), node_id.clone());
        let mut files = files.to_vec();
        files.push(("run.sh", script));
        FakeNode {
            registration: wire::RegisterResponse {
                auth_token: token.into(),
                deployment_id: "dep".into(),
                node_id,
                node_index: 0,
                env,
                script: "run.sh".into(),
                dest_dir: dest_dir.map(str::to_owned),
                heartbeat_interval_s: 1,
                timeout_s: None,
                pooled,
                next_token: None,
            },
            bundle: bundle(&files),
            shutdown: false,
            statuses: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// The shells the bootstrap is run with: `sh` (dash here), and bash and busybox sh where
    /// this machine has them.
    fn shells() -> Vec<Vec<&'static str>> {
        let mut shells = vec![vec!["sh"]];
        for shell in [vec!["bash"], vec!["busybox", "sh"]] {
            let present = Command::new(shell[0])
                .args(&shell[1..])
                .args(["-c", "true"])
                .output()
                .is_ok_and(|o| o.status.success());
            if present {
                shells.push(shell);
            }
        }
        shells
    }

    /// Runs the rendered bootstrap for `daemon` with `shell` as an instance would, in
    /// `instance` (also its `TMPDIR`) with `home` as `HOME` and `extra_env`, and returns its exit status and
    /// stderr once it has ended (killing it and failing after [`RUN_LIMIT`]).
    fn run_bootstrap(
        shell: &[&str],
        daemon: &FakeDaemon,
        instance: &Path,
        home: &Path,
        extra_env: &[(&str, String)],
    ) -> (std::process::ExitStatus, String) {
        let script = bootstrap_script(&daemon.url, TOKEN, None).expect("rendered");
        std::fs::write(instance.join("user-data"), script).expect("user-data");
        let child = Command::new(shell[0])
            .args(&shell[1..])
            .arg("user-data")
            .current_dir(instance)
            .env("TMPDIR", instance)
            .env("HOME", home)
            .env("TASKFLY_AGENT_GRACE_MS", "1000")
            .envs(extra_env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the shell starts");
        let pid = child.id();
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        let Ok(output) = ended.recv_timeout(RUN_LIMIT) else {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{shell:?}: the bootstrap still runs after {RUN_LIMIT:?}");
        };
        let output = output.expect("the bootstrap's output");
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The entries of `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("a directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// The work directory (`taskfly-node.*`) the bootstrap made in `instance`.
    fn work_dir(instance: &Path) -> PathBuf {
        let works: Vec<String> = entries(instance)
            .into_iter()
            .filter(|name| name.starts_with("taskfly-node."))
            .collect();
        assert_eq!(works.len(), 1, "{works:?}");
        instance.join(&works[0])
    }

    #[test]
    fn a_pooled_bootstrap_serves_node_after_node_until_the_pool_retires_it() {
        for shell in shells() {
            let scratch = tempfile::tempdir().expect("tempdir");
            let scratch = scratch.path();
            let instance = scratch.join("instance");
            let home = scratch.join("home");
            let made = scratch.join("made");
            let existing = scratch.join("existing");
            for dir in [&instance, &home, &existing] {
                std::fs::create_dir(dir).expect("mkdir");
            }
            std::fs::write(home.join("keep.txt"), "mine").expect("write");
            std::fs::write(existing.join("old.txt"), "old").expect("write");
            std::fs::write(existing.join(".hidden"), "old").expect("write");
            let made_deep = made.join("deep");
            let (made_s, made_deep_s, existing_s) = (
                made.to_str().expect("utf-8"),
                made_deep.to_str().expect("utf-8"),
                existing.to_str().expect("utf-8"),
            );
            // A leaves files in its bundle root and in the work directory; B must see neither,
            // nor A's environment, nor the bootstrap's controls.
            // A also looks for its next registration token in the bootstrap's files.
            let mut a = fake_node(
                "a1",
                "#!/bin/sh\necho \"a: secret=$SECRET_A\"\necho made >a-made.txt\nmkdir ../a-left\n\
                 echo \"a: next token seen $(cat ../.taskfly/* | grep -c 0a0a0a)\"\n\
                 echo \"a: its answer read $(grep -c TASKFLY_AUTH_TOKEN ../.taskfly/reg)\"\n",
                &[("a.txt", "a")],
                None,
                &[("SECRET_A", "alpha")],
                true,
            );
            // Each registration hands the next token; B's and the rest come with it.
            a.registration.next_token = Some("0a0a0a".to_owned());
            let b = fake_node(
                "b2",
                "#!/bin/sh\n\
                 echo \"b: SECRET_A=${SECRET_A-unset} TASKFLY_POOLED=${TASKFLY_POOLED-unset} SECRET_B=$SECRET_B\"\n\
                 echo \"b: bundle: $(ls -A | tr '\\n' ' ')\"\n\
                 echo \"b: work: $(ls -A .. | tr '\\n' ' ')\"\n\
                 echo oops >&2\nexit 3\n",
                &[("b.txt", "b")],
                None,
                &[("SECRET_B", "beta")],
                true,
            );
            // C, in a directory the bootstrap makes, runs until a heartbeat answers shutdown.
            let mut c = fake_node(
                "c3",
                "#!/bin/sh\necho c: ran\nsleep 30\n",
                &[("c.txt", "c")],
                Some(made_deep_s),
                &[],
                true,
            );
            c.shutdown = true;
            // D, in a directory that existed, sees C's gone.
            let d = fake_node(
                "d4",
                "#!/bin/sh\n\
                 [ -e \"$MADE\" ] && echo \"d: made is there\" || echo \"d: made is gone\"\n\
                 echo \"d: here: $(ls -A | tr '\\n' ' ')\"\n",
                &[],
                Some(existing_s),
                &[("MADE", made_s)],
                true,
            );
            // E, in the home directory, which is never cleared.
            let e = fake_node(
                "e5",
                "#!/bin/sh\necho e: ran\n",
                &[("e.txt", "e")],
                Some("~"),
                &[],
                true,
            );
            let daemon = FakeDaemon::start(
                vec![
                    Answer::Node("a1"),
                    Answer::NoWork,
                    Answer::Node("b2"),
                    Answer::Node("c3"),
                    Answer::Node("d4"),
                    Answer::Node("e5"),
                    Answer::Retired,
                ],
                vec![a, b, c, d, e],
            );

            let (status, stderr) = run_bootstrap(&shell, &daemon, &instance, &home, &[]);

            assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
            assert!(
                stderr.contains("leaving the pool: 410"),
                "{shell:?}: {stderr}"
            );
            let state = daemon.state();
            assert_eq!(
                state.registrations,
                [200, 204, 200, 200, 200, 200, 410],
                "{shell:?}"
            );
            let node = |token: &str| &state.nodes[token];
            assert_eq!(
                node("a1").status_names(),
                ["downloading_assets", "running_script", "completed"],
                "{shell:?}"
            );
            assert_eq!(
                node("a1").output("stdout"),
                "a: secret=alpha\na: next token seen 0\na: its answer read 1\n",
                "{shell:?}"
            );
            assert_eq!(
                node("b2").output("stdout"),
                "b: SECRET_A=unset TASKFLY_POOLED=unset SECRET_B=beta\n\
                 b: bundle: b.txt run.sh \n\
                 b: work: .taskfly bundle \n",
                "{shell:?}: {stderr}"
            );
            // B's output files started afresh: its first piece is at offset 0.
            assert!(
                node("b2").logs.iter().all(|l| l.1 == 0),
                "{shell:?}: {:?}",
                node("b2").logs
            );
            assert_eq!(
                node("b2").statuses.last(),
                Some(&(
                    "failed".to_owned(),
                    Some(3),
                    Some("exited with code 3: oops".to_owned())
                )),
                "{shell:?}"
            );
            // C was stopped by the daemon: no report of its end, and the next node came.
            assert_eq!(
                node("c3").status_names(),
                ["downloading_assets", "running_script"]
            );
            assert_eq!(node("c3").output("stdout"), "c: ran\n", "{shell:?}");
            assert!(stderr.contains("stopping the script: shutdown"), "{stderr}");
            assert_eq!(
                node("d4").output("stdout"),
                "d: made is gone\nd: here: .hidden old.txt run.sh \n",
                "{shell:?}: {stderr}"
            );
            assert_eq!(node("e5").output("stdout"), "e: ran\n", "{shell:?}");
            for token in ["b2", "d4", "e5"] {
                assert_eq!(node(token).status_names()[0], "downloading_assets");
            }
            // What the nodes left is gone, but for the home directory's files; the directory
            // that existed is kept, empty; the work directory is empty.
            assert!(!made.exists(), "{shell:?}");
            assert_eq!(entries(&existing), Vec::<String>::new(), "{shell:?}");
            assert_eq!(entries(&home), ["e.txt", "keep.txt", "run.sh"], "{shell:?}");
            assert!(stderr.contains("the bundle files stay in"), "{stderr}");
            assert_eq!(
                entries(&work_dir(&instance)),
                Vec::<String>::new(),
                "{shell:?}"
            );
        }
    }

    #[test]
    fn a_pooled_bootstrap_goes_on_after_a_timeout_and_leaves_when_its_token_is_forgotten() {
        for shell in shells() {
            let instance = tempfile::tempdir().expect("tempdir");
            let mut slow = fake_node(
                "f6",
                "#!/bin/sh\necho f: ran\nsleep 30\n",
                &[],
                None,
                &[],
                true,
            );
            slow.registration.timeout_s = Some(1);
            let daemon = FakeDaemon::start(
                vec![Answer::Node("f6"), Answer::NoWork, Answer::Unknown],
                vec![slow],
            );

            let (status, stderr) =
                run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

            assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
            assert!(
                stderr.contains("leaving the pool: 401"),
                "{shell:?}: {stderr}"
            );
            let state = daemon.state();
            assert_eq!(state.registrations, [200, 204, 401], "{shell:?}");
            assert_eq!(
                state.nodes["f6"].statuses.last(),
                Some(&(
                    "failed".to_owned(),
                    None,
                    Some("timed out after 1s".to_owned())
                )),
                "{shell:?}"
            );
            assert_eq!(
                entries(&work_dir(instance.path())),
                Vec::<String>::new(),
                "{shell:?}"
            );
        }
    }

    #[test]
    fn a_pooled_bootstrap_stopped_by_a_signal_registers_no_more() {
        for shell in shells() {
            let instance = tempfile::tempdir().expect("tempdir");
            // The script's parent is the shell that records its exit status; the bootstrap is
            // that shell's parent.
            let signalled = fake_node(
                "a7",
                "#!/bin/sh\necho g: ran\nkill -TERM $(cut -d' ' -f4 /proc/$PPID/stat)\nsleep 30\n",
                &[],
                None,
                &[],
                true,
            );
            let next = fake_node("b8", "#!/bin/sh\n", &[], None, &[], true);
            let daemon = FakeDaemon::start(
                vec![Answer::Node("a7"), Answer::Node("b8")],
                vec![signalled, next],
            );

            let (status, stderr) =
                run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

            assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
            assert!(
                stderr.contains("stopping the script: term"),
                "{shell:?}: {stderr}"
            );
            let state = daemon.state();
            assert_eq!(state.registrations, [200], "{shell:?}");
            assert_eq!(state.nodes["a7"].output("stdout"), "g: ran\n", "{shell:?}");
        }
    }

    #[test]
    fn a_bootstrap_that_is_not_pooled_serves_one_node_and_a_first_401_fails() {
        for shell in shells() {
            let instance = tempfile::tempdir().expect("tempdir");
            let only = fake_node(
                "c9",
                "#!/bin/sh\necho h: ran\n",
                &[("h.txt", "h")],
                None,
                &[],
                false,
            );
            let unused = fake_node("d0", "#!/bin/sh\n", &[], None, &[], true);
            let daemon = FakeDaemon::start(
                vec![Answer::Node("c9"), Answer::Node("d0")],
                vec![only, unused],
            );

            let (status, stderr) =
                run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

            assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
            let state = daemon.state();
            assert_eq!(state.registrations, [200], "{shell:?}");
            assert_eq!(
                state.nodes["c9"].status_names(),
                ["downloading_assets", "running_script", "completed"],
                "{shell:?}"
            );
            // As before pools: the bundle is kept, the private files are gone.
            let work = work_dir(instance.path());
            assert_eq!(entries(&work), ["bundle"], "{shell:?}");
            assert_eq!(
                entries(&work.join("bundle")),
                ["h.txt", "run.sh"],
                "{shell:?}"
            );
            drop(state);

            // A token the daemon does not know at the first registration is an error.
            let refused = tempfile::tempdir().expect("tempdir");
            let daemon = FakeDaemon::start(vec![Answer::Unknown], Vec::new());
            let (status, stderr) =
                run_bootstrap(&shell, &daemon, refused.path(), refused.path(), &[]);
            assert_eq!(status.code(), Some(1), "{shell:?}: {stderr}");
            assert!(stderr.contains("cannot register"), "{shell:?}: {stderr}");
        }
    }

    #[test]
    fn a_pooled_node_stopped_while_its_bundle_is_extracted_leaves_nothing_behind() {
        // A tar that takes two seconds: the first heartbeat, a second after the node starts,
        // answers shutdown while the bundle is still being extracted.
        let tools = tempfile::tempdir().expect("tempdir");
        let real_tar = String::from_utf8(sh("command -v tar")).expect("a path");
        let slow_tar = tools.path().join("tar");
        std::fs::write(
            &slow_tar,
            format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", real_tar.trim()),
        )
        .expect("write");
        std::fs::set_permissions(
            &slow_tar,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let path = format!(
            "{}:{}",
            tools.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        for shell in shells() {
            let instance = tempfile::tempdir().expect("tempdir");
            let mut stopped = fake_node("a1", "#!/bin/sh\n", &[("a.txt", "a")], None, &[], true);
            stopped.shutdown = true;
            let next = fake_node(
                "b2",
                "#!/bin/sh\necho \"b: bundle: $(ls -A | tr '\\n' ' ')\"\n",
                &[("b.txt", "b")],
                None,
                &[],
                true,
            );
            let daemon = FakeDaemon::start(
                vec![Answer::Node("a1"), Answer::Node("b2"), Answer::Retired],
                vec![stopped, next],
            );

            let (status, stderr) = run_bootstrap(
                &shell,
                &daemon,
                instance.path(),
                instance.path(),
                &[("PATH", path.clone())],
            );

            assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
            let state = daemon.state();
            assert_eq!(state.registrations, [200, 200, 410], "{shell:?}");
            assert_eq!(
                state.nodes["a1"].status_names(),
                ["downloading_assets"],
                "{shell:?}"
            );
            // The first bundle was fully extracted before it was cleared, so none of it is left
            // for the next node.
            assert_eq!(
                state.nodes["b2"].output("stdout"),
                "b: bundle: b.txt run.sh \n",
                "{shell:?}: {stderr}"
            );
        }
    }

    #[test]
    fn the_registration_answer_says_whether_the_node_is_pooled() {
        let mut node = fake_node("ab", "#!/bin/sh\n", &[], None, &[], false);
        let text = registration_env(&node.registration).expect("valid names");
        assert!(text.contains("\nTASKFLY_POOLED=''\n"), "{text}");
        node.registration.pooled = true;
        let text = registration_env(&node.registration).expect("valid names");
        assert!(text.contains("\nTASKFLY_POOLED='1'\n"), "{text}");
    }
}
