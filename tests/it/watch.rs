//! Following a deployment: `watch`, `summary` and `wait` read the deployment alone, never
//! its node list, however many nodes it has and however often they change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use taskfly::state::model::{Applied, Deployment, DeploymentStatus, Node, NodeUpdate};
use taskfly::state::{LogLine, LogQuery, NewLogLine};
use taskfly::{MemoryStore, Result, Store};

use crate::support::{local_yml, Project, TestEngine};

/// A [`MemoryStore`] that counts how often a deployment's node list is read.
#[derive(Default)]
struct CountingStore {
    inner: MemoryStore,
    node_list_reads: AtomicUsize,
}

impl CountingStore {
    fn node_list_reads(&self) -> usize {
        self.node_list_reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn create_deployment(&self, deployment: Deployment, nodes: Vec<Node>) -> Result<()> {
        self.inner.create_deployment(deployment, nodes).await
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        self.inner.deployment(id).await
    }

    async fn deployments(&self) -> Result<Vec<Deployment>> {
        self.inner.deployments().await
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        self.inner.node(node_id).await
    }

    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>> {
        self.node_list_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.nodes(deployment_id).await
    }

    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        self.inner.node_by_provision_token(hash).await
    }

    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        self.inner.node_by_auth_token(hash).await
    }

    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> Result<Applied> {
        self.inner.update_node(node_id, update, now).await
    }

    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<Deployment> {
        self.inner
            .update_deployment_status(id, to, message, now)
            .await
    }

    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<()> {
        self.inner.touch_node(node_id, now).await
    }

    async fn append_logs(&self, deployment_id: &str, lines: Vec<NewLogLine>) -> Result<u64> {
        self.inner.append_logs(deployment_id, lines).await
    }

    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>> {
        self.inner.logs(deployment_id, query).await
    }

    async fn delete_deployment(&self, id: &str) -> Result<bool> {
        self.inner.delete_deployment(id).await
    }

    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> Result<bool> {
        self.inner.mark_cleaned(id, at).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_and_waiting_never_read_the_node_list() {
    const NODES: u32 = 8;
    let store = Arc::new(CountingStore::default());
    let engine = TestEngine::start_with(|config| {
        // The heartbeat monitor (which reads node lists for the boot timeout) stays quiet.
        config
            .store(store.clone())
            .heartbeat_timeout(Duration::from_secs(3600))
    })
    .await;
    let project = Project::new(&local_yml(NODES, "")).script("#!/bin/sh\necho hello\n");
    let id = engine.deploy(project.path()).await;
    let before = store.node_list_reads();

    let mut watch = engine.engine.watch(&id).await.expect("watch");
    let mut seen = vec![watch.current().clone()];
    while !watch.current().is_final() {
        seen.push(watch.changed().await.expect("a change").clone());
    }
    let done = engine.engine.wait(&id).await.expect("wait");
    let summary = engine.engine.summary(&id).await.expect("summary");

    // Every node went through six states, and each change of the summary woke the watch;
    // provisioning read the node list once, the watch and `wait` never did.
    let reads = store.node_list_reads() - before;
    assert!(
        reads <= 1,
        "{reads} node list reads while following {seen:#?}"
    );
    assert_eq!(done, summary);
    assert_eq!(done.status, DeploymentStatus::Completed, "{done:#?}");
    assert_eq!(done.nodes_completed, NODES);
    assert!(
        seen.windows(2).all(|pair| pair[0] != pair[1]),
        "each wake-up is a change: {seen:#?}"
    );
    assert_eq!(seen.last(), Some(&done));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_boot_timeout_check_never_reads_the_node_list() {
    const NODES: u32 = 8;
    let store = Arc::new(CountingStore::default());
    // The monitor checks every 500 ms, a few times while the nodes run.
    let engine = TestEngine::start_with(|config| {
        config
            .store(store.clone())
            .heartbeat_timeout(Duration::from_secs(2))
            .boot_timeout(Duration::from_secs(3600))
    })
    .await;
    let project = Project::new(&local_yml(NODES, "")).script("#!/bin/sh\nsleep 2\n");
    let id = engine.deploy(project.path()).await;
    let before = store.node_list_reads();
    let done = engine.engine.wait(&id).await.expect("wait");
    assert_eq!(done.status, DeploymentStatus::Completed, "{done:#?}");
    let reads = store.node_list_reads() - before;
    assert!(reads <= 1, "{reads} node list reads while the monitor ran");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_fails_instead_of_hanging_when_the_engine_stops() {
    let engine = TestEngine::start().await;
    let project = Project::new(&local_yml(1, "")).script("#!/bin/sh\nsleep 600\n");
    let id = engine.deploy(project.path()).await;
    let mut watch = engine.engine.watch(&id).await.expect("watch");
    let waiting = tokio::spawn({
        let engine = engine.engine.clone();
        let id = id.clone();
        async move { engine.wait(&id).await }
    });
    engine.stop().await;
    let error = loop {
        match watch.changed().await {
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert!(error.is_shutting_down(), "{error:?}");
    assert!(error.to_string().contains("shut down"), "{error}");
    let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("wait returns")
        .expect("wait task");
    assert!(waited.is_err(), "{waited:?}");
}
