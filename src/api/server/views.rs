//! The engine's model types in their wire form (SPEC §4): the only place that decides how a
//! deployment, a node or a log line looks on the wire.

use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::orchestrator::Orchestrator;
use crate::state::model::{
    Assignment, CleanupCounts, Deployment, DeploymentDetail, DeploymentSummary, LogsPage, Node,
    NodeResources,
};
use crate::state::LogLine;
use crate::wire::{self, DeploymentView, LogLineView, NodeView};

pub(crate) fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `POST /deployments`'s answer.
pub(crate) fn created(d: &DeploymentSummary) -> wire::DeploymentCreated {
    wire::DeploymentCreated {
        deployment_id: d.id.clone(),
        status: d.status,
        nodes: d.total_nodes,
        status_url: format!("/api/v1/deployments/{}", d.id),
        rerun_of: d.rerun_of.clone(),
        node_indexes: Vec::new(),
    }
}

/// `POST /deployments/{id}/rerun`'s answer: as `POST /deployments`', with the nodes it runs.
pub(crate) fn rerun_created(detail: &DeploymentDetail) -> wire::DeploymentCreated {
    wire::DeploymentCreated {
        node_indexes: detail.nodes.iter().map(|n| n.index).collect(),
        ..created(&DeploymentSummary::from(&detail.deployment))
    }
}

/// Seconds to the millisecond (what the SQLite store keeps), as a JSON number.
fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// A deployment with `nodes` (none in lists).
pub(crate) fn deployment(d: &Deployment, nodes: &[Node]) -> DeploymentView {
    DeploymentView {
        deployment_id: d.id.clone(),
        status: d.status,
        cloud_provider: d.cloud_provider.clone(),
        total_nodes: d.total_nodes,
        nodes_completed: d.nodes_completed,
        nodes_failed: d.nodes_failed,
        nodes_terminated: d.nodes_terminated,
        created_at: time(d.created_at),
        updated_at: time(d.updated_at),
        completed_at: d.completed_at.map(time),
        error_message: d.error_message.clone(),
        nodes: nodes.iter().map(node).collect(),
        rerun_of: d.rerun_of.clone(),
        duration_s: d
            .completed_at
            .map(|done| seconds(done.duration_since(d.created_at).unwrap_or_default())),
        retries: d.retries,
        cleaned_at: d.cleaned_at.map(time),
        notify: None,
    }
}

pub(crate) fn node(n: &Node) -> NodeView {
    // Only what has ended, so a view changes only when its node does.
    let phases = n.times.ended_durations();
    NodeView {
        node_id: n.id.clone(),
        node_index: n.index,
        status: n.status,
        attempt: n.attempt,
        instance_id: n.instance_id.clone(),
        ip_address: n.ip_address.clone(),
        last_update: time(n.last_update),
        exit_code: n.exit_code,
        error_message: n.error_message.clone(),
        started_at: n.times.started_at.map(time),
        finished_at: n.times.finished_at.map(time),
        duration_s: phases.running.map(seconds),
        phases: wire::NodePhases {
            provisioning_s: phases.provisioning.map(seconds),
            booting_s: phases.booting.map(seconds),
            downloading_s: phases.downloading.map(seconds),
            running_s: phases.running.map(seconds),
        },
        queue_reason: n.queue_reason.clone(),
        resources: None,
    }
}

/// A deployment with its nodes, what their scripts used, and its webhook notification.
pub(crate) fn detail(detail: &DeploymentDetail) -> DeploymentView {
    let mut view = deployment(&detail.deployment, &detail.nodes);
    for node in &mut view.nodes {
        node.resources = detail.resources.get(&node.node_index).map(resources);
    }
    view.notify = detail.notify.as_ref().map(|d| wire::NotifyView {
        status: d.status.as_str().to_owned(),
        attempts: d.attempts,
        last_error: d.last_error.clone(),
        delivered_at: d.delivered_at.map(time),
    });
    view
}

fn resources(r: &NodeResources) -> wire::NodeResources {
    wire::NodeResources {
        cpu_percent: r.cpu_percent,
        rss_bytes: r.rss_bytes,
        peak_rss_bytes: r.peak_rss_bytes,
        disk_bytes: r.disk_bytes,
        sampled_at: time(r.sampled_at),
    }
}

pub(crate) fn log_line(l: &LogLine) -> LogLineView {
    LogLineView {
        seq: l.seq,
        node_id: l.node_id.clone(),
        node_index: l.node_index,
        stream: l.stream.as_str().to_owned(),
        line: l.line.clone(),
        timestamp: time(l.timestamp),
        attempt: l.attempt,
    }
}

pub(crate) fn logs_page(page: &LogsPage) -> wire::LogsPage {
    wire::LogsPage {
        logs: page.lines.iter().map(log_line).collect(),
        next: page.next,
    }
}

pub(crate) fn cleanup_all(counts: CleanupCounts) -> wire::CleanupAll {
    wire::CleanupAll {
        cleaned_count: counts.cleaned,
        failed_count: counts.failed,
    }
}

/// `GET /stats`: the engine's counts and its pools'.
pub(crate) async fn stats(engine: &Orchestrator) -> Result<wire::Stats> {
    let stats = engine.stats().await?;
    Ok(wire::Stats {
        total_deployments: stats.total_deployments,
        total_nodes: stats.total_nodes,
        deployment_status: stats
            .deployment_status
            .iter()
            .map(|(status, count)| (status.as_str().to_owned(), *count))
            .collect(),
        uptime_seconds: stats.uptime.as_secs(),
        pools: engine
            .pools()
            .map(|(name, pool)| pool_stats(&pool.stats(name)))
            .collect(),
    })
}

/// One pool as `GET /stats` shows it.
fn pool_stats(p: &crate::provider::PoolStats) -> wire::PoolStats {
    wire::PoolStats {
        provider: p.provider.clone(),
        max_instances: p.max_instances as u64,
        min_instances: p.min_instances as u64,
        idle_timeout_s: p.idle_timeout.as_secs(),
        provision_ahead: p.provision_ahead as u64,
        instances: p.instances,
        launching: p.launching,
        busy: p.busy,
        idle: p.idle,
        booting: p.booting,
        launched_total: p.launched_total,
        reused_total: p.reused_total,
        spares_used_total: p.spares_used_total,
        retired_total: p.retired_total,
    }
}

/// A node's assignment as `POST /nodes/register` answers it.
pub(crate) fn assignment(a: Assignment) -> wire::RegisterResponse {
    wire::RegisterResponse {
        auth_token: a.auth_token,
        deployment_id: a.deployment_id,
        node_id: a.node_id,
        node_index: a.node_index,
        env: a.env,
        secret_names: a.secret_names,
        script: a.script,
        dest_dir: a.dest_dir,
        heartbeat_interval_s: a.heartbeat_interval.as_secs().max(1),
        heartbeat_interval_ms: Some(
            u64::try_from(a.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
        ),
        timeout_s: a.timeout.map(|t| t.as_secs()),
        pooled: a.pooled,
        next_token: a.next_token,
        outputs: a.outputs,
    }
}

/// A deployment and its nodes as `GET /deployments/{id}` shows them: lets an embedder show or
/// print the engine's [`DeploymentDetail`] exactly as the daemon would.
impl From<&DeploymentDetail> for DeploymentView {
    fn from(detail: &DeploymentDetail) -> DeploymentView {
        self::detail(detail)
    }
}

/// A log line as `GET /deployments/{id}/logs` shows it.
impl From<&LogLine> for LogLineView {
    fn from(line: &LogLine) -> LogLineView {
        log_line(line)
    }
}
