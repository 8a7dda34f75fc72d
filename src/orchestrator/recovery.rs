//! Carrying on after a restart, and forgetting old deployments.
//!
//! With a durable [`crate::Store`], a restarted engine finds deployments that were in flight.
//! Nodes whose agent had registered carry on by themselves (agents retry while the daemon is
//! away and their tokens stay valid): they only need a fresh last-seen time, so the heartbeat
//! timeout counts from the restart. Nodes caught mid-provisioning are provisioned again with a
//! new provision token (an agent started with the old token is refused and stops); failed nodes
//! with a retry left are retried; terminate requests are finished.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use super::Orchestrator;
use crate::error::Result;
use crate::notify;
use crate::provider::OwnedBy;
use crate::state::model::{has_retry_left, DeploymentStatus, NodeStatus};
use crate::sync::lock;

impl Orchestrator {
    /// Resume every deployment that was not final when the engine last stopped; then
    /// deployments stop being noted as created during recovery, whether it succeeded or not.
    pub(crate) async fn recover(&self) -> Result<()> {
        // First, while the deployments it looks at are those that were final before the
        // start: none of them ends (and makes its notification) in this run.
        self.make_missed_notifications().await;
        let resumed = self.resume_deployments().await;
        *lock(&self.inner().created_during_recovery) = None;
        resumed
    }

    /// Make the webhook notifications a stop lost: a deployment that became final less than
    /// [`notify::GIVE_UP_AFTER`] ago, files still there, without a stored notification,
    /// ended while the engine went down before its notification was made and stored. (One
    /// its `notify:` does not ask for makes none, here as at its end.)
    async fn make_missed_notifications(&self) {
        let store = &self.inner().store;
        let deployments = match store.deployments().await {
            Ok(deployments) => deployments,
            Err(e) => {
                tracing::error!(error = %e.report(), "cannot look for lost webhook notifications");
                return;
            }
        };
        let now = SystemTime::now();
        let recent = |at: SystemTime| {
            now.duration_since(at)
                .is_ok_and(|ago| ago < notify::GIVE_UP_AFTER)
        };
        let created = lock(&self.inner().created_during_recovery).clone();
        for deployment in deployments {
            // Deployed (and already ended) since the engine started: its own end made it.
            let new = created.as_ref().is_some_and(|c| c.contains(&deployment.id));
            if new
                || !deployment.status.is_final()
                || deployment.cleaned_at.is_some()
                || !deployment.completed_at.is_some_and(recent)
            {
                continue;
            }
            match store.delivery(&deployment.id).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(deployment_id = %deployment.id, error = %e.report(), "cannot read the webhook notification");
                    continue;
                }
            }
            if let Err(e) = self
                .make_notification(&deployment.id, deployment.status)
                .await
            {
                tracing::error!(deployment_id = %deployment.id, error = %e.report(), "cannot make the webhook notification");
            }
        }
    }

    async fn resume_deployments(&self) -> Result<()> {
        let store = &self.inner().store;
        let deployments = store.deployments().await?;
        for deployment in deployments.into_iter().filter(|d| !d.status.is_final()) {
            let id = deployment.id.clone();
            // Deployed since the engine started (recovery runs beside the API): its own
            // provisioning is under way.
            let new = lock(&self.inner().created_during_recovery)
                .as_ref()
                .is_some_and(|created| created.contains(&id));
            if new {
                continue;
            }
            tracing::info!(deployment_id = %id, status = %deployment.status, "resuming deployment after restart");
            let live = match self.live(&id).await {
                Ok(live) => live,
                Err(e) => {
                    tracing::error!(deployment_id = %id, error = %e.report(), "cannot resume deployment");
                    continue;
                }
            };
            match deployment.status {
                DeploymentStatus::Pending => {
                    let this = self.clone();
                    self.spawn_tracked(async move {
                        let provisioned = match this.inner().store.nodes(&id).await {
                            Ok(nodes) => {
                                let node_indexes = nodes.iter().map(|n| n.index).collect();
                                // Not held while the deployment is provisioned.
                                drop(nodes);
                                this.provision_all(&id, live, node_indexes).await
                            }
                            Err(e) => Err(e),
                        };
                        if let Err(e) = provisioned {
                            tracing::error!(deployment_id = %id, error = %e.report(), "provisioning stopped");
                        }
                    });
                }
                DeploymentStatus::Terminating => {
                    live.cancel.cancel();
                    let this = self.clone();
                    self.spawn_tracked(async move {
                        if let Err(e) = this.finish_terminate(&id).await {
                            tracing::error!(deployment_id = %id, error = %e.report(), "terminate failed");
                        }
                    });
                }
                _ => {
                    let nodes = store.nodes(&id).await?;
                    for node in nodes {
                        match node.status {
                            NodeStatus::Pending | NodeStatus::Provisioning => {
                                let (this, live) = (self.clone(), Arc::clone(&live));
                                self.spawn_tracked(async move {
                                    this.provision_node(&live, node.id).await
                                });
                            }
                            NodeStatus::Registering
                            | NodeStatus::DownloadingAssets
                            | NodeStatus::RunningScript => {
                                let key = (Arc::from(node.deployment_id.as_str()), node.index);
                                lock(&self.inner().last_seen)
                                    .insert(key, tokio::time::Instant::now());
                            }
                            NodeStatus::Failed if has_retry_left(&deployment, &node) => {
                                let (this, live) = (self.clone(), Arc::clone(&live));
                                self.spawn_tracked(
                                    async move { this.retry_node(&live, node).await },
                                );
                            }
                            NodeStatus::Booting => self.watch_boot(&node),
                            // Final nodes are done.
                            _ => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Terminate every instance a provider runs for a deployment that is unknown or final, or
    /// that its node has left (see `left_by_its_node`):
    /// leaked by a crash between creating an instance and recording it, or by a terminate
    /// call that failed. An instance a live node runs on is kept whatever its tag says (a
    /// pooled instance serves deployments other than the one it was started for). Returns
    /// how many were terminated.
    pub(crate) async fn reconcile_orphans(&self) -> usize {
        let mut listed = Vec::new();
        for (name, provider) in self.providers() {
            let owned = provider.owned_instances().await;
            self.inner()
                .metrics
                .provider_call(&name, "list", owned.is_ok());
            match owned {
                Ok(owned) => {
                    let running = owned.into_iter().filter(|instance| {
                        !matches!(
                            instance.state,
                            crate::InstanceState::Terminated | crate::InstanceState::ShuttingDown
                        )
                    });
                    listed.push((name, provider, running.collect::<Vec<_>>()));
                }
                Err(e) => {
                    tracing::warn!(provider = %name, error = %crate::error::Report::new(e.as_ref()), "cannot list instances for leak checks")
                }
            }
        }
        // Only providers that list instances (EC2) cost the scan of live nodes.
        if listed.iter().all(|(_, _, owned)| owned.is_empty()) {
            return 0;
        }
        let Some(in_use) = self.instances_in_use().await else {
            return 0;
        };
        let mut terminated = 0;
        for (name, provider, owned) in listed {
            for instance in owned {
                if in_use.contains(&instance.instance.id) {
                    continue;
                }
                // A pool slot's instance not in use belongs to no live deployment.
                let deployment_id = match &instance.owner {
                    OwnedBy::Deployment { deployment_id, .. } => deployment_id.as_str(),
                    OwnedBy::Pool => "",
                };
                let live = match self.inner().store.deployment(deployment_id).await {
                    Ok(Some(d)) => !d.status.is_final(),
                    Ok(None) => false,
                    // Unsure: leave it for the next round rather than kill a live node.
                    Err(_) => true,
                };
                if live && !self.left_by_its_node(&instance).await {
                    continue;
                }
                let why = if live {
                    "its node runs elsewhere or has ended"
                } else {
                    "it belongs to no live deployment"
                };
                tracing::warn!(provider = %name, instance_id = %instance.instance.id, deployment_id, reason = why, "terminating a leaked instance");
                let terminate = provider.terminate(&instance.instance).await;
                self.inner()
                    .metrics
                    .provider_call(&name, "terminate", terminate.is_ok());
                match terminate {
                    Ok(()) => terminated += 1,
                    Err(e) => {
                        tracing::error!(instance_id = %instance.instance.id, error = %crate::error::Report::new(e.as_ref()), "cannot terminate leaked instance")
                    }
                }
            }
        }
        terminated
    }

    /// Whether a live deployment's instance is one its node has left: the node (named by the
    /// provider, [`crate::OwnedInstance::node_id`]) records another instance — it was
    /// provisioned again after a crash caught its first launch — or has ended. A node still
    /// being provisioned is not judged: its new instance may not be recorded yet.
    async fn left_by_its_node(&self, instance: &crate::OwnedInstance) -> bool {
        let OwnedBy::Deployment {
            deployment_id,
            node_id: Some(node_id),
        } = &instance.owner
        else {
            return false;
        };
        let Ok(Some(node)) = self.inner().store.node(node_id).await else {
            return false;
        };
        if &node.deployment_id != deployment_id
            || matches!(node.status, NodeStatus::Pending | NodeStatus::Provisioning)
        {
            return false;
        }
        let elsewhere = node
            .instance_id
            .as_deref()
            .is_some_and(|id| id != instance.instance.id);
        elsewhere || node.status.is_final()
    }

    /// The instances of every node not final yet; `None` when the store cannot say (then no
    /// instance is taken for leaked).
    async fn instances_in_use(&self) -> Option<HashSet<String>> {
        let store = &self.inner().store;
        let mut in_use = HashSet::new();
        for deployment in store.deployments().await.ok()? {
            if deployment.status.is_final() {
                continue;
            }
            for node in store.nodes(&deployment.id).await.ok()? {
                if let (false, Some(id)) = (node.status.is_final(), node.instance_id) {
                    in_use.insert(id);
                }
            }
        }
        Some(in_use)
    }

    /// Finish terminate requests left unfinished (a provider that would not confirm an
    /// instance gone); runs every minute.
    pub(crate) async fn retry_stuck_terminations(&self) {
        let Ok(all) = self.inner().store.deployments().await else {
            return;
        };
        let stuck_before = SystemTime::now() - std::time::Duration::from_secs(30);
        for deployment in all {
            if deployment.status == DeploymentStatus::Terminating
                && deployment.updated_at < stuck_before
            {
                tracing::info!(deployment_id = %deployment.id, "retrying an unfinished terminate");
                if let Err(e) = self.finish_terminate(&deployment.id).await {
                    tracing::warn!(deployment_id = %deployment.id, error = %e.report(), "terminate still unfinished");
                }
            }
        }
    }

    /// Forget final deployments older than the retention period, files and all.
    pub(crate) async fn expire_old_deployments(&self) {
        let Some(retention) = self.inner().config.retention else {
            return;
        };
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
            return;
        };
        let Ok(all) = self.inner().store.deployments().await else {
            return;
        };
        for deployment in all {
            let expired = deployment.status.is_final()
                && deployment.completed_at.is_some_and(|done| done < cutoff);
            if expired {
                match self.forget_deployment(&deployment.id).await {
                    Ok(()) => {
                        tracing::info!(deployment_id = %deployment.id, "deployment past retention removed")
                    }
                    Err(e) => {
                        tracing::warn!(deployment_id = %deployment.id, error = %e.report(), "cannot remove expired deployment")
                    }
                }
            }
        }
    }
}
