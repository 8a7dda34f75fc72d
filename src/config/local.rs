//! `instance_config.local`: local child processes, or SSH hosts.

use serde_yaml::Value;

use super::diagnostics::{closest, describe, item, Fields, Problems};
use super::values::{integer, string, string_list};
use super::{LocalAgent, LocalConfig};
use crate::error::Result;
use crate::provider::ProviderSettings;

/// The fields of `instance_config.local`, in the order the documentation lists them.
const LOCAL_FIELDS: &[&str] = &["hosts", "ssh_user", "ssh_key_path", "ssh_port", "agent"];
/// The values of `instance_config.local.agent`.
const AGENT_NAMES: &[&str] = &["rust", "script"];

/// The typed `instance_config.local` of `settings`, validated as [`DeploymentConfig`] does;
/// errors name the fields (`instance_config.local.hosts[1]`).
pub(crate) fn local_settings(settings: &ProviderSettings) -> Result<LocalConfig> {
    let mut problems = Problems::default();
    let local = match settings.section() {
        Value::Null => LocalConfig::default(),
        section => parse_local(section, &settings.path(), &mut problems),
    };
    problems.into_result(local)
}

pub(super) fn parse_local(value: &Value, path: &str, problems: &mut Problems) -> LocalConfig {
    let mut local = LocalConfig::default();
    let Some(fields) = Fields::read(value, path, LOCAL_FIELDS, problems) else {
        return local;
    };
    if let Some(value) = fields.get("hosts") {
        let path = fields.path("hosts");
        local.hosts = string_list(value, &path, "host names", problems);
        for (index, host) in local.hosts.iter().enumerate() {
            // Handed to `ssh` as an argument: a leading `-` would be read as an option.
            if !is_ssh_word(host, ".:") {
                problems.add(
                    &item(&path, index),
                    format!(
                        "{host:?} is not a host name or IP address (letters, digits, `.`, `-`, \
                         `_` and `:`, not starting with `-`)"
                    ),
                );
            }
        }
    }
    local.ssh_user = fields
        .get("ssh_user")
        .and_then(|value| string(value, &fields.path("ssh_user"), problems));
    if let Some(user) = local
        .ssh_user
        .as_deref()
        .filter(|user| !is_ssh_word(user, "."))
    {
        problems.add(
            &fields.path("ssh_user"),
            format!(
                "{user:?} is not a user name (letters, digits, `.`, `-` and `_`, not starting \
                 with `-`)"
            ),
        );
    }
    local.ssh_key_path = fields
        .get("ssh_key_path")
        .and_then(|value| string(value, &fields.path("ssh_key_path"), problems));
    if let Some(value) = fields.get("ssh_port") {
        let port = integer(
            value,
            &fields.path("ssh_port"),
            1,
            u32::from(u16::MAX),
            problems,
        );
        if let Some(port) = port.and_then(|port| u16::try_from(port).ok()) {
            local.ssh_port = port;
        }
    }
    if let Some(value) = fields.get("agent") {
        match value.as_str() {
            Some("rust") => local.agent = LocalAgent::Rust,
            Some("script") => local.agent = LocalAgent::Script,
            _ => {
                let hint = value
                    .as_str()
                    .and_then(|name| closest(name, AGENT_NAMES.iter().copied()))
                    .map(|meant| format!("; did you mean {meant}?"))
                    .unwrap_or_default();
                problems.add(
                    &fields.path("agent"),
                    format!("expected rust or script, got {}{hint}", describe(value)),
                );
            }
        }
    }
    if !local.hosts.is_empty() {
        // A host has no `taskfly` binary: its nodes run the shell bootstrap.
        match fields.get("agent") {
            None => local.agent = LocalAgent::Script,
            Some(agent) if agent.as_str() == Some("rust") => problems.add(
                &fields.path("agent"),
                "nodes on SSH hosts run the shell bootstrap (they need only sh, curl, tar and \
                 gzip there); remove agent or set it to script",
            ),
            Some(_) => {}
        }
    }
    if !local.hosts.is_empty() && local.ssh_user.is_none() && fields.get("ssh_user").is_none() {
        problems.add(
            &fields.path("ssh_user"),
            "required when hosts is set; the user to log in as over SSH",
        );
    }
    local
}

/// A host or user name that is safe as an `ssh` argument: ASCII letters, digits, `-`, `_` and
/// the characters of `extra`, not starting with `-`.
fn is_ssh_word(word: &str, extra: &str) -> bool {
    !word.starts_with('-')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c))
}
