//! What every [`Store`] backend must do alike, written once and run against each backend: the
//! in-memory store here, the SQLite store in its own tests.
//!
//! Each check uses deployment ids of its own (`conf-<check>`), so all of them can run against
//! one store. Times are whole seconds, which every backend stores exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::model::{
    Applied, Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate, PhaseTimes,
};
use super::{Heartbeat, LogLine, LogQuery, LogStream, NewLogLine, Store};
use crate::provider::InstanceRef;

/// The caps the store given to [`check_log_cap`] must have been built with: lines per
/// deployment, and per node.
pub(crate) const LOG_CAP: usize = 6;
pub(crate) const NODE_LOG_CAP: usize = 4;

/// Runs every shared check against `store`, which must use the default log cap.
pub(crate) async fn check_store(store: &dyn Store) {
    creates_and_reads(store).await;
    refuses_illegal_transitions_and_changes_nothing(store).await;
    counts_nodes_to_completion(store).await;
    retries_a_failed_node(store).await;
    provision_tokens_work_once(store).await;
    moves_deployments(store).await;
    heartbeats_touch_only_live_nodes(store).await;
    heartbeats_by_token_answer_live_or_stop(store).await;
    pages_logs(store).await;
    pages_logs_by_bytes(store).await;
    lists_newest_first(store).await;
    deletes_everything_of_a_deployment(store).await;
    drops_resent_log_lines(store).await;
    keeps_the_instance_locator(store).await;
    keeps_phase_times(store).await;
    records_an_instance_answered_after_its_node_ended(store).await;
    keeps_a_rerun_and_its_node_indexes(store).await;
    creates_new_nodes_from_their_indexes(store).await;
    marks_a_deployment_cleaned_and_keeps_its_record(store).await;
    keeps_webhook_deliveries_until_their_deployment_goes(store).await;
}

async fn marks_a_deployment_cleaned_and_keeps_its_record(store: &dyn Store) {
    let id = "conf-cleaned";
    create(store, id, 1, 0).await;
    append(store, id, &[0]).await;
    assert_eq!(
        store.deployment(id).await.unwrap().unwrap().cleaned_at,
        None
    );
    assert!(store.mark_cleaned(id, at(5)).await.unwrap());
    // Marked again (a second cleanup): the first time stays.
    assert!(store.mark_cleaned(id, at(9)).await.unwrap());
    let cleaned = store.deployment(id).await.unwrap().unwrap();
    assert_eq!(cleaned.cleaned_at, Some(at(5)));
    let listed = store.deployments().await.unwrap();
    let listed = listed.iter().find(|d| d.id == id).unwrap();
    assert_eq!(listed.cleaned_at, Some(at(5)));
    assert_eq!(store.nodes(id).await.unwrap().len(), 1, "nodes stay");
    assert_eq!(
        read_logs(store, id, 0, None, 10).await.len(),
        1,
        "logs stay"
    );
    assert!(!store.mark_cleaned("conf-no-such", at(5)).await.unwrap());
}

/// Checks that a store built with caps of [`LOG_CAP`] lines per deployment and
/// [`NODE_LOG_CAP`] per node drops only the oldest lines of the node over its cap (or, past
/// the deployment's cap, of the node holding the most), keeps one marker line per node saying
/// how many of its lines were dropped, and never reuses a `seq`.
pub(crate) async fn check_log_cap(store: &dyn Store) {
    let id = "conf-cap";
    create(store, id, 3, 0).await;
    assert_eq!(append(store, id, &[1, 1]).await, 2);
    assert_eq!(append(store, id, &[0, 0, 0]).await, 5);
    assert_eq!(
        seqs(&read_logs(store, id, 0, None, 100).await),
        [1, 2, 3, 4, 5]
    );

    // Node 0 goes over its cap: its oldest lines go, the newest of them becomes its marker.
    assert_eq!(append(store, id, &[0, 0, 0]).await, 8);
    let all = read_logs(store, id, 0, None, 100).await;
    assert_eq!(seqs(&all), [1, 2, 5, 6, 7, 8]);
    assert_eq!(
        (all[2].node_index, all[2].stream, all[2].line.as_str()),
        (
            0,
            LogStream::Stderr,
            super::dropped_lines_marker(0, 3).as_str()
        )
    );
    // Again: the marker moves up and counts every line dropped.
    assert_eq!(append(store, id, &[0]).await, 9);
    let all = read_logs(store, id, 0, None, 100).await;
    assert_eq!(seqs(&all), [1, 2, 6, 7, 8, 9]);
    assert_eq!(all[2].line, super::dropped_lines_marker(0, 4));

    // Past the deployment's cap, the node holding the most loses lines, whoever wrote last.
    assert_eq!(append(store, id, &[2]).await, 10);
    assert_eq!(append(store, id, &[1]).await, 11);
    let all = read_logs(store, id, 0, None, 100).await;
    assert_eq!(seqs(&all), [1, 2, 8, 9, 10, 11]);
    assert_eq!(all[2].line, super::dropped_lines_marker(0, 6));
    assert_eq!(
        seqs(&read_logs(store, id, 0, Some(1), 100).await),
        [1, 2, 11],
        "node 1's lines are all kept"
    );
    let markers = all
        .iter()
        .filter(|l| l.line.starts_with("[taskfly:"))
        .count();
    assert_eq!(markers, 1, "one marker line for node 0: {all:?}");
    assert_eq!(seqs(&read_logs(store, id, 8, None, 100).await), [9, 10, 11]);
    assert_eq!(append(store, id, &[2]).await, 12, "no seq is reused");
}

/// A page ends at its byte bound, holds at least one line, and paging still reads every line.
async fn pages_logs_by_bytes(store: &dyn Store) {
    let id = "conf-bytes";
    create(store, id, 1, 0).await;
    let lines = (0..10u64)
        .map(|n| NewLogLine {
            line: format!("{n}").repeat(if n == 5 { 500 } else { 100 }),
            ..log_line(0, n)
        })
        .collect();
    assert_eq!(store.append_logs(id, lines).await.unwrap(), 10);
    let page = |after| LogQuery {
        after,
        node_index: None,
        limit: 100,
        max_bytes: Some(350),
    };
    let first = store.logs(id, page(0)).await.unwrap();
    assert_eq!(seqs(&first), [1, 2, 3]);
    assert_eq!(
        seqs(&store.logs(id, page(5)).await.unwrap()),
        [6],
        "a line over the bound comes alone"
    );
    let mut after = 0;
    let mut followed = Vec::new();
    loop {
        let page = store.logs(id, page(after)).await.unwrap();
        let Some(last) = page.last() else { break };
        assert!(page.iter().map(|l| l.line.len()).sum::<usize>() <= 500);
        after = last.seq;
        followed.extend(seqs(&page));
    }
    assert_eq!(followed, (1..=10).collect::<Vec<u64>>());
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn deployment(id: &str, total_nodes: u32, retries: u32, created_at: SystemTime) -> Deployment {
    Deployment {
        id: id.to_owned(),
        status: DeploymentStatus::Pending,
        cloud_provider: "local".to_owned(),
        total_nodes,
        retries,
        nodes_completed: 0,
        nodes_failed: 0,
        nodes_terminated: 0,
        created_at,
        updated_at: created_at,
        completed_at: None,
        error_message: None,
        rerun_of: None,
        cleaned_at: None,
    }
}

fn nodes(id: &str, count: u32) -> Vec<Node> {
    (0..count)
        .map(|index| Node::new(id, index, at(0)))
        .collect()
}

fn status(status: NodeStatus) -> NodeUpdate {
    NodeUpdate::Status {
        status,
        exit_code: None,
        message: None,
    }
}

fn provisioned(index: u32) -> NodeUpdate {
    provisioned_for(index, 1)
}

/// [`provisioned`] for the node's `attempt`.
fn provisioned_for(index: u32, attempt: u32) -> NodeUpdate {
    NodeUpdate::Provisioned {
        instance: InstanceRef {
            id: format!("i-{index}"),
            locator: format!("region-{index}"),
        },
        ip_address: Some("10.1.2.3".to_owned()),
        attempt,
    }
}

/// Creates a deployment of `total` pending nodes and moves it to `provisioning`.
async fn create(store: &dyn Store, id: &str, total: u32, retries: u32) {
    store
        .create_deployment(deployment(id, total, retries, at(0)), nodes(id, total))
        .await
        .unwrap();
    store
        .update_deployment_status(id, DeploymentStatus::Provisioning, None, at(1))
        .await
        .unwrap();
}

async fn update(store: &dyn Store, node_id: &str, update: NodeUpdate, now: SystemTime) -> Applied {
    store
        .update_node(node_id, update, now)
        .await
        .unwrap_or_else(|e| panic!("{node_id}: {}", e))
}

/// Takes a node from `pending` to `last` (completed or failed) along the happy path.
async fn run_node(store: &dyn Store, node_id: &str, index: u32, last: NodeUpdate, now: SystemTime) {
    update(store, node_id, status(NodeStatus::Provisioning), now).await;
    let attempt = node(store, node_id).await.attempt;
    update(store, node_id, provisioned_for(index, attempt), now).await;
    update(store, node_id, status(NodeStatus::RunningScript), now).await;
    update(store, node_id, last, now).await;
}

async fn snapshot(store: &dyn Store, id: &str) -> (Deployment, Vec<Node>) {
    (
        store.deployment(id).await.unwrap().unwrap(),
        store.nodes(id).await.unwrap(),
    )
}

async fn node(store: &dyn Store, node_id: &str) -> Node {
    store.node(node_id).await.unwrap().unwrap()
}

fn log_line(node_index: u32, n: u64) -> NewLogLine {
    NewLogLine {
        node_id: format!("node-{node_index}"),
        node_index,
        stream: if n % 2 == 0 {
            LogStream::Stdout
        } else {
            LogStream::Stderr
        },
        line: format!("line {n} of node {node_index} with \"quotes\", $VARS and a tab\t"),
        timestamp: at(100 + n) + Duration::from_millis(250),
        attempt: 1,
        line_no: None,
    }
}

/// Appends one line per entry of `node_indexes` and returns the last seq.
async fn append(store: &dyn Store, id: &str, node_indexes: &[u32]) -> u64 {
    let lines = node_indexes
        .iter()
        .enumerate()
        .map(|(n, index)| log_line(*index, n as u64))
        .collect();
    store.append_logs(id, lines).await.unwrap()
}

async fn read_logs(
    store: &dyn Store,
    id: &str,
    after: u64,
    node_index: Option<u32>,
    limit: usize,
) -> Vec<LogLine> {
    let query = LogQuery {
        after,
        node_index,
        limit,
        max_bytes: None,
    };
    store.logs(id, query).await.unwrap()
}

fn seqs(lines: &[LogLine]) -> Vec<u64> {
    lines.iter().map(|line| line.seq).collect()
}

async fn creates_and_reads(store: &dyn Store) {
    let id = "conf-read";
    store
        .create_deployment(deployment(id, 3, 2, at(0)), nodes(id, 3))
        .await
        .unwrap();
    let stored = store.deployment(id).await.unwrap();
    assert_eq!(stored, Some(deployment(id, 3, 2, at(0))));
    assert_eq!(store.nodes(id).await.unwrap(), nodes(id, 3), "by index");
    assert_eq!(node(store, "conf-read-1").await, Node::new(id, 1, at(0)));

    assert_eq!(store.node("conf-read-9").await.unwrap(), None);
    assert_eq!(store.deployment("conf-nothing").await.unwrap(), None);
    assert!(store
        .nodes("conf-nothing")
        .await
        .unwrap_err()
        .is_not_found());

    let again = store
        .create_deployment(deployment(id, 1, 0, at(5)), nodes(id, 1))
        .await;
    assert!(again.unwrap_err().is_already_exists());
    assert_eq!(
        snapshot(store, id).await,
        (deployment(id, 3, 2, at(0)), nodes(id, 3)),
        "a refused create changes nothing"
    );
}

/// [`Store::create_deployment_with_indexes`] stores the nodes [`Node::new`] makes, by index
/// whatever the order given; an index given twice, or a deployment id taken, is refused and
/// stores nothing.
async fn creates_new_nodes_from_their_indexes(store: &dyn Store) {
    let id = "conf-indexes";
    let created = deployment(id, 3, 0, at(4));
    store
        .create_deployment_with_indexes(created.clone(), &[9, 0, 4])
        .await
        .unwrap();
    assert_eq!(store.deployment(id).await.unwrap(), Some(created));
    let expected: Vec<Node> = [0, 4, 9]
        .into_iter()
        .map(|index| Node::new(id, index, at(4)))
        .collect();
    assert_eq!(store.nodes(id).await.unwrap(), expected, "by index");
    assert_eq!(node(store, "conf-indexes-9").await, expected[2]);
    assert_eq!(store.node("conf-indexes-1").await.unwrap(), None);
    store
        .update_deployment_status(id, DeploymentStatus::Provisioning, None, at(5))
        .await
        .unwrap();
    run_node(
        store,
        "conf-indexes-4",
        4,
        status(NodeStatus::Completed),
        at(5),
    )
    .await;
    assert_eq!(
        node(store, "conf-indexes-4").await.status,
        NodeStatus::Completed
    );

    let taken = store
        .create_deployment_with_indexes(deployment(id, 1, 0, at(6)), &[0])
        .await;
    assert!(taken.unwrap_err().is_already_exists());
    assert_eq!(store.nodes(id).await.unwrap().len(), 3, "unchanged");

    let twice = "conf-indexes-twice";
    let refused = store
        .create_deployment_with_indexes(deployment(twice, 3, 0, at(0)), &[1, 2, 1])
        .await
        .unwrap_err();
    assert!(refused.is_invalid_input(), "{refused}");
    assert!(refused.to_string().contains("index 1"), "{refused}");
    assert_eq!(store.deployment(twice).await.unwrap(), None);
}

/// A rerun names the deployment it reruns, and its nodes keep their original indexes (not
/// from 0, not contiguous): they are read back by index, and complete the rerun by its own
/// count of nodes.
async fn keeps_a_rerun_and_its_node_indexes(store: &dyn Store) {
    let id = "conf-rerun";
    let rerun = Deployment {
        rerun_of: Some("conf-original".to_owned()),
        ..deployment(id, 2, 0, at(0))
    };
    let chosen = vec![Node::new(id, 7, at(0)), Node::new(id, 2, at(0))];
    store
        .create_deployment(rerun.clone(), chosen)
        .await
        .unwrap();
    assert_eq!(store.deployment(id).await.unwrap(), Some(rerun));
    let indexes: Vec<u32> = store
        .nodes(id)
        .await
        .unwrap()
        .iter()
        .map(|n| n.index)
        .collect();
    assert_eq!(indexes, [2, 7], "by index");
    store
        .update_deployment_status(id, DeploymentStatus::Provisioning, None, at(1))
        .await
        .unwrap();
    run_node(
        store,
        "conf-rerun-2",
        2,
        status(NodeStatus::Completed),
        at(2),
    )
    .await;
    run_node(
        store,
        "conf-rerun-7",
        7,
        status(NodeStatus::Completed),
        at(3),
    )
    .await;
    let done = store.deployment(id).await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.nodes_completed, done.rerun_of.as_deref()),
        (DeploymentStatus::Completed, 2, Some("conf-original"))
    );
}

async fn refuses_illegal_transitions_and_changes_nothing(store: &dyn Store) {
    let id = "conf-illegal";
    create(store, id, 2, 0).await;
    let completed = status(NodeStatus::Completed);
    run_node(store, "conf-illegal-0", 0, completed.clone(), at(2)).await;
    let before = snapshot(store, id).await;
    // Completed again is a repeated report: accepted, and it changes nothing.
    store
        .update_node("conf-illegal-0", completed.clone(), at(3))
        .await
        .expect("a repeated state is a no-op");
    assert_eq!(
        snapshot(store, id).await,
        before,
        "a repeat changed nothing"
    );
    let mut refused: Vec<NodeUpdate> = NodeStatus::ALL
        .iter()
        .filter(|s| **s != NodeStatus::Completed)
        .map(|s| status(*s))
        .collect();
    refused.extend([
        provisioned_for(0, 2),
        NodeUpdate::Retry,
        NodeUpdate::ProvisionToken { hash: [1; 32] },
        NodeUpdate::Registered {
            auth_token_hash: [2; 32],
        },
    ]);
    for attempt in refused {
        let result = store
            .update_node("conf-illegal-0", attempt.clone(), at(3))
            .await;
        let e = result.unwrap_err();
        assert!(e.is_invalid_transition(), "{attempt:?}: {e}");
        assert_eq!(
            snapshot(store, id).await,
            before,
            "{attempt:?} changed nothing"
        );
    }
    // A pending node cannot jump to completed either.
    let e = store
        .update_node("conf-illegal-1", completed.clone(), at(3))
        .await
        .unwrap_err();
    assert!(e.is_invalid_transition(), "{e}");
    assert_eq!(snapshot(store, id).await, before);

    let missing = store.update_node("conf-illegal-7", completed, at(3)).await;
    let e = missing.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}

async fn counts_nodes_to_completion(store: &dyn Store) {
    let id = "conf-count";
    create(store, id, 3, 0).await;
    let applied = update(
        store,
        "conf-count-0",
        status(NodeStatus::Provisioning),
        at(2),
    )
    .await;
    assert_eq!(
        (
            applied.previous,
            applied.node.status,
            applied.deployment_changed
        ),
        (NodeStatus::Pending, NodeStatus::Provisioning, None)
    );
    let applied = update(store, "conf-count-0", provisioned(0), at(3)).await;
    assert_eq!(applied.deployment_changed, Some(DeploymentStatus::Running));
    assert_eq!(applied.node.instance_id.as_deref(), Some("i-0"));
    assert_eq!(applied.node, node(store, "conf-count-0").await);
    update(
        store,
        "conf-count-0",
        status(NodeStatus::RunningScript),
        at(4),
    )
    .await;
    let applied = update(store, "conf-count-0", status(NodeStatus::Completed), at(5)).await;
    assert_eq!(applied.deployment_changed, None);

    run_node(
        store,
        "conf-count-1",
        1,
        status(NodeStatus::Completed),
        at(6),
    )
    .await;
    let failed = NodeUpdate::Status {
        status: NodeStatus::Failed,
        exit_code: Some(2),
        message: Some("exit code 2: no such file".to_owned()),
    };
    run_node(store, "conf-count-2", 2, failed, at(7)).await;

    let (done, nodes) = snapshot(store, id).await;
    assert_eq!(done.status, DeploymentStatus::Failed);
    assert_eq!(
        (
            done.nodes_completed,
            done.nodes_failed,
            done.nodes_terminated
        ),
        (2, 1, 0)
    );
    assert_eq!((done.updated_at, done.completed_at), (at(7), Some(at(7))));
    assert_eq!(done.error_message.as_deref(), Some("1 of 3 nodes failed"));
    assert_eq!(nodes[2].exit_code, Some(2));
    assert_eq!(
        nodes[2].error_message.as_deref(),
        Some("exit code 2: no such file")
    );
    assert_eq!(nodes[2].last_update, at(7));

    let id = "conf-done";
    create(store, id, 2, 0).await;
    for index in 0..2 {
        let node_id = format!("conf-done-{index}");
        run_node(store, &node_id, index, status(NodeStatus::Completed), at(8)).await;
    }
    let done = store.deployment(id).await.unwrap().unwrap();
    assert_eq!(done.status, DeploymentStatus::Completed);
    assert_eq!((done.nodes_completed, done.completed_at), (2, Some(at(8))));
}

async fn retries_a_failed_node(store: &dyn Store) {
    let id = "conf-retry";
    create(store, id, 1, 1).await;
    run_node(store, "conf-retry-0", 0, status(NodeStatus::Failed), at(2)).await;
    let running = store.deployment(id).await.unwrap().unwrap();
    assert_eq!(
        (running.status, running.nodes_failed),
        (DeploymentStatus::Running, 0)
    );

    let applied = update(store, "conf-retry-0", NodeUpdate::Retry, at(3)).await;
    assert_eq!(
        (applied.node.status, applied.node.attempt),
        (NodeStatus::Provisioning, 2)
    );
    assert_eq!(applied.node.instance_id, None);
    assert_eq!(applied.node.instance_locator, None);
    update(store, "conf-retry-0", provisioned_for(0, 2), at(4)).await;
    update(store, "conf-retry-0", status(NodeStatus::Failed), at(5)).await;
    let failed = store.deployment(id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.nodes_failed),
        (DeploymentStatus::Failed, 1)
    );
    let again = store
        .update_node("conf-retry-0", NodeUpdate::Retry, at(6))
        .await;
    assert!(again.unwrap_err().is_invalid_transition(), "no retry left");
}

/// The instance's locator is stored with its id, read back everywhere a node is read, and
/// forgotten with it on a retry.
async fn keeps_the_instance_locator(store: &dyn Store) {
    let id = "conf-locator";
    create(store, id, 1, 1).await;
    update(
        store,
        "conf-locator-0",
        status(NodeStatus::Provisioning),
        at(2),
    )
    .await;
    let instance = InstanceRef {
        id: "i-77".to_owned(),
        locator: "eu-west-1 at http://127.0.0.1:5000".to_owned(),
    };
    let provisioned = NodeUpdate::Provisioned {
        instance: instance.clone(),
        ip_address: None,
        attempt: 1,
    };
    let applied = update(store, "conf-locator-0", provisioned, at(3)).await;
    assert_eq!(applied.node.instance(), Some(instance.clone()));
    assert_eq!(
        node(store, "conf-locator-0").await.instance(),
        Some(instance.clone())
    );
    let (_, nodes) = snapshot(store, id).await;
    assert_eq!(nodes[0].instance(), Some(instance));
    update(store, "conf-locator-0", status(NodeStatus::Failed), at(4)).await;
    let retried = update(store, "conf-locator-0", NodeUpdate::Retry, at(5)).await;
    assert_eq!(retried.node.instance(), None);
    assert_eq!(node(store, "conf-locator-0").await.instance_locator, None);
}

/// Each phase's start is stored with the transition into it, read back everywhere a node is
/// read, and started afresh by a retry.
async fn keeps_phase_times(store: &dyn Store) {
    let id = "conf-times";
    create(store, id, 1, 1).await;
    let node_id = "conf-times-0";
    update(store, node_id, status(NodeStatus::Provisioning), at(2)).await;
    update(store, node_id, provisioned(0), at(3)).await;
    update(store, node_id, status(NodeStatus::DownloadingAssets), at(5)).await;
    update(store, node_id, status(NodeStatus::RunningScript), at(6)).await;
    let applied = update(store, node_id, status(NodeStatus::Failed), at(9)).await;
    let expected = PhaseTimes {
        provisioning_at: Some(at(2)),
        booting_at: Some(at(3)),
        downloading_at: Some(at(5)),
        started_at: Some(at(6)),
        finished_at: Some(at(9)),
    };
    assert_eq!(applied.node.times, expected);
    assert_eq!(node(store, node_id).await.times, expected);
    let (_, nodes) = snapshot(store, id).await;
    assert_eq!(nodes[0].times, expected);

    update(store, node_id, NodeUpdate::Retry, at(12)).await;
    let retried = PhaseTimes {
        provisioning_at: Some(at(12)),
        ..PhaseTimes::default()
    };
    assert_eq!(node(store, node_id).await.times, retried);
}

async fn provision_tokens_work_once(store: &dyn Store) {
    let id = "conf-token";
    let mut created = nodes(id, 2);
    created[1].provision_token_hash = Some([0xB1; 32]);
    store
        .create_deployment(deployment(id, 2, 0, at(0)), created)
        .await
        .unwrap();
    let found = store.node_by_provision_token(&[0xB1; 32]).await.unwrap();
    assert_eq!(found.map(|n| n.id).as_deref(), Some("conf-token-1"));

    let node_id = "conf-token-0";
    let arm = NodeUpdate::ProvisionToken { hash: [0xA1; 32] };
    update(store, node_id, arm, at(1)).await;
    let found = store.node_by_provision_token(&[0xA1; 32]).await.unwrap();
    assert_eq!(found, Some(node(store, node_id).await));
    assert_eq!(store.node_by_auth_token(&[0xA2; 32]).await.unwrap(), None);

    update(store, node_id, status(NodeStatus::Provisioning), at(2)).await;
    update(store, node_id, provisioned(0), at(3)).await;
    let register = NodeUpdate::Registered {
        auth_token_hash: [0xA2; 32],
    };
    let applied = update(store, node_id, register.clone(), at(4)).await;
    assert_eq!(applied.node.status, NodeStatus::Registering);
    assert_eq!(applied.node.provision_token_hash, None);
    assert_eq!(
        store.node_by_provision_token(&[0xA1; 32]).await.unwrap(),
        None
    );
    let found = store.node_by_auth_token(&[0xA2; 32]).await.unwrap();
    assert_eq!(found.as_ref().map(|n| n.id.as_str()), Some(node_id));
    assert_eq!(found.and_then(|n| n.auth_token_hash), Some([0xA2; 32]));

    let before = node(store, node_id).await;
    let twice = store.update_node(node_id, register, at(5)).await;
    assert!(
        twice.unwrap_err().is_invalid_transition(),
        "a provision token works once"
    );
    assert_eq!(node(store, node_id).await, before);
}

async fn moves_deployments(store: &dyn Store) {
    let id = "conf-move";
    store
        .create_deployment(deployment(id, 1, 0, at(0)), nodes(id, 1))
        .await
        .unwrap();
    let early = store
        .update_deployment_status(id, DeploymentStatus::Running, None, at(1))
        .await;
    assert!(early.unwrap_err().is_invalid_transition());
    assert_eq!(
        store.deployment(id).await.unwrap(),
        Some(deployment(id, 1, 0, at(0)))
    );

    let moved = store
        .update_deployment_status(id, DeploymentStatus::Provisioning, None, at(2))
        .await
        .unwrap();
    assert_eq!(
        (moved.status, moved.updated_at),
        (DeploymentStatus::Provisioning, at(2))
    );
    let message = Some("no node could be provisioned".to_owned());
    let failed = store
        .update_deployment_status(id, DeploymentStatus::Failed, message.clone(), at(3))
        .await
        .unwrap();
    assert_eq!(
        (failed.completed_at, failed.error_message.clone()),
        (Some(at(3)), message)
    );
    assert_eq!(store.deployment(id).await.unwrap(), Some(failed.clone()));
    let late = store
        .update_deployment_status(id, DeploymentStatus::Terminating, None, at(4))
        .await;
    assert!(
        late.unwrap_err().is_invalid_transition(),
        "a final deployment stays"
    );
    assert_eq!(store.deployment(id).await.unwrap(), Some(failed));

    let missing = store
        .update_deployment_status("conf-nothing", DeploymentStatus::Provisioning, None, at(1))
        .await;
    assert!(missing.unwrap_err().is_not_found());
}

async fn heartbeats_touch_only_live_nodes(store: &dyn Store) {
    let id = "conf-beat";
    create(store, id, 2, 0).await;
    update(
        store,
        "conf-beat-0",
        status(NodeStatus::Provisioning),
        at(2),
    )
    .await;
    store.touch_node("conf-beat-0", at(50)).await.unwrap();
    let touched = node(store, "conf-beat-0").await;
    assert_eq!(
        (touched.last_update, touched.status),
        (at(50), NodeStatus::Provisioning)
    );
    store.touch_node("conf-beat-1", at(60)).await.unwrap();
    let nodes = store.nodes(id).await.unwrap();
    assert_eq!(
        (nodes[0].last_update, nodes[1].last_update),
        (at(50), at(60))
    );

    // An update after a heartbeat takes the update's time.
    update(store, "conf-beat-0", provisioned(0), at(55)).await;
    assert_eq!(node(store, "conf-beat-0").await.last_update, at(55));

    update(
        store,
        "conf-beat-0",
        status(NodeStatus::RunningScript),
        at(70),
    )
    .await;
    update(store, "conf-beat-0", status(NodeStatus::Completed), at(71)).await;
    store.touch_node("conf-beat-0", at(300)).await.unwrap();
    assert_eq!(
        node(store, "conf-beat-0").await.last_update,
        at(71),
        "a final node is not touched"
    );
    store.touch_node("conf-beat-9", at(300)).await.unwrap();
    assert_eq!(store.node("conf-beat-9").await.unwrap(), None);
}

/// Takes node `index` of `id` to `registering` with the auth token hash `[auth; 32]`, and a
/// registration key `[resend; 32]` to resend its registration with.
async fn register(store: &dyn Store, id: &str, index: u32, auth: u8, resend: u8) {
    let node_id = format!("{id}-{index}");
    let arm = NodeUpdate::ProvisionToken { hash: [resend; 32] };
    update(store, &node_id, arm, at(1)).await;
    update(store, &node_id, status(NodeStatus::Provisioning), at(2)).await;
    update(store, &node_id, provisioned(index), at(3)).await;
    let registered = NodeUpdate::RegisteredWithNonce {
        auth_token_hash: [auth; 32],
        resend_key: [resend; 32],
    };
    update(store, &node_id, registered, at(4)).await;
}

async fn heartbeats_by_token_answer_live_or_stop(store: &dyn Store) {
    let id = "conf-hb";
    create(store, id, 3, 0).await;
    let live = |index| Heartbeat::Live {
        deployment_id: id.into(),
        node_index: index,
    };
    register(store, id, 0, 0xC0, 0xD0).await;
    register(store, id, 2, 0xC2, 0xD2).await;

    assert_eq!(store.heartbeat(&[0xC0; 32], at(50)).await.unwrap(), live(0));
    let touched = node(store, "conf-hb-0").await;
    assert_eq!(
        (touched.last_update, touched.status),
        (at(50), NodeStatus::Registering),
        "a live node is touched, its state kept"
    );
    assert_eq!(
        store.heartbeat(&[0xEE; 32], at(51)).await.unwrap(),
        Heartbeat::UnknownToken
    );

    // A resent registration rotates the token: the old one is refused from the next beat.
    let resent = NodeUpdate::RegistrationResent {
        resend_key: [0xD0; 32],
        auth_token_hash: [0xC1; 32],
    };
    update(store, "conf-hb-0", resent, at(52)).await;
    assert_eq!(
        store.heartbeat(&[0xC0; 32], at(53)).await.unwrap(),
        Heartbeat::UnknownToken
    );
    assert_eq!(store.heartbeat(&[0xC1; 32], at(54)).await.unwrap(), live(0));
    assert_eq!(node(store, "conf-hb-0").await.last_update, at(54));

    // A final node is told to stop and never touched again.
    update(
        store,
        "conf-hb-0",
        status(NodeStatus::RunningScript),
        at(60),
    )
    .await;
    update(store, "conf-hb-0", status(NodeStatus::Completed), at(61)).await;
    assert_eq!(
        store.heartbeat(&[0xC1; 32], at(300)).await.unwrap(),
        Heartbeat::Stop
    );
    assert_eq!(node(store, "conf-hb-0").await.last_update, at(61));

    // A terminating deployment stops its live nodes, untouched.
    assert_eq!(store.heartbeat(&[0xC2; 32], at(70)).await.unwrap(), live(2));
    store
        .update_deployment_status(id, DeploymentStatus::Terminating, None, at(80))
        .await
        .unwrap();
    assert_eq!(
        store.heartbeat(&[0xC2; 32], at(90)).await.unwrap(),
        Heartbeat::Stop
    );
    let stopped = node(store, "conf-hb-2").await;
    assert_eq!(
        (stopped.last_update, stopped.status),
        (at(70), NodeStatus::Registering)
    );

    // A forgotten deployment's tokens are unknown.
    assert!(store.delete_deployment(id).await.unwrap());
    assert_eq!(
        store.heartbeat(&[0xC2; 32], at(91)).await.unwrap(),
        Heartbeat::UnknownToken
    );
}

async fn pages_logs(store: &dyn Store) {
    let id = "conf-logs";
    create(store, id, 2, 0).await;
    assert_eq!(store.logs(id, LogQuery::default()).await.unwrap(), []);
    assert_eq!(append(store, id, &[]).await, 0);
    assert_eq!(append(store, id, &[0, 1, 0]).await, 3);
    assert_eq!(append(store, id, &[1, 0]).await, 5);

    let all = read_logs(store, id, 0, None, 100).await;
    assert_eq!(seqs(&all), [1, 2, 3, 4, 5], "oldest first");
    let expected = [(0, 0), (1, 1), (0, 2), (1, 0), (0, 1)].map(|(index, n)| {
        let line = log_line(index, n);
        (
            line.node_id,
            line.node_index,
            line.stream,
            line.line,
            line.timestamp,
        )
    });
    let stored: Vec<_> = all
        .iter()
        .map(|l| {
            (
                l.node_id.clone(),
                l.node_index,
                l.stream,
                l.line.clone(),
                l.timestamp,
            )
        })
        .collect();
    assert_eq!(stored, expected);

    assert_eq!(seqs(&read_logs(store, id, 2, None, 2).await), [3, 4]);
    assert_eq!(
        seqs(&read_logs(store, id, 5, None, 10).await),
        [] as [u64; 0]
    );
    assert_eq!(seqs(&read_logs(store, id, 0, Some(1), 10).await), [2, 4]);
    assert_eq!(seqs(&read_logs(store, id, 1, Some(0), 1).await), [3]);
    assert_eq!(
        seqs(&read_logs(store, id, 0, None, 0).await),
        [] as [u64; 0]
    );
    assert_eq!(
        seqs(&read_logs(store, id, u64::MAX, None, 10).await),
        [] as [u64; 0]
    );

    // Following with `after` = the last seq seen never repeats or skips a line.
    let mut followed = Vec::new();
    let mut after = 0;
    loop {
        let page = read_logs(store, id, after, None, 2).await;
        let Some(last) = page.last() else { break };
        after = last.seq;
        followed.extend(seqs(&page));
    }
    assert_eq!(followed, [1, 2, 3, 4, 5]);

    let missing = store
        .append_logs("conf-nothing", vec![log_line(0, 0)])
        .await;
    assert!(missing.unwrap_err().is_not_found());
    let missing = store.logs("conf-nothing", LogQuery::default()).await;
    assert!(missing.unwrap_err().is_not_found());
}

async fn drops_resent_log_lines(store: &dyn Store) {
    create(store, "dep-resend", 1, 1).await;
    let numbered = |first: u64, count: u64, attempt: u32| -> Vec<NewLogLine> {
        (first..first + count)
            .map(|n| NewLogLine {
                attempt,
                line_no: Some(n),
                ..log_line(0, n)
            })
            .map(|mut line| {
                line.node_id = "dep-resend-0".to_owned();
                line
            })
            .collect()
    };
    store
        .append_logs("dep-resend", numbered(0, 3, 1))
        .await
        .unwrap();
    // The same batch again (a retry after a lost answer), then one overlapping the first.
    store
        .append_logs("dep-resend", numbered(0, 3, 1))
        .await
        .unwrap();
    let last = store
        .append_logs("dep-resend", numbered(2, 3, 1))
        .await
        .unwrap();
    assert_eq!(last, 5, "lines 0..5 stored once each");
    // A new attempt numbers its lines from 0 again.
    let last = store
        .append_logs("dep-resend", numbered(0, 2, 2))
        .await
        .unwrap();
    assert_eq!(last, 7);
    let lines = read_logs(store, "dep-resend", 0, None, 100).await;
    let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(
        texts,
        [
            log_line(0, 0).line,
            log_line(0, 1).line,
            log_line(0, 2).line,
            log_line(0, 3).line,
            log_line(0, 4).line,
            log_line(0, 0).line,
            log_line(0, 1).line,
        ]
    );
    assert_eq!(seqs(&lines), [1, 2, 3, 4, 5, 6, 7]);
    let attempts: Vec<u32> = lines.iter().map(|l| l.attempt).collect();
    assert_eq!(
        attempts,
        [1, 1, 1, 1, 1, 2, 2],
        "each line keeps its attempt"
    );
    // The highest number taken, per attempt and stream (even numbers are stdout here).
    let last_taken =
        |attempt, stream| store.last_line_no("dep-resend", "dep-resend-0", attempt, stream);
    assert_eq!(last_taken(1, LogStream::Stdout).await.unwrap(), Some(4));
    assert_eq!(last_taken(1, LogStream::Stderr).await.unwrap(), Some(3));
    assert_eq!(last_taken(2, LogStream::Stdout).await.unwrap(), Some(0));
    assert_eq!(last_taken(3, LogStream::Stdout).await.unwrap(), None);
}

async fn lists_newest_first(store: &dyn Store) {
    for (id, created) in [
        ("conf-order-a", 10),
        ("conf-order-b", 30),
        ("conf-order-c", 20),
        ("conf-order-d", 30),
    ] {
        store
            .create_deployment(deployment(id, 1, 0, at(created)), nodes(id, 1))
            .await
            .unwrap();
    }
    let listed: Vec<String> = store
        .deployments()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .filter(|id| id.starts_with("conf-order-"))
        .collect();
    assert_eq!(
        listed,
        [
            "conf-order-d",
            "conf-order-b",
            "conf-order-c",
            "conf-order-a"
        ]
    );
}

async fn deletes_everything_of_a_deployment(store: &dyn Store) {
    let id = "conf-delete";
    let kept = "conf-kept";
    let mut created = nodes(id, 2);
    created[0].provision_token_hash = Some([0xD1; 32]);
    created[1].auth_token_hash = Some([0xD2; 32]);
    store
        .create_deployment(deployment(id, 2, 0, at(0)), created)
        .await
        .unwrap();
    create(store, kept, 1, 0).await;
    append(store, id, &[0, 1]).await;
    append(store, kept, &[0]).await;
    store.touch_node("conf-delete-1", at(9)).await.unwrap();

    assert!(store.delete_deployment(id).await.unwrap());
    assert_eq!(store.deployment(id).await.unwrap(), None);
    assert_eq!(store.node("conf-delete-0").await.unwrap(), None);
    assert!(store.nodes(id).await.unwrap_err().is_not_found());
    assert_eq!(
        store.node_by_provision_token(&[0xD1; 32]).await.unwrap(),
        None
    );
    assert_eq!(store.node_by_auth_token(&[0xD2; 32]).await.unwrap(), None);
    assert!(store
        .logs(id, LogQuery::default())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(!store.delete_deployment(id).await.unwrap(), "already gone");
    assert!(!store.delete_deployment("conf-nothing").await.unwrap());

    assert_eq!(store.nodes(kept).await.unwrap().len(), 1);
    assert_eq!(seqs(&read_logs(store, kept, 0, None, 10).await), [1]);

    // The id is free again, with a fresh log.
    store
        .create_deployment(deployment(id, 1, 0, at(20)), nodes(id, 1))
        .await
        .unwrap();
    assert_eq!(store.nodes(id).await.unwrap(), nodes(id, 1));
    assert_eq!(append(store, id, &[0]).await, 1);
}

mod tests {
    use super::*;
    use crate::state::MemoryStore;

    #[tokio::test]
    async fn memory_store_conforms() {
        check_store(&MemoryStore::new()).await;
        let capped = MemoryStore::new()
            .max_log_lines(LOG_CAP)
            .max_log_lines_per_node(NODE_LOG_CAP);
        check_log_cap(&capped).await;
    }

    /// A store that leaves [`Store::heartbeat`] to the trait's default.
    struct DefaultHeartbeat(MemoryStore);

    #[async_trait::async_trait]
    impl Store for DefaultHeartbeat {
        async fn create_deployment(&self, d: Deployment, nodes: Vec<Node>) -> crate::Result<()> {
            self.0.create_deployment(d, nodes).await
        }
        async fn deployment(&self, id: &str) -> crate::Result<Option<Deployment>> {
            self.0.deployment(id).await
        }
        async fn deployments(&self) -> crate::Result<Vec<Deployment>> {
            self.0.deployments().await
        }
        async fn node(&self, node_id: &str) -> crate::Result<Option<Node>> {
            self.0.node(node_id).await
        }
        async fn nodes(&self, id: &str) -> crate::Result<Vec<Node>> {
            self.0.nodes(id).await
        }
        async fn node_by_provision_token(&self, hash: &[u8; 32]) -> crate::Result<Option<Node>> {
            self.0.node_by_provision_token(hash).await
        }
        async fn node_by_auth_token(&self, hash: &[u8; 32]) -> crate::Result<Option<Node>> {
            self.0.node_by_auth_token(hash).await
        }
        async fn update_node(
            &self,
            node_id: &str,
            update: NodeUpdate,
            now: SystemTime,
        ) -> crate::Result<Applied> {
            self.0.update_node(node_id, update, now).await
        }
        async fn update_deployment_status(
            &self,
            id: &str,
            to: DeploymentStatus,
            message: Option<String>,
            now: SystemTime,
        ) -> crate::Result<Deployment> {
            self.0.update_deployment_status(id, to, message, now).await
        }
        async fn touch_node(&self, node_id: &str, now: SystemTime) -> crate::Result<()> {
            self.0.touch_node(node_id, now).await
        }
        async fn append_logs(&self, id: &str, lines: Vec<NewLogLine>) -> crate::Result<u64> {
            self.0.append_logs(id, lines).await
        }
        async fn last_line_no(
            &self,
            id: &str,
            node_id: &str,
            attempt: u32,
            stream: LogStream,
        ) -> crate::Result<Option<u64>> {
            self.0.last_line_no(id, node_id, attempt, stream).await
        }
        async fn logs(&self, id: &str, query: LogQuery) -> crate::Result<Vec<LogLine>> {
            self.0.logs(id, query).await
        }
        async fn delete_deployment(&self, id: &str) -> crate::Result<bool> {
            self.0.delete_deployment(id).await
        }
        async fn mark_cleaned(&self, id: &str, at: SystemTime) -> crate::Result<bool> {
            self.0.mark_cleaned(id, at).await
        }
        async fn save_delivery(
            &self,
            delivery: crate::state::model::WebhookDelivery,
        ) -> crate::Result<()> {
            self.0.save_delivery(delivery).await
        }
        async fn delivery(
            &self,
            id: &str,
        ) -> crate::Result<Option<crate::state::model::WebhookDelivery>> {
            self.0.delivery(id).await
        }
        async fn pending_deliveries(
            &self,
        ) -> crate::Result<Vec<crate::state::model::WebhookDelivery>> {
            self.0.pending_deliveries().await
        }
    }

    #[tokio::test]
    async fn the_default_heartbeat_conforms() {
        check_store(&DefaultHeartbeat(MemoryStore::new())).await;
    }
}

async fn keeps_webhook_deliveries_until_their_deployment_goes(store: &dyn Store) {
    use super::model::{DeliveryStatus, WebhookDelivery};
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
    let delivery = |id: &str, created: u64| WebhookDelivery {
        deployment_id: id.to_owned(),
        url: "https://hooks.example.com/T0/B0/secret-path".to_owned(),
        body: format!("{{\"deployment_id\":\"{id}\"}}"),
        signature: Some("sha256=00ff".to_owned()),
        status: DeliveryStatus::Pending,
        attempts: 0,
        last_error: None,
        created_at: at(created),
        next_attempt_at: at(created),
        delivered_at: None,
    };
    create(store, "conf-hook-a", 1, 0).await;
    create(store, "conf-hook-b", 1, 0).await;
    let unknown = store
        .save_delivery(delivery("conf-hook-none", 0))
        .await
        .expect_err("no such deployment");
    assert!(unknown.is_not_found(), "{unknown}");

    store
        .save_delivery(delivery("conf-hook-b", 2))
        .await
        .expect("save");
    store
        .save_delivery(delivery("conf-hook-a", 1))
        .await
        .expect("save");
    let pending: Vec<String> = store
        .pending_deliveries()
        .await
        .expect("pending")
        .into_iter()
        .map(|d| d.deployment_id)
        .collect();
    assert_eq!(pending, ["conf-hook-a", "conf-hook-b"], "oldest first");

    let mut done = delivery("conf-hook-a", 1);
    done.status = DeliveryStatus::Delivered;
    done.attempts = 2;
    done.last_error = Some("HTTP 500".to_owned());
    done.delivered_at = Some(at(5));
    store.save_delivery(done.clone()).await.expect("replace");
    assert_eq!(
        store.delivery("conf-hook-a").await.expect("read"),
        Some(done)
    );
    let pending = store.pending_deliveries().await.expect("pending");
    assert_eq!(pending, [delivery("conf-hook-b", 2)]);

    assert!(store
        .delete_deployment("conf-hook-b")
        .await
        .expect("delete"));
    assert_eq!(store.delivery("conf-hook-b").await.expect("read"), None);
    assert_eq!(store.pending_deliveries().await.expect("pending"), []);
}

/// A node that ended before its provider answered (a quick Slurm task) gets its instance
/// recorded and keeps its end; the deployment's counts do not change.
async fn records_an_instance_answered_after_its_node_ended(store: &dyn Store) {
    let id = "conf-late";
    create(store, id, 1, 0).await;
    let node_id = "conf-late-0";
    update(store, node_id, status(NodeStatus::Provisioning), at(2)).await;
    update(store, node_id, status(NodeStatus::RunningScript), at(3)).await;
    update(store, node_id, status(NodeStatus::Completed), at(4)).await;
    let (before, _) = snapshot(store, id).await;
    let applied = update(store, node_id, provisioned(0), at(5)).await;
    assert_eq!(
        (applied.previous, applied.node.status),
        (NodeStatus::Completed, NodeStatus::Completed)
    );
    assert_eq!(applied.deployment_changed, None);
    let (after, nodes) = snapshot(store, id).await;
    assert_eq!(nodes[0].status, NodeStatus::Completed);
    assert_eq!(nodes[0].instance_id.as_deref(), Some("i-0"));
    let counts = |d: &Deployment| (d.status, d.nodes_completed, d.nodes_failed, d.completed_at);
    assert_eq!(counts(&after), counts(&before));
}
