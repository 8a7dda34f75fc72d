//! The types of a validated `taskfly.yml`, as [`DeploymentConfig`](super::DeploymentConfig)'s
//! parsers build them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value as JsonValue;
use serde_yaml::Value;

/// The SSH port used when `instance_config.local.ssh_port` is not given.
const DEFAULT_SSH_PORT: u16 = 22;

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
    pub(super) provider_section: Value,
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
    /// `outputs`: files, globs and folders each node sends back once its script has ended,
    /// relative to its bundle folder and never outside it; empty when nodes send nothing.
    pub outputs: Vec<String>,
    /// `notify`: the webhook told when the deployment ends, if any.
    pub notify: Option<NotifyConfig>,
}

/// `notify`: a webhook the daemon POSTs to when a deployment reaches a final state it names.
#[derive(Clone, PartialEq)]
pub struct NotifyConfig {
    /// The `http://` or `https://` URL. Many services put a credential in it, so it is never
    /// logged nor shown.
    pub webhook: String,
    /// The final states that notify (`completed`, `failed`, `terminated`); all by default.
    pub on: Vec<crate::state::model::DeploymentStatus>,
    /// Signs each body (`X-TaskFly-Signature: sha256=<hex HMAC-SHA256>`); a secret.
    pub secret: Option<String>,
}

impl fmt::Debug for NotifyConfig {
    /// Shows neither the URL nor the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhook", &"***")
            .field("on", &self.on)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
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
