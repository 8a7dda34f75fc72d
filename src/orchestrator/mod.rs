//! The engine: accepts deployments, provisions their nodes through a [`Provider`], answers the
//! node protocol, watches every node to a final state, and tears everything down.
//!
//! Tasks: every background task (provisioning, retries, instance termination, the heartbeat
//! monitor) is spawned on one [`TaskTracker`] and stops when one [`CancellationToken`] fires;
//! [`Orchestrator::shutdown`] fires it and waits for them all.

mod check;
mod config;
mod deploy;
pub(crate) mod events;
mod lifecycle;
mod live;
mod monitor;
mod nodes;
mod notify;
mod outputs;
mod provision;
mod queries;
mod recovery;
mod rerun;
mod terminate;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, OutputLimits};
pub(crate) use live::Live;
pub(crate) use nodes::NodeAssets;
pub use outputs::OutputsReader;
pub use queries::DeploymentWatch;
pub use rerun::RerunNodes;

use crate::config::{DeploymentConfig, CONFIG_FILE_NAME};
use crate::error::{Error, Result};
use crate::metadata::MetadataGenerator;
use crate::provider::Registered;
use crate::state::memory::shrink_if_sparse;
use crate::state::model::Deployment;
use crate::state::Store;
use crate::sync::lock;

/// Tries of one provider terminate call before it is left for the next minute's round.
const TERMINATE_ATTEMPTS: u32 = 3;

/// How often final deployments are checked against the retention period.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);

/// Name of the worker bundle inside a deployment's folder.
const WORKER_BUNDLE: &str = "worker.tar.gz";

/// The TaskFly engine. Cheap to clone: clones share one engine.
///
/// It does not speak HTTP itself: [`crate::Server`] serves its API and node protocol.
///
/// ```no_run
/// # async fn demo() -> taskfly::Result<()> {
/// use taskfly::{Config, Orchestrator, Server, ServerConfig};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let engine = Orchestrator::new(Config::new("/tmp/taskfly"))?;
/// let server = Server::new(engine.clone(), ServerConfig::default())?.spawn(listener)?;
/// let created = engine.deploy_dir("examples/hello".as_ref()).await?;
/// let done = engine.wait(&created.id).await?;
/// println!("{}: {}", done.id, done.status);
/// server.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn Store>,
    providers: HashMap<String, Registered>,
    /// Deployments created by this engine while its recovery runs, which recovery must leave
    /// alone (they are not left over from before the start); `None` once recovery is done.
    pub(crate) created_during_recovery: Mutex<Option<HashSet<String>>>,
    /// Deployments this process has loaded: their parsed config and metadata. Final ones
    /// are dropped ([`Orchestrator::forget_final`]) and read again on demand.
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// When each registered node was last heard from (heartbeats cost no store write), by
    /// deployment and node index.
    pub(crate) last_seen:
        Mutex<HashMap<nodes::SeenKey, tokio::time::Instant, crate::auth::DrawnKeys>>,
    /// Log lines stored per node attempt, for the per-node volume limit.
    pub(crate) log_counts: Mutex<HashMap<(String, u32), nodes::LogVolume>>,
    /// Nodes in `booting`, by the time their agent must register by (the boot timeout).
    pub(crate) boot_deadlines: Mutex<monitor::BootDeadlines>,
    /// Bumped whenever a deployment changes state (or its node counters), to wake
    /// [`DeploymentWatch`]es.
    changes: watch::Sender<u64>,
    /// Every deployment and node state change, for event subscribers ([`events`]).
    pub(crate) events: Arc<events::EventHub>,
    provision_slots: Arc<Semaphore>,
    advertise_url: Mutex<Option<String>>,
    /// The certificates nodes are to trust ([`Config::node_ca_pem`], or the server's own).
    node_ca_pem: Mutex<Option<String>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    started: Instant,
    /// What each node's script used, by deployment and node index (heartbeats; SPEC §4.2).
    /// Forgotten when the deployment is cleaned up.
    pub(crate) resources: Mutex<HashMap<String, HashMap<u32, crate::state::model::NodeResources>>>,
    /// Sends the webhook notifications of deployments that ended (`notify:`).
    pub(crate) notifier: Arc<crate::notify::Notifier>,
    /// Counters and histograms for `GET /metrics`, moved by the engine and the API.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl Orchestrator {
    /// A new engine. Must be called inside a tokio runtime: it starts the heartbeat monitor.
    pub fn new(mut config: Config) -> Result<Orchestrator> {
        std::fs::create_dir_all(config.data_dir.join("deployments")).map_err(|e| {
            Error::io(
                format!(
                    "cannot create the data directory {}; pick a writable one",
                    config.data_dir.display()
                ),
                e,
            )
        })?;
        let store = config.take_store();
        let providers = config.take_providers()?;
        let advertise_url = config.advertise_url.clone();
        let node_ca_pem = config.node_ca_pem.clone();
        let (changes, _) = watch::channel(0);
        let notifier = Arc::new(crate::notify::Notifier::new(
            Arc::clone(&store),
            config.webhook_retry_backoff,
        ));
        let inner = Arc::new(Inner {
            provision_slots: Arc::new(Semaphore::new(config.provision_concurrency)),
            config,
            store,
            providers,
            live: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::default()),
            log_counts: Mutex::new(HashMap::new()),
            boot_deadlines: Mutex::new(monitor::BootDeadlines::default()),
            changes,
            events: Arc::new(events::EventHub::new()),
            advertise_url: Mutex::new(advertise_url),
            node_ca_pem: Mutex::new(node_ca_pem),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            started: Instant::now(),
            resources: Mutex::new(HashMap::new()),
            created_during_recovery: Mutex::new(Some(HashSet::new())),
            notifier,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        });
        let orchestrator = Orchestrator { inner };
        orchestrator.spawn_monitor();
        let (notifier, cancel) = (
            Arc::clone(&orchestrator.inner.notifier),
            orchestrator.inner.cancel.clone(),
        );
        orchestrator.spawn_tracked(async move { notifier.run(cancel).await });
        for (_, provider) in orchestrator.providers() {
            if let Registered::Pooled(pool) = provider {
                let cancel = orchestrator.inner.cancel.clone();
                orchestrator.spawn_tracked(async move { pool.maintain(cancel).await });
            }
        }
        let resuming = orchestrator.clone();
        orchestrator.spawn_tracked(async move {
            if let Err(e) = resuming.recover().await {
                tracing::error!(error = %e.report(), "cannot resume deployments after a restart");
            }
            resuming.reconcile_orphans().await;
        });
        Ok(orchestrator)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn limits(&self) -> &Config {
        &self.inner.config
    }

    /// Run `task` on the engine's tracker, so shutdown waits for it.
    pub(crate) fn spawn_tracked(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.inner.tasks.spawn(task);
    }

    /// Where nodes call back and what they trust, once a server knows it: `url` becomes the
    /// advertise URL unless [`Config::advertise_url`] set one, and `ca_pem` the certificates
    /// nodes trust unless [`Config::node_ca_pem`] set them. Returns the advertise URL.
    pub(crate) fn served_at(&self, url: String, ca_pem: Option<&str>) -> String {
        let advertise = lock(&self.inner.advertise_url).get_or_insert(url).clone();
        if let Some(pem) = ca_pem {
            lock(&self.inner.node_ca_pem).get_or_insert_with(|| pem.to_owned());
        }
        advertise
    }

    /// The advertise URL set in [`Config::advertise_url`], if any.
    #[cfg(feature = "tls")]
    pub(crate) fn configured_advertise_url(&self) -> Option<String> {
        lock(&self.inner.advertise_url).clone()
    }

    /// The loaded settings of a deployment, reading its `taskfly.yml` again if this process
    /// has not loaded it yet (after a restart).
    pub(crate) async fn live(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.clone());
        }
        let live = self.read_live(id).await?;
        let mut map = lock(&self.inner.live);
        Ok(map.entry(id.to_owned()).or_insert(live).clone())
    }

    /// The deployment's settings as [`Self::live`] has them, without keeping them loaded when
    /// they were not: for a look at a final deployment that must not undo [`Self::forget_final`].
    pub(crate) async fn peek_live(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.clone());
        }
        self.read_live(id).await
    }

    /// The deployment's settings, read from its files.
    async fn read_live(&self, id: &str) -> Result<Arc<Live>> {
        let dir = self.deployment_dir(id);
        let yaml = tokio::fs::read_to_string(dir.join(CONFIG_FILE_NAME))
            .await
            .map_err(|_| {
                Error::not_found(format!("no files for deployment `{id}` (cleaned up?)"))
            })?;
        let config = DeploymentConfig::from_yaml(&yaml)?;
        let metadata = MetadataGenerator::new(&config.nodes)?;
        Ok(Arc::new(Live::new(config, metadata)))
    }

    /// Drop the loaded settings of a final deployment (they are read again if asked for), so
    /// a finished deployment costs no memory; kept while releases of its instances are under
    /// way, which cleanup waits for.
    pub(crate) fn forget_final(&self, id: &str) {
        let mut map = lock(&self.inner.live);
        if map.get(id).is_some_and(|live| live.releases.is_empty()) {
            map.remove(id);
            shrink_if_sparse(&mut map);
            drop(map);
            // What a large deployment's nodes left in the per-node maps goes back too.
            shrink_if_sparse(&mut lock(&self.inner.last_seen));
            shrink_if_sparse(&mut lock(&self.inner.log_counts));
        }
    }

    /// [`Self::forget_final`] if the deployment is final.
    pub(crate) async fn forget_if_final(&self, id: &str) {
        if let Ok(Some(deployment)) = self.inner.store.deployment(id).await {
            if deployment.status.is_final() {
                self.forget_final(id);
            }
        }
    }

    /// Whether the engine is stopping ([`Self::shutdown`]).
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    pub(crate) fn deployment_dir(&self, id: &str) -> PathBuf {
        self.inner.config.data_dir.join("deployments").join(id)
    }

    pub(crate) fn worker_bundle_path(&self, id: &str) -> PathBuf {
        self.deployment_dir(id).join(WORKER_BUNDLE)
    }

    /// The certificates nodes are to trust, when they are told an `https://` URL.
    fn node_ca_pem(&self) -> Option<String> {
        if !self.advertise_url().starts_with("https://") {
            return None;
        }
        lock(&self.inner.node_ca_pem).clone()
    }

    pub(crate) fn advertise_url(&self) -> String {
        lock(&self.inner.advertise_url)
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned())
    }

    fn notify(&self) {
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Tell event subscribers a deployment was accepted or changed state.
    fn publish_deployment(&self, deployment: Deployment) {
        self.inner
            .events
            .publish(events::Change::Deployment(deployment));
    }

    /// Follow the engine's changes after event `after` (`None`: from now on), of one
    /// deployment or all; the subscription ends when `stop` fires or the engine shuts down.
    pub(crate) fn subscribe_events(
        &self,
        after: Option<u64>,
        deployment: Option<String>,
        stop: &CancellationToken,
    ) -> events::Subscription {
        self.inner
            .events
            .subscribe(after, deployment, [stop.clone(), self.inner.cancel.clone()])
    }

    /// Stop the engine: background tasks stop, providers stop what they run locally (local
    /// processes are killed; cloud instances are left to a restarted engine), and this returns
    /// once everything has ended.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        for provider in self.inner.providers.values() {
            provider.shutdown().await;
        }
    }
}

fn create_private_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))
}

#[cfg(test)]
mod tests;
