//! Provisioning: every node gets an instance from its provider, under the engine's concurrency
//! limit, with retries while the provider says a failure is retryable.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;

use super::{Live, Orchestrator};

use crate::auth;
use crate::backoff::Backoff;
use crate::config::DeploymentConfig;
use crate::error::{Error, Result};
use crate::provider::{Instance, InstanceSpec, Owner, Registered};
use crate::state::model::{self, DeploymentStatus, NodeStatus, NodeUpdate};

impl Orchestrator {
    /// Provision the nodes of a new deployment (`node_indexes`, all of its nodes), at most
    /// `provision_concurrency` at a time. What a node's provisioning needs is read from the
    /// store when it starts, so a large deployment is never held in memory whole for it.
    pub(crate) async fn provision_all(
        &self,
        id: &str,
        live: Arc<Live>,
        node_indexes: Vec<u32>,
    ) -> Result<()> {
        let store = &self.inner.store;
        match store
            .update_deployment_status(id, DeploymentStatus::Provisioning, None, SystemTime::now())
            .await
        {
            Ok(deployment) => {
                self.publish_deployment(deployment);
                self.notify();
            }
            Err(e) => {
                // Terminated before provisioning began: nothing to do.
                return if e.is_invalid_transition() {
                    Ok(())
                } else {
                    Err(e)
                };
            }
        }
        let gathers = self.gathers_provisions(&live);
        let provisions = TaskTracker::new();
        for index in node_indexes {
            // Taken here, before the task is spawned, so a large deployment does not start a
            // task per node at once; a provider that gathers the calls wants them all at once.
            let permit = if gathers {
                None
            } else {
                let Some(permit) = self.provision_permit(&live).await else {
                    break;
                };
                Some(permit)
            };
            let this = self.clone();
            let live = live.clone();
            let node_id = model::node_id(id, index);
            provisions.spawn(async move {
                this.provision_node_holding(&live, node_id, permit).await;
            });
        }
        provisions.close();
        provisions.wait().await;
        Ok(())
    }

    /// One of the `provision_concurrency` slots every provisioning path (first attempt,
    /// retry, recovery after a restart) holds while it asks a provider for an instance; `None`
    /// once the deployment is being terminated or the engine stops.
    async fn provision_permit(&self, live: &Live) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            permit = self.inner.provision_slots.clone().acquire_owned() => permit.ok(),
            () = live.cancel.cancelled() => None,
            () = self.inner.cancel.cancelled() => None,
        }
    }

    /// Provision node `node_id` (retry, or resumed after a restart) once a provisioning slot
    /// is free. Failures are recorded on the node.
    pub(crate) async fn provision_node(&self, live: &Live, node_id: String) {
        if self.gathers_provisions(live) {
            self.provision_node_holding(live, node_id, None).await;
        } else if let Some(permit) = self.provision_permit(live).await {
            self.provision_node_holding(live, node_id, Some(permit))
                .await;
        }
    }

    /// Whether the deployment's provider gathers provisioning calls
    /// ([`crate::Provider::gathers_provisions`]): they are then made without slots.
    fn gathers_provisions(&self, live: &Live) -> bool {
        self.provider_for(&live.config)
            .is_ok_and(|provider| provider.provider().gathers_provisions())
    }

    /// Provision one node while holding `permit` (if any). Failures are recorded on the node, except
    /// at engine shutdown: that is not the deployment's end, and the node is left as it is
    /// for a restarted engine to provision.
    async fn provision_node_holding(
        &self,
        live: &Live,
        node_id: String,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if live.cancel.is_cancelled() || self.is_shutting_down() {
            return;
        }
        let result = self.try_provision_node(live, &node_id, permit).await;
        if let Err(e) = result {
            if self.is_shutting_down() {
                tracing::info!(node_id = %node_id, error = %e.report(), "provisioning stopped by shutdown; it resumes at the next start");
                return;
            }
            let message = live.mask(&format!("provisioning failed: {}", e.report()));
            tracing::warn!(node_id = %node_id, error = %message, "node provisioning failed");
            self.node_failed(&node_id, message).await;
        }
    }

    /// One provisioning attempt of node `node_id`: its token armed (and `pending` left) in
    /// one store write, the provider asked for the attempt that write found, its answer
    /// recorded. `permit` (the provisioning slot, if any) is held until the provider has
    /// answered, not while the answer is stored.
    pub(super) async fn try_provision_node(
        &self,
        live: &Live,
        node_id: &str,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<()> {
        let token = auth::new_token()?;
        let armed = self
            .update_node(
                node_id,
                NodeUpdate::ProvisioningStarted {
                    hash: auth::hash_token(&token),
                },
            )
            .await?;
        let node = armed.node;
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
        let info = self.provision_with_retries(&provider, request, live).await;
        drop(permit);
        let info = info?;
        let instance = info.reference.clone();
        tracing::info!(node_id = %node.id, instance_id = %instance.id, "node provisioned");
        let update = NodeUpdate::Provisioned {
            instance: instance.clone(),
            ip_address: info.ip_address.clone(),
            attempt: node.attempt,
        };
        match self.update_node(&node.id, update).await {
            // Still waiting for it, or already up: the node's end releases it.
            Ok(applied) if !ended_before_its_instance(applied.node.status) => {}
            // The node ended (or is being terminated) while its instance was being created,
            // so nothing else will release it: make sure it does not outlive the node.
            Ok(_) => {
                tracing::info!(node_id = %node.id, instance_id = %instance.id, "the node ended before its instance was recorded; releasing it");
                self.release_instance(live, &instance, &node.id).await;
            }
            // Refused: the node moved on to another attempt. Its instance is nobody's.
            Err(e) => {
                tracing::info!(node_id = %node.id, instance_id = %instance.id, "instance no longer wanted; releasing it");
                self.release_instance(live, &instance, &node.id).await;
                if !e.is_invalid_transition() {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Ask the provider for an instance, trying again with exponential backoff and jitter
    /// while it says the failure is retryable, up to the configured number of attempts.
    pub(super) async fn provision_with_retries(
        &self,
        provider: &Registered,
        request: InstanceSpec,
        live: &Live,
    ) -> Result<Instance> {
        let attempts = self.inner.config.provision_attempts;
        let mut backoff =
            Backoff::new(self.inner.config.provision_backoff, Duration::from_secs(30));
        let provider_name = live.config.cloud_provider.as_str();
        let mut attempt = 1;
        loop {
            let provisioned = provider.provision(request.clone()).await;
            self.inner
                .metrics
                .provider_call(provider_name, "provision", provisioned.is_ok());
            match provisioned {
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
                    let wait = backoff.next_pause();
                    tracing::warn!(node_id = %request.owner.name(), attempt, error = %crate::error::Report::new(e.as_ref()), wait_ms = wait.as_millis() as u64, "provider call failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = live.cancel.cancelled() => {
                            return Err(Error::terminated("the deployment is being terminated"));
                        }
                        () = self.inner.cancel.cancelled() => {
                            return Err(Error::shutting_down("the engine is shutting down"));
                        }
                    }
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
}

/// Whether a node in `status` when its instance is recorded has ended (or is being torn down)
/// without it: its end could not release an instance it did not know of.
fn ended_before_its_instance(status: NodeStatus) -> bool {
    matches!(
        status,
        NodeStatus::Completed
            | NodeStatus::Failed
            | NodeStatus::Terminating
            | NodeStatus::Terminated
    )
}
