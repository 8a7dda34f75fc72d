//! A provider written by an embedding program, as the "adding a provider" guide describes it:
//! registered under its own name, named by `cloud_provider` in `taskfly.yml`, handed its own
//! `instance_config.<name>` section and nothing else, and terminated through the reference it
//! returned. It runs each node's agent as a task of this process with the crate's public
//! [`taskfly::agent::run`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use taskfly::agent::AgentConfig;
use taskfly::state::model::DeploymentStatus;
use taskfly::{
    async_trait, BoxError, Instance, InstanceKind, InstanceRef, InstanceSpec, Owner, Provider,
    ProviderSettings,
};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{Project, TestEngine};

/// How long a test waits for nodes to finish or instances to be released.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// `instance_config.inproc`: what this provider reads of `taskfly.yml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct InProcSettings {
    /// A label the test checks arrives.
    label: String,
    /// The grace period of each node's agent, in milliseconds.
    #[serde(default)]
    grace_ms: Option<u64>,
}

/// Runs each node's agent as a task of this process, in a work directory of its own.
struct InProcProvider {
    work_root: PathBuf,
    /// Running agents by instance id: how to stop one, and its task.
    agents: Mutex<HashMap<String, (CancellationToken, JoinHandle<()>)>>,
    /// The settings and owner of every `provision` call, in order.
    provisioned: Mutex<Vec<(InProcSettings, Owner)>>,
    /// Every instance `terminate` was handed, in order.
    terminated: Mutex<Vec<InstanceRef>>,
    /// When set, `terminate` records its call, then waits for a permit before it stops the
    /// agent: a release the test holds open.
    release_gate: Option<Arc<Semaphore>>,
}

impl InProcProvider {
    fn new(work_root: PathBuf) -> Arc<InProcProvider> {
        Arc::new(InProcProvider::build(work_root, None))
    }

    /// A provider whose `terminate` holds until the test adds a permit to the semaphore.
    fn gated(work_root: PathBuf) -> (Arc<InProcProvider>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let provider = InProcProvider::build(work_root, Some(gate.clone()));
        (Arc::new(provider), gate)
    }

    fn build(work_root: PathBuf, release_gate: Option<Arc<Semaphore>>) -> InProcProvider {
        InProcProvider {
            work_root,
            agents: Mutex::new(HashMap::new()),
            provisioned: Mutex::new(Vec::new()),
            terminated: Mutex::new(Vec::new()),
            release_gate,
        }
    }

    /// Waits (bounded) until `terminate` has been called `count` times.
    async fn wait_for_terminated(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        while lock(&self.terminated).len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "instances not released: {:?}",
                lock(&self.terminated)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[async_trait]
impl Provider for InProcProvider {
    fn name(&self) -> &str {
        "inproc"
    }

    /// Every instance is alike, but settings this provider cannot read refuse the deployment.
    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        _owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        settings.parse::<InProcSettings>()?;
        Ok(InstanceKind::new("inproc"))
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let settings: InProcSettings = spec.settings.parse()?;
        let id = format!("inproc-{}-{}", spec.owner.name(), spec.owner.attempt());
        let work_dir = self.work_root.join(&id);
        let mut config = AgentConfig::new(
            spec.daemon_url.clone(),
            spec.provision_token.expose(),
            &work_dir,
        );
        if let Some(ms) = settings.grace_ms {
            config = config.grace_period(Duration::from_millis(ms));
        }
        lock(&self.provisioned).push((settings, spec.owner.clone()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let _ = taskfly::agent::run(config, cancel).await;
            }
        });
        lock(&self.agents).insert(id.clone(), (cancel, task));
        Ok(Instance {
            reference: InstanceRef {
                id,
                locator: work_dir.display().to_string(),
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        lock(&self.terminated).push(instance.clone());
        if let Some(gate) = &self.release_gate {
            gate.acquire().await?.forget();
        }
        let agent = lock(&self.agents).remove(&instance.id);
        if let Some((cancel, task)) = agent {
            cancel.cancel();
            let _ = task.await;
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let agents: Vec<_> = lock(&self.agents).drain().collect();
        for (_, (cancel, task)) in agents {
            cancel.cancel();
            let _ = task.await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn inproc_yml(section: &str) -> String {
    format!(
        "cloud_provider: inproc\ninstance_config:\n  inproc: {section}\n\
         application_files: [setup.sh]\nnodes:\n  count: 2\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_of_the_host_runs_nodes_under_its_own_name_with_its_own_section() {
    let work = tempfile::tempdir().expect("temp dir");
    let provider = InProcProvider::new(work.path().to_path_buf());
    let engine = TestEngine::start_with(|config| config.provider(provider.clone())).await;
    let project = Project::new(&inproc_yml("{label: from-yml, grace_ms: 500}"))
        .script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX ran\"\n");

    let id = engine.deploy(project.path()).await;
    let done = tokio::time::timeout(WAIT_LIMIT, engine.engine.wait(&id))
        .await
        .expect("the deployment ends")
        .expect("wait");
    assert_eq!(done.status, DeploymentStatus::Completed, "{done:#?}");
    assert_eq!(done.nodes_completed, 2);

    // The provider saw its own section, typed, and whose instance each one is.
    let mut seen = lock(&provider.provisioned).clone();
    seen.sort_by_key(|(_, owner)| owner.name().to_owned());
    let expected_settings = InProcSettings {
        label: "from-yml".to_owned(),
        grace_ms: Some(500),
    };
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (index, (settings, owner)) in seen.iter().enumerate() {
        assert_eq!(settings, &expected_settings);
        assert_eq!(
            owner,
            &Owner::Node {
                deployment_id: id.clone(),
                node_id: format!("{id}-{index}"),
                node_index: index as u32,
                attempt: 1,
            }
        );
    }

    // Each node's instance is released once it ended, through the reference it returned.
    provider.wait_for_terminated(2).await;
    for instance in lock(&provider.terminated).iter() {
        let expected = work.path().join(&instance.id);
        assert_eq!(instance.locator, expected.display().to_string());
    }
    assert!(lock(&provider.agents).is_empty());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_provider_names_and_settings_a_provider_refuses_fail_the_deploy() {
    let work = tempfile::tempdir().expect("temp dir");
    let provider = InProcProvider::new(work.path().to_path_buf());
    let engine = TestEngine::start_with(|config| config.provider(provider.clone())).await;

    let elsewhere = Project::new(
        "cloud_provider: elsewhere\napplication_files: [setup.sh]\nnodes: {count: 1}\n",
    )
    .script("#!/bin/sh\ntrue\n");
    let error = engine
        .engine
        .deploy_dir(elsewhere.path())
        .await
        .expect_err("no provider of that name");
    assert!(error.is_invalid_config(), "{error}");
    let details = error.details().join("\n");
    assert!(details.contains("`elsewhere`"), "{details}");
    assert!(
        details.contains("registered: inproc, local"),
        "the registered names are listed: {details}"
    );

    let misspelt = Project::new(&inproc_yml("{labl: x}")).script("#!/bin/sh\ntrue\n");
    let error = engine
        .engine
        .deploy_dir(misspelt.path())
        .await
        .expect_err("settings the provider cannot read");
    assert!(error.is_invalid_config(), "{error}");
    let details = error.details().join("\n");
    assert!(details.contains("instance_config.inproc"), "{details}");
    assert!(lock(&provider.provisioned).is_empty());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_waits_for_the_release_of_an_ended_nodes_instance() {
    let work = tempfile::tempdir().expect("temp dir");
    let (provider, gate) = InProcProvider::gated(work.path().to_path_buf());
    let engine = TestEngine::start_with(|config| config.provider(provider.clone())).await;
    let yml = inproc_yml("{label: gated}").replace("count: 2", "count: 1");
    let project = Project::new(&yml).script("#!/bin/sh\necho done\n");
    let id = engine.deploy(project.path()).await;
    let done = tokio::time::timeout(WAIT_LIMIT, engine.engine.wait(&id))
        .await
        .expect("the deployment ends")
        .expect("wait");
    assert_eq!(done.status, DeploymentStatus::Completed, "{done:#?}");
    // The node ended: its instance's release has begun and is held by the provider.
    provider.wait_for_terminated(1).await;

    let cleaning = tokio::spawn({
        let (engine, id) = (engine.engine.clone(), id.clone());
        async move { engine.cleanup(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !cleaning.is_finished(),
        "cleanup returned while the instance was still being released"
    );
    gate.add_permits(1);
    tokio::time::timeout(WAIT_LIMIT, cleaning)
        .await
        .expect("cleanup ends once the release has")
        .expect("the cleanup task")
        .expect("cleanup");
    assert!(
        lock(&provider.agents).is_empty(),
        "the agent was stopped first"
    );
    engine.stop().await;
}
