//! The agent end to end, against the fake daemon: one node, then a pooled instance.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::fake_daemon::RegisterAnswer;
pub(crate) use crate::agent::fake_daemon::{bundle, fake_daemon, registration, Daemon};

async fn run_against(
    script: &str,
    env: &[(&str, &str)],
    timeout_s: Option<u64>,
    shutdown: bool,
) -> (AgentReport, Daemon, tempfile::TempDir) {
    let mut registration = registration(env);
    registration.timeout_s = timeout_s;
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle(script),
        registration: Some(registration),
        shutdown,
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::new(url, "provision", work.path().join("node"))
        .grace_period(Duration::from_millis(300));
    let report = run(config, CancellationToken::new()).await.expect("agent");
    server.abort();
    let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
    (report, daemon, work)
}

fn statuses(daemon: &Daemon) -> Vec<&str> {
    daemon.statuses.iter().map(|s| s.status.as_str()).collect()
}

#[tokio::test]
async fn a_failing_script_is_reported_with_its_code_output_and_environment() {
    let tricky = "a 'b' \"c\" $HOME `id`";
    let script = "#!/bin/sh\nprintf '%s\\n' \"$TRICKY\"\necho \"token=${TASKFLY_API_TOKEN:-none} node=$TASKFLY_NODE_ID\"\nprintf 'x\\r\\n'\necho oops >&2\necho boom >&2\nexit 3\n";
    let (report, daemon, _work) = run_against(script, &[("TRICKY", tricky)], None, false).await;
    assert_eq!(report.status, NodeStatus::Failed);
    assert_eq!(report.exit_code, Some(3));
    assert_eq!(
        statuses(&daemon),
        ["downloading_assets", "running_script", "failed"]
    );
    let last = daemon.statuses.last().expect("final status");
    assert_eq!(last.message.as_deref(), Some("exited with code 3: boom"));
    assert_eq!(last.exit_code, Some(3));
    let stdout: Vec<&str> = daemon
        .lines
        .iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(stdout, [tricky, "token=none node=dep-1", "x"]);
    let stderr: Vec<&str> = daemon
        .lines
        .iter()
        .filter(|l| l.stream == "stderr")
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(stderr, ["oops", "boom"]);
}

#[tokio::test]
async fn a_node_ending_within_one_heartbeat_interval_sends_no_heartbeat() {
    // The registration itself told the daemon the node is alive.
    let mut registration = registration(&[]);
    registration.heartbeat_interval_ms = Some(600_000);
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("true\n"),
        registration: Some(registration),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::new(url, "provision", work.path().join("node"));
    let report = run(config, CancellationToken::new()).await.expect("agent");
    server.abort();
    assert_eq!(report.status, NodeStatus::Completed);
    let daemon = daemon.lock().expect("lock");
    assert_eq!(
        statuses(&daemon),
        ["downloading_assets", "running_script", "completed"]
    );
    assert_eq!(daemon.heartbeats, 0);
}

#[tokio::test]
async fn a_successful_script_completes() {
    let (report, daemon, work) = run_against("echo done > result.txt\n", &[], None, false).await;
    assert_eq!(report.status, NodeStatus::Completed);
    assert_eq!(report.exit_code, Some(0));
    assert_eq!(
        statuses(&daemon),
        ["downloading_assets", "running_script", "completed"]
    );
    let result = std::fs::read_to_string(work.path().join("node/bundle/result.txt"))
        .expect("the script ran in the bundle root");
    assert_eq!(result, "done\n");
    assert!(!work.path().join("node").join(ASSETS_FILE).exists());
}

#[tokio::test]
async fn a_script_past_its_timeout_fails() {
    let (report, daemon, _work) = run_against("sleep 100 & sleep 100\n", &[], Some(1), false).await;
    assert_eq!(report.status, NodeStatus::Failed);
    assert_eq!(report.exit_code, None);
    assert_eq!(
        daemon.statuses.last().and_then(|s| s.message.as_deref()),
        Some("timed out after 1s")
    );
}

#[tokio::test]
async fn a_shutdown_request_terminates_without_a_final_report() {
    let (report, daemon, _work) = run_against("echo started\nsleep 100\n", &[], None, true).await;
    assert_eq!(report.status, NodeStatus::Terminated);
    let statuses = statuses(&daemon);
    assert!(
        !statuses.contains(&"completed") && !statuses.contains(&"failed"),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_missing_script_fails_before_running() {
    let mut registration = registration(&[]);
    registration.script = "nope.sh".into();
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("echo hi\n"),
        registration: Some(registration),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let report = run(
        AgentConfig::new(url, "provision", work.path()),
        CancellationToken::new(),
    )
    .await
    .expect("agent");
    server.abort();
    assert_eq!(report.status, NodeStatus::Failed);
    assert_eq!(
        report.message.as_deref(),
        Some("script nope.sh not found in the bundle")
    );
    let daemon = daemon.lock().expect("lock");
    assert_eq!(statuses(&daemon), ["downloading_assets", "failed"]);
}

#[tokio::test]
async fn cancelling_stops_the_script() {
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("echo up\nsleep 100\n"),
        registration: Some(registration(&[])),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    let config =
        AgentConfig::new(url, "provision", work.path()).grace_period(Duration::from_millis(200));
    let agent = tokio::spawn(run(config, cancel.clone()));
    Daemon::wait_until(&daemon, "the script starts", |d| {
        d.lines.iter().any(|l| l.line == "up")
    })
    .await;
    cancel.cancel();
    let report = agent.await.expect("joined").expect("agent");
    server.abort();
    assert_eq!(report.status, NodeStatus::Terminated);
    assert_eq!(report.node_id, "dep-1");
    assert_eq!(
        statuses(&daemon.lock().expect("lock")),
        ["downloading_assets", "running_script"]
    );
}

// ----- pooled instances -----

fn pooled(node_index: u32, env: &[(&str, &str)]) -> wire::RegisterResponse {
    let mut registration = registration(env);
    registration.node_id = format!("dep-{node_index}");
    registration.node_index = node_index;
    registration.pooled = true;
    registration
}

fn assign(registration: wire::RegisterResponse, script: &str) -> RegisterAnswer {
    RegisterAnswer::Assign {
        registration: Box::new(registration),
        bundle: bundle(script),
        shutdown: false,
    }
}

/// Runs an agent with the instance token `pool-token` against a fake daemon answering
/// registrations with `answers`.
async fn run_pooled(
    answers: Vec<RegisterAnswer>,
) -> (Result<AgentReport>, Daemon, tempfile::TempDir) {
    let work = tempfile::tempdir().expect("tempdir");
    let daemon = Arc::new(Mutex::new(Daemon {
        register_answers: answers.into(),
        register_probe: Some(work.path().join("node/bundle")),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let config = AgentConfig::new(url, "pool-token", work.path().join("node"))
        .grace_period(Duration::from_millis(300));
    let report = run(config, CancellationToken::new()).await;
    server.abort();
    let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
    (report, daemon, work)
}

fn stdout(daemon: &Daemon) -> Vec<&str> {
    daemon
        .lines
        .iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.line.as_str())
        .collect()
}

#[tokio::test]
async fn a_pooled_agent_serves_node_after_node_until_retired() {
    // The first node leaves files behind, one in a directory it made read-only.
    let first = "echo one\necho one > first.txt\nmkdir sub\necho x > sub/f\nchmod 555 sub\n";
    let second = "echo \"first=${FIRST:-unset} second=$SECOND node=$TASKFLY_NODE_ID\"\nls -A\n";
    let (report, daemon, work) = run_pooled(vec![
        assign(pooled(1, &[("FIRST", "one")]), first),
        RegisterAnswer::NoWork,
        assign(pooled(2, &[("SECOND", "two")]), second),
        RegisterAnswer::Gone,
    ])
    .await;
    let report = report.expect("retired is not an error");
    assert_eq!(report.node_id, "dep-2");
    assert_eq!(report.status, NodeStatus::Completed);
    assert!(daemon.register_answers.is_empty());
    assert_eq!(daemon.register_tokens, ["pool-token"; 4]);
    // The bundle directory the agent created was gone at every registration after a node.
    assert_eq!(daemon.probe_seen, [false; 4]);
    assert_eq!(
        statuses(&daemon),
        [
            "downloading_assets",
            "running_script",
            "completed",
            "downloading_assets",
            "running_script",
            "completed"
        ]
    );
    // The second node saw its own variables only, and a bundle of its own only.
    assert_eq!(
        stdout(&daemon),
        ["one", "first=unset second=two node=dep-2", "setup.sh"]
    );
    assert!(work.path().join("node").is_dir());
    assert!(!work.path().join("node/bundle").exists());
    assert!(!work.path().join("node").join(ASSETS_FILE).exists());
}

#[tokio::test]
async fn every_pooled_node_gets_its_own_time_limit_and_stop() {
    let mut timed = pooled(1, &[]);
    timed.timeout_s = Some(1);
    let stopped = RegisterAnswer::Assign {
        registration: Box::new(pooled(2, &[])),
        bundle: bundle("echo started\nsleep 100\n"),
        shutdown: true,
    };
    let (report, daemon, _work) = run_pooled(vec![
        assign(timed, "sleep 100\n"),
        stopped,
        assign(pooled(3, &[]), "sleep 2\necho third\n"),
        RegisterAnswer::Gone,
    ])
    .await;
    let report = report.expect("agent");
    assert_eq!(report.node_id, "dep-3");
    assert_eq!(report.status, NodeStatus::Completed, "{report:?}");
    let ends: Vec<_> = daemon
        .statuses
        .iter()
        .filter(|s| s.status.is_final())
        .map(|s| (s.status.as_str(), s.message.as_deref()))
        .collect();
    assert_eq!(
        ends,
        [("failed", Some("timed out after 1s")), ("completed", None)]
    );
    assert_eq!(stdout(&daemon).last(), Some(&"third"));
    assert_eq!(daemon.probe_seen, [false; 4]);
}

#[tokio::test]
async fn an_agent_that_is_not_pooled_serves_one_node_and_keeps_its_files() {
    let (report, daemon, work) = run_pooled(vec![
        assign(registration(&[]), "echo done > result.txt\n"),
        RegisterAnswer::Gone,
    ])
    .await;
    let report = report.expect("agent");
    assert_eq!(report.status, NodeStatus::Completed);
    assert_eq!(daemon.register_tokens.len(), 1);
    assert!(work.path().join("node/bundle/result.txt").is_file());
}

#[tokio::test]
async fn a_forgotten_pooled_instance_stops_with_its_last_report() {
    let (report, daemon, _work) = run_pooled(vec![
        assign(pooled(1, &[]), "exit 4\n"),
        RegisterAnswer::Unauthorized,
    ])
    .await;
    let report = report.expect("a 401 after a node ends the loop");
    assert_eq!(report.node_id, "dep-1");
    assert_eq!(report.status, NodeStatus::Failed);
    assert_eq!(report.exit_code, Some(4));
    assert_eq!(daemon.register_tokens.len(), 2);

    // Refused at the first registration, it is an error as ever.
    let (report, _, _work) = run_pooled(vec![RegisterAnswer::Unauthorized]).await;
    let error = report.expect_err("unknown token");
    assert!(error.is_unauthorized(), "{error}");
}

#[tokio::test]
async fn cancelling_ends_the_wait_for_an_assignment() {
    for answers in [
        vec![RegisterAnswer::Hold],
        vec![assign(pooled(1, &[]), "echo done\n"), RegisterAnswer::Hold],
    ] {
        let served = answers.len() > 1;
        let work = tempfile::tempdir().expect("tempdir");
        let daemon = Arc::new(Mutex::new(Daemon {
            register_answers: answers.into(),
            ..Daemon::default()
        }));
        let held = daemon.lock().expect("lock").held.clone();
        let (url, server) = fake_daemon(daemon.clone()).await;
        let cancel = CancellationToken::new();
        let agent = tokio::spawn(run(
            AgentConfig::new(url, "pool-token", work.path()),
            cancel.clone(),
        ));
        held.notified().await;
        cancel.cancel();
        let report = tokio::time::timeout(Duration::from_secs(5), agent)
            .await
            .expect("the agent stops promptly")
            .expect("joined")
            .expect("agent");
        server.abort();
        if served {
            assert_eq!(report.node_id, "dep-1");
            assert_eq!(report.status, NodeStatus::Completed);
        } else {
            assert_eq!(report, AgentReport::terminated(""));
        }
    }
}

#[tokio::test]
async fn answers_lost_after_the_daemon_acted_are_resent_and_the_node_completes() {
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("echo hello\n"),
        registration: Some(registration(&[])),
        lose_answers: vec!["register", "status", "status", "status", "logs"],
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::new(url, "provision", work.path().join("node"))
        .grace_period(Duration::from_millis(300));
    let report = run(config, CancellationToken::new()).await.expect("agent");
    server.abort();
    let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
    assert_eq!(report.status, NodeStatus::Completed);
    assert!(daemon.lose_answers.is_empty(), "every answer was lost once");
    // The registration was resent with the nonce of its first try.
    assert_eq!(daemon.register_nonces.len(), 2);
    assert!(daemon.register_nonces[0].is_some());
    assert_eq!(daemon.register_nonces[0], daemon.register_nonces[1]);
    // The first report lost three answers in a row and was sent again each time: the same
    // state four times (the daemon takes a repeat as a no-op).
    assert_eq!(
        statuses(&daemon),
        [
            "downloading_assets",
            "downloading_assets",
            "downloading_assets",
            "downloading_assets",
            "running_script",
            "completed"
        ]
    );
    // The log batch whose answer was lost was sent again (the daemon keeps it once, by its
    // offset).
    assert_eq!(stdout(&daemon), ["hello", "hello"]);
}

#[tokio::test]
async fn batches_the_daemon_finds_too_large_are_split_and_every_line_arrives() {
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle(
            "i=1\nwhile [ $i -le 60 ]; do printf '%04d%0996d\\n' $i 0; i=$((i + 1)); done\n",
        ),
        registration: Some(registration(&[])),
        max_logs_body: Some(8 * 1024),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::new(url, "provision", work.path().join("node"))
        .grace_period(Duration::from_millis(300));
    let report = run(config, CancellationToken::new()).await.expect("agent");
    server.abort();
    let daemon = std::mem::take(&mut *daemon.lock().expect("lock"));
    assert_eq!(report.status, NodeStatus::Completed);
    let numbers: Vec<&str> = stdout(&daemon).iter().map(|l| &l[..4]).collect();
    let expected: Vec<String> = (1..=60).map(|i| format!("{i:04}")).collect();
    assert_eq!(numbers, expected);
    assert!(stdout(&daemon).iter().all(|l| l.len() == 1000));
}
