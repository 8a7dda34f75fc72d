//! Reading deployments: details, summaries, watches that cannot miss a change, logs and counts.

use tokio::sync::watch;

use super::Orchestrator;

use crate::error::{Error, Result};
use crate::state::model::{
    Deployment, DeploymentDetail, DeploymentSummary, LogsPage, Node, NodeStatus, Stats,
};
use crate::state::LogQuery;
use crate::sync::lock;

/// Most bytes of line text in one page of logs (SPEC: the logs endpoint); a page holds at
/// least one line, and a line at most 64 KiB.
pub(crate) const MAX_LOG_PAGE_BYTES: usize = 2 * 1024 * 1024;

impl Orchestrator {
    /// One deployment row, or not found.
    pub(super) async fn deployment_row(&self, id: &str) -> Result<Deployment> {
        self.inner
            .store
            .deployment(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("no deployment `{id}`")))
    }

    /// One deployment and its nodes, as `GET /deployments/{id}` shows it. Reads every node:
    /// to follow a deployment, use [`Orchestrator::summary`] or [`Orchestrator::watch`].
    pub async fn deployment(&self, id: &str) -> Result<DeploymentDetail> {
        let deployment = self.deployment_row(id).await?;
        let mut nodes = self.inner.store.nodes(id).await?;
        self.add_queue_reasons(&deployment.cloud_provider, &mut nodes);
        let resources = lock(&self.inner.resources)
            .get(id)
            .map(|by_index| by_index.iter().map(|(i, r)| (*i, *r)).collect())
            .unwrap_or_default();
        let notify = self.inner.notifier.delivery(id).await;
        Ok(DeploymentDetail {
            deployment,
            nodes,
            resources,
            notify,
        })
    }

    /// A deployment's state and node counters, without reading its nodes.
    pub async fn summary(&self, id: &str) -> Result<DeploymentSummary> {
        Ok(DeploymentSummary::from(&self.deployment_row(id).await?))
    }

    /// Every deployment, newest first, without their nodes.
    pub async fn deployments(&self) -> Result<Vec<Deployment>> {
        self.inner.store.deployments().await
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

    /// A page of a deployment's logs: lines after `after` (a previous page's `next`), of one
    /// node or all, at most `limit` (1 to 10,000) and at most 2 MiB of line text (at least one
    /// line).
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
                    max_bytes: Some(MAX_LOG_PAGE_BYTES),
                },
            )
            .await?;
        let next = lines.last().map_or(after, |l| l.seq);
        Ok(LogsPage { lines, next })
    }

    /// Counts over every deployment, for `GET /stats` and metrics.
    pub async fn stats(&self) -> Result<Stats> {
        let all = self.inner.store.deployments().await?;
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

    /// Fills in why each `provisioning` node still waits in its provider's queue.
    fn add_queue_reasons(&self, cloud_provider: &str, nodes: &mut [Node]) {
        let Some(provider) = self.inner.providers.get(cloud_provider) else {
            return;
        };
        for node in nodes
            .iter_mut()
            .filter(|node| node.status == NodeStatus::Provisioning)
        {
            node.queue_reason = provider.provider().queue_reason(&node.id);
        }
    }
}

impl Orchestrator {
    /// The metrics of `GET /metrics` (SPEC §4.3), OpenMetrics text: one read of the
    /// deployments, never of every node (a deployment in flight when the engine started has
    /// its nodes read once, the first time it is scraped).
    pub(crate) async fn metrics_text(&self) -> Result<String> {
        let metrics = &self.inner.metrics;
        let mut snapshot = crate::metrics::Snapshot {
            uptime: self.inner.started.elapsed(),
            pools: self.pools().map(|(name, pool)| pool.stats(name)).collect(),
            ..Default::default()
        };
        for deployment in self.inner.store.deployments().await? {
            snapshot.add(&deployment);
            if !deployment.status.is_final() && !metrics.knows_live(&deployment.id) {
                let nodes = self.inner.store.nodes(&deployment.id).await?;
                metrics.seed_live(&deployment.id, nodes.iter().map(|n| n.status));
            }
        }
        Ok(metrics.encode(&snapshot))
    }

    /// The engine's metrics, for the API's own (HTTP requests).
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
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
                        return Err(Error::shutting_down("the engine shut down"));
                    }
                }
                () = self.engine.inner.cancel.cancelled() => {
                    return Err(Error::shutting_down("the engine shut down"));
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
