//! The `nodes` section: how many nodes run, for how long, and what each one gets.

use serde_yaml::Value;

use super::diagnostics::{child, item, Fields, Problems};
use super::values::{duration, integer, json_map, list_map, scalar_map};
use super::NodesConfig;

/// The most nodes one deployment may have (`nodes.count`).
pub(crate) const MAX_NODES: u32 = 100_000;

/// The most times a failed node may be started again (`nodes.retries`).
const MAX_RETRIES: u32 = 100;

/// The fields of `nodes`, in the order the documentation lists them.
pub(super) const NODES_FIELDS: &[&str] = &[
    "count",
    "timeout",
    "retries",
    "global_metadata",
    "secrets",
    "distributed_lists",
    "config_template",
];

/// Reads `nodes`. Invalid fields are reported and replaced by stand-ins (count 1, an empty value
/// for a key whose value is invalid) so that [`crate::metadata::check`] can still report the
/// template and name problems in the same pass without repeating these.
pub(super) fn parse_nodes(value: Option<&Value>, problems: &mut Problems) -> Option<NodesConfig> {
    let path = "nodes";
    let Some(value) = value else {
        problems.add(path, "required; set at least nodes.count");
        return None;
    };
    let fields = Fields::read(value, path, NODES_FIELDS, problems)?;
    let count = match fields.get("count") {
        Some(value) => integer(value, &fields.path("count"), 1, MAX_NODES, problems),
        None => {
            problems.add(
                &fields.path("count"),
                format!("required; an integer from 1 to {MAX_NODES}"),
            );
            None
        }
    };
    let timeout = fields
        .get("timeout")
        .and_then(|value| duration(value, &fields.path("timeout"), problems));
    let retries = fields
        .get("retries")
        .and_then(|value| integer(value, &fields.path("retries"), 0, MAX_RETRIES, problems));
    let global_metadata = fields
        .get("global_metadata")
        .map(|value| json_map(value, &fields.path("global_metadata"), problems))
        .unwrap_or_default();
    let secrets = fields
        .get("secrets")
        .map(|value| scalar_map(value, &fields.path("secrets"), true, problems))
        .unwrap_or_default();
    let distributed_lists = fields
        .get("distributed_lists")
        .map(|value| list_map(value, &fields.path("distributed_lists"), problems))
        .unwrap_or_default();
    let config_template = fields
        .get("config_template")
        .map(|value| {
            let path = fields.path("config_template");
            if let Value::Mapping(map) = value {
                for (key, value) in map {
                    if let Some(name) = key.as_str() {
                        flag_unquoted_placeholders(value, &child(&path, name), problems);
                    }
                }
            }
            json_map(value, &path, problems)
        })
        .unwrap_or_default();

    Some(NodesConfig {
        // A stand-in for a missing or invalid count, which is already reported.
        count: count.unwrap_or(1),
        timeout,
        retries: retries.unwrap_or(0),
        global_metadata,
        secrets,
        distributed_lists,
        config_template,
    })
}

/// Reports `{name}` written without quotes in a template: YAML reads it as a mapping of `name`
/// to nothing, which is never what a template means.
fn flag_unquoted_placeholders(value: &Value, path: &str, problems: &mut Problems) {
    match value {
        Value::Mapping(map) => {
            if let (1, Some((Value::String(name), Value::Null))) = (map.len(), map.iter().next()) {
                problems.add(
                    path,
                    format!(
                        "{{{name}}} without quotes is a YAML mapping, not a placeholder; \
                         write \"{{{name}}}\" in quotes"
                    ),
                );
                return;
            }
            for (key, value) in map {
                if let Some(name) = key.as_str() {
                    flag_unquoted_placeholders(value, &child(path, name), problems);
                }
            }
        }
        Value::Sequence(items) => {
            for (index, value) in items.iter().enumerate() {
                flag_unquoted_placeholders(value, &item(path, index), problems);
            }
        }
        _ => {}
    }
}
