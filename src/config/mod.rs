//! `taskfly.yml`: its types, and the parser that checks every field and reports every problem at
//! once.
//!
//! The file is read into a [`serde_yaml::Value`] and walked by hand rather than derived with
//! serde, so that one pass collects every problem (an unknown field together with the field that
//! was probably meant, a wrong type, a value out of range, a bad placeholder) with the path of the
//! field it concerns, instead of stopping at the first one. Apart from
//! [`DeploymentConfig::from_dir`], nothing here does I/O.
//!
//! The parts: `types` holds the public types, `diagnostics` collects problems with
//! their field paths, `values` reads single values, and one module per section reads it:
//! `instance_config` (with `local` and `aws`), `files` (`application_files`) and `nodes`.
//! This module ties them together: the entry points and the walk over the top level.

mod aws;
mod diagnostics;
mod duration;
mod files;
mod instance_config;
mod local;
mod nodes;
mod notify;
mod outputs;
mod slurm;
mod tree;
mod types;
mod values;

use std::path::Path;

use serde_yaml::Value;

#[cfg(feature = "aws")]
pub(crate) use aws::aws_settings;
pub(crate) use diagnostics::closest;
use diagnostics::{yaml_error, Fields, Problems};
pub use duration::parse_duration;
use files::{leaves_folder, parse_application_files};
use instance_config::{parse_cloud_provider, parse_instance_config};
pub(crate) use local::local_settings;
use nodes::parse_nodes;
pub(crate) use nodes::MAX_NODES;
use outputs::parse_outputs;
pub(crate) use slurm::{slurm_settings, SlurmConfig};
pub use types::{
    AwsConfig, CloudProvider, DeploymentConfig, LocalAgent, LocalConfig, NodesConfig, NotifyConfig,
};
use values::string;

use crate::error::{Error, Result};
use crate::provider::ProviderSettings;

/// The name of the deployment file in a project folder.
pub const CONFIG_FILE_NAME: &str = "taskfly.yml";

/// The script a node runs when `remote_script_to_run` is not given.
const DEFAULT_SCRIPT: &str = "setup.sh";

/// The top-level fields of the file, in the order the documentation lists them.
const TOP_FIELDS: &[&str] = &[
    "cloud_provider",
    "instance_config",
    "application_files",
    "remote_script_to_run",
    "remote_dest_dir",
    "bundle_name",
    "nodes",
    "outputs",
    "notify",
];

impl DeploymentConfig {
    /// The section `instance_config.<cloud_provider>`, unparsed, for the provider that runs
    /// the deployment: all it sees of the deployment.
    pub fn provider_settings(&self) -> ProviderSettings {
        ProviderSettings::new(self.cloud_provider.as_str(), self.provider_section.clone())
    }

    /// Parses and validates the text of a `taskfly.yml`.
    ///
    /// On failure the error [`is_invalid_config`](Error::is_invalid_config) and its
    /// [`details`](Error::details) list every problem found, each as `"<field path>: <what is
    /// wrong>"`, including those of the `nodes` templates and environment names.
    pub fn from_yaml(text: &str) -> Result<DeploymentConfig> {
        let mut problems = Problems::default();
        let config = parse_document(text, &mut problems);
        match config {
            Some(config) if problems.0.is_empty() => Ok(config),
            _ => Err(problems.into_error(CONFIG_FILE_NAME)),
        }
    }

    /// Reads and validates `dir/taskfly.yml`.
    ///
    /// A file that cannot be read gives an [`is_io`](Error::is_io) error naming its path; an
    /// invalid one gives the same error as [`DeploymentConfig::from_yaml`], its message naming
    /// the path.
    pub fn from_dir(dir: &Path) -> Result<DeploymentConfig> {
        let path = dir.join(CONFIG_FILE_NAME);
        let bytes = std::fs::read(&path).map_err(|err| {
            let message = if err.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{} does not exist; create it, or point taskfly at the folder that holds it",
                    path.display()
                )
            } else {
                format!(
                    "cannot read {}; check that it is a readable file",
                    path.display()
                )
            };
            Error::io(message, err)
        })?;
        let label = path.display().to_string();
        let Ok(text) = String::from_utf8(bytes) else {
            let mut problems = Problems::default();
            problems.add(CONFIG_FILE_NAME, "not valid UTF-8 text; save it as UTF-8");
            return Err(problems.into_error(&label));
        };
        DeploymentConfig::from_yaml(&text)
            .map_err(|err| Problems(err.details().to_vec()).into_error(&label))
    }
}

/// The error for a `taskfly.yml` (named `file` in the message) with these problems, each
/// `<field path>: <what is wrong>`: what the checks beyond the file itself report.
pub(crate) fn invalid_config(file: &str, problems: Vec<String>) -> Error {
    Problems(problems).into_error(file)
}

fn parse_document(text: &str, problems: &mut Problems) -> Option<DeploymentConfig> {
    let mut root: Value = match tree::parse(text) {
        Ok(root) => root,
        Err(err) => {
            problems.add(CONFIG_FILE_NAME, yaml_error(&err));
            return None;
        }
    };
    if let Err(err) = root.apply_merge() {
        problems.add(CONFIG_FILE_NAME, yaml_error(&err));
        return None;
    }
    let fields = Fields::read(&root, "", TOP_FIELDS, problems)?;

    let cloud_provider = parse_cloud_provider(fields.get("cloud_provider"), problems);
    let (local, aws, provider_section) = parse_instance_config(
        fields.get("instance_config"),
        cloud_provider.as_ref(),
        problems,
    );
    let application_files = parse_application_files(fields.get("application_files"), problems);
    let remote_script_to_run = match fields.get("remote_script_to_run") {
        None => DEFAULT_SCRIPT.to_owned(),
        Some(value) => {
            let path = fields.path("remote_script_to_run");
            let script = string(value, &path, problems).unwrap_or_default();
            if leaves_folder(&script) {
                problems.add(
                    &path,
                    format!("{script:?} must be relative to the bundle's root and stay inside it"),
                );
            }
            script
        }
    };
    let remote_dest_dir = fields.get("remote_dest_dir").and_then(|value| {
        let path = fields.path("remote_dest_dir");
        let dir = string(value, &path, problems)?;
        // Agents must agree on the folder and know before extracting what it will be: a
        // `..` step through a folder not made yet can land on any existing one.
        if dir.trim() != dir {
            problems.add(
                &path,
                format!("{dir:?} starts or ends with blanks; remove them"),
            );
        } else if dir.split('/').any(|step| step == "..") {
            problems.add(
                &path,
                format!("{dir:?} has a `..` step; name the folder directly (e.g. /opt/job)"),
            );
        }
        Some(dir)
    });
    let bundle_name = fields.get("bundle_name").and_then(|value| {
        let path = fields.path("bundle_name");
        let name = string(value, &path, problems)?;
        if name.contains(['/', '\\']) || name == "." || name == ".." {
            problems.add(
                &path,
                format!("{name:?} must be a file name, without folders"),
            );
        }
        Some(name)
    });
    let nodes = parse_nodes(fields.get("nodes"), problems);
    let outputs = parse_outputs(fields.get("outputs"), problems);
    let notify = fields
        .get("notify")
        .and_then(|value| notify::parse_notify(value, problems));
    if let Some(nodes) = &nodes {
        problems.0.extend(crate::metadata::check(nodes));
    }
    if let (Some(CloudProvider::Local), Some(dir), Some(nodes)) =
        (&cloud_provider, &remote_dest_dir, &nodes)
    {
        // Local nodes all run on this machine: one folder of it (absolute, or in the home
        // directory) would take every node's bundle, and all but the first be refused.
        // Relative folders are taken from each node's own work directory.
        // Over SSH, the same holds for the nodes that share a host.
        let one_folder = dir.starts_with('/') || dir == "~" || dir.starts_with("~/");
        let machines = local
            .hosts
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if one_folder && u64::from(nodes.count) > machines.max(1) as u64 {
            let machine = if machines == 0 {
                "this machine".to_owned()
            } else {
                format!("each of the {machines} hosts")
            };
            problems.add(
                &fields.path("remote_dest_dir"),
                format!(
                    "the {} local nodes would share {dir} on {machine}; remove it \
                     (each node gets a fresh folder) or make it relative (taken from each \
                     node's work directory)",
                    nodes.count
                ),
            );
        }
    }

    Some(DeploymentConfig {
        cloud_provider: cloud_provider?,
        local,
        aws,
        provider_section,
        application_files,
        remote_script_to_run,
        remote_dest_dir,
        bundle_name,
        nodes: nodes?,
        outputs,
        notify,
    })
}

#[cfg(test)]
mod tests;
