//! `GET /api/v1/events` (SPEC §4.1) and `taskfly watch`: every change in order, the
//! deployment filter, resuming with `Last-Event-ID`, a reader that never reads, shutdown.

use std::collections::BTreeMap;
use std::time::Duration;

use taskfly::wire::{DeploymentStatus, Event, NodeStatus};
use taskfly::EventStream;

use crate::support::cli_daemon::Daemon;
use crate::support::cli_run::Running;
use crate::support::engine_http::raw_get;
use crate::support::{local_yml, Project, TestEngine, API_TOKEN};

/// Longest a test waits for the events it expects.
const LIMIT: Duration = Duration::from_secs(120);

/// One event with the id the stream gave it.
#[derive(Debug, Clone)]
struct Seen {
    id: u64,
    event: Event,
}

impl Seen {
    fn deployment_id(&self) -> Option<&str> {
        match &self.event {
            Event::Deployment(e) => Some(&e.deployment.deployment_id),
            Event::Node(e) => Some(&e.deployment.deployment_id),
            _ => None,
        }
    }

    /// The deployment's new state, for a deployment event.
    fn deployment_status(&self) -> Option<DeploymentStatus> {
        match &self.event {
            Event::Deployment(e) => Some(e.deployment.status),
            _ => None,
        }
    }
}

/// Reads `stream` until `done` holds for what was read; fails the test after [`LIMIT`].
async fn read_until(stream: &mut EventStream, mut done: impl FnMut(&[Seen]) -> bool) -> Vec<Seen> {
    let mut seen = Vec::new();
    let reading = async {
        while !done(&seen) {
            let event = stream
                .next()
                .await
                .expect("the stream stays up")
                .expect("the stream does not end");
            let id = stream.last_event_id().expect("events carry ids");
            seen.push(Seen { id, event });
        }
    };
    if tokio::time::timeout(LIMIT, reading).await.is_err() {
        panic!("the expected events did not arrive within {LIMIT:?}; seen: {seen:#?}");
    }
    seen
}

/// Whether `seen` holds a final deployment event of every one of `ids`.
fn all_final(seen: &[Seen], ids: &[&str]) -> bool {
    ids.iter().all(|id| {
        seen.iter().any(|s| {
            s.deployment_id() == Some(id) && s.deployment_status().is_some_and(|d| d.is_final())
        })
    })
}

fn hello(count: u32) -> Project {
    Project::new(&local_yml(count, "")).script("#!/bin/sh\necho hello from $TASKFLY_NODE_INDEX\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_every_change_in_order_and_resume_after_an_id() {
    let engine = TestEngine::start().await;
    let client = engine.client();
    let mut all = client.events(None, None).await.expect("events");
    let (two, one) = (hello(2), hello(1));
    let a = engine.deploy(two.path()).await;
    let b = engine.deploy(one.path()).await;
    let seen = read_until(&mut all, |seen| all_final(seen, &[&a, &b])).await;

    assert!(
        seen.windows(2).all(|pair| pair[0].id < pair[1].id),
        "ids increase: {seen:#?}"
    );
    let of_a: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.deployment_id() == Some(&a))
        .collect();
    let statuses: Vec<DeploymentStatus> =
        of_a.iter().filter_map(|s| s.deployment_status()).collect();
    assert_eq!(
        statuses,
        [
            DeploymentStatus::Pending,
            DeploymentStatus::Provisioning,
            DeploymentStatus::Running,
            DeploymentStatus::Completed
        ],
        "{of_a:#?}"
    );
    // Each node's events chain (each leaves the state the last one entered) and end completed;
    // each carries the deployment's counters.
    let mut last_state: BTreeMap<u32, NodeStatus> = BTreeMap::new();
    for s in &of_a {
        if let Event::Node(e) = &s.event {
            let before = last_state.insert(e.node.node_index, e.node.status);
            assert_eq!(before.unwrap_or(NodeStatus::Pending), e.previous, "{s:#?}");
            assert_eq!(e.deployment.total_nodes, 2);
        }
    }
    assert_eq!(
        last_state.values().copied().collect::<Vec<_>>(),
        [NodeStatus::Completed, NodeStatus::Completed]
    );
    let Some(Event::Deployment(last)) = of_a.last().map(|s| &s.event) else {
        panic!("the last event of {a} is its deployment's: {of_a:#?}");
    };
    assert_eq!(last.deployment.nodes_completed, 2);

    // Resuming after A's first event, filtered to A: exactly A's later events, again.
    let mut resumed = client
        .events(Some(&a), Some(of_a[0].id))
        .await
        .expect("resume");
    let again = read_until(&mut resumed, |seen| all_final(seen, &[&a])).await;
    let expected: Vec<u64> = of_a[1..].iter().map(|s| s.id).collect();
    let got: Vec<u64> = again.iter().map(|s| s.id).collect();
    assert_eq!(got, expected);
    assert!(again.iter().all(|s| s.deployment_id() == Some(&a)));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_is_an_event_with_its_cleaned_at() {
    let engine = TestEngine::start().await;
    let client = engine.client();
    let project = hello(1);
    let id = engine.deploy(project.path()).await;
    let mut stream = client.events(Some(&id), None).await.expect("events");
    let done = engine.engine.wait(&id).await.expect("wait");
    assert_eq!(
        done.status,
        taskfly::state::model::DeploymentStatus::Completed
    );
    engine.engine.cleanup(&id).await.expect("cleanup");
    let seen = read_until(&mut stream, |seen| {
        seen.iter()
            .any(|s| matches!(&s.event, Event::Deployment(e) if e.deployment.cleaned_at.is_some()))
    })
    .await;
    let Some(Event::Deployment(last)) = seen.last().map(|s| &s.event) else {
        panic!("the cleanup's event is a deployment event: {seen:#?}");
    };
    assert_eq!(
        (
            last.deployment.deployment_id.as_str(),
            last.deployment.status
        ),
        (id.as_str(), DeploymentStatus::Completed)
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_an_id_no_longer_held_is_told_to_reload() {
    let engine = TestEngine::start().await;
    let client = engine.client();
    for stale in [1, u64::MAX - 1] {
        let mut stream = client.events(None, Some(stale)).await.expect("events");
        let first = stream.next().await.expect("stream").expect("an event");
        let Event::Reload(reload) = first else {
            panic!("a resume from {stale} is told to reload, got {first:?}");
        };
        assert!(reload.reason.contains("read the state again"), "{reload:?}");
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_endpoint_refuses_what_it_cannot_serve() {
    let engine = TestEngine::start().await;
    let unknown = engine
        .client()
        .events(Some("dep-0000000000000000"), None)
        .await
        .expect_err("an unknown deployment");
    assert!(unknown.is_not_found(), "{unknown}");

    let anonymous = taskfly::Client::new(&engine.url, None).expect("client");
    let refused = anonymous.events(None, None).await.expect_err("no token");
    assert!(refused.is_unauthorized(), "{refused}");

    let odd = raw_get(&engine.url, "/api/v1/events?after=3", Some(API_TOKEN)).await;
    assert_eq!(odd.status, 400, "{}", odd.text());
    assert!(odd.error().contains("deployment=ID"), "{}", odd.error());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_never_holds_up_the_engine() {
    const NODES: u32 = 40;
    let engine = TestEngine::start().await;
    let client = engine.client();
    // Opened and then left unread while a deployment runs: the daemon's writes to it back up.
    let mut slow = client.events(None, None).await.expect("events");
    let project = hello(NODES);
    let id = engine.deploy(project.path()).await;
    let done = tokio::time::timeout(LIMIT, engine.engine.wait(&id))
        .await
        .expect("the deployment ends while nobody reads the stream")
        .expect("wait");
    assert_eq!(done.nodes_completed, NODES);

    // Read late, the stream still holds every change (or says some were missed).
    let seen = read_until(&mut slow, |seen| all_final(seen, &[&id])).await;
    let reloaded = seen.iter().any(|s| matches!(s.event, Event::Reload(_)));
    let completed = seen
        .iter()
        .filter(|s| matches!(&s.event, Event::Node(e) if e.node.status == NodeStatus::Completed))
        .count();
    assert!(
        reloaded || completed == NODES as usize,
        "{completed} completions and no reload in {} events",
        seen.len()
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_when_the_server_stops() {
    let engine = TestEngine::start().await;
    let mut stream = engine.client().events(None, None).await.expect("events");
    let stopping = tokio::spawn(engine.stop());
    let end = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    stopping.await.expect("the server stops");
}

#[test]
fn taskfly_watch_follows_a_deployment_until_it_ends() {
    let daemon = Daemon::start();
    let gate_dir = tempfile::tempdir().expect("temp dir");
    let gate = gate_dir.path().join("go");
    let project = Project::new(&local_yml(
        2,
        &format!("global_metadata: {{gate: {}}}", gate.display()),
    ))
    .script("#!/bin/sh\nwhile [ ! -e \"$GATE\" ]; do sleep 0.05; done\necho through the gate\n");

    // Every deployment, as it happens.
    let mut everything = Running::start(&mut daemon.taskfly(&["watch"]));
    let id = daemon.up(project.path());

    // One deployment, as NDJSON, until it is final.
    let mut one = Running::start(&mut daemon.taskfly(&["watch", &id, "--output", "json"]));
    // Its first line, the state as read, comes once it listens: then the nodes may finish.
    one.wait_for_line(LIMIT, |line| line.contains("\"id\":null"));
    std::fs::write(&gate, "").expect("open the gate");
    let ran = one.finish(LIMIT);
    ran.expect_success();
    let events: Vec<serde_json::Value> = ran
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["event"], "deployment", "{last}");
    assert_eq!(last["data"]["deployment"]["status"], "completed", "{last}");
    assert!(
        events.iter().any(|e| e["event"] == "node"
            && e["data"]["node"]["status"] == "completed"
            && e["id"].as_u64().is_some()),
        "{events:#?}"
    );
    everything.wait_for_line(LIMIT, |line| {
        line.contains(&id) && line.contains("deployment completed")
    });
    drop(everything);

    // A deployment already final: its state, and done.
    let ran = daemon.cli(&["watch", &id]);
    ran.expect_success();
    assert!(
        ran.stdout.contains("deployment completed") && ran.stdout.contains("(2/2 completed)"),
        "{}",
        ran.show()
    );
    daemon.stop();
}
