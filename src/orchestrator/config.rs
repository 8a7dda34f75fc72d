//! [`Config`]: how the engine is set up, builder-lite.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::bundle::BundleLimits;
use crate::provider::{LocalProvider, PoolConfig, PooledProvider, Provider, Registered};
use crate::state::{MemoryStore, Store};

/// The engine's settings. Start from [`Config::new`] and chain the setters:
///
/// ```
/// use std::time::Duration;
/// let config = taskfly::Config::new("/tmp/taskfly-data")
///     .advertise_url("http://127.0.0.1:8080")
///     .heartbeat_timeout(Duration::from_secs(60));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    pub(crate) data_dir: PathBuf,
    pub(crate) advertise_url: Option<String>,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) boot_timeout: Duration,
    pub(crate) provision_concurrency: usize,
    pub(crate) retry_backoff: Duration,
    pub(crate) webhook_retry_backoff: Duration,
    pub(crate) provision_attempts: u32,
    pub(crate) provision_backoff: Duration,
    pub(crate) retention: Option<Duration>,
    pub(crate) bundle_limits: BundleLimits,
    pub(crate) max_bundle_upload: u64,
    pub(crate) max_config_bytes: usize,
    pub(crate) max_nodes: u32,
    pub(crate) max_log_lines_per_node: u64,
    pub(crate) max_log_line_bytes: usize,
    /// The certificates nodes are to trust when they call back over https.
    pub(crate) node_ca_pem: Option<String>,
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) providers: HashMap<String, Registered>,
    pub(crate) pools: HashMap<String, PoolConfig>,
    /// Limits on the outputs nodes upload (SPEC §4.2, outputs).
    pub(crate) output_limits: OutputLimits,
}

/// Limits on the outputs nodes send back ([`Config::output_limits`]). An upload over one is
/// refused with a too-large error (413) once the limit is reached; what arrived before is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Bytes of file data per node (default 256 MiB).
    pub max_node_bytes: u64,
    /// Entries (files, folders, links) per node (default 10,000).
    pub max_node_files: u64,
    /// Bytes of file data of all the nodes of a deployment together (default 4 GiB).
    pub max_deployment_bytes: u64,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            max_node_bytes: 256 << 20,
            max_node_files: 10_000,
            max_deployment_bytes: 4 << 30,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Config");
        d.field("data_dir", &self.data_dir)
            .field("advertise_url", &self.advertise_url)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("heartbeat_interval", &self.effective_heartbeat_interval())
            .field("boot_timeout", &self.boot_timeout)
            .field("provision_concurrency", &self.provision_concurrency)
            .field("node_ca_pem", &self.node_ca_pem.is_some())
            .field("providers", &self.providers.keys().collect::<Vec<_>>());
        d.finish_non_exhaustive()
    }
}

impl Config {
    /// Settings with every default, keeping bundles and node work directories in `data_dir`.
    pub fn new(data_dir: impl AsRef<Path>) -> Config {
        Config {
            data_dir: data_dir.as_ref().to_path_buf(),
            advertise_url: None,
            heartbeat_timeout: Duration::from_secs(30),
            heartbeat_interval: None,
            boot_timeout: Duration::from_secs(600),
            provision_concurrency: 32,
            retry_backoff: Duration::from_secs(1),
            webhook_retry_backoff: Duration::from_secs(5),
            provision_attempts: 5,
            provision_backoff: Duration::from_millis(500),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            bundle_limits: BundleLimits::default(),
            max_bundle_upload: 512 * 1024 * 1024,
            max_config_bytes: 1024 * 1024,
            max_nodes: 100_000,
            max_log_lines_per_node: 1_000_000,
            max_log_line_bytes: 64 * 1024,
            node_ca_pem: None,
            store: None,
            providers: HashMap::new(),
            pools: HashMap::new(),
            output_limits: OutputLimits::default(),
        }
    }

    /// The URL nodes call back on. Without it, [`crate::Server`] uses
    /// `http://<the listener's address>` (`https://` with TLS) once it starts serving, which
    /// only suits nodes on the same machine.
    #[must_use]
    pub fn advertise_url(mut self, url: impl Into<String>) -> Config {
        self.advertise_url = Some(url.into().trim_end_matches('/').to_owned());
        self
    }

    /// The PEM certificates nodes are to trust when the advertise URL is `https://`
    /// ([`crate::InstanceSpec::ca_pem`]). [`crate::Server`] sets them to its own certificate
    /// chain when it serves TLS (`ServerConfig::tls`, feature `tls`); set them yourself when TLS
    /// ends in front of the engine (a proxy) with a certificate nodes would not otherwise
    /// trust.
    #[must_use]
    pub fn node_ca_pem(mut self, pem: impl Into<String>) -> Config {
        self.node_ca_pem = Some(pem.into());
        self
    }

    /// A node silent for longer than this is failed with "heartbeat timeout" (default 30 s).
    #[must_use]
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Config {
        self.heartbeat_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// How often agents send heartbeats, in whole seconds (default a third of the heartbeat
    /// timeout, at least 1 s).
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Config {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// A provisioned node whose agent has not registered within this long is failed
    /// (default 10 minutes: cloud instances take a while to boot).
    #[must_use]
    pub fn boot_timeout(mut self, timeout: Duration) -> Config {
        self.boot_timeout = timeout;
        self
    }

    /// At most this many provider calls to create instances at once (default 32), so a large
    /// deployment does not trip a cloud API's rate limits.
    #[must_use]
    pub fn provision_concurrency(mut self, limit: usize) -> Config {
        self.provision_concurrency = limit.max(1);
        self
    }

    /// The first wait before a failed node is retried; doubled per attempt, at most 60 s
    /// (default 1 s).
    #[must_use]
    pub fn retry_backoff(mut self, backoff: Duration) -> Config {
        self.retry_backoff = backoff;
        self
    }

    /// The first wait before a failed webhook notification (`notify:`) is tried again;
    /// doubled per try, at most 5 minutes, for up to an hour (default 5 s).
    #[must_use]
    pub fn webhook_retry_backoff(mut self, backoff: Duration) -> Config {
        self.webhook_retry_backoff = backoff;
        self
    }

    /// How many times a provider call creating an instance is tried when the provider says
    /// the failure is retryable (a [`crate::ProviderError`] with `retryable`), and the first
    /// wait between tries (doubled each time, with jitter, at most 30 s). Defaults: 5 tries,
    /// 500 ms.
    #[must_use]
    pub fn provision_retries(mut self, attempts: u32, first_backoff: Duration) -> Config {
        self.provision_attempts = attempts.max(1);
        self.provision_backoff = first_backoff;
        self
    }

    /// Finished deployments are forgotten (files, nodes and logs) this long after they ended
    /// (default 7 days); `None` keeps them until cleaned up.
    #[must_use]
    pub fn retention(mut self, retention: Option<Duration>) -> Config {
        self.retention = retention;
        self
    }

    /// Caps on a bundle's decompressed size and entry count.
    #[must_use]
    pub fn bundle_limits(mut self, limits: BundleLimits) -> Config {
        self.bundle_limits = limits;
        self
    }

    /// Largest accepted client bundle upload, compressed (default 512 MiB).
    #[must_use]
    pub fn max_bundle_upload(mut self, bytes: u64) -> Config {
        self.max_bundle_upload = bytes;
        self
    }

    /// Largest accepted `taskfly.yml`, in bytes (default 1 MiB).
    #[must_use]
    pub fn max_config_bytes(mut self, bytes: usize) -> Config {
        self.max_config_bytes = bytes;
        self
    }

    /// Most nodes one deployment may ask for (default and ceiling 100,000).
    #[must_use]
    pub fn max_nodes(mut self, nodes: u32) -> Config {
        self.max_nodes = nodes.clamp(1, 100_000);
        self
    }

    /// Most log lines stored per node attempt (default 1,000,000); later lines are dropped and
    /// one line says so.
    #[must_use]
    pub fn max_log_lines_per_node(mut self, lines: u64) -> Config {
        self.max_log_lines_per_node = lines.max(1);
        self
    }

    /// Limits on the outputs nodes upload (defaults: 256 MiB and 10,000 entries per node,
    /// 4 GiB per deployment).
    #[must_use]
    pub fn output_limits(mut self, limits: OutputLimits) -> Config {
        self.output_limits = limits;
        self
    }

    /// Longest stored log line in bytes (default 64 KiB); longer lines are cut and marked.
    #[must_use]
    pub fn max_log_line_bytes(mut self, bytes: usize) -> Config {
        self.max_log_line_bytes = bytes.max(16);
        self
    }

    /// Where state is kept (default: a new [`MemoryStore`]).
    #[must_use]
    pub fn store(mut self, store: Arc<dyn Store>) -> Config {
        self.store = Some(store);
        self
    }

    /// Runs deployments whose `cloud_provider` is the provider's [`Provider::name`] on it,
    /// handing it their `instance_config.<name>` section. `local` is registered by default (a
    /// [`LocalProvider`] working in `<data_dir>/work`); a provider of the same name replaces
    /// it.
    #[must_use]
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Config {
        self.providers
            .insert(provider.name().to_owned(), Registered::Plain(provider));
        self
    }

    /// The interval agents are told (milliseconds on the wire): a third of the heartbeat
    /// timeout unless set, never more than half of it, at least 10 ms.
    pub(crate) fn effective_heartbeat_interval(&self) -> Duration {
        let interval = self
            .heartbeat_interval
            .unwrap_or(self.heartbeat_timeout / 3)
            .min(self.heartbeat_timeout / 2);
        interval.max(Duration::from_millis(10))
    }

    pub(crate) fn take_store(&mut self) -> Arc<dyn Store> {
        self.store
            .take()
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn Store>)
    }

    /// The registered providers by name, each behind its pool if it has one. Errors: pool
    /// settings that contradict each other, or a pool for no registered provider.
    pub(crate) fn take_providers(&mut self) -> crate::Result<HashMap<String, Registered>> {
        let mut providers = std::mem::take(&mut self.providers);
        providers.entry("local".to_owned()).or_insert_with(|| {
            Registered::Plain(Arc::new(LocalProvider::new(self.data_dir.join("work"))))
        });
        let mut pools = std::mem::take(&mut self.pools);
        if let Some(name) = pools.keys().find(|name| !providers.contains_key(*name)) {
            return Err(crate::Error::invalid_input(format!(
                "a pool is configured for `{name}`, but no provider of that name is registered"
            )));
        }
        providers
            .into_iter()
            .map(|(name, registered)| {
                let registered = match (pools.remove(&name), registered) {
                    (Some(pool), Registered::Plain(provider)) => {
                        Registered::Pooled(Arc::new(PooledProvider::new(provider, pool)?))
                    }
                    (Some(_), Registered::Pooled(_)) => {
                        return Err(crate::Error::invalid_input(format!(
                            "`{name}` is registered with a pool already; configure only one"
                        )))
                    }
                    (None, registered) => registered,
                };
                Ok((name, registered))
            })
            .collect()
    }

    /// Puts the provider named `name` behind a pool ([`PooledProvider`]): instances are kept
    /// between nodes, so a later node starts on one that is already up. The settings are
    /// checked once, by [`crate::Orchestrator::new`] ([`PoolConfig::validate`]).
    #[must_use]
    pub fn pool(mut self, name: impl Into<String>, pool: PoolConfig) -> Config {
        self.pools.insert(name.into(), pool);
        self
    }

    /// Registers a pool made by the caller ([`PooledProvider::new`]) under its provider's name,
    /// so the caller keeps a handle on it (its [`PooledProvider::stats`], say).
    #[must_use]
    pub fn pooled_provider(mut self, pool: Arc<PooledProvider>) -> Config {
        self.providers
            .insert(pool.name().to_owned(), Registered::Pooled(pool));
        self
    }
}
