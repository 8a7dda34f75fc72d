use std::time::SystemTime;

use super::*;
use crate::state::model::{Deployment, DeploymentStatus, Node, PhaseTimes};

fn deployment(id: &str, status: DeploymentStatus, completed: u32, failed: u32) -> Deployment {
    Deployment {
        id: id.to_owned(),
        status,
        cloud_provider: "local".to_owned(),
        total_nodes: completed + failed,
        retries: 0,
        nodes_completed: completed,
        nodes_failed: failed,
        nodes_terminated: 0,
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
        completed_at: None,
        error_message: None,
        rerun_of: None,
        cleaned_at: None,
    }
}

/// A node of `deployment` in `status` that entered its phases (provisioning, booting,
/// downloading, running, a final state) at these seconds after a start.
fn node(deployment: &str, status: NodeStatus, marks: [Option<u64>; 5]) -> Node {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let at = |mark: Option<u64>| mark.map(|s| start + Duration::from_secs(s));
    let mut node = Node::new(deployment, 0, start);
    node.status = status;
    node.times = PhaseTimes {
        provisioning_at: at(marks[0]),
        booting_at: at(marks[1]),
        downloading_at: at(marks[2]),
        started_at: at(marks[3]),
        finished_at: at(marks[4]),
    };
    node
}

/// The value of the sample line that starts with `series ` (name and labels as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[test]
fn node_gauges_add_live_counts_to_final_deployments_counters() {
    let metrics = Metrics::new();
    metrics.deployment_created("dep-live", 3);
    let provisioning = node(
        "dep-live",
        NodeStatus::Provisioning,
        [Some(0), None, None, None, None],
    );
    metrics.node_changed(NodeStatus::Pending, &provisioning);
    let booting = node(
        "dep-live",
        NodeStatus::Booting,
        [Some(0), Some(2), None, None, None],
    );
    metrics.node_changed(NodeStatus::Provisioning, &booting);
    let mut snapshot = Snapshot::default();
    snapshot.add(&deployment(
        "dep-live",
        DeploymentStatus::Provisioning,
        0,
        0,
    ));
    snapshot.add(&deployment("dep-done", DeploymentStatus::Failed, 4, 1));

    let text = metrics.encode(&snapshot);
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="pending"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="booting"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="completed"}"#),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_deployments{status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_deployments{status="running"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_node_transitions_total{status="booting"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"taskfly_node_phase_seconds_count{phase="provisioning"}"#
        ),
        Some(1.0)
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn a_deployment_no_longer_live_is_forgotten_and_a_restarted_one_is_seeded() {
    let metrics = Metrics::new();
    metrics.deployment_created("dep-a", 2);
    let text = metrics.encode(&Snapshot::default());
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="pending"}"#),
        Some(0.0)
    );
    assert!(!metrics.knows_live("dep-a"));

    // Changes of a deployment not counted yet are not invented.
    let registering = node(
        "dep-b",
        NodeStatus::Registering,
        [Some(0), Some(1), None, None, None],
    );
    metrics.node_changed(NodeStatus::Booting, &registering);
    metrics.seed_live(
        "dep-b",
        [NodeStatus::RunningScript, NodeStatus::Completed].into_iter(),
    );
    let mut snapshot = Snapshot::default();
    snapshot.add(&deployment("dep-b", DeploymentStatus::Running, 0, 0));
    let text = metrics.encode(&snapshot);
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="running_script"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"taskfly_nodes{status="registering"}"#),
        Some(0.0)
    );
}

#[test]
fn each_phase_is_observed_once_when_left_with_its_length() {
    let metrics = Metrics::new();
    let all = [Some(0), Some(2), Some(7), Some(8), Some(20)];
    let mut marks = [None; 5];
    for (index, (from, to)) in [
        (NodeStatus::Pending, NodeStatus::Provisioning),
        (NodeStatus::Provisioning, NodeStatus::Booting),
        (NodeStatus::Booting, NodeStatus::Registering),
        (NodeStatus::Registering, NodeStatus::DownloadingAssets),
        (NodeStatus::DownloadingAssets, NodeStatus::RunningScript),
        (NodeStatus::RunningScript, NodeStatus::Failed),
    ]
    .into_iter()
    .enumerate()
    {
        let phase = index.saturating_sub(usize::from(index > 2));
        marks[phase] = all[phase];
        metrics.node_changed(from, &node("dep-x", to, marks));
    }
    let text = metrics.encode(&Snapshot::default());
    for (phase, seconds) in [
        ("provisioning", 2.0),
        ("booting", 5.0),
        ("downloading", 1.0),
        ("running", 12.0),
    ] {
        let count = format!("taskfly_node_phase_seconds_count{{phase=\"{phase}\"}}");
        let sum = format!("taskfly_node_phase_seconds_sum{{phase=\"{phase}\"}}");
        assert_eq!(
            (sample(&text, &count), sample(&text, &sum)),
            (Some(1.0), Some(seconds)),
            "{phase}\n{text}"
        );
    }
}

#[test]
fn http_and_provider_calls_are_counted_by_bounded_labels() {
    let metrics = Metrics::new();
    let route = RouteMetrics::new("/api/v1/deployments/{id}");
    metrics.http_request(&route, 404, Duration::from_millis(2));
    metrics.http_request(&route, 404, Duration::from_millis(3));
    metrics.http_request(&route, 200, Duration::from_millis(1));
    metrics.http_request(&route, 200, Duration::from_millis(1));
    metrics.provider_call("local", "provision", true);
    metrics.provider_call("local", "provision", false);
    let text = metrics.encode(&Snapshot::default());
    assert_eq!(
        sample(
            &text,
            r#"taskfly_http_requests_total{route="/api/v1/deployments/{id}",code="404"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"taskfly_http_requests_total{route="/api/v1/deployments/{id}",code="200"}"#
        ),
        Some(2.0),
        "200 answers are counted through the route's own handle"
    );
    assert_eq!(
        sample(
            &text,
            r#"taskfly_http_request_duration_seconds_count{route="/api/v1/deployments/{id}"}"#
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"taskfly_provider_calls_total{provider="local",op="provision",result="error"}"#
        ),
        Some(1.0)
    );
    let version = format!(
        "taskfly_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0));
}
