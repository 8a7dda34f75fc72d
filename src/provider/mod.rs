//! Where nodes run: the [`Provider`] trait and its implementations.
//!
//! A provider only creates and destroys instances; everything else (registration, assets, logs,
//! status) happens between the node's agent and the engine over the node API. So a provider is
//! small, and a node behaves the same on every provider.

#[cfg(feature = "aws")]
pub(crate) mod aws;
pub(crate) mod local;
pub(crate) mod pool;
mod procfs;


use std::fmt;

use async_trait::async_trait;

use crate::config::DeploymentConfig;
use crate::error::BoxError;

#[cfg(feature = "aws")]
pub use aws::AwsProvider;
pub use local::LocalProvider;
pub use pool::{PoolConfig, PooledProvider, POOL_DEPLOYMENT_ID};

/// Everything a provider needs to start one node.
#[derive(Clone)]
pub struct InstanceConfig {
    /// The deployment the node belongs to.
    pub deployment_id: String,
    /// The node's id.
    pub node_id: String,
    /// The node's index.
    pub node_index: u32,
    /// The attempt (1 unless retried), so instance names stay unique across retries.
    pub attempt: u32,
    /// The URL the node's agent calls back on (the engine's node API).
    pub daemon_url: String,
    /// For an `https://` daemon URL, the PEM certificates the node's agent must trust for it
    /// (those the engine serves, see `Config::tls`; not secret). A provider hands them
    /// to the node: the local provider as a CA file for its agents, the shell bootstrap
    /// ([`crate::agent::bootstrap::bootstrap_script`]) embedded for curl's `--cacert`. `None`:
    /// plain http, or the platform's trust store is enough.
    pub ca_pem: Option<String>,
    /// Single-use token the agent registers with. A secret: never log it.
    pub provision_token: String,
    /// The deployment's validated `taskfly.yml`, for the provider's own settings
    /// (`instance_config.local` / `instance_config.aws`).
    pub deployment: std::sync::Arc<DeploymentConfig>,
}

impl fmt::Debug for InstanceConfig {
    /// Leaves out the provision token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceConfig")
            .field("deployment_id", &self.deployment_id)
            .field("node_id", &self.node_id)
            .field("node_index", &self.node_index)
            .field("attempt", &self.attempt)
            .field("daemon_url", &self.daemon_url)
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|_| "<PEM certificates>"),
            )
            .finish_non_exhaustive()
    }
}

/// What a provider knows about an instance it created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The provider's id (`i-0abc…` on EC2, `local-…` for processes).
    pub instance_id: String,
    /// Its address, when known.
    pub ip_address: Option<String>,
    /// Whether it is still there.
    pub state: InstanceState,
}

/// The coarse life of an instance, as far as leak prevention cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Being created or booting.
    Pending,
    /// Up.
    Running,
    /// Being torn down.
    ShuttingDown,
    /// Gone.
    Terminated,
}

/// Creates and destroys the machines (or processes) nodes run on.
///
/// Implement it to run nodes somewhere new; register it with
/// [`crate::Config::provider`] under the `cloud_provider` name it serves.
///
/// Cancellation: the engine awaits every call to completion, except at engine shutdown, where a
/// pending `provision` future may be dropped. An implementation must therefore not leave an
/// instance behind that it has not reported: create it in one step (as EC2's RunInstances
/// does), or clean up in a drop guard. `terminate` futures are never dropped by the engine.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Start one node: create an instance whose agent registers at `config.daemon_url` with
    /// `config.provision_token`. Returns once the instance exists, not once it has booted.
    async fn provision(&self, config: InstanceConfig) -> Result<InstanceInfo, BoxError>;

    /// Destroy the instance and everything running on it. Idempotent: terminating an instance
    /// that is already gone succeeds. Returns once the instance is shutting down or gone.
    async fn terminate(&self, instance_id: &str) -> Result<(), BoxError>;

    /// The node `node_id` is done with its instance: it ended, its deployment is being
    /// terminated, or it went silent. Returns once the node no longer runs there. By default
    /// the instance is terminated; a pool ([`PooledProvider`]) keeps it for another node once
    /// its agent is back. `terminate` futures' rule applies: never dropped by the engine.
    async fn release(&self, instance_id: &str, node_id: &str) -> Result<(), BoxError> {
        let _ = node_id;
        self.terminate(instance_id).await
    }

    /// What kind of instance `config` asks for: instances of one kind are interchangeable, so
    /// a [`PooledProvider`] may give a node an idle instance of its kind instead of starting
    /// one. It must cover every setting that shapes an instance (EC2: region, AMI, type,
    /// network, profile, spot, tags). The default, the provider's name, suits providers whose
    /// instances are all alike.
    fn instance_kind(&self, config: &InstanceConfig) -> String {
        config.deployment.cloud_provider.to_string()
    }

    /// The pool behind this provider, if it is a [`PooledProvider`]: the engine runs its
    /// upkeep, routes its agents' registrations to it and shows it in `GET /stats`.
    fn pool(&self) -> Option<&PooledProvider> {
        None
    }

    /// What the provider knows of the instance now; `None` if it does not know it at all.
    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, BoxError>;

    /// Every instance this provider runs for TaskFly, with the deployment it was started for
    /// (EC2: instances tagged `taskfly:deployment-id`). The engine terminates those whose
    /// deployment is unknown or final, at start and periodically, so nothing leaks. Providers
    /// that cannot list their instances keep the default: none.
    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        Ok(Vec::new())
    }

    /// Stop everything this provider still runs; called once when the engine shuts down.
    /// Cloud providers leave instances alone here (a restarted daemon carries on with them).
    async fn shutdown(&self) {}
}

/// An instance found by [`Provider::owned_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedInstance {
    /// The provider's instance id.
    pub instance_id: String,
    /// The deployment it was started for.
    pub deployment_id: String,
    /// The node it was started for, when the provider knows (EC2: the `taskfly:node-id` tag).
    /// Lets the leak checks find an instance of a live deployment that its node no longer
    /// uses (its node was provisioned again after a crash, or has ended).
    pub node_id: Option<String>,
    /// Its state.
    pub state: InstanceState,
}

/// A provider failure that says whether trying again may help. Providers return it (boxed)
/// from [`Provider::provision`]; the engine retries a retryable one with exponential backoff
/// and jitter up to [`crate::Config::provision_retries`] times, then fails the node with
/// `code` in its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// The provider's own error code (`RequestLimitExceeded`, `InsufficientInstanceCapacity`, ...).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Whether the same request may succeed later (throttling, capacity).
    pub retryable: bool,
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProviderError {}
