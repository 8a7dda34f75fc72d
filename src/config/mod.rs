//! `taskfly.yml`: its types, and the parser that checks every field and reports every problem at
//! once.
//!
//! The file is read into a [`serde_yaml::Value`] and walked by hand rather than derived with
//! serde, so that one pass collects every problem (an unknown field together with the field that
//! was probably meant, a wrong type, a value out of range, a bad placeholder) with the path of the
//! field it concerns, instead of stopping at the first one. Apart from
//! [`DeploymentConfig::from_dir`], nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value as JsonValue;
use serde_yaml::Value;

use crate::error::{Error, Result};
use crate::provider::ProviderSettings;

/// The name of the deployment file in a project folder.
pub const CONFIG_FILE_NAME: &str = "taskfly.yml";

/// The most nodes one deployment may have (`nodes.count`).
pub(crate) const MAX_NODES: u32 = 100_000;

/// The most times a failed node may be started again (`nodes.retries`).
const MAX_RETRIES: u32 = 100;

/// The script a node runs when `remote_script_to_run` is not given.
const DEFAULT_SCRIPT: &str = "setup.sh";

/// The SSH port used when `instance_config.local.ssh_port` is not given.
const DEFAULT_SSH_PORT: u16 = 22;

/// The fields of each level of the file, in the order the documentation lists them.
const TOP_FIELDS: &[&str] = &[
    "cloud_provider",
    "instance_config",
    "application_files",
    "remote_script_to_run",
    "remote_dest_dir",
    "bundle_name",
    "nodes",
];
const PROVIDER_NAMES: &[&str] = &["local", "aws"];
const LOCAL_FIELDS: &[&str] = &["hosts", "ssh_user", "ssh_key_path", "ssh_port", "agent"];
const AWS_FIELDS: &[&str] = &[
    "region",
    "image_id",
    "ami",
    "instance_type",
    "key_name",
    "security_groups",
    "subnet_id",
    "iam_instance_profile",
    "spot",
    "tags",
    "endpoint_url",
];
const NODES_FIELDS: &[&str] = &[
    "count",
    "timeout",
    "retries",
    "global_metadata",
    "secrets",
    "distributed_lists",
    "config_template",
];
const AGENT_NAMES: &[&str] = &["rust", "script"];

/// Where the nodes of a deployment run: the name of a provider (`cloud_provider`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudProvider {
    /// Child processes on the daemon's machine, or SSH hosts when `instance_config.local.hosts`
    /// is set.
    Local,
    /// EC2 instances (or any EC2-compatible endpoint).
    Aws,
    /// A provider the engine's host registered under this name (see
    /// [`crate::Config::provider`]). Its `instance_config.<name>` section is handed to it
    /// unchecked; the engine refuses the deployment if no provider of that name is registered.
    Other(String),
}

impl CloudProvider {
    /// The name used in `taskfly.yml` and in API responses: `local`, `aws`, or another
    /// provider's name.
    pub fn as_str(&self) -> &str {
        match self {
            CloudProvider::Local => "local",
            CloudProvider::Aws => "aws",
            CloudProvider::Other(name) => name,
        }
    }
}

/// A validated `taskfly.yml`: everything needed to deploy a bundle.
///
/// Built only by [`DeploymentConfig::from_yaml`] or [`DeploymentConfig::from_dir`], which check
/// every field, so code that receives one can rely on its invariants (a known provider with its
/// required settings, relative application files, a valid `nodes` section).
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentConfig {
    /// Where the nodes run.
    pub cloud_provider: CloudProvider,
    /// `instance_config.local`; its defaults when absent or when the provider is not `local`.
    pub local: LocalConfig,
    /// `instance_config.aws`; `Some` exactly when the provider is `aws`.
    pub aws: Option<AwsConfig>,
    /// `instance_config.<cloud_provider>` as written, for the provider
    /// ([`DeploymentConfig::provider_settings`]).
    provider_section: Value,
    /// Files, globs and directories to bundle, relative to `taskfly.yml` and never outside its
    /// folder; never empty.
    pub application_files: Vec<String>,
    /// The script each node runs from the extracted bundle; relative, default `setup.sh`.
    pub remote_script_to_run: String,
    /// Where nodes extract the bundle; `None` means a fresh per-node work directory.
    pub remote_dest_dir: Option<String>,
    /// The file name of the client bundle, when the user chose one.
    pub bundle_name: Option<String>,
    /// How many nodes run and what each one gets.
    pub nodes: NodesConfig,
}

/// `instance_config.local`: nodes as local child processes, or over SSH when `hosts` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    /// SSH hosts; node `i` runs on `hosts[i % hosts.len()]`. Empty means local child processes.
    pub hosts: Vec<String>,
    /// The SSH user; always set when `hosts` is not empty.
    pub ssh_user: Option<String>,
    /// The private key to log in with, as written (a leading `~` is not expanded here).
    pub ssh_key_path: Option<String>,
    /// The SSH port, default 22.
    pub ssh_port: u16,
    /// Which agent a local node runs.
    pub agent: LocalAgent,
}

impl Default for LocalConfig {
    /// No hosts (local child processes), port 22, the Rust agent.
    fn default() -> Self {
        LocalConfig {
            hosts: Vec::new(),
            ssh_user: None,
            ssh_key_path: None,
            ssh_port: DEFAULT_SSH_PORT,
            agent: LocalAgent::default(),
        }
    }
}

/// The node agent a local node runs (`instance_config.local.agent: rust | script`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalAgent {
    /// The `taskfly agent` binary.
    #[default]
    Rust,
    /// The generated shell bootstrap script, as a cloud instance would run it.
    Script,
}

/// `instance_config.aws`: how to start EC2 instances.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsConfig {
    /// The region; `None` leaves it to the AWS SDK's usual lookup.
    pub region: Option<String>,
    /// The AMI to start (`image_id`, or the Go tool's `ami`).
    pub image_id: String,
    /// The instance type, like `t3.micro`.
    pub instance_type: String,
    /// The EC2 key pair to install, if any.
    pub key_name: Option<String>,
    /// Security group ids (with `subnet_id`) or names; default `["default"]`, never empty.
    pub security_groups: Vec<String>,
    /// The subnet to start instances in, if any.
    pub subnet_id: Option<String>,
    /// The IAM instance profile to attach, if any.
    pub iam_instance_profile: Option<String>,
    /// Whether to request spot capacity.
    pub spot: bool,
    /// Tags added to every instance.
    pub tags: BTreeMap<String, String>,
    /// An EC2-compatible endpoint to use instead of AWS's own.
    pub endpoint_url: Option<String>,
}

/// The `nodes` section: how many nodes run, for how long, and what each one gets.
///
/// [`crate::metadata::MetadataGenerator`] turns it into each node's configuration and
/// environment. Its `Debug` output shows secret names but never secret values.
#[derive(Clone, PartialEq, Default)]
pub struct NodesConfig {
    /// How many nodes run, from 1 to 100000.
    pub count: u32,
    /// How long a node's script may run before it is killed and the node failed.
    pub timeout: Option<Duration>,
    /// How many times a failed node is started again.
    pub retries: u32,
    /// Values every node gets.
    pub global_metadata: BTreeMap<String, JsonValue>,
    /// Values every node gets as environment variables, never shown anywhere.
    pub secrets: BTreeMap<String, String>,
    /// Lists shared out between the nodes (SPEC §2).
    pub distributed_lists: BTreeMap<String, Vec<JsonValue>>,
    /// Values with `{name}` placeholders, filled in for each node.
    pub config_template: BTreeMap<String, JsonValue>,
}

impl fmt::Debug for NodesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secrets: BTreeMap<&str, &str> = self
            .secrets
            .keys()
            .map(|name| (name.as_str(), "***"))
            .collect();
        f.debug_struct("NodesConfig")
            .field("count", &self.count)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("global_metadata", &self.global_metadata)
            .field("secrets", &secrets)
            .field("distributed_lists", &self.distributed_lists)
            .field("config_template", &self.config_template)
            .finish()
    }
}

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

/// Every problem found so far, each formatted as `"<field path>: <what is wrong>"`.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: &str, what: impl fmt::Display) {
        self.0.push(format!("{path}: {what}"));
    }

    /// `value` if no problem was found, else the error naming them all.
    fn into_result<T>(self, value: T) -> Result<T> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error(CONFIG_FILE_NAME))
        }
    }

    /// The error for an invalid file; `file` is how the message names it.
    fn into_error(self, file: &str) -> Error {
        let mut details = self.0;
        if details.is_empty() {
            // Every path that refuses a file records why, so this is only a safety net.
            details.push(format!(
                "{CONFIG_FILE_NAME}: could not be read as a deployment"
            ));
        }
        let count = details.len();
        let plural = if count == 1 { "" } else { "s" };
        Error::invalid_config(
            format!("{file} is invalid ({count} problem{plural})"),
            details,
        )
    }
}

/// The path of field `name` inside the field at `path` (the top level when `path` is empty).
fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The path of item `index` of the list at `path`.
fn item(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// The fields of one YAML mapping, read with their names checked against the known ones.
struct Fields<'a> {
    path: String,
    entries: Vec<(&'a str, &'a Value)>,
}

impl<'a> Fields<'a> {
    /// Reads `value` as a mapping whose field names must be among `known`, reporting every
    /// unknown one. An empty value (`field:` with nothing after it) has no fields. Returns
    /// `None`, after reporting it, when `value` is not a mapping.
    fn read(
        value: &'a Value,
        path: &str,
        known: &[&str],
        problems: &mut Problems,
    ) -> Option<Fields<'a>> {
        let label = if path.is_empty() {
            CONFIG_FILE_NAME
        } else {
            path
        };
        let map = match value {
            Value::Null => {
                return Some(Fields {
                    path: path.to_owned(),
                    entries: Vec::new(),
                })
            }
            Value::Mapping(map) => map,
            other => {
                problems.add(
                    label,
                    format!(
                        "expected a mapping with the fields {}, got {}",
                        known.join(", "),
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let mut entries = Vec::new();
        for (key, value) in map {
            let Some(name) = key.as_str() else {
                problems.add(
                    label,
                    format!("field names must be strings, got {}", describe(key)),
                );
                continue;
            };
            if known.contains(&name) {
                entries.push((name, value));
            } else {
                problems.add(&child(path, name), unknown_field(name, known));
            }
        }
        Some(Fields {
            path: path.to_owned(),
            entries,
        })
    }

    /// The value of field `name`, or `None` when it is absent or empty.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(field, _)| *field == name)
            .map(|(_, value)| *value)
            .filter(|value| !value.is_null())
    }

    /// The path of field `name`.
    fn path(&self, name: &str) -> String {
        child(&self.path, name)
    }
}

/// The message for an unknown field, naming the closest known one or else all of them.
fn unknown_field(name: &str, known: &[&str]) -> String {
    match closest(name, known.iter().copied()) {
        Some(meant) => format!("unknown field; did you mean `{meant}`?"),
        None => format!("unknown field; valid fields are {}", known.join(", ")),
    }
}

/// The candidate `name` was most likely meant to be, if one is close enough: within one edit
/// for short names and two for longer ones, ignoring case and `-` versus `_`.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Beyond this length a name is not a typo of a field, and comparing it would only cost time.
    const LONGEST_COMPARED: usize = 64;
    if name.chars().count() > LONGEST_COMPARED {
        return None;
    }
    let wanted = normalize(name);
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let distance = edit_distance(&wanted, &normalize(candidate));
            let allowed = (candidate.chars().count() / 3).clamp(1, 2);
            (distance <= allowed).then_some((distance, candidate))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn normalize(name: &str) -> Vec<char> {
    name.chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// The optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters (`cuont` is one edit from `count`).
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut before_previous: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut current = vec![0; b.len() + 1];
        current[0] = i;
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut distance = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                distance = distance.min(before_previous[j - 2] + 1);
            }
            current[j] = distance;
        }
        before_previous = std::mem::replace(&mut previous, current);
    }
    previous[b.len()]
}

/// A short description of a YAML value for a message: scalars as written (strings quoted and
/// cut short), collections by their kind.
fn describe(value: &Value) -> String {
    // Long strings are cut so that one bad value cannot flood the report.
    const LONGEST_SHOWN: usize = 40;
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut shown: String = s.chars().take(LONGEST_SHOWN).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("{shown:?}")
        }
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// Like [`describe`] but without the value itself, for secrets.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn parse_document(text: &str, problems: &mut Problems) -> Option<DeploymentConfig> {
    let mut root: Value = match serde_yaml::from_str(text) {
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
    })
}

/// A YAML syntax error as a message with its line and column.
///
/// serde_yaml quotes the value it could not read between backticks (`invalid type: integer
/// \`…\` as u128`); that value may be a secret, so every quoted value is left out.
fn yaml_error(err: &serde_yaml::Error) -> String {
    let full = err.to_string();
    let mut message = String::with_capacity(full.len());
    let mut rest = full.as_str();
    while let Some(open) = rest.find('`') {
        let Some(close) = rest[open + 1..].find('`') else {
            break;
        };
        message.push_str(rest[..open].trim_end_matches(' '));
        rest = &rest[open + 1 + close + 1..];
    }
    message.push_str(rest);
    match err.location() {
        Some(location) if !message.contains("line ") => format!(
            "invalid YAML at line {}, column {}: {message}",
            location.line(),
            location.column()
        ),
        _ => format!("invalid YAML: {message}"),
    }
}

fn parse_cloud_provider(value: Option<&Value>, problems: &mut Problems) -> Option<CloudProvider> {
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
fn parse_instance_config(
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
        Some(CloudProvider::Other(_)) | None => (LocalConfig::default(), None, section),
    }
}

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

/// The typed `instance_config.aws` of `settings`, validated as [`DeploymentConfig`] does;
/// errors name the fields (`instance_config.aws.image_id`).
#[cfg(feature = "aws")]
pub(crate) fn aws_settings(settings: &ProviderSettings) -> Result<AwsConfig> {
    let mut problems = Problems::default();
    let section = Some(settings.section()).filter(|value| !value.is_null());
    let aws = parse_aws(section, &settings.path(), &mut problems);
    match aws {
        Some(aws) => problems.into_result(aws),
        None => Err(problems.into_error(CONFIG_FILE_NAME)),
    }
}

fn parse_local(value: &Value, path: &str, problems: &mut Problems) -> LocalConfig {
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

fn parse_aws(value: Option<&Value>, path: &str, problems: &mut Problems) -> Option<AwsConfig> {
    let Some(value) = value else {
        problems.add(
            path,
            "required when cloud_provider is aws; set at least image_id and instance_type",
        );
        return None;
    };
    let fields = Fields::read(value, path, AWS_FIELDS, problems)?;
    let optional = |name: &str, problems: &mut Problems| {
        fields
            .get(name)
            .and_then(|value| string(value, &fields.path(name), problems))
    };

    let image_id = match (fields.get("image_id"), fields.get("ami")) {
        (Some(_), Some(_)) => {
            problems.add(
                &fields.path("ami"),
                "`ami` is another name for `image_id`; give only one of them",
            );
            None
        }
        (Some(value), None) => string(value, &fields.path("image_id"), problems),
        (None, Some(value)) => string(value, &fields.path("ami"), problems),
        (None, None) => {
            problems.add(
                &fields.path("image_id"),
                "required; the AMI to start, like ami-0abc1234",
            );
            None
        }
    };
    let instance_type = match fields.get("instance_type") {
        Some(value) => string(value, &fields.path("instance_type"), problems),
        None => {
            problems.add(
                &fields.path("instance_type"),
                "required; the instance type, like t3.micro",
            );
            None
        }
    };
    let security_groups = match fields.get("security_groups") {
        None => vec!["default".to_owned()],
        Some(value) => {
            let path = fields.path("security_groups");
            let groups = string_list(value, &path, "security group ids or names", problems);
            if matches!(value, Value::Sequence(items) if items.is_empty()) {
                problems.add(
                    &path,
                    "the list is empty; name at least one group, or leave the field out for [default]",
                );
            }
            groups
        }
    };
    let spot = match fields.get("spot") {
        None => false,
        Some(Value::Bool(spot)) => *spot,
        Some(other) => {
            problems.add(
                &fields.path("spot"),
                format!("expected true or false, got {}", describe(other)),
            );
            false
        }
    };
    let tags = match fields.get("tags") {
        None => BTreeMap::new(),
        Some(value) => scalar_map(value, &fields.path("tags"), false, problems),
    };
    let endpoint_url = optional("endpoint_url", problems);
    if let Some(url) = &endpoint_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.add(
                &fields.path("endpoint_url"),
                format!("expected an http:// or https:// URL, got {url:?}"),
            );
        }
    }

    Some(AwsConfig {
        region: optional("region", problems),
        image_id: image_id?,
        instance_type: instance_type?,
        key_name: optional("key_name", problems),
        security_groups,
        subnet_id: optional("subnet_id", problems),
        iam_instance_profile: optional("iam_instance_profile", problems),
        spot,
        tags,
        endpoint_url,
    })
}

fn parse_application_files(value: Option<&Value>, problems: &mut Problems) -> Vec<String> {
    let path = "application_files";
    let Some(value) = value else {
        problems.add(
            path,
            "required; list at least the script named by remote_script_to_run",
        );
        return Vec::new();
    };
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!(
                "expected a list of files, globs or directories (like [setup.sh, data/]), got {}",
                describe(value)
            ),
        );
        return Vec::new();
    };
    if items.is_empty() {
        problems.add(
            path,
            "the list is empty; list at least the script named by remote_script_to_run",
        );
    }
    let mut files = Vec::with_capacity(items.len());
    for (index, value) in items.iter().enumerate() {
        let path = item(path, index);
        let Some(file) = string(value, &path, problems) else {
            continue;
        };
        if leaves_folder(&file) {
            problems.add(
                &path,
                format!("{file:?} must be relative to taskfly.yml and stay inside its folder"),
            );
        }
        files.push(file);
    }
    files
}

/// Whether a path written in `taskfly.yml` could point outside the folder it is relative to:
/// absolute (including a Windows drive or a home directory `~`) or with a `..` component.
fn leaves_folder(path: &str) -> bool {
    let bytes = path.as_bytes();
    let has_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    path.starts_with(['/', '\\', '~'])
        || has_drive
        || Path::new(path).is_absolute()
        || path.split(['/', '\\']).any(|part| part == "..")
}

/// Reads `nodes`. Invalid fields are reported and replaced by stand-ins (count 1, an empty value
/// for a key whose value is invalid) so that [`crate::metadata::check`] can still report the
/// template and name problems in the same pass without repeating these.
fn parse_nodes(value: Option<&Value>, problems: &mut Problems) -> Option<NodesConfig> {
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

/// A non-empty string.
fn string(value: &Value, path: &str, problems: &mut Problems) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::String(_) => {
            problems.add(path, "must not be empty");
            None
        }
        other => {
            problems.add(path, format!("expected a string, got {}", describe(other)));
            None
        }
    }
}

/// A host or user name that is safe as an `ssh` argument: ASCII letters, digits, `-`, `_` and
/// the characters of `extra`, not starting with `-`.
fn is_ssh_word(word: &str, extra: &str) -> bool {
    !word.starts_with('-')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c))
}

/// A list of non-empty strings; `what` says what they are, for the message.
fn string_list(value: &Value, path: &str, what: &str, problems: &mut Problems) -> Vec<String> {
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!("expected a list of {what}, got {}", describe(value)),
        );
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(index, value)| string(value, &item(path, index), problems))
        .collect()
}

/// A whole number from `min` to `max`.
fn integer(value: &Value, path: &str, min: u32, max: u32, problems: &mut Problems) -> Option<u32> {
    let number = value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (min..=max).contains(n));
    if number.is_none() {
        problems.add(
            path,
            format!(
                "expected an integer from {min} to {max}, got {}",
                describe(value)
            ),
        );
    }
    number
}

/// A duration: a humantime string (`30m`, `90s`, `1h 30m`) or a whole number of seconds.
fn duration(value: &Value, path: &str, problems: &mut Problems) -> Option<Duration> {
    let expected = "expected a duration like 30m, 90s or 1h 30m, or a whole number of seconds";
    let parsed = match value {
        Value::String(s) => humantime::parse_duration(s.trim())
            .map_err(|err| format!("{expected}, got {} ({err})", describe(value))),
        Value::Number(n) => n
            .as_u64()
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{expected}, got {n}")),
        other => Err(format!("{expected}, got {}", describe(other))),
    };
    match parsed {
        Ok(duration) if duration.is_zero() => {
            problems.add(
                path,
                "must be longer than zero; leave it out for no timeout",
            );
            None
        }
        Ok(duration) => Some(duration),
        Err(message) => {
            problems.add(path, message);
            None
        }
    }
}

/// The string key of a mapping entry, reporting any other kind of key.
fn key_name<'a>(key: &'a Value, path: &str, problems: &mut Problems) -> Option<&'a str> {
    let name = key.as_str();
    if name.is_none() {
        problems.add(
            path,
            format!("names must be strings, got {}", describe(key)),
        );
    }
    name
}

/// A mapping of names to any values (`global_metadata`, `config_template`).
fn json_map(value: &Value, path: &str, problems: &mut Problems) -> BTreeMap<String, JsonValue> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to values, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        if let Some(name) = key_name(key, path, problems) {
            out.insert(
                name.to_owned(),
                to_json(value, &child(path, name), problems),
            );
        }
    }
    out
}

/// A mapping of names to scalars, each turned into a string (`secrets`, `tags`). With `secret`,
/// messages never show a value.
fn scalar_map(
    value: &Value,
    path: &str,
    secret: bool,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to strings, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let Some(name) = key_name(key, path, problems) else {
            continue;
        };
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                let got = if secret {
                    kind_of(other).to_owned()
                } else {
                    describe(other)
                };
                problems.add(
                    &child(path, name),
                    format!("expected a string, number or boolean, got {got}"),
                );
                // A stand-in keeps the name for the later checks of names.
                String::new()
            }
        };
        out.insert(name.to_owned(), text);
    }
    out
}

/// `distributed_lists`: a mapping of names to lists of values.
fn list_map(
    value: &Value,
    path: &str,
    problems: &mut Problems,
) -> BTreeMap<String, Vec<JsonValue>> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to lists, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let Some(name) = key_name(key, path, problems) else {
            continue;
        };
        let path = child(path, name);
        let list = match value {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(index, value)| to_json(value, &item(&path, index), problems))
                .collect(),
            other => {
                problems.add(
                    &path,
                    format!("expected a list of items, got {}", describe(other)),
                );
                // A one-item stand-in, so that the list is not also reported as empty.
                vec![JsonValue::Null]
            }
        };
        out.insert(name.to_owned(), list);
    }
    out
}

/// Converts a YAML value into JSON, reporting what JSON cannot hold (tags, non-string keys,
/// NaN and infinities). Whole-numbered floats stay floats, as YAML wrote them.
fn to_json(value: &Value, path: &str, problems: &mut Problems) -> JsonValue {
    match value {
        Value::Null => JsonValue::Null,
        Value::Bool(b) => JsonValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JsonValue::from(i)
            } else if let Some(u) = n.as_u64() {
                JsonValue::from(u)
            } else {
                let float = n.as_f64().and_then(serde_json::Number::from_f64);
                match float {
                    Some(float) => JsonValue::Number(float),
                    None => {
                        problems.add(path, format!("expected a finite number, got {n}"));
                        JsonValue::Null
                    }
                }
            }
        }
        Value::String(s) => JsonValue::String(s.clone()),
        Value::Sequence(items) => JsonValue::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, value)| to_json(value, &item(path, index), problems))
                .collect(),
        ),
        Value::Mapping(map) => {
            let mut object = serde_json::Map::new();
            for (key, value) in map {
                match key.as_str() {
                    Some(name) => {
                        object.insert(
                            name.to_owned(),
                            to_json(value, &child(path, name), problems),
                        );
                    }
                    None => problems.add(
                        path,
                        format!("mapping keys must be strings, got {}", describe(key)),
                    ),
                }
            }
            JsonValue::Object(object)
        }
        Value::Tagged(tagged) => {
            problems.add(
                path,
                format!(
                    "YAML tags like {} are not supported; remove the tag",
                    tagged.tag
                ),
            );
            JsonValue::Null
        }
    }
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

#[cfg(test)]
mod tests;
