//! Where nodes run: the [`Provider`] trait and its implementations.
//!
//! A provider only creates and destroys instances; everything else (registration, assets, logs,
//! status) happens between the node's agent and the engine over the node API. So a provider is
//! small, and a node behaves the same on every provider.

#[cfg(feature = "aws")]
pub(crate) mod aws;
pub(crate) mod local;
pub(crate) mod pool;
pub(crate) mod slurm;

use std::fmt;

use async_trait::async_trait;

use crate::error::{BoxError, Error};
use crate::secret::Secret;

#[cfg(feature = "aws")]
pub use aws::AwsProvider;
pub use local::LocalProvider;
pub use pool::{PoolConfig, PoolStats, PooledProvider};
pub use slurm::SlurmProvider;

/// Names one instance so that its provider can reach it again from any process: the id the
/// provider gave it, and a `locator` saying where it lives (EC2: region and endpoint; an SSH
/// host: `user@host:port` and key). The engine stores both on the node's row and hands them
/// back to [`Provider::terminate`], so a provider needs no memory of its own to terminate an
/// instance after a restart. The locator means nothing to the engine; nodes recorded by
/// taskfly 0.1 have an empty one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceRef {
    /// The provider's id (`i-0abc…` on EC2, `local-…` for processes).
    pub id: String,
    /// Where the instance lives, in the provider's own format.
    pub locator: String,
}

/// An instance a provider has just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// How to find it again.
    pub reference: InstanceRef,
    /// Its address, when known.
    pub ip_address: Option<String>,
}

/// What kind of instance a deployment asks for (see [`Provider::instance_kind`]): instances of
/// one kind are interchangeable, so a pool ([`PooledProvider`]) hands a node an idle instance
/// of its kind instead of starting one. The pool's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKind(String);

impl InstanceKind {
    /// A kind named by `description`, which must cover every setting that shapes an instance.
    pub fn new(description: impl Into<String>) -> InstanceKind {
        InstanceKind(description.into())
    }

    /// The description it was made from.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who an instance is started for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Owner {
    /// One attempt of one node of a deployment.
    Node {
        /// The deployment the node belongs to.
        deployment_id: String,
        /// The node's id.
        node_id: String,
        /// The node's index.
        node_index: u32,
        /// The attempt (1 unless retried), so instance names stay unique across retries.
        attempt: u32,
    },
    /// A slot of a [`PooledProvider`]: the instance serves one node after another, of any
    /// deployment.
    Pool {
        /// The slot's name, unique across engine restarts (`pool-…`).
        slot: String,
    },
}

impl Owner {
    /// A short unique name for the instance's owner: the node id, or the pool slot.
    pub fn name(&self) -> &str {
        match self {
            Owner::Node { node_id, .. } => node_id,
            Owner::Pool { slot } => slot,
        }
    }

    /// The attempt of the node (1 for a pool slot).
    pub fn attempt(&self) -> u32 {
        match self {
            Owner::Node { attempt, .. } => *attempt,
            Owner::Pool { .. } => 1,
        }
    }
}

/// The section `instance_config.<name>` of a deployment's `taskfly.yml`, for the provider
/// named `name`, unparsed: the only part of the deployment a provider sees (never the
/// secrets, never the other providers' sections). `Null` when the section is absent.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    name: String,
    section: serde_yaml::Value,
}

impl ProviderSettings {
    /// The section `section` of provider `name`.
    pub fn new(name: impl Into<String>, section: serde_yaml::Value) -> ProviderSettings {
        ProviderSettings {
            name: name.into(),
            section,
        }
    }

    /// The provider's name (`cloud_provider`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The section as written (`Null` when absent).
    pub fn section(&self) -> &serde_yaml::Value {
        &self.section
    }

    /// Where the section is in `taskfly.yml` (`instance_config.<name>`), for messages.
    pub fn path(&self) -> String {
        format!("instance_config.{}", self.name)
    }

    /// The section read into `T` with serde; an error names the section and what is wrong
    /// ([`crate::Error::is_invalid_config`]).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_yaml::from_value(self.section.clone()).map_err(|e| {
            Error::invalid_config(
                "taskfly.yml is invalid (1 problem)",
                vec![format!("{}: {e}", self.path())],
            )
        })
    }
}

/// Everything a provider needs to start one instance. Built by the engine.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstanceSpec {
    /// Who the instance is for: a node, or a pool slot.
    pub owner: Owner,
    /// Its kind, as [`Provider::instance_kind`] said for [`InstanceSpec::settings`].
    pub kind: InstanceKind,
    /// The URL the instance's agent calls back on (the engine's node API).
    pub daemon_url: String,
    /// For an `https://` daemon URL, the PEM certificates the node's agent must trust for it
    /// (those the engine serves, see `ServerConfig::tls`; not secret). A provider hands them
    /// to the node: the local provider as a CA file for its agents, the shell bootstrap
    /// ([`crate::agent::bootstrap::bootstrap_script`]) embedded for curl's `--cacert`. `None`:
    /// plain http, or the platform's trust store is enough.
    pub ca_pem: Option<String>,
    /// Single-use token the agent registers with.
    pub provision_token: Secret,
    /// The provider's own section of `taskfly.yml`.
    pub settings: ProviderSettings,
}

impl InstanceSpec {
    /// A spec for plain http (no [`InstanceSpec::ca_pem`]). The engine builds every spec it
    /// hands a provider; this is for testing a provider on its own.
    pub fn new(
        owner: Owner,
        kind: InstanceKind,
        daemon_url: impl Into<String>,
        provision_token: Secret,
        settings: ProviderSettings,
    ) -> InstanceSpec {
        InstanceSpec {
            owner,
            kind,
            daemon_url: daemon_url.into(),
            ca_pem: None,
            provision_token,
            settings,
        }
    }
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
/// Implement it to run nodes somewhere new, and register it with [`crate::Config::provider`]:
/// deployments whose `cloud_provider` is its [`Provider::name`] run on it, and it is handed
/// their `instance_config.<name>` section ([`ProviderSettings`]). Implementing it needs no
/// direct dependency on `async-trait`: use [`crate::async_trait`].
///
/// Cancellation: the engine awaits every call to completion, except at engine shutdown, where a
/// pending `provision` future may be dropped. An implementation must therefore not leave an
/// instance behind that it has not reported: create it in one step (as EC2's RunInstances
/// does), or clean up in a drop guard. `terminate` futures are never dropped by the engine.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The `cloud_provider` name this provider serves (`local`, `aws`, …).
    fn name(&self) -> &str;

    /// What kind of instance `settings` ask for, for `owner`: instances of one kind are
    /// interchangeable, so a [`PooledProvider`] may give a node an idle instance of its kind
    /// instead of starting one. It must cover every setting that shapes an instance (EC2:
    /// region, AMI, type, network, profile, spot, tags; an SSH node: the host its index picks).
    /// Called for every instance and once when a deployment is accepted, so an error here
    /// (settings this provider cannot use, named by their path in `taskfly.yml`) refuses the
    /// deployment. The default, the provider's name, suits providers whose instances are all
    /// alike.
    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        let _ = (settings, owner);
        Ok(InstanceKind::new(self.name()))
    }

    /// Start one instance: its agent registers at `spec.daemon_url` with
    /// `spec.provision_token`. Returns once the instance exists, not once it has booted.
    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError>;

    /// Destroy the instance and everything running on it. Idempotent: terminating an instance
    /// that is already gone succeeds. Returns once the instance is shutting down or gone.
    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError>;

    /// Every instance this provider runs for TaskFly, with whom it was started for (EC2:
    /// instances tagged `taskfly:deployment-id`). The engine terminates those whose deployment
    /// is unknown or final, at start and periodically, so nothing leaks. Providers that cannot
    /// list their instances keep the default: none.
    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        Ok(Vec::new())
    }

    /// Whether this provider gathers the `provision` calls of one deployment into one request
    /// (Slurm: one job array), so it wants them all at once. The engine then makes a
    /// deployment's calls without waiting for [`crate::Config::provision_concurrency`]'s
    /// slots (they would let only that many arrive together). The default: no.
    fn gathers_provisions(&self) -> bool {
        false
    }

    /// Why the node `node_id` still waits for its instance, in the provider's words (Slurm's
    /// queue reason: `Priority`, `Resources`), while a `provision` call for it waits in a queue;
    /// `None` otherwise. Shown as the node's `queue_reason` while it is `provisioning`. Called
    /// for every such node a view shows, so it must answer from memory. The default: `None`.
    fn queue_reason(&self, node_id: &str) -> Option<String> {
        let _ = node_id;
        None
    }

    /// Stop everything this provider still runs; called once when the engine shuts down.
    /// Cloud providers leave instances alone here (a restarted daemon carries on with them).
    async fn shutdown(&self) {}
}

/// Whom an instance found by [`Provider::owned_instances`] was started for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedBy {
    /// A node of a deployment.
    Deployment {
        /// The deployment.
        deployment_id: String,
        /// The node, when the provider knows (EC2: the `taskfly:node-id` tag). Lets the leak
        /// checks find an instance of a live deployment that its node no longer uses (its node
        /// was provisioned again after a crash, or has ended).
        node_id: Option<String>,
    },
    /// A pool slot ([`Owner::Pool`]): it belongs to no deployment.
    Pool,
}

/// An instance found by [`Provider::owned_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedInstance {
    /// How to terminate it.
    pub instance: InstanceRef,
    /// Whom it was started for.
    pub owner: OwnedBy,
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

/// A provider as the engine holds it under its name: plain, or behind a pool.
#[derive(Clone)]
pub(crate) enum Registered {
    /// Every node gets a new instance, terminated when the node is done with it.
    Plain(std::sync::Arc<dyn Provider>),
    /// Instances are kept for later nodes.
    Pooled(std::sync::Arc<PooledProvider>),
}

impl Registered {
    /// The provider that makes the instances.
    pub(crate) fn provider(&self) -> &dyn Provider {
        match self {
            Registered::Plain(provider) => &**provider,
            Registered::Pooled(pool) => &**pool.inner(),
        }
    }

    /// The pool, if instances are pooled.
    pub(crate) fn pool(&self) -> Option<&PooledProvider> {
        match self {
            Registered::Plain(_) => None,
            Registered::Pooled(pool) => Some(pool),
        }
    }

    /// A new instance for `spec` (a pooled one may be an idle instance of its kind).
    pub(crate) async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        match self {
            Registered::Plain(provider) => provider.provision(spec).await,
            Registered::Pooled(pool) => pool.provision(spec).await,
        }
    }

    /// The node `node_id` is done with `instance`: terminated, or back in its pool once its
    /// agent is. Returns once the node no longer runs there.
    pub(crate) async fn release(
        &self,
        instance: &InstanceRef,
        node_id: &str,
    ) -> Result<(), BoxError> {
        match self {
            Registered::Plain(provider) => provider.terminate(instance).await,
            Registered::Pooled(pool) => pool.release(instance, node_id).await,
        }
    }

    /// Terminate `instance` for good, whatever it is doing.
    pub(crate) async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        match self {
            Registered::Plain(provider) => provider.terminate(instance).await,
            Registered::Pooled(pool) => pool.terminate(instance).await,
        }
    }

    /// The instances the leak checks may judge (a pool hides those it holds).
    pub(crate) async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        match self {
            Registered::Plain(provider) => provider.owned_instances().await,
            Registered::Pooled(pool) => pool.owned_instances().await,
        }
    }

    /// Stop what the provider (and its pool) runs locally.
    pub(crate) async fn shutdown(&self) {
        match self {
            Registered::Plain(provider) => provider.shutdown().await,
            Registered::Pooled(pool) => pool.shutdown().await,
        }
    }
}

/// Letters, digits, `-`, `_` and `.`, not starting with `.` or `-`: safe as a file name, in a
/// Slurm job's comment and as a word on any shell's command line (ids providers put there).
pub(crate) fn is_plain_word(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with(['.', '-'])
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
