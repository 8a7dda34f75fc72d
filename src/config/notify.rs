//! The `notify` section (SPEC §1): a webhook the daemon calls when a deployment ends.

use serde_yaml::Value;

use super::diagnostics::{describe, item, kind_of, Fields, Problems};
use super::types::NotifyConfig;
use super::values::string;
use crate::state::model::DeploymentStatus;

const NOTIFY_FIELDS: &[&str] = &["webhook", "on", "secret"];

/// The final states `notify.on` may name, which are also its default.
const FINAL_STATES: [DeploymentStatus; 3] = [
    DeploymentStatus::Completed,
    DeploymentStatus::Failed,
    DeploymentStatus::Terminated,
];

/// Reads `notify`: `webhook` (an http or https URL, required), `on` (final states, default
/// all), `secret` (signs the body; never echoed in a message).
pub(super) fn parse_notify(value: &Value, problems: &mut Problems) -> Option<NotifyConfig> {
    let fields = Fields::read(value, "notify", NOTIFY_FIELDS, problems)?;
    let webhook = match fields.get("webhook") {
        None => {
            problems.add(
                &fields.path("webhook"),
                "missing: the http:// or https:// URL to POST to when the deployment ends",
            );
            None
        }
        Some(value) => {
            let path = fields.path("webhook");
            string(value, &path, problems).filter(|url| match url_problem(url) {
                Some(problem) => {
                    problems.add(&path, problem);
                    false
                }
                None => true,
            })
        }
    };
    let on = match fields.get("on") {
        None => FINAL_STATES.to_vec(),
        Some(value) => parse_on(value, &fields.path("on"), problems),
    };
    let secret = fields.get("secret").and_then(|value| {
        let path = fields.path("secret");
        let secret = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                problems.add(&path, format!("expected a string, got {}", kind_of(other)));
                return None;
            }
        };
        if secret.trim().is_empty() {
            problems.add(
                &path,
                "must not be empty; remove it to send unsigned notifications",
            );
            return None;
        }
        Some(secret)
    });
    Some(NotifyConfig {
        webhook: webhook?,
        on,
        secret,
    })
}

fn parse_on(value: &Value, path: &str, problems: &mut Problems) -> Vec<DeploymentStatus> {
    let names = FINAL_STATES.map(DeploymentStatus::as_str).join(", ");
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!(
                "expected a list of final states ({names}), got {}",
                describe(value)
            ),
        );
        return Vec::new();
    };
    if items.is_empty() {
        problems.add(
            path,
            format!("names no state; list some of {names}, or leave `on` out for all of them"),
        );
    }
    let mut on = Vec::new();
    for (index, value) in items.iter().enumerate() {
        let wanted = value
            .as_str()
            .and_then(|name| FINAL_STATES.into_iter().find(|s| s.as_str() == name));
        match wanted {
            Some(status) if !on.contains(&status) => on.push(status),
            Some(status) => problems.add(&item(path, index), format!("{status} is listed twice")),
            None => problems.add(
                &item(path, index),
                format!("expected one of {names}, got {}", describe(value)),
            ),
        }
    }
    on
}

/// What is wrong with a webhook URL, if anything: it must be `http://` or `https://` with a
/// host, and hold no blanks. The message never quotes the URL, which may hold a credential.
fn url_problem(url: &str) -> Option<String> {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Some("must start with http:// or https://".to_owned());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Some("has no host; write it as https://host[:port]/path".to_owned());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("holds blanks or control characters; encode them (%20)".to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> (Option<NotifyConfig>, Vec<String>) {
        let mut problems = Problems::default();
        let value: Value = serde_yaml::from_str(yaml).expect("yaml");
        let notify = parse_notify(&value, &mut problems);
        (notify, problems.0)
    }

    #[test]
    fn a_webhook_alone_notifies_every_final_state_unsigned() {
        let (notify, problems) = parse("webhook: https://hooks.example.com/T0/B0/x");
        assert_eq!(problems, Vec::<String>::new());
        let notify = notify.expect("notify");
        assert_eq!(notify.on, FINAL_STATES);
        assert_eq!(notify.secret, None);
    }

    #[test]
    fn every_problem_is_named_by_its_field_and_the_secret_never_shown() {
        let (_, problems) = parse(
            "webhook: ftp://files.example.com/drop\non: [completed, running, completed]\nsecret: ['hunter2']\nretry: 3",
        );
        assert_eq!(
            problems,
            [
                "notify.retry: unknown field; valid fields are webhook, on, secret",
                "notify.webhook: must start with http:// or https://",
                "notify.on[1]: expected one of completed, failed, terminated, got \"running\"",
                "notify.on[2]: completed is listed twice",
                "notify.secret: expected a string, got a list",
            ]
        );
        let (_, problems) = parse("on: []\nsecret: ''");
        assert_eq!(
            problems,
            [
                "notify.webhook: missing: the http:// or https:// URL to POST to when the deployment ends",
                "notify.on: names no state; list some of completed, failed, terminated, or leave `on` out for all of them",
                "notify.secret: must not be empty; remove it to send unsigned notifications",
            ]
        );
        assert!(url_problem("http://127.0.0.1:9/hook").is_none());
        assert!(url_problem("https:///path").is_some());
        assert!(url_problem("https://user:token@:443/").is_some());
    }
}
