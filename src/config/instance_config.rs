//! `cloud_provider` and `instance_config`: which provider runs the nodes, and the section of
//! `instance_config` it is handed.

use serde_yaml::Value;

use super::aws::parse_aws;
use super::diagnostics::{closest, describe, Fields, Problems};
use super::local::parse_local;
use super::slurm::parse_slurm;
use super::{AwsConfig, CloudProvider, LocalConfig};

/// The providers built into taskfly, whose sections are read here.
const PROVIDER_NAMES: &[&str] = &["local", "aws", "slurm"];

pub(super) fn parse_cloud_provider(
    value: Option<&Value>,
    problems: &mut Problems,
) -> Option<CloudProvider> {
    let path = "cloud_provider";
    let Some(value) = value else {
        problems.add(path, "required; set it to local or aws");
        return None;
    };
    match value.as_str() {
        Some("local") => Some(CloudProvider::Local),
        Some("aws") => Some(CloudProvider::Aws),
        // Any other provider is the engine's to know: it refuses names it has none for.
        Some(name) if is_provider_name(name) => Some(CloudProvider::Other(name.to_owned())),
        _ => {
            let hint = value
                .as_str()
                .and_then(|name| closest(name, PROVIDER_NAMES.iter().copied()))
                .map(|meant| format!("; did you mean {meant}?"))
                .unwrap_or_default();
            problems.add(
                path,
                format!(
                    "expected local, aws or a provider's name (lowercase letters, digits, `-` \
                     and `_`), got {}{hint}",
                    describe(value)
                ),
            );
            None
        }
    }
}

/// Whether `name` may name a provider: lowercase letters, digits, `-` and `_`, starting with a
/// letter.
fn is_provider_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Reads `instance_config`, validating only the entry of the chosen provider (the built-ins'
/// sections; another provider's section is its own to check). Returns the typed built-in
/// sections and the chosen provider's section as written.
pub(super) fn parse_instance_config(
    value: Option<&Value>,
    provider: Option<&CloudProvider>,
    problems: &mut Problems,
) -> (LocalConfig, Option<AwsConfig>, Value) {
    let path = "instance_config";
    let empty = Value::Null;
    let mut known = PROVIDER_NAMES.to_vec();
    if let Some(CloudProvider::Other(name)) = provider {
        known.push(name);
    }
    let Some(fields) = Fields::read(value.unwrap_or(&empty), path, &known, problems) else {
        return (LocalConfig::default(), None, Value::Null);
    };
    let section = provider
        .and_then(|provider| fields.get(provider.as_str()))
        .cloned()
        .unwrap_or(Value::Null);
    match provider {
        Some(CloudProvider::Local) => {
            let local = match fields.get("local") {
                Some(value) => parse_local(value, &fields.path("local"), problems),
                None => LocalConfig::default(),
            };
            (local, None, section)
        }
        Some(CloudProvider::Aws) => {
            let aws = parse_aws(fields.get("aws"), &fields.path("aws"), problems);
            (LocalConfig::default(), aws, section)
        }
        // The slurm provider reads its section again from the settings it is handed; it is
        // checked here so that `taskfly validate` and `up` report its mistakes with the rest.
        Some(CloudProvider::Other(name)) if name == "slurm" => {
            if let Some(value) = fields.get("slurm") {
                parse_slurm(value, &fields.path("slurm"), problems);
            }
            (LocalConfig::default(), None, section)
        }
        Some(CloudProvider::Other(_)) | None => (LocalConfig::default(), None, section),
    }
}
