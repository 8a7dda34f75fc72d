//! The engine: accepts deployments, provisions their nodes through a [`Provider`], answers the
//! node protocol, watches every node to a final state, and tears everything down.
//!
//! Tasks: every background task (provisioning, retries, instance termination, the heartbeat
//! monitor) is spawned on one [`TaskTracker`] and stops when one [`CancellationToken`] fires;
//! [`Orchestrator::shutdown`] fires it and waits for them all.

mod config;
mod nodes;
mod recovery;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::auth;
use crate::bundle;
use crate::config::{DeploymentConfig, CONFIG_FILE_NAME};
use crate::error::{Error, Result};
use crate::metadata::MetadataGenerator;
use crate::provider::{Instance, InstanceRef, InstanceSpec, Owner, Registered};
use crate::state::model::{
    CleanupCounts, Deployment, DeploymentDetail, DeploymentStatus, DeploymentSummary, LogsPage,
    Node, NodeStatus, NodeUpdate, Stats,
};
use crate::state::{store_error, LogQuery, Store};

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
    /// Deployments this process has loaded: their parsed config and metadata.
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// When each registered node was last heard from (heartbeats cost no store write).
    pub(crate) last_seen: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Log lines stored per node attempt, for the per-node volume limit.
    pub(crate) log_counts: Mutex<HashMap<(String, u32), u64>>,
    /// Bumped whenever a deployment changes state (or its node counters), to wake
    /// [`DeploymentWatch`]es.
    changes: watch::Sender<u64>,
    provision_slots: Arc<Semaphore>,
    advertise_url: Mutex<Option<String>>,
    /// The certificates nodes are to trust ([`Config::node_ca_pem`], or the server's own).
    node_ca_pem: Mutex<Option<String>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    started: Instant,
}

/// A deployment's parsed settings, loaded once.
pub(crate) struct Live {
    pub(crate) config: Arc<DeploymentConfig>,
    pub(crate) metadata: MetadataGenerator,
    /// Secret values to mask in logs and messages.
    pub(crate) secrets: Vec<String>,
    /// Fires on a terminate request: stops provisioning and retries of this deployment.
    pub(crate) cancel: CancellationToken,
    /// The releases of its nodes' instances under way, so cleanup waits for them.
    pub(crate) releases: TaskTracker,
}

impl Live {
    /// `text` with every secret value replaced by `***`.
    ///
    /// Agents cut long lines into pieces and quote at most 500 characters of a failing line,
    /// so a secret may also arrive cut in two: a text that ends with the start of a secret, or
    /// starts with its end (at least [`MIN_PARTIAL_SECRET`] characters), has that part masked
    /// too.
    pub(crate) fn mask(&self, text: &str) -> String {
        mask_secrets(text, &self.secrets)
    }
}

/// Shortest piece of a cut secret that is masked at the edges of a text.
const MIN_PARTIAL_SECRET: usize = 4;

fn mask_secrets(text: &str, secrets: &[String]) -> String {
    let mut masked = text.to_owned();
    for secret in secrets {
        if masked.contains(secret.as_str()) {
            masked = masked.replace(secret.as_str(), "***");
        }
    }
    for secret in secrets {
        // The longest start of the secret that ends the text...
        let starts: Vec<usize> = secret.char_indices().map(|(i, _)| i).collect();
        let tail = starts
            .iter()
            .copied()
            .filter(|&i| i >= MIN_PARTIAL_SECRET)
            .rev()
            .find(|&i| masked.ends_with(&secret[..i]));
        if let Some(i) = tail {
            masked.truncate(masked.len() - i);
            masked.push_str("***");
        }
        // ...and the longest end of the secret that starts it.
        let head = starts
            .iter()
            .copied()
            .filter(|&i| i > 0 && secret.len() - i >= MIN_PARTIAL_SECRET)
            .find(|&i| masked.starts_with(&secret[i..]));
        if let Some(i) = head {
            masked = format!("***{}", &masked[secret.len() - i..]);
        }
    }
    masked
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
        let inner = Arc::new(Inner {
            provision_slots: Arc::new(Semaphore::new(config.provision_concurrency)),
            config,
            store,
            providers,
            live: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::new()),
            log_counts: Mutex::new(HashMap::new()),
            changes,
            advertise_url: Mutex::new(advertise_url),
            node_ca_pem: Mutex::new(node_ca_pem),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            started: Instant::now(),
        });
        let orchestrator = Orchestrator { inner };
        orchestrator.spawn_monitor();
        for (_, provider) in orchestrator.providers() {
            if let Registered::Pooled(pool) = provider {
                let cancel = orchestrator.inner.cancel.clone();
                orchestrator.spawn_tracked(async move { pool.maintain(cancel).await });
            }
        }
        let resuming = orchestrator.clone();
        orchestrator.spawn_tracked(async move {
            if let Err(e) = resuming.recover().await {
                tracing::error!(error = %e, "cannot resume deployments after a restart");
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
    pub(crate) fn configured_advertise_url(&self) -> Option<String> {
        lock(&self.inner.advertise_url).clone()
    }

    /// Bundle the project in `dir` (its `taskfly.yml` and `application_files`) and deploy it.
    pub async fn deploy_dir(&self, dir: &Path) -> Result<DeploymentSummary> {
        let config = DeploymentConfig::from_dir(dir)?;
        let uploads = self.inner.config.data_dir.join("uploads");
        tokio::fs::create_dir_all(&uploads)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", uploads.display()), e))?;
        let path = uploads.join(format!("{}.tar.gz", auth::new_id()?));
        let file = create_private_file(&path)?;
        let project = dir.to_path_buf();
        let patterns = config.application_files.clone();
        let written = tokio::task::spawn_blocking(move || {
            bundle::write_client_bundle(&project, &patterns, std::io::BufWriter::new(file))
        })
        .await
        .map_err(|e| Error::io("bundling failed", std::io::Error::other(e)))?;
        let result = match written {
            Ok(_) => match tokio::fs::File::open(&path).await {
                Ok(file) => self.deploy_bundle(file).await,
                Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
            },
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    /// Deploy a client bundle (a gzip tar holding `taskfly.yml` and the application files),
    /// read from `bundle`. Returns once the deployment is accepted; nodes are provisioned in
    /// the background.
    pub async fn deploy_bundle(
        &self,
        mut bundle: impl AsyncRead + Unpin + Send,
    ) -> Result<DeploymentSummary> {
        let id = format!("dep-{}", auth::new_id()?);
        let dir = self.deployment_dir(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let result = self.accept_bundle(&id, &dir, &mut bundle).await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }

    async fn accept_bundle(
        &self,
        id: &str,
        dir: &Path,
        bundle: &mut (impl AsyncRead + Unpin + Send),
    ) -> Result<DeploymentSummary> {
        // The client bundle holds taskfly.yml, secrets included: private file, deleted once
        // split into the worker bundle and the config.
        let client_path = dir.join("client.tar.gz");
        let limit = self.inner.config.max_bundle_upload;
        {
            let file = create_private_file(&client_path)?;
            let mut file = tokio::fs::File::from_std(file);
            let mut limited = tokio::io::AsyncReadExt::take(&mut *bundle, limit + 1);
            let copied = tokio::io::copy(&mut limited, &mut file)
                .await
                .map_err(|e| Error::io("cannot receive the bundle", e))?;
            if copied > limit {
                return Err(Error::too_large(format!(
                    "the bundle is larger than the {limit}-byte upload limit"
                )));
            }
            file.flush()
                .await
                .map_err(|e| Error::io("cannot store the bundle", e))?;
        }
        let worker_path = dir.join(WORKER_BUNDLE);
        let limits = self.inner.config.bundle_limits;
        let (client_for_split, worker_for_split) = (client_path.clone(), worker_path.clone());
        let (yaml, summary) = tokio::task::spawn_blocking(move || -> Result<_> {
            let client = std::fs::File::open(&client_for_split)
                .map_err(|e| Error::io("cannot read the stored bundle", e))?;
            let worker = std::fs::File::create(&worker_for_split)
                .map_err(|e| Error::io("cannot write the worker bundle", e))?;
            let mut worker = std::io::BufWriter::new(worker);
            let split =
                bundle::split_client_bundle(std::io::BufReader::new(client), &mut worker, &limits)?;
            std::io::Write::flush(&mut worker)
                .map_err(|e| Error::io("cannot write the worker bundle", e))?;
            Ok(split)
        })
        .await
        .map_err(|e| Error::io("bundle processing failed", std::io::Error::other(e)))??;
        let _ = tokio::fs::remove_file(&client_path).await;

        let max_config = self.inner.config.max_config_bytes;
        if yaml.len() > max_config {
            return Err(Error::too_large(format!(
                "taskfly.yml is {} bytes, more than this daemon's {max_config}-byte limit",
                yaml.len()
            )));
        }
        let config = DeploymentConfig::from_yaml(&yaml)?;
        let max_nodes = self.inner.config.max_nodes;
        if config.nodes.count > max_nodes {
            return Err(Error::invalid_config(
                "taskfly.yml is invalid (1 problem)",
                vec![format!(
                    "nodes.count: {} is more than this daemon allows ({max_nodes})",
                    config.nodes.count
                )],
            ));
        }
        if !summary
            .files
            .iter()
            .any(|f| f == &config.remote_script_to_run)
        {
            return Err(Error::invalid_config(
                "taskfly.yml is invalid (1 problem)",
                vec![format!(
                    "remote_script_to_run: `{}` is not in the bundle; add it to application_files",
                    config.remote_script_to_run
                )],
            ));
        }
        let provider_name = config.cloud_provider.as_str().to_owned();
        let Some(provider) = self.inner.providers.get(&provider_name) else {
            let mut registered: Vec<&str> =
                self.inner.providers.keys().map(String::as_str).collect();
            registered.sort_unstable();
            return Err(Error::invalid_config(
                "taskfly.yml is invalid (1 problem)",
                vec![format!(
                    "cloud_provider: `{provider_name}` is not available in this build of TaskFly{} \
                     (registered: {})",
                    if provider_name == "aws" {
                        " (build it with the `aws` feature)"
                    } else {
                        ""
                    },
                    registered.join(", ")
                )],
            ));
        };
        // The provider checks its own settings now, so a deployment it cannot run is refused.
        let first = Owner::Node {
            deployment_id: id.to_owned(),
            node_id: format!("{id}-0"),
            node_index: 0,
            attempt: 1,
        };
        if let Err(e) = provider
            .provider()
            .instance_kind(&config.provider_settings(), &first)
        {
            return Err(match e.downcast::<Error>() {
                Ok(e) if e.is_invalid_config() => *e,
                Ok(e) => Error::provider(format!("{provider_name} refused the deployment"), e),
                Err(e) => Error::provider(format!("{provider_name} refused the deployment"), e),
            });
        }
        let metadata = MetadataGenerator::new(&config.nodes)?;
        std::io::Write::write_all(
            &mut create_private_file(&dir.join(CONFIG_FILE_NAME))?,
            yaml.as_bytes(),
        )
        .map_err(|e| Error::io("cannot store taskfly.yml", e))?;

        let now = SystemTime::now();
        let total = config.nodes.count;
        let deployment = Deployment {
            id: id.to_owned(),
            status: DeploymentStatus::Pending,
            cloud_provider: provider_name.clone(),
            total_nodes: total,
            retries: config.nodes.retries,
            nodes_completed: 0,
            nodes_failed: 0,
            nodes_terminated: 0,
            created_at: now,
            updated_at: now,
            completed_at: None,
            error_message: None,
        };
        let nodes: Vec<Node> = (0..total).map(|i| Node::new(id, i, now)).collect();
        let created = DeploymentSummary::from(&deployment);
        self.inner
            .store
            .create_deployment(deployment, nodes)
            .await
            .map_err(store_error)?;
        let live = Arc::new(Live {
            secrets: secret_values(&config),
            config: Arc::new(config),
            metadata,
            cancel: self.inner.cancel.child_token(),
            releases: TaskTracker::new(),
        });
        lock(&self.inner.live).insert(id.to_owned(), live.clone());
        tracing::info!(deployment_id = %id, nodes = total, provider = %provider_name, files = summary.files.len(), "deployment accepted");

        let this = self.clone();
        let deployment_id = id.to_owned();
        self.inner.tasks.spawn(async move {
            if let Err(e) = this.provision_all(&deployment_id, live).await {
                tracing::error!(deployment_id = %deployment_id, error = %e, "provisioning stopped");
            }
        });
        Ok(created)
    }

    /// Provision every node of a new deployment, at most `provision_concurrency` at a time.
    pub(crate) async fn provision_all(&self, id: &str, live: Arc<Live>) -> Result<()> {
        let store = &self.inner.store;
        match store
            .update_deployment_status(id, DeploymentStatus::Provisioning, None, SystemTime::now())
            .await
        {
            Ok(_) => self.notify(),
            Err(e) => {
                let e = store_error(e);
                // Terminated before provisioning began: nothing to do.
                return if e.is_conflict() { Ok(()) } else { Err(e) };
            }
        }
        let nodes = store.nodes(id).await.map_err(store_error)?;
        let provisions = TaskTracker::new();
        for node in nodes {
            let permit = tokio::select! {
                permit = self.inner.provision_slots.clone().acquire_owned() => permit,
                () = live.cancel.cancelled() => break,
            };
            let Ok(permit) = permit else { break };
            let this = self.clone();
            let live = live.clone();
            provisions.spawn(async move {
                this.provision_node(&live, node).await;
                drop(permit);
            });
        }
        provisions.close();
        provisions.wait().await;
        Ok(())
    }

    /// Provision one node (first attempt or retry). Failures are recorded on the node.
    pub(crate) async fn provision_node(&self, live: &Live, node: Node) {
        if live.cancel.is_cancelled() {
            return;
        }
        let result = self.try_provision_node(live, &node).await;
        if let Err(e) = result {
            let message = live.mask(&format!("provisioning failed: {e}"));
            tracing::warn!(node_id = %node.id, error = %message, "node provisioning failed");
            self.node_failed(&node.id, message).await;
        }
    }

    async fn try_provision_node(&self, live: &Live, node: &Node) -> Result<()> {
        let store = &self.inner.store;
        let token = auth::new_token()?;
        let now = SystemTime::now();
        store
            .update_node(
                &node.id,
                NodeUpdate::ProvisionToken {
                    hash: auth::hash_token(&token),
                },
                now,
            )
            .await
            .map_err(store_error)?;
        if node.status == NodeStatus::Pending {
            self.update_node(
                &node.id,
                NodeUpdate::Status {
                    status: NodeStatus::Provisioning,
                    exit_code: None,
                    message: None,
                },
            )
            .await?;
        }
        let provider = self.provider_for(&live.config)?;
        let owner = Owner::Node {
            deployment_id: node.deployment_id.clone(),
            node_id: node.id.clone(),
            node_index: node.index,
            attempt: node.attempt,
        };
        let settings = live.config.provider_settings();
        let kind = provider
            .provider()
            .instance_kind(&settings, &owner)
            .map_err(|e| Error::provider("the provider refused the node's settings", e))?;
        let request = InstanceSpec {
            owner,
            kind,
            daemon_url: self.advertise_url(),
            ca_pem: self.node_ca_pem(),
            provision_token: token.into(),
            settings,
        };
        let info = self
            .provision_with_retries(&provider, request, live)
            .await?;
        let instance = info.reference.clone();
        tracing::info!(node_id = %node.id, instance_id = %instance.id, "node provisioned");
        let update = NodeUpdate::Provisioned {
            instance: instance.clone(),
            ip_address: info.ip_address.clone(),
        };
        if let Err(e) = self.update_node(&node.id, update).await {
            // The node was terminated (or failed) while its instance was being created:
            // make sure the new instance does not outlive it.
            tracing::info!(node_id = %node.id, instance_id = %instance.id, "instance no longer wanted; releasing it");
            self.release_instance(live, &instance, &node.id).await;
            if !e.is_conflict() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Ask the provider for an instance, trying again with exponential backoff and jitter
    /// while it says the failure is retryable, up to the configured number of attempts.
    async fn provision_with_retries(
        &self,
        provider: &Registered,
        request: InstanceSpec,
        live: &Live,
    ) -> Result<Instance> {
        let attempts = self.inner.config.provision_attempts;
        let mut backoff = self.inner.config.provision_backoff;
        let provider_name = live.config.cloud_provider.as_str();
        let mut attempt = 1;
        loop {
            match provider.provision(request.clone()).await {
                Ok(info) => return Ok(info),
                Err(e) => {
                    let retryable = e
                        .downcast_ref::<crate::provider::ProviderError>()
                        .is_some_and(|p| p.retryable);
                    if !retryable || attempt >= attempts {
                        let suffix = if attempt > 1 {
                            format!(" (after {attempt} attempts)")
                        } else {
                            String::new()
                        };
                        return Err(Error::provider(
                            format!("{provider_name} could not start the node{suffix}"),
                            e,
                        ));
                    }
                    let wait = jitter(backoff);
                    tracing::warn!(node_id = %request.owner.name(), attempt, error = %e, wait_ms = wait.as_millis() as u64, "provider call failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = live.cancel.cancelled() => {
                            return Err(Error::conflict("the deployment is being terminated"));
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
            }
        }
    }

    /// The pooled providers, by `cloud_provider` name, in name order.
    pub(crate) fn pools(&self) -> impl Iterator<Item = (&str, &crate::PooledProvider)> {
        let mut pools: Vec<_> = self
            .inner
            .providers
            .iter()
            .filter_map(|(name, provider)| Some((name.as_str(), provider.pool()?)))
            .collect();
        pools.sort_by_key(|(name, _)| *name);
        pools.into_iter()
    }

    pub(crate) fn providers(&self) -> Vec<(String, Registered)> {
        self.inner
            .providers
            .iter()
            .map(|(name, provider)| (name.clone(), provider.clone()))
            .collect()
    }

    /// Terminate instances that belong to no live deployment (see [`crate::Provider::owned_instances`]);
    /// the engine also does this at start and every minute. Returns how many it terminated.
    pub async fn terminate_orphans(&self) -> usize {
        self.reconcile_orphans().await
    }

    pub(crate) fn provider_for(&self, config: &DeploymentConfig) -> Result<Registered> {
        let name = config.cloud_provider.as_str();
        self.inner.providers.get(name).cloned().ok_or_else(|| {
            Error::invalid_config(format!("no provider `{name}` in this build"), Vec::new())
        })
    }

    /// Release a node's instance (terminated, or back in its pool), trying a few times with
    /// backoff; returns whether the provider confirmed the node no longer runs there.
    async fn release_instance(&self, live: &Live, instance: &InstanceRef, node_id: &str) -> bool {
        let instance_id = instance.id.as_str();
        let Ok(provider) = self.provider_for(&live.config) else {
            return false;
        };
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=TERMINATE_ATTEMPTS {
            match provider.release(instance, node_id).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(instance_id, attempt, error = %e, "could not terminate instance");
                    if attempt < TERMINATE_ATTEMPTS {
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff *= 2;
                    }
                }
            }
        }
        false
    }

    /// Apply a node update, wake waiters when its deployment changed, and act on final states.
    pub(crate) async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
    ) -> Result<crate::state::model::Applied> {
        let applied = self
            .inner
            .store
            .update_node(node_id, update, SystemTime::now())
            .await
            .map_err(store_error)?;
        if applied.node.status != applied.previous {
            tracing::info!(
                deployment_id = %applied.node.deployment_id,
                node_id = %applied.node.id,
                from = %applied.previous,
                to = %applied.node.status,
                "node state"
            );
            if applied.node.status.is_final() || applied.node.status == NodeStatus::Terminating {
                lock(&self.inner.last_seen).remove(node_id);
                lock(&self.inner.log_counts).remove(&(node_id.to_owned(), applied.node.attempt));
            }
            if matches!(
                applied.node.status,
                NodeStatus::Completed | NodeStatus::Failed
            ) {
                self.after_node_ended(&applied.node);
            }
            self.notify();
        }
        if let Some(status) = applied.deployment_changed {
            tracing::info!(deployment_id = %applied.node.deployment_id, status = %status, "deployment state");
        }
        Ok(applied)
    }

    /// Fail a node with `message` (agent lost, provisioning failed, ...).
    pub(crate) async fn node_failed(&self, node_id: &str, message: String) {
        let update = NodeUpdate::Status {
            status: NodeStatus::Failed,
            exit_code: None,
            message: Some(message),
        };
        if let Err(e) = self.update_node(node_id, update).await {
            if !e.is_conflict() {
                tracing::error!(node_id, error = %e, "cannot record node failure");
            }
        }
    }

    /// A node completed or failed: terminate its instance and, if it may, retry it.
    fn after_node_ended(&self, node: &Node) {
        let this = self.clone();
        let node = node.clone();
        self.inner.tasks.spawn(async move {
            let Ok(live) = this.live(&node.deployment_id).await else {
                return;
            };
            if let Some(instance) = node.instance() {
                let (releasing, live_for_release) = (this.clone(), live.clone());
                let node_id = node.id.clone();
                let release = live.releases.track_future(async move {
                    releasing
                        .release_instance(&live_for_release, &instance, &node_id)
                        .await
                });
                release.await;
            }
            if node.status == NodeStatus::Failed && node.attempt <= live.config.nodes.retries {
                this.retry_node(&live, node).await;
            }
        });
    }

    pub(crate) async fn retry_node(&self, live: &Live, node: Node) {
        let exponent = node.attempt.saturating_sub(1).min(6);
        let wait =
            (self.inner.config.retry_backoff * 2u32.pow(exponent)).min(Duration::from_secs(60));
        tracing::info!(node_id = %node.id, attempt = node.attempt + 1, wait_ms = wait.as_millis() as u64, "retrying node");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = live.cancel.cancelled() => return,
        }
        match self.update_node(&node.id, NodeUpdate::Retry).await {
            Ok(applied) => self.provision_node(live, applied.node).await,
            Err(e) => tracing::info!(node_id = %node.id, error = %e, "retry abandoned"),
        }
    }

    /// The loaded settings of a deployment, reading its `taskfly.yml` again if this process
    /// has not loaded it yet (after a restart).
    pub(crate) async fn live(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.clone());
        }
        let dir = self.deployment_dir(id);
        let yaml = tokio::fs::read_to_string(dir.join(CONFIG_FILE_NAME))
            .await
            .map_err(|_| {
                Error::not_found(format!("no files for deployment `{id}` (cleaned up?)"))
            })?;
        let config = DeploymentConfig::from_yaml(&yaml)?;
        let metadata = MetadataGenerator::new(&config.nodes)?;
        let live = Arc::new(Live {
            secrets: secret_values(&config),
            config: Arc::new(config),
            metadata,
            cancel: self.inner.cancel.child_token(),
            releases: TaskTracker::new(),
        });
        let mut map = lock(&self.inner.live);
        Ok(map.entry(id.to_owned()).or_insert(live).clone())
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

    /// One deployment row, or not found.
    async fn deployment_row(&self, id: &str) -> Result<Deployment> {
        self.inner
            .store
            .deployment(id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| Error::not_found(format!("no deployment `{id}`")))
    }

    /// One deployment and its nodes, as `GET /deployments/{id}` shows it. Reads every node:
    /// to follow a deployment, use [`Orchestrator::summary`] or [`Orchestrator::watch`].
    pub async fn deployment(&self, id: &str) -> Result<DeploymentDetail> {
        let deployment = self.deployment_row(id).await?;
        let nodes = self.inner.store.nodes(id).await.map_err(store_error)?;
        Ok(DeploymentDetail { deployment, nodes })
    }

    /// A deployment's state and node counters, without reading its nodes.
    pub async fn summary(&self, id: &str) -> Result<DeploymentSummary> {
        Ok(DeploymentSummary::from(&self.deployment_row(id).await?))
    }

    /// Every deployment, newest first, without their nodes.
    pub async fn deployments(&self) -> Result<Vec<Deployment>> {
        self.inner.store.deployments().await.map_err(store_error)
    }

    /// Follow one deployment: the returned watch holds its summary now and wakes on every
    /// later change of its state or node counters. It cannot miss a change: it listens
    /// before it reads. Each wake-up reads the deployment row alone.
    ///
    /// ```no_run
    /// # async fn demo(engine: taskfly::Orchestrator, id: &str) -> taskfly::Result<()> {
    /// let mut watch = engine.watch(id).await?;
    /// while !watch.current().is_final() {
    ///     let now = watch.changed().await?;
    ///     println!("{}: {}/{} nodes done", now.status, now.nodes_completed, now.total_nodes);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn watch(&self, id: &str) -> Result<DeploymentWatch> {
        let changes = self.inner.changes.subscribe();
        let current = self.summary(id).await?;
        Ok(DeploymentWatch {
            engine: self.clone(),
            changes,
            current,
        })
    }

    /// Wait until the deployment is final, and return its summary (read the nodes with
    /// [`Orchestrator::deployment`] if needed). Fails if the engine shuts down first.
    pub async fn wait(&self, id: &str) -> Result<DeploymentSummary> {
        let mut watch = self.watch(id).await?;
        while !watch.current().is_final() {
            watch.changed().await?;
        }
        Ok(watch.current)
    }

    /// Terminate a deployment and wait until it is torn down: every node's instance is
    /// terminated through its provider, then the nodes and the deployment become
    /// `terminated`. Refused (conflict) once final.
    pub async fn terminate(&self, id: &str) -> Result<()> {
        self.begin_terminate(id).await?;
        self.finish_terminate(id).await
    }

    /// Start terminating a deployment and return at once: it is `terminating` when this
    /// returns, and the engine tears it down in the background (shutdown waits for that).
    /// Refused (conflict) once final.
    pub async fn request_terminate(&self, id: &str) -> Result<DeploymentStatus> {
        self.begin_terminate(id).await?;
        let this = self.clone();
        let id = id.to_owned();
        self.spawn_tracked(async move {
            if let Err(e) = this.finish_terminate(&id).await {
                tracing::error!(deployment_id = %id, error = %e, "terminate failed");
            }
        });
        Ok(DeploymentStatus::Terminating)
    }

    /// Move the deployment to `terminating` and stop its provisioning and retries. Refused
    /// (conflict, naming the state) once final.
    async fn begin_terminate(&self, id: &str) -> Result<()> {
        let store = &self.inner.store;
        if let Err(e) = store
            .update_deployment_status(id, DeploymentStatus::Terminating, None, SystemTime::now())
            .await
        {
            let e = store_error(e);
            if e.is_conflict() {
                let current = self.deployment_row(id).await?;
                return Err(Error::conflict(format!(
                    "deployment `{id}` is already {}; nothing to terminate",
                    current.status
                )));
            }
            return Err(e);
        }
        self.notify();
        tracing::info!(deployment_id = %id, "terminating deployment");
        self.live(id).await?.cancel.cancel();
        Ok(())
    }

    /// Terminate every node's instance, then mark nodes and deployment `terminated`.
    async fn finish_terminate(&self, id: &str) -> Result<()> {
        let store = &self.inner.store;
        let live = self.live(id).await?;
        let nodes = store.nodes(id).await.map_err(store_error)?;
        let teardown = TaskTracker::new();
        for node in nodes {
            let this = self.clone();
            let live = live.clone();
            teardown.spawn(async move { this.terminate_node(&live, &node.id).await });
        }
        teardown.close();
        teardown.wait().await;
        // Releases of nodes that ended before the request finish too: once this returns, no
        // instance of the deployment is still being let go.
        live.releases.close();
        live.releases.wait().await;
        // Every node final but the deployment not (a race with the last node ending): close it.
        // Nodes still terminating keep it terminating until their instances are confirmed gone.
        let DeploymentDetail { deployment, nodes } = self.deployment(id).await?;
        let all_final = nodes.iter().all(|n| n.status.is_final());
        if deployment.status == DeploymentStatus::Terminating && all_final {
            store
                .update_deployment_status(id, DeploymentStatus::Terminated, None, SystemTime::now())
                .await
                .map_err(store_error)?;
            self.notify();
        }
        Ok(())
    }

    /// Terminate one node: `terminating`, its instance terminated, then `terminated`. A node
    /// whose instance the provider would not confirm gone stays `terminating` (and so does its
    /// deployment), and is tried again every minute.
    async fn terminate_node(&self, live: &Live, node_id: &str) {
        let terminating = NodeUpdate::Status {
            status: NodeStatus::Terminating,
            exit_code: None,
            message: None,
        };
        let node = match self.update_node(node_id, terminating).await {
            Ok(applied) => applied.node,
            Err(_) => match self.inner.store.node(node_id).await {
                // An earlier try left it terminating: try its instance again.
                Ok(Some(node)) if node.status == NodeStatus::Terminating => node,
                // Already final: its instance was (or is being) terminated when it ended.
                _ => return,
            },
        };
        if let Some(instance) = node.instance() {
            if !self.release_instance(live, &instance, node_id).await {
                tracing::error!(node_id, instance_id = %instance.id, "instance not confirmed terminated; the node stays terminating and is tried again");
                return;
            }
        }
        let terminated = NodeUpdate::Status {
            status: NodeStatus::Terminated,
            exit_code: None,
            message: None,
        };
        if let Err(e) = self.update_node(node_id, terminated).await {
            tracing::error!(node_id, error = %e, "cannot mark node terminated");
        }
    }

    /// Delete a final deployment's files and forget it. Refused (conflict) while it runs.
    pub async fn cleanup(&self, id: &str) -> Result<()> {
        let deployment = self.deployment_row(id).await?;
        if !deployment.status.is_final() {
            return Err(Error::conflict(format!(
                "deployment `{id}` is {}; terminate it first (`taskfly down {id}`) or wait until it ends",
                deployment.status
            )));
        }
        // Instance releases of its nodes still under way finish first.
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = live {
            live.releases.close();
            live.releases.wait().await;
        }
        for dir in [
            self.deployment_dir(id),
            self.inner.config.data_dir.join("work").join(id),
        ] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("cannot delete {}", dir.display()), e)),
            }
        }
        self.inner
            .store
            .delete_deployment(id)
            .await
            .map_err(store_error)?;
        lock(&self.inner.live).remove(id);
        tracing::info!(deployment_id = %id, "deployment cleaned up");
        Ok(())
    }

    /// Clean up every final deployment.
    pub async fn cleanup_all(&self) -> Result<CleanupCounts> {
        let mut result = CleanupCounts::default();
        for deployment in self.inner.store.deployments().await.map_err(store_error)? {
            if !deployment.status.is_final() {
                continue;
            }
            match self.cleanup(&deployment.id).await {
                Ok(()) => result.cleaned += 1,
                Err(e) => {
                    tracing::warn!(deployment_id = %deployment.id, error = %e, "cleanup failed");
                    result.failed += 1;
                }
            }
        }
        Ok(result)
    }

    /// A page of a deployment's logs: lines after `after` (a previous page's `next`), of one
    /// node or all, at most `limit`.
    pub async fn logs(
        &self,
        id: &str,
        node_index: Option<u32>,
        after: u64,
        limit: usize,
    ) -> Result<LogsPage> {
        let lines = self
            .inner
            .store
            .logs(
                id,
                LogQuery {
                    after,
                    node_index,
                    limit: limit.clamp(1, 10_000),
                },
            )
            .await
            .map_err(store_error)?;
        let next = lines.last().map_or(after, |l| l.seq);
        Ok(LogsPage { lines, next })
    }

    /// Counts over every deployment, for `GET /stats` and metrics.
    pub async fn stats(&self) -> Result<Stats> {
        let all = self.inner.store.deployments().await.map_err(store_error)?;
        let mut deployment_status = std::collections::BTreeMap::new();
        let mut total_nodes = 0u64;
        for d in &all {
            *deployment_status.entry(d.status).or_insert(0) += 1;
            total_nodes += u64::from(d.total_nodes);
        }
        Ok(Stats {
            total_deployments: all.len() as u64,
            total_nodes,
            deployment_status,
            uptime: self.inner.started.elapsed(),
        })
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

    /// Watch registered nodes: fail those silent past the heartbeat timeout and those that
    /// never registered within the boot timeout.
    fn spawn_monitor(&self) {
        let this = self.clone();
        let period = (self.inner.config.heartbeat_timeout / 4).max(Duration::from_millis(50));
        self.inner.tasks.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut expiry = tokio::time::interval(EXPIRY_CHECK);
            expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => this.check_silent_nodes().await,
                    _ = expiry.tick() => {
                        this.expire_old_deployments().await;
                        this.reconcile_orphans().await;
                        this.retry_stuck_terminations().await;
                    }
                    () = this.inner.cancel.cancelled() => return,
                }
            }
        });
    }

    async fn check_silent_nodes(&self) {
        let timeout = self.inner.config.heartbeat_timeout;
        let now = tokio::time::Instant::now();
        let silent: Vec<String> = lock(&self.inner.last_seen)
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in silent {
            lock(&self.inner.last_seen).remove(&node_id);
            tracing::warn!(node_id = %node_id, "heartbeat timeout");
            self.node_failed(&node_id, "heartbeat timeout".to_owned())
                .await;
        }
        let boot_deadline = SystemTime::now().checked_sub(self.inner.config.boot_timeout);
        let Some(boot_deadline) = boot_deadline else {
            return;
        };
        let live: Vec<String> = lock(&self.inner.live).keys().cloned().collect();
        for id in live {
            match self.inner.store.deployment(&id).await {
                Ok(Some(d)) if !d.status.is_final() => {}
                _ => continue,
            }
            let Ok(nodes) = self.inner.store.nodes(&id).await else {
                continue;
            };
            for node in nodes {
                if node.status == NodeStatus::Booting && node.last_update < boot_deadline {
                    let message = format!(
                        "the node did not register within {}",
                        humantime::format_duration(self.inner.config.boot_timeout)
                    );
                    self.node_failed(&node.id, message).await;
                }
            }
        }
    }
}

/// One deployment followed through [`Orchestrator::watch`]: its latest summary, and a way to
/// wait for the next change.
pub struct DeploymentWatch {
    engine: Orchestrator,
    changes: watch::Receiver<u64>,
    current: DeploymentSummary,
}

impl DeploymentWatch {
    /// The summary as last read.
    pub fn current(&self) -> &DeploymentSummary {
        &self.current
    }

    /// Wait until the deployment's state or node counters differ from [`Self::current`], and
    /// return the new summary. Fails if the deployment is cleaned up or the engine shuts down.
    pub async fn changed(&mut self) -> Result<&DeploymentSummary> {
        loop {
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return Err(Error::conflict("the engine shut down"));
                    }
                }
                () = self.engine.inner.cancel.cancelled() => {
                    return Err(Error::conflict("the engine shut down"));
                }
            }
            let now = self.engine.summary(&self.current.id).await?;
            if now != self.current {
                self.current = now;
                return Ok(&self.current);
            }
        }
    }
}

impl std::fmt::Debug for DeploymentWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentWatch")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// `wait` scaled by a random factor in [0.5, 1.5), so many nodes retrying at once spread out.
fn jitter(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let factor = match getrandom::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 256.0,
        Err(_) => 1.0,
    };
    wait.mul_f64(factor)
}

/// Lock a std mutex whose data stays consistent even if a holder panicked.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn secret_values(config: &DeploymentConfig) -> Vec<String> {
    let mut values: Vec<String> = config
        .nodes
        .secrets
        .values()
        .filter(|v| !v.is_empty())
        .cloned()
        .collect();
    // Longest first, so a secret that contains another is masked whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
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
mod tests {
    use super::mask_secrets;

    #[test]
    fn secrets_are_masked_whole_and_where_a_cut_left_a_piece() {
        let secrets = vec!["PLANTEDabcdefgh".to_owned()];
        assert_eq!(mask_secrets("x PLANTEDabcdefgh y", &secrets), "x *** y");
        // A line cut inside the secret: both pieces are masked.
        assert_eq!(mask_secrets("xxxxPLANTE", &secrets), "xxxx***");
        assert_eq!(mask_secrets("Dabcdefgh tail", &secrets), "*** tail");
        // Fewer than four characters of a secret are too common to mask.
        assert_eq!(mask_secrets("xxxPLA", &secrets), "xxxPLA");
        assert_eq!(mask_secrets("fgh tail", &secrets), "fgh tail");
        assert_eq!(mask_secrets("no secret here", &secrets), "no secret here");
        let unicode = vec!["sécret-ünïcode".to_owned()];
        assert_eq!(mask_secrets("a sécret-ü", &unicode), "a ***");
    }
}
