//! A [`Provider`] that starts nothing: it records the provision tokens the engine hands it, so
//! a test can play a node's agent itself, call by call, over the real node API.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use taskfly::{BoxError, Instance, InstanceRef, InstanceSpec, Owner, Provider};
use tokio::sync::{watch, Semaphore};

/// The deployment id [`Provisioned`] shows for a pool slot's instance ([`Owner::Pool`]).
pub const POOL_SLOTS: &str = "(pool slots)";

/// How long a test waits for the engine to call the provider before it fails.
const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// One `provision` call, as the provider saw it.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub deployment_id: String,
    pub node_id: String,
    pub node_index: u32,
    pub attempt: u32,
    pub daemon_url: String,
    /// The single-use token an agent would register with.
    pub provision_token: String,
    /// The fake instance id returned to the engine.
    pub instance_id: String,
}

/// Records `provision` and `terminate` calls and returns fake instances.
pub struct RecordingProvider {
    provisioned: Mutex<Vec<Provisioned>>,
    terminated: Mutex<Vec<String>>,
    /// Bumped after every recorded call, to wake the `wait_*` methods.
    changes: watch::Sender<u64>,
    /// When set, `provision` records its call, then waits for a permit before it returns.
    gate: Option<Arc<Semaphore>>,
}

impl RecordingProvider {
    /// A provider whose `provision` returns at once.
    pub fn new() -> Arc<RecordingProvider> {
        Arc::new(RecordingProvider::build(None))
    }

    /// A provider whose `provision` records the call and then holds until the test adds a
    /// permit to the returned semaphore, so the test can act while the engine waits for the
    /// instance.
    pub fn gated() -> (Arc<RecordingProvider>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (Arc::new(RecordingProvider::build(Some(gate.clone()))), gate)
    }

    fn build(gate: Option<Arc<Semaphore>>) -> RecordingProvider {
        RecordingProvider {
            provisioned: Mutex::new(Vec::new()),
            terminated: Mutex::new(Vec::new()),
            changes: watch::channel(0).0,
            gate,
        }
    }

    /// This provider as the engine's `local` provider.
    pub fn as_provider(self: &Arc<Self>) -> Arc<dyn Provider> {
        self.clone()
    }

    /// Every `provision` call so far, in call order.
    pub fn provisioned(&self) -> Vec<Provisioned> {
        lock(&self.provisioned).clone()
    }

    /// Every instance id passed to `terminate` so far, in call order.
    pub fn terminated(&self) -> Vec<String> {
        lock(&self.terminated).clone()
    }

    /// Waits (bounded) until the deployment's nodes have been provisioned `count` times, and
    /// returns those calls sorted by node index.
    pub async fn wait_for_provisioned(
        &self,
        deployment_id: &str,
        count: usize,
    ) -> Vec<Provisioned> {
        let of_deployment = || -> Vec<Provisioned> {
            let mut calls: Vec<Provisioned> = lock(&self.provisioned)
                .iter()
                .filter(|p| p.deployment_id == deployment_id)
                .cloned()
                .collect();
            calls.sort_by_key(|p| (p.node_index, p.attempt));
            calls
        };
        let mut changes = self.changes.subscribe();
        let waited = tokio::time::timeout(
            WAIT_LIMIT,
            changes.wait_for(|_| of_deployment().len() >= count),
        )
        .await;
        let calls = of_deployment();
        assert!(
            waited.is_ok(),
            "the engine provisioned {} of {count} nodes of {deployment_id} within {WAIT_LIMIT:?}",
            calls.len()
        );
        calls
    }

    /// Waits (bounded) until `instance_id` has been terminated.
    pub async fn wait_for_terminated(&self, instance_id: &str) {
        let mut changes = self.changes.subscribe();
        let waited = tokio::time::timeout(
            WAIT_LIMIT,
            changes.wait_for(|_| lock(&self.terminated).iter().any(|t| t == instance_id)),
        )
        .await;
        assert!(
            waited.is_ok(),
            "the engine did not terminate {instance_id} within {WAIT_LIMIT:?}; terminated: {:?}",
            self.terminated()
        );
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl Provider for RecordingProvider {
    fn name(&self) -> &str {
        "local"
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let (deployment_id, node_id, node_index, attempt) = match &spec.owner {
            Owner::Node {
                deployment_id,
                node_id,
                node_index,
                attempt,
            } => (deployment_id, node_id, node_index, attempt),
            Owner::Pool { slot } => (&POOL_SLOTS.to_owned(), slot, &0, &1),
            other => return Err(format!("an owner this test does not know: {other:?}").into()),
        };
        let instance_id = format!("fake-{node_id}-{attempt}");
        lock(&self.provisioned).push(Provisioned {
            deployment_id: deployment_id.clone(),
            node_id: node_id.clone(),
            node_index: *node_index,
            attempt: *attempt,
            daemon_url: spec.daemon_url.clone(),
            provision_token: spec.provision_token.expose().to_owned(),
            instance_id: instance_id.clone(),
        });
        self.bump();
        if let Some(gate) = &self.gate {
            gate.acquire().await?.forget();
        }
        Ok(Instance {
            reference: InstanceRef {
                locator: format!("recorded:{instance_id}"),
                id: instance_id,
            },
            ip_address: Some("192.0.2.1".to_owned()),
        })
    }

    /// Records the id; the locator must be the one `provision` gave (the engine stores it).
    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        assert_eq!(
            instance.locator,
            format!("recorded:{}", instance.id),
            "the engine hands back the locator it was given"
        );
        lock(&self.terminated).push(instance.id.clone());
        self.bump();
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
