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
/// then serves the node to its end, as [`crate::agent::run`] does.
///
/// For an `https://` daemon, `ca_pem` holds the PEM certificates to trust for it (a private
/// CA, or the daemon's self-signed certificate: [`crate::InstanceConfig::ca_pem`]). The script
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
/// per line, every value quoted by [`sh_quote`]. First the values the bootstrap itself uses
/// (`TASKFLY_AUTH_TOKEN`, `TASKFLY_SCRIPT`, `TASKFLY_DEST_DIR` (empty for none),
/// `TASKFLY_HEARTBEAT_INTERVAL_S`, `TASKFLY_TIMEOUT_S` (empty for none)), not exported, then
/// `export NAME='value'` for each variable of the node's environment.
///
/// Errors: an environment variable name that is not a shell name (the engine validates names
/// when a deployment is created, so this is a second line of defence: a name is code).
pub(crate) fn registration_env(registration: &wire::RegisterResponse) -> Result<String> {
    let mut text = String::new();
    let controls = [
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
    use std::collections::BTreeMap;
    use std::process::Command;

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
        };
        let text = registration_env(&registration).expect("valid names");
        assert!(text.starts_with("TASKFLY_AUTH_TOKEN='abc123'\n"), "{text}");
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
        assert!(
            script.len() < 8 * 1024,
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
}
