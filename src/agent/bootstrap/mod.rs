//! The node bootstrap: a POSIX `sh` script that serves a node exactly as the Rust agent
//! ([`crate::agent::run`]) does, for machines where no `taskfly` binary is installed.
//!
//! [`bootstrap_script`] renders it for one node. A cloud provider hands it to the instance as
//! its user-data; the local provider runs it instead of the Rust agent when a deployment says
//! `instance_config.local.agent: script`, so both agents pass the same tests. It needs `sh`
//! (dash, busybox ash and bash are tested), `curl`, `tar` and `gzip`, plus utilities every
//! Linux has (coreutils or busybox): `env`, `sed`, `grep`, `tr`, `head -c`, `tail`, `wc`,
//! `date +%s`, `sleep`, `awk`, `du -sk`, `cut`, and `setsid` to give the script a process group of its own (without
//! it, stopping a node signals the script's own process only, not its children, and heartbeats
//! carry no resource readings). Where `/proc` is readable, heartbeats carry the script group's
//! CPU and memory use (`getconf PAGESIZE` gives the page size, 4096 without it). It talks to
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
        (
            "TASKFLY_HEARTBEAT_INTERVAL_MS",
            registration
                .heartbeat_interval_ms
                .map(|ms| ms.to_string())
                .unwrap_or_default(),
        ),
        ("TASKFLY_SECRET_NAMES", registration.secret_names.join(" ")),
        // The `outputs` patterns, one a line (config validation refuses a line break in one).
        ("TASKFLY_OUTPUTS", registration.outputs.join("\n")),
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
mod tests;
