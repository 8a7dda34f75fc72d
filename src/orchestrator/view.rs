//! Internal records to their wire form.

use std::time::SystemTime;

use crate::state::model::{Deployment, Node};
use crate::state::LogLine;
use crate::wire::{DeploymentView, LogLineView, NodeView};

pub(crate) fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(crate) fn deployment(d: &Deployment, nodes: &[Node]) -> DeploymentView {
    DeploymentView {
        deployment_id: d.id.clone(),
        status: d.status.as_str().to_owned(),
        cloud_provider: d.cloud_provider.clone(),
        total_nodes: d.total_nodes,
        nodes_completed: d.nodes_completed,
        nodes_failed: d.nodes_failed,
        created_at: time(d.created_at),
        updated_at: time(d.updated_at),
        completed_at: d.completed_at.map(time),
        error_message: d.error_message.clone(),
        nodes: nodes.iter().map(node).collect(),
    }
}

pub(crate) fn node(n: &Node) -> NodeView {
    NodeView {
        node_id: n.id.clone(),
        node_index: n.index,
        status: n.status.as_str().to_owned(),
        attempt: n.attempt,
        instance_id: n.instance_id.clone(),
        ip_address: n.ip_address.clone(),
        last_update: time(n.last_update),
        exit_code: n.exit_code,
        error_message: n.error_message.clone(),
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
    }
}
