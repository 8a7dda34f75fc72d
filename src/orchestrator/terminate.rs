//! Tearing down: terminating a deployment's instances, then its nodes; deleting the files of
//! final deployments (cleanup), and their records (forget).

use std::time::SystemTime;

use tokio_util::task::TaskTracker;

use super::{Live, Orchestrator};

use crate::error::{Error, Result};
use crate::state::model::{
    CleanupCounts, DeploymentDetail, DeploymentStatus, NodeStatus, NodeUpdate,
};
use crate::sync::lock;

impl Orchestrator {
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
                tracing::error!(deployment_id = %id, error = %e.report(), "terminate failed");
            }
        });
        Ok(DeploymentStatus::Terminating)
    }

    /// Move the deployment to `terminating` and stop its provisioning and retries. Refused
    /// ([`Error::is_already_final`], naming the state) once final.
    pub(super) async fn begin_terminate(&self, id: &str) -> Result<()> {
        let store = &self.inner.store;
        let terminating = store
            .update_deployment_status(id, DeploymentStatus::Terminating, None, SystemTime::now())
            .await;
        let terminating = match terminating {
            Ok(deployment) => deployment,
            Err(e) if e.is_invalid_transition() => {
                let current = self.deployment_row(id).await?;
                return Err(Error::already_final(format!(
                    "deployment `{id}` is already {}; nothing to terminate",
                    current.status
                )));
            }
            Err(e) => return Err(e),
        };
        self.publish_deployment(terminating);
        self.notify();
        tracing::info!(deployment_id = %id, "terminating deployment");
        self.live(id).await?.cancel.cancel();
        Ok(())
    }

    /// Terminate every node's instance, then mark nodes and deployment `terminated`.
    pub(super) async fn finish_terminate(&self, id: &str) -> Result<()> {
        let store = &self.inner.store;
        let live = self.live(id).await?;
        let nodes = store.nodes(id).await?;
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
        let DeploymentDetail {
            deployment, nodes, ..
        } = self.deployment(id).await?;
        let all_final = nodes.iter().all(|n| n.status.is_final());
        if deployment.status == DeploymentStatus::Terminating && all_final {
            let terminated = store
                .update_deployment_status(id, DeploymentStatus::Terminated, None, SystemTime::now())
                .await?;
            self.deployment_ended(id, DeploymentStatus::Terminated);
            self.publish_deployment(terminated);
            self.notify();
        }
        drop(live);
        self.forget_if_final(id).await;
        Ok(())
    }

    /// Terminate one node: `terminating`, its instance terminated, then `terminated`. A node
    /// whose instance the provider would not confirm gone stays `terminating` (and so does its
    /// deployment), and is tried again every minute.
    pub(super) async fn terminate_node(&self, live: &Live, node_id: &str) {
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
            tracing::error!(node_id, error = %e.report(), "cannot mark node terminated");
        }
    }

    /// Delete a final deployment's files (its bundle and its nodes' work directories) and mark
    /// it cleaned (`cleaned_at`); its record, nodes and logs stay until
    /// [`forget_deployment`](Orchestrator::forget_deployment). Cleaning a cleaned deployment
    /// again changes nothing. Refused ([`Error::is_not_final`]) while it runs.
    pub async fn cleanup(&self, id: &str) -> Result<()> {
        let deployment = self.deployment_row(id).await?;
        if !deployment.status.is_final() {
            return Err(Error::not_final(format!(
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
        self.inner.store.mark_cleaned(id, SystemTime::now()).await?;
        lock(&self.inner.live).remove(id);
        lock(&self.inner.resources).remove(id);
        self.inner.notifier.forget(id);
        if deployment.cleaned_at.is_none() {
            tracing::info!(deployment_id = %id, "deployment cleaned up");
            // Event streams (the dashboard) learn its `cleaned_at` as they learn any change.
            if let Ok(cleaned) = self.deployment_row(id).await {
                self.publish_deployment(cleaned);
            }
            self.notify();
        }
        Ok(())
    }

    /// Forget a final deployment: its files are deleted as by [`cleanup`](Orchestrator::cleanup)
    /// if they are still there, then its record, nodes and logs. Refused
    /// ([`Error::is_not_final`]) while it runs; [`Error::is_not_found`] once forgotten.
    pub async fn forget_deployment(&self, id: &str) -> Result<()> {
        self.cleanup(id).await?;
        self.inner.store.delete_deployment(id).await?;
        tracing::info!(deployment_id = %id, "deployment forgotten");
        self.notify();
        Ok(())
    }

    /// The final deployments (cleaned or not), newest first: what
    /// [`forget_finished`](Orchestrator::forget_finished) forgets. Running ones are left
    /// alone.
    pub async fn forgettable(&self) -> Result<Vec<String>> {
        Ok(self
            .inner
            .store
            .deployments()
            .await?
            .into_iter()
            .filter(|deployment| deployment.status.is_final())
            .map(|deployment| deployment.id)
            .collect())
    }

    /// Forget every final deployment ([`forget_deployment`](Orchestrator::forget_deployment)),
    /// returning the ids forgotten and how many could not be.
    pub async fn forget_finished(&self) -> Result<(Vec<String>, u32)> {
        let mut forgotten = Vec::new();
        let mut failed = 0;
        for id in self.forgettable().await? {
            match self.forget_deployment(&id).await {
                Ok(()) => forgotten.push(id),
                Err(e) => {
                    tracing::warn!(deployment_id = %id, error = %e.report(), "cannot forget deployment");
                    failed += 1;
                }
            }
        }
        Ok((forgotten, failed))
    }

    /// Clean up every final deployment not cleaned yet (records stay).
    pub async fn cleanup_all(&self) -> Result<CleanupCounts> {
        let mut result = CleanupCounts::default();
        for deployment in self.inner.store.deployments().await? {
            if !deployment.status.is_final() || deployment.cleaned_at.is_some() {
                continue;
            }
            match self.cleanup(&deployment.id).await {
                Ok(()) => result.cleaned += 1,
                Err(e) => {
                    tracing::warn!(deployment_id = %deployment.id, error = %e.report(), "cleanup failed");
                    result.failed += 1;
                }
            }
        }
        Ok(result)
    }
}
