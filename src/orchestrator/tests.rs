//! The engine's own paths, with test providers and stores: the provisioning permit taken by
//! recovery, node updates that survive a store error, final deployments forgotten.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::{Config, Orchestrator};
use crate::error::BoxError;
use crate::provider::{Instance, InstanceRef, InstanceSpec, Provider};
use crate::state::model::{Applied, Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate};
use crate::state::{LogLine, LogQuery, MemoryStore, NewLogLine, Store};
use crate::sync::lock;

/// A provider named `counting` whose instances take `delay` to start (and never register),
/// or that refuses every instance; it records how many provision calls ran at once.
struct CountingProvider {
    delay: Duration,
    refuse: bool,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    calls: AtomicUsize,
}

impl CountingProvider {
    fn new(delay: Duration, refuse: bool) -> Arc<CountingProvider> {
        Arc::new(CountingProvider {
            delay,
            refuse,
            running: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Provider for CountingProvider {
    fn name(&self) -> &str {
        "counting"
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.refuse {
            return Err("no instance for you".into());
        }
        Ok(Instance {
            reference: InstanceRef {
                id: format!("counting-{}-{}", spec.owner.name(), spec.owner.attempt()),
                locator: String::new(),
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, _instance: &InstanceRef) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A [`MemoryStore`] whose first write of a node failure, and first retry, fail as a broken
/// database would (once each armed), and whose first listing of deployments waits for
/// `listing` to be let go, when there is one. It counts the calls that hold a whole
/// deployment's nodes at once: reads of the node list, and creations from a `Vec<Node>`.
struct FlakyStore {
    inner: MemoryStore,
    failure_refused: AtomicBool,
    retry_refused: AtomicBool,
    listing: Option<tokio::sync::Semaphore>,
    node_lists: AtomicUsize,
    node_vectors: AtomicUsize,
}

impl FlakyStore {
    fn new(fail_once: bool, hold_first_listing: bool) -> FlakyStore {
        FlakyStore {
            inner: MemoryStore::new(),
            failure_refused: AtomicBool::new(!fail_once),
            retry_refused: AtomicBool::new(!fail_once),
            listing: hold_first_listing.then(|| tokio::sync::Semaphore::new(0)),
            node_lists: AtomicUsize::new(0),
            node_vectors: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn create_deployment(&self, d: Deployment, nodes: Vec<Node>) -> crate::Result<()> {
        self.node_vectors.fetch_add(1, Ordering::SeqCst);
        self.inner.create_deployment(d, nodes).await
    }
    async fn create_deployment_with_indexes(
        &self,
        d: Deployment,
        node_indexes: &[u32],
    ) -> crate::Result<()> {
        self.inner
            .create_deployment_with_indexes(d, node_indexes)
            .await
    }
    async fn deployment(&self, id: &str) -> crate::Result<Option<Deployment>> {
        self.inner.deployment(id).await
    }
    async fn deployments(&self) -> crate::Result<Vec<Deployment>> {
        if let Some(listing) = &self.listing {
            // Every listing after the first one passes (its permit is never given back).
            if let Ok(permit) = listing.acquire().await {
                permit.forget();
                listing.add_permits(usize::MAX >> 4);
            }
        }
        self.inner.deployments().await
    }
    async fn node(&self, node_id: &str) -> crate::Result<Option<Node>> {
        self.inner.node(node_id).await
    }
    async fn nodes(&self, deployment_id: &str) -> crate::Result<Vec<Node>> {
        self.node_lists.fetch_add(1, Ordering::SeqCst);
        self.inner.nodes(deployment_id).await
    }
    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> crate::Result<Option<Node>> {
        self.inner.node_by_provision_token(hash).await
    }
    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> crate::Result<Option<Node>> {
        self.inner.node_by_auth_token(hash).await
    }
    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> crate::Result<Applied> {
        let refuse = match &update {
            NodeUpdate::Status {
                status: NodeStatus::Failed,
                ..
            } => &self.failure_refused,
            NodeUpdate::Retry => &self.retry_refused,
            _ => return self.inner.update_node(node_id, update, now).await,
        };
        if !refuse.swap(true, Ordering::SeqCst) {
            return Err(crate::Error::store(
                "the state store failed",
                "database is locked",
            ));
        }
        self.inner.update_node(node_id, update, now).await
    }
    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> crate::Result<Deployment> {
        self.inner
            .update_deployment_status(id, to, message, now)
            .await
    }
    async fn touch_node(&self, node_id: &str, now: SystemTime) -> crate::Result<()> {
        self.inner.touch_node(node_id, now).await
    }
    async fn append_logs(&self, id: &str, lines: Vec<NewLogLine>) -> crate::Result<u64> {
        self.inner.append_logs(id, lines).await
    }
    async fn logs(&self, id: &str, query: LogQuery) -> crate::Result<Vec<LogLine>> {
        self.inner.logs(id, query).await
    }
    async fn delete_deployment(&self, id: &str) -> crate::Result<bool> {
        self.inner.delete_deployment(id).await
    }

    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> crate::Result<bool> {
        self.inner.mark_cleaned(id, at).await
    }
}

/// A project of `count` nodes on the `counting` provider, with `retries`.
fn project(count: u32, retries: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("taskfly.yml"),
        format!(
            "cloud_provider: counting\napplication_files: [run.sh]\nremote_script_to_run: run.sh\n\
             nodes:\n  count: {count}\n  retries: {retries}\n"
        ),
    )
    .expect("taskfly.yml");
    std::fs::write(dir.path().join("run.sh"), "#!/bin/sh\ntrue\n").expect("run.sh");
    dir
}

/// Polls `check` every 10 ms for up to 20 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn statuses(engine: &Orchestrator, id: &str) -> Vec<NodeStatus> {
    let nodes = engine.inner.store.nodes(id).await.expect("nodes");
    nodes.iter().map(|node| node.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_provisions_no_more_nodes_at_once_than_provision_concurrency() {
    let data = tempfile::tempdir().expect("data dir");
    let store = Arc::new(MemoryStore::new());
    let project = project(40, 0);

    // The first engine starts provisioning, four at a time, and stops after a few nodes.
    let before = CountingProvider::new(Duration::from_millis(200), false);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .store(store.clone())
            .provider(before.clone())
            .provision_concurrency(4),
    )
    .expect("engine");
    let id = engine.deploy_dir(project.path()).await.expect("deploy").id;
    eventually("a few nodes provisioned", || {
        before.calls.load(Ordering::SeqCst) >= 8
    })
    .await;
    engine.shutdown().await;
    let waiting = statuses(&engine, &id)
        .await
        .into_iter()
        .filter(|s| matches!(s, NodeStatus::Pending | NodeStatus::Provisioning))
        .count();
    assert!(waiting >= 20, "{waiting} nodes left to provision");

    // The restarted engine resumes them under the same limit.
    let after = CountingProvider::new(Duration::from_millis(50), false);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .store(store.clone())
            .provider(after.clone())
            .provision_concurrency(4),
    )
    .expect("engine");
    eventually("every node resumed", || {
        after.calls.load(Ordering::SeqCst) >= waiting && after.running.load(Ordering::SeqCst) == 0
    })
    .await;
    engine.shutdown().await;
    assert_eq!(before.most_at_once.load(Ordering::SeqCst), 4);
    let most = after.most_at_once.load(Ordering::SeqCst);
    assert!(most <= 4, "recovery ran {most} provision calls at once");
}

/// At 100,000 nodes a deployment's nodes as `Node`s are 35 MB: the engine stores a new
/// deployment from its node indexes and provisions it a node at a time, never holding them
/// all (issue #12's memory goal). A gathering provider gets every node at once all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_stored_and_provisioned_without_its_whole_node_list() {
    for gathers in [false, true] {
        let data = tempfile::tempdir().expect("data dir");
        let store = Arc::new(FlakyStore::new(false, false));
        let provider = GatheringProvider::new(gathers);
        let engine = Orchestrator::new(
            Config::new(data.path())
                .store(store.clone())
                .provider(provider.clone())
                .provision_concurrency(4),
        )
        .expect("engine");
        let id = engine
            .deploy_dir(project(50, 0).path())
            .await
            .expect("deploy")
            .id;
        if gathers {
            eventually("all 50 provision calls waiting at once", || {
                provider.waiting.load(Ordering::SeqCst) == 50
            })
            .await;
            provider.open.add_permits(50);
        }
        eventually("every node provisioned", || {
            provider.answered.load(Ordering::SeqCst) == 50
        })
        .await;
        let nodes = store.inner.nodes(&id).await.expect("nodes");
        let owners: Vec<(u32, u32)> = nodes.iter().map(|n| (n.index, n.attempt)).collect();
        assert_eq!(owners, (0..50).map(|i| (i, 1)).collect::<Vec<_>>());
        let mut asked = lock(&provider.owners).clone();
        asked.sort_unstable();
        assert_eq!(asked, owners, "each node asked for once, as its attempt");
        assert_eq!(
            store.node_vectors.load(Ordering::SeqCst),
            0,
            "stored from indexes"
        );
        assert_eq!(
            store.node_lists.load(Ordering::SeqCst),
            0,
            "no node list read"
        );
        engine.shutdown().await;
    }
}

/// A provider named `counting` that answers every provision call (its instances never
/// register), noting each call's node index and attempt; when it gathers provisioning calls
/// ([`Provider::gathers_provisions`]), each call waits for a permit of `open`.
struct GatheringProvider {
    gathers: bool,
    open: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    answered: AtomicUsize,
    owners: std::sync::Mutex<Vec<(u32, u32)>>,
}

impl GatheringProvider {
    fn new(gathers: bool) -> Arc<GatheringProvider> {
        Arc::new(GatheringProvider {
            gathers,
            open: tokio::sync::Semaphore::new(0),
            waiting: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            owners: std::sync::Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl Provider for GatheringProvider {
    fn name(&self) -> &str {
        "counting"
    }

    fn gathers_provisions(&self) -> bool {
        self.gathers
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let crate::provider::Owner::Node {
            node_index,
            attempt,
            ..
        } = &spec.owner
        else {
            return Err("not a node".into());
        };
        lock(&self.owners).push((*node_index, *attempt));
        if self.gathers {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.open.acquire().await?.forget();
        }
        self.answered.fetch_add(1, Ordering::SeqCst);
        Ok(Instance {
            reference: InstanceRef {
                id: format!("gathered-{}", spec.owner.name()),
                locator: String::new(),
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, _instance: &InstanceRef) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_on_a_nodes_failure_or_retry_is_tried_again_until_the_node_is_final() {
    let data = tempfile::tempdir().expect("data dir");
    let store = Arc::new(FlakyStore::new(true, false));
    let provider = CountingProvider::new(Duration::ZERO, true);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .store(store.clone())
            .provider(provider.clone())
            .retry_backoff(Duration::from_millis(10)),
    )
    .expect("engine");
    let id = engine
        .deploy_dir(project(1, 1).path())
        .await
        .expect("deploy")
        .id;
    let done = tokio::time::timeout(Duration::from_secs(20), engine.wait(&id))
        .await
        .expect("the deployment ends although the store refused a failure and a retry once")
        .expect("wait");
    assert_eq!(done.status, DeploymentStatus::Failed);
    assert!(store.failure_refused.load(Ordering::SeqCst));
    assert!(store.retry_refused.load(Ordering::SeqCst));
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        2,
        "both attempts ran"
    );
    let node = &engine.inner.store.nodes(&id).await.expect("nodes")[0];
    assert_eq!((node.status, node.attempt), (NodeStatus::Failed, 2));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_deployments_settings_are_dropped_and_read_again_on_demand() {
    let data = tempfile::tempdir().expect("data dir");
    let provider = CountingProvider::new(Duration::ZERO, true);
    let engine = Orchestrator::new(Config::new(data.path()).provider(provider)).expect("engine");
    let id = engine
        .deploy_dir(project(3, 0).path())
        .await
        .expect("deploy")
        .id;
    let done = engine.wait(&id).await.expect("wait");
    assert_eq!(done.status, DeploymentStatus::Failed);
    eventually("the final deployment's settings dropped", || {
        !lock(&engine.inner.live).contains_key(&id)
    })
    .await;
    // Asked for again (to mask a late log line, say), they are read from its files.
    let live = engine.live(&id).await.expect("settings read again");
    assert_eq!(live.config.nodes.count, 3);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_agent_never_registers_fails_at_the_boot_timeout() {
    let data = tempfile::tempdir().expect("data dir");
    let provider = CountingProvider::new(Duration::ZERO, false);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .provider(provider.clone())
            .heartbeat_timeout(Duration::from_millis(100))
            .boot_timeout(Duration::from_millis(300)),
    )
    .expect("engine");
    let id = engine
        .deploy_dir(project(3, 0).path())
        .await
        .expect("deploy")
        .id;
    let done = tokio::time::timeout(Duration::from_secs(20), engine.wait(&id))
        .await
        .expect("the boot timeout ends the deployment")
        .expect("wait");
    assert_eq!(done.status, DeploymentStatus::Failed);
    assert_eq!(done.nodes_failed, 3, "{done:?}");
    for node in engine.inner.store.nodes(&id).await.expect("nodes") {
        let message = node.error_message.unwrap_or_default();
        assert!(message.contains("did not register within"), "{message}");
    }
    assert_eq!(
        lock(&engine.inner.boot_deadlines).len(),
        0,
        "no node left watched"
    );
    engine.shutdown().await;
}

/// A provider named `counting` whose first attempt of each node waits for `open` before
/// answering (a Slurm task that runs while its submission is watched); it records what it
/// terminates.
struct LateProvider {
    open: tokio::sync::Notify,
    asked: AtomicUsize,
    terminated: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl Provider for LateProvider {
    fn name(&self) -> &str {
        "counting"
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if spec.owner.attempt() == 1 {
            self.open.notified().await;
        }
        Ok(Instance {
            reference: InstanceRef {
                id: format!("late-{}-{}", spec.owner.name(), spec.owner.attempt()),
                locator: String::new(),
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        lock(&self.terminated).push(instance.id.clone());
        Ok(())
    }
}

fn late_provider() -> Arc<LateProvider> {
    Arc::new(LateProvider {
        open: tokio::sync::Notify::new(),
        asked: AtomicUsize::new(0),
        terminated: std::sync::Mutex::new(Vec::new()),
    })
}

fn status(status: NodeStatus) -> NodeUpdate {
    NodeUpdate::Status {
        status,
        exit_code: Some(0),
        message: None,
    }
}

/// One node (with `retries`) on a [`LateProvider`], which has been asked for its first
/// instance; its agent then ran its script, which ended as `end`, before the provider answered.
async fn a_node_that_ends_before_its_instance(
    data: &Path,
    provider: &Arc<LateProvider>,
    retries: u32,
    end: NodeStatus,
) -> (Orchestrator, String, String) {
    let engine = Orchestrator::new(
        Config::new(data)
            .provider(provider.clone())
            .retry_backoff(Duration::from_millis(10)),
    )
    .expect("engine");
    let id = engine
        .deploy_dir(project(1, retries).path())
        .await
        .expect("deploy")
        .id;
    let node_id = format!("{id}-0");
    eventually("the provider asked", || {
        provider.asked.load(Ordering::SeqCst) == 1
    })
    .await;
    for next in [NodeStatus::RunningScript, end] {
        engine
            .update_node(&node_id, status(next))
            .await
            .expect("update");
    }
    (engine, id, node_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answered_after_its_node_completed_is_recorded_and_released() {
    let data = tempfile::tempdir().expect("data dir");
    let provider = late_provider();
    let (engine, id, node_id) =
        a_node_that_ends_before_its_instance(data.path(), &provider, 0, NodeStatus::Completed)
            .await;
    provider.open.notify_one();
    let wanted = format!("late-{node_id}-1");
    eventually("the late instance released", || {
        lock(&provider.terminated).contains(&wanted)
    })
    .await;
    let node = engine
        .inner
        .store
        .node(&node_id)
        .await
        .expect("read")
        .expect("node");
    assert_eq!(node.status, NodeStatus::Completed);
    assert_eq!(
        node.instance_id.as_deref(),
        Some(wanted.as_str()),
        "recorded"
    );
    assert_eq!(
        engine.wait(&id).await.expect("wait").status,
        DeploymentStatus::Completed
    );
    engine.shutdown().await;
    assert_eq!(lock(&provider.terminated).as_slice(), [wanted]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answered_after_its_node_was_retried_is_released_not_given_to_the_retry() {
    let data = tempfile::tempdir().expect("data dir");
    let provider = late_provider();
    let (engine, id, node_id) =
        a_node_that_ends_before_its_instance(data.path(), &provider, 1, NodeStatus::Failed).await;
    // Attempt 2 gets its own instance.
    eventually("attempt 2 provisioned", || {
        provider.asked.load(Ordering::SeqCst) == 2
    })
    .await;
    let second = format!("late-{node_id}-2");
    let mut booted = None;
    for _ in 0..2000 {
        let node = engine
            .inner
            .store
            .node(&node_id)
            .await
            .expect("read")
            .expect("node");
        if node.instance_id.is_some() {
            booted = Some(node);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let booted = booted.expect("attempt 2 recorded its instance");
    assert_eq!(
        (booted.attempt, booted.status, booted.instance_id.as_deref()),
        (2, NodeStatus::Booting, Some(second.as_str()))
    );
    provider.open.notify_one();
    let first = format!("late-{node_id}-1");
    eventually("the first attempt's instance released", || {
        lock(&provider.terminated).contains(&first)
    })
    .await;
    let node = engine
        .inner
        .store
        .node(&node_id)
        .await
        .expect("read")
        .expect("node");
    assert_eq!(
        (node.attempt, node.status, node.instance_id.as_deref()),
        (2, NodeStatus::Booting, Some(second.as_str())),
        "attempt 2 keeps its own instance"
    );
    engine.terminate(&id).await.expect("terminate");
    engine.shutdown().await;
    let mut terminated = lock(&provider.terminated).clone();
    terminated.sort();
    assert_eq!(terminated, [first, second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_made_while_recovery_runs_is_provisioned_once() {
    let data = tempfile::tempdir().expect("data dir");
    let store = Arc::new(FlakyStore::new(false, true));
    let provider = CountingProvider::new(Duration::ZERO, false);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .store(store.clone())
            .provider(provider.clone()),
    )
    .expect("engine");
    // Recovery waits to list the deployments while one is deployed and provisioned.
    let id = engine
        .deploy_dir(project(3, 0).path())
        .await
        .expect("deploy")
        .id;
    eventually("its own provisioning", || {
        provider.calls.load(Ordering::SeqCst) == 3
    })
    .await;
    store.listing.as_ref().expect("held listing").add_permits(1);
    eventually("recovery done", || {
        lock(&engine.inner.created_during_recovery).is_none()
    })
    .await;
    engine.shutdown().await;
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        3,
        "recovery took the new deployment {id} for one left from before and provisioned it again"
    );
    assert!(statuses(&engine, &id)
        .await
        .iter()
        .all(|s| *s == NodeStatus::Booting));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_only_when_the_deployments_summary_can_change() {
    let data = tempfile::tempdir().expect("data dir");
    let provider = CountingProvider::new(Duration::ZERO, false);
    let engine = Orchestrator::new(
        Config::new(data.path())
            .provider(provider.clone())
            .heartbeat_timeout(Duration::from_secs(3600)),
    )
    .expect("engine");
    let id = engine
        .deploy_dir(project(4, 0).path())
        .await
        .expect("deploy")
        .id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while statuses(&engine, &id).await != [NodeStatus::Booting; 4] {
        assert!(tokio::time::Instant::now() < deadline, "nodes never booted");
        tokio::task::yield_now().await;
    }
    let mut watch = engine.watch(&id).await.expect("watch");
    let before = *engine.inner.changes.borrow();
    for index in 0..4 {
        for status in [
            NodeStatus::Registering,
            NodeStatus::DownloadingAssets,
            NodeStatus::RunningScript,
            NodeStatus::Completed,
        ] {
            engine
                .update_node(
                    &format!("{id}-{index}"),
                    NodeUpdate::Status {
                        status,
                        exit_code: None,
                        message: None,
                    },
                )
                .await
                .expect("update");
        }
    }
    // Sixteen node updates; four of them changed the summary (the last one its state too).
    let woken = engine.inner.changes.borrow().wrapping_sub(before);
    assert_eq!(woken, 4);
    while !watch.current().is_final() {
        watch.changed().await.expect("a change");
    }
    assert_eq!(watch.current().nodes_completed, 4);
    assert_eq!(watch.current().status, DeploymentStatus::Completed);
    engine.shutdown().await;
}
