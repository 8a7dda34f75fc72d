//! Issue 5, "crash the daemon, lose nothing": a real `taskflyd` (SQLite state in its data dir,
//! each local node's agent a process of its own) killed with SIGKILL and started again at the
//! same address; heartbeat time-outs, retries, time-outs, retention and graceful termination.
//!
//! Nothing here waits by sleeping: anything asynchronous is waited for by a bounded poll of
//! `taskfly status --output json`, of `/proc`, or of an agent's own log. Sleeping inside a
//! node's script is the workload; scripts that must outlive a step wait for a file the test
//! writes (a "gate").

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::cli_daemon::{free_port, nodes, path_str, unique_word, Daemon, DaemonOptions};
use crate::support::cli_run::{self, Ran};
use crate::support::{local_yml, processes_with_env, Project};

/// How long a deployment of this file's short scripts may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(40);
/// How long the processes of a finished or stopped node may take to disappear.
const PROCESS_LIMIT: Duration = Duration::from_secs(10);
/// How often `status` and `/proc` are polled.
const POLL: Duration = Duration::from_millis(50);

/// Prints `n<index> line 1` to `line 40`; after line 20 it waits (at most 60 s) until the file
/// `$GATE/go` exists, so the test decides when the second half is printed.
const COUNTING_SCRIPT: &str = r#"#!/bin/sh
i=1
while [ "$i" -le 40 ]; do
  echo "n$TASKFLY_NODE_INDEX line $i"
  if [ "$i" -eq 20 ]; then
    waited=0
    while [ ! -e "$GATE/go" ] && [ "$waited" -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
  fi
  sleep 0.05
  i=$((i + 1))
done
"#;

/// Says `started`, waits (at most 60 s) until the file `$GATE/go-<node index>` exists, then
/// says `done`: the test decides when each node ends.
const GATED_SCRIPT: &str = r#"#!/bin/sh
echo started
waited=0
while [ ! -e "$GATE/go-$TASKFLY_NODE_INDEX" ] && [ "$waited" -lt 600 ]; do
  sleep 0.1
  waited=$((waited + 1))
done
echo done
"#;

/// Starts, then sleeps until it is stopped.
const SLEEP_SCRIPT: &str = "#!/bin/sh\necho started\nsleep 300\necho never\n";

/// `nodes:` lines giving every node `MARKER=<marker>` (to find its processes) and `extra`.
fn marked(marker: &str, extra: &str) -> String {
    format!("global_metadata: {{marker: {marker}{extra}}}")
}

/// A project of `count` local nodes running `script`, with `marker` and the folder `gate`
/// (where the test writes the files the script waits for) as metadata.
fn gated_project(count: u32, marker: &str, gate: &Path, script: &str) -> Project {
    Project::new(&local_yml(
        count,
        &marked(marker, &format!(", gate: \"{}\"", path_str(gate))),
    ))
    .script(script)
}

/// Daemon options under which agent processes, which inherit `RUST_LOG`, log every call they
/// retry to their agent.log.
fn agent_calls_logged() -> DaemonOptions {
    DaemonOptions {
        rust_log: "info,taskfly::api::client=debug".to_owned(),
        ..DaemonOptions::default()
    }
}

fn node_field<'a>(view: &'a serde_json::Value, field: &str) -> Vec<&'a serde_json::Value> {
    nodes(view).iter().map(|n| &n[field]).collect()
}

fn all_nodes_are(view: &serde_json::Value, status: &str) -> bool {
    nodes(view).iter().all(|n| n["status"] == status)
}

/// `taskfly logs ID --output json`: the whole document.
fn logs_json(daemon: &Daemon, id: &str) -> serde_json::Value {
    let ran = daemon.cli(&["logs", id, "--output", "json"]);
    ran.expect_success();
    ran.json()
}

/// The log lines of every node, in stored order: node index -> [(stream, line)].
fn lines_by_node(logs: &serde_json::Value) -> BTreeMap<u64, Vec<(String, String)>> {
    let mut by_node: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    for line in logs["logs"].as_array().expect("logs is an array") {
        by_node
            .entry(line["node_index"].as_u64().expect("node_index"))
            .or_default()
            .push((
                line["stream"].as_str().expect("stream").to_owned(),
                line["line"].as_str().expect("line").to_owned(),
            ));
    }
    by_node
}

/// The stdout lines of node `index`.
fn stdout_of(logs: &serde_json::Value, index: u64) -> Vec<String> {
    lines_by_node(logs)
        .remove(&index)
        .unwrap_or_default()
        .into_iter()
        .filter(|(stream, _)| stream == "stdout")
        .map(|(_, line)| line)
        .collect()
}

/// Polls until no process carries `MARKER=<marker>` (scripts) and none but the daemon carries
/// the daemon's marker (agents).
#[track_caller]
fn wait_until_no_process_left(daemon: &Daemon, marker: &str) {
    let env = format!("MARKER={marker}");
    cli_run::poll(PROCESS_LIMIT, POLL, "every script to be gone", || {
        processes_with_env(&env).is_empty().then_some(())
    });
    cli_run::poll(PROCESS_LIMIT, POLL, "every agent to be gone", || {
        daemon.other_processes().is_empty().then_some(())
    });
}

/// `taskfly up DIR --wait --output json`, asserting the exit code; the final deployment.
#[track_caller]
fn up_wait_json(daemon: &Daemon, project: &Path, expected_code: i32) -> serde_json::Value {
    daemon.up_wait_json(project, expected_code, DEPLOYMENT_LIMIT)
}

/// `taskfly down ID`, asserting success; how long it took.
#[track_caller]
fn down(daemon: &Daemon, id: &str) -> (Ran, Duration) {
    let started = Instant::now();
    let ran = daemon.down(id, DEPLOYMENT_LIMIT);
    (ran, started.elapsed())
}

/// The ATTEMPT column of `taskfly status ID` (text), by node index.
fn attempt_column(status_text: &str) -> BTreeMap<u32, (String, u32)> {
    let mut lines = status_text.lines().skip_while(|l| !l.starts_with("NODE"));
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_else(|| panic!("no node table in:\n{status_text}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        &header[..4],
        ["NODE", "STATUS", "ATTEMPT", "EXIT"],
        "{status_text}"
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|row| {
            let cells: Vec<&str> = row.split_whitespace().collect();
            let index = cells[0].parse().expect("node index");
            let attempt = cells[2].parse().expect("attempt");
            (index, (cells[1].to_owned(), attempt))
        })
        .collect()
}

// ----- restart -----

#[test]
fn a_daemon_killed_mid_run_comes_back_and_every_line_is_stored_exactly_once() {
    let port = free_port();
    // Agent processes inherit RUST_LOG: their agent.log then shows every call they retried.
    let options = agent_calls_logged();
    let mut daemon = Daemon::start_on(port, options, &["--heartbeat-timeout", "10s"]);
    let marker = unique_word();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(4, &marker, gate.path(), COUNTING_SCRIPT);
    let id = daemon.up(project.path());

    // Every node runs its script and has sent some lines: the output is flowing.
    let running = daemon.wait_for_status(
        &id,
        DEPLOYMENT_LIMIT,
        "every node to run its script with some lines stored",
        |view| {
            all_nodes_are(view, "running_script") && {
                let logs = lines_by_node(&logs_json(&daemon, &id));
                (0..4).all(|i| logs.get(&i).is_some_and(|lines| lines.len() >= 3))
            }
        },
    );
    let daemon_pid = daemon.pid().expect("daemon pid");
    let killed = daemon.kill();
    assert_eq!(killed.signal(), Some(9), "taskflyd died of SIGKILL");
    assert!(
        !Path::new(&format!("/proc/{daemon_pid}")).exists(),
        "taskflyd is gone"
    );

    // The daemon is gone, its nodes are not: each agent process and each script lives on.
    let unreachable = daemon.cli(&["status", &id]);
    unreachable.expect_code(3);
    for node in nodes(&running) {
        let instance_id = node["instance_id"].as_str().expect("instance_id");
        let node_id = node["node_id"].as_str().expect("node_id");
        assert_eq!(
            processes_with_env(&format!("TASKFLY_AGENT_INSTANCE_ID={instance_id}")).len(),
            1,
            "one agent process serves {instance_id} after the crash"
        );
        assert!(
            !processes_with_env(&format!("TASKFLY_NODE_ID={node_id}")).is_empty(),
            "the script of {node_id} still runs after the crash"
        );
    }
    assert!(processes_with_env(&format!("MARKER={marker}")).len() >= 4);

    // The second half of every script's output is printed while no daemon listens: the
    // scripts end, their agents keep their lines and final status until the daemon is back.
    std::fs::write(gate.path().join("go"), "").expect("open the gate");
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        POLL,
        "every script to end while the daemon is down",
        || {
            processes_with_env(&format!("MARKER={marker}"))
                .is_empty()
                .then_some(())
        },
    );
    daemon.restart();
    assert_eq!(daemon.url, format!("http://127.0.0.1:{port}"));

    let done = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    });
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["nodes_completed"], 4, "{done:#}");
    assert_eq!(done["nodes_failed"], 0, "{done:#}");
    for node in nodes(&done) {
        assert_eq!(node["status"], "completed", "{node:#}");
        assert_eq!(node["attempt"], 1, "{node:#}");
        assert_eq!(node["exit_code"], 0, "{node:#}");
    }
    // The instances are the ones started before the crash: nothing was provisioned again.
    assert_eq!(
        node_field(&done, "instance_id"),
        node_field(&running, "instance_id")
    );

    // Every line of every node, exactly once and in order; nothing else.
    let logs = logs_json(&daemon, &id);
    let by_node = lines_by_node(&logs);
    assert_eq!(by_node.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    for (index, lines) in &by_node {
        let expected: Vec<(String, String)> = (1..=40)
            .map(|i| ("stdout".to_owned(), format!("n{index} line {i}")))
            .collect();
        assert_eq!(lines, &expected, "node {index}'s lines");
    }
    let seqs: Vec<u64> = logs["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|l| l["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs.len(), 160);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase: {seqs:?}"
    );
    assert!(
        daemon
            .stderr_lines()
            .iter()
            .any(|l| l.contains("resuming deployment after restart") && l.contains(&id)),
        "the restarted daemon says it resumed {id}"
    );
    // Each agent had to send lines again once the daemon was back.
    for index in 0..4 {
        let agent_log = daemon
            .data_dir
            .path()
            .join("work")
            .join(&id)
            .join(format!("{index}-1"))
            .join("agent.log");
        let text = std::fs::read_to_string(&agent_log)
            .unwrap_or_else(|e| panic!("read {}: {e}", agent_log.display()));
        assert!(
            text.lines()
                .any(|l| l.contains("daemon call failed; retrying") && l.contains("send_logs")),
            "{}:\n{text}",
            agent_log.display()
        );
    }
    wait_until_no_process_left(&daemon, &marker);

    // A clean restart after the end keeps the history: deployment, nodes and logs.
    let status = daemon.shut_down();
    assert!(
        status.success(),
        "SIGTERM ends taskflyd cleanly: {status:?}"
    );
    daemon.restart();
    // Resources (what the scripts used) live in the daemon's memory only: a restart drops them.
    assert_eq!(
        without_resources(daemon.status(&id)),
        without_resources(done)
    );
    assert_eq!(logs_json(&daemon, &id), logs);
    let list = daemon.cli(&["list", "--output", "json"]);
    list.expect_success();
    let listed = list.json();
    let listed = listed.as_array().expect("list is an array");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["deployment_id"], id.as_str());
    assert_eq!(listed[0]["status"], "completed");
    assert_eq!(listed[0]["nodes_completed"], 4);
}

// ----- heartbeat timeout -----

#[test]
fn a_node_whose_agent_is_killed_fails_by_heartbeat_timeout_and_its_script_is_stopped() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    // Agents heartbeat every third of the time-out: 1 s.
    const INTERVAL: Duration = Duration::from_secs(1);
    let daemon = Daemon::start_on(
        free_port(),
        DaemonOptions::default(),
        &["--heartbeat-timeout", "3s"],
    );
    let marker = unique_word();
    let project = Project::new(&local_yml(1, &marked(&marker, ""))).script(SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let running = daemon.wait_for_status(
        &id,
        DEPLOYMENT_LIMIT,
        "the script to run and its first line to be stored",
        |view| {
            all_nodes_are(view, "running_script")
                && stdout_of(&logs_json(&daemon, &id), 0) == ["started"]
        },
    );
    let instance_id = nodes(&running)[0]["instance_id"]
        .as_str()
        .expect("instance_id")
        .to_owned();

    let agents = processes_with_env(&format!("TASKFLY_AGENT_INSTANCE_ID={instance_id}"));
    assert_eq!(agents.len(), 1, "one agent process for {instance_id}");
    let script_env = format!("MARKER={marker}");
    assert!(!processes_with_env(&script_env).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agents[0]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the agent");
    let killed = Instant::now();
    // The script is in a process group of its own: the agent's death leaves it running.
    assert!(
        !processes_with_env(&script_env).is_empty(),
        "the orphaned script lives until the daemon stops it"
    );

    let failed = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the node to fail", |view| {
        view["status"] != "running"
    });
    let took = killed.elapsed();
    assert_eq!(failed["status"], "failed", "{failed:#}");
    let node = &nodes(&failed)[0];
    assert_eq!(node["status"], "failed", "{node:#}");
    assert_eq!(node["error_message"], "heartbeat timeout", "{node:#}");
    assert_eq!(node["exit_code"], serde_json::Value::Null, "{node:#}");
    // Failed by the time-out (the last heartbeat was at most one interval before the kill),
    // and soon after it: the time-out, one interval, and some slack for polling.
    assert!(took >= Duration::from_secs(1), "failed after only {took:?}");
    assert!(
        took < TIMEOUT + INTERVAL + Duration::from_secs(2),
        "failed only after {took:?}"
    );
    wait_until_no_process_left(&daemon, &marker);
    let logs = logs_json(&daemon, &id);
    assert_eq!(stdout_of(&logs, 0), ["started"]);
}

#[test]
fn an_agent_lost_while_the_daemon_is_down_is_failed_after_the_restart_by_heartbeat_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let port = free_port();
    let mut daemon = Daemon::start_on(
        port,
        DaemonOptions::default(),
        &["--heartbeat-timeout", "3s"],
    );
    let marker = unique_word();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(2, &marker, gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    let running = daemon.wait_for_status(
        &id,
        DEPLOYMENT_LIMIT,
        "both scripts to run and say so",
        |view| {
            all_nodes_are(view, "running_script") && {
                let logs = logs_json(&daemon, &id);
                (0..2).all(|i| stdout_of(&logs, i) == ["started"])
            }
        },
    );
    let lost_node_id = nodes(&running)[1]["node_id"]
        .as_str()
        .expect("node_id")
        .to_owned();
    let lost_instance = nodes(&running)[1]["instance_id"]
        .as_str()
        .expect("instance_id")
        .to_owned();

    // While the daemon is down, node 1's agent dies too; its script lives on, orphaned.
    daemon.kill();
    let agents = processes_with_env(&format!("TASKFLY_AGENT_INSTANCE_ID={lost_instance}"));
    assert_eq!(agents.len(), 1, "one agent process for {lost_instance}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agents[0]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the agent");
    let orphan_env = format!("TASKFLY_NODE_ID={lost_node_id}");
    assert!(!processes_with_env(&orphan_env).is_empty());

    // Timed from the moment the restart begins: the daemon's clock may start while it is still
    // starting up (slow on a loaded machine); one counted from before the kill would still end
    // well short of TIMEOUT.
    let restarted = Instant::now();
    daemon.restart();
    std::fs::write(gate.path().join("go-0"), "").expect("let node 0 finish");
    let done = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    });
    let took = restarted.elapsed();
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(node_field(&done, "status"), ["completed", "failed"]);
    assert_eq!(nodes(&done)[1]["error_message"], "heartbeat timeout");
    assert_eq!(node_field(&done, "attempt"), [1, 1]);
    // The time-out counts from the restart: the node was not failed for the daemon's absence.
    assert!(
        took >= TIMEOUT - Duration::from_millis(500),
        "failed only {took:?} after the restart"
    );
    assert!(
        took < TIMEOUT + Duration::from_secs(4),
        "failed {took:?} after the restart"
    );
    // The restarted daemon stops the orphaned script, which it never started.
    cli_run::poll(
        PROCESS_LIMIT,
        POLL,
        "the orphaned script to be stopped",
        || processes_with_env(&orphan_env).is_empty().then_some(()),
    );
    wait_until_no_process_left(&daemon, &marker);
    let logs = logs_json(&daemon, &id);
    assert_eq!(stdout_of(&logs, 0), ["started", "done"]);
    assert_eq!(stdout_of(&logs, 1), ["started"]);
}

#[test]
fn a_daemon_killed_during_down_finishes_the_termination_after_its_restart() {
    let port = free_port();
    let mut daemon = Daemon::start_on(port, DaemonOptions::default(), &["--grace-period", "3s"]);
    let marker = unique_word();
    // Ignores SIGTERM: each node takes the whole grace period to stop, a window for the crash.
    let project = Project::new(&local_yml(2, &marked(&marker, "")))
        .script("#!/bin/sh\ntrap '' TERM\necho started\nsleep 300\necho never\n");
    let id = daemon.up(project.path());
    daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the scripts to run", |view| {
        all_nodes_are(view, "running_script")
    });

    let down = cli_run::Running::start(&mut daemon.taskfly(&["down", &id]));
    let stopping = daemon.wait_for_status(
        &id,
        DEPLOYMENT_LIMIT,
        "every node to be terminating",
        |view| all_nodes_are(view, "terminating"),
    );
    daemon.kill();
    assert_eq!(stopping["status"], "terminating", "{stopping:#}");
    // `down` loses its daemon: it cannot tell how the termination ends.
    down.finish(DEPLOYMENT_LIMIT).expect_code(3);

    daemon.restart();
    let done = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the termination to finish", |view| {
        view["status"] != "terminating"
    });
    assert_eq!(done["status"], "terminated", "{done:#}");
    assert_eq!(node_field(&done, "status"), ["terminated", "terminated"]);
    wait_until_no_process_left(&daemon, &marker);
    // Nothing left to stop: success, saying so.
    let again = daemon.cli(&["down", &id]);
    again.expect_success();
    assert!(
        again.stdout.contains("was already terminated"),
        "{}",
        again.show()
    );
}

/// How long the agent of `agent_log` has been trying heartbeats without an answer: from its
/// first failed try to its latest, by the timestamps of its own log.
fn heartbeat_failures_span(agent_log: &Path) -> Duration {
    let text = std::fs::read_to_string(agent_log).unwrap_or_default();
    let times: Vec<std::time::SystemTime> = text
        .lines()
        .filter(|l| l.contains("daemon call failed; retrying") && l.contains("heartbeat"))
        .filter_map(|l| humantime::parse_rfc3339_weak(l.split_whitespace().next()?).ok())
        .collect();
    match (times.first(), times.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

#[test]
fn a_live_agent_is_not_failed_after_a_restart_that_ended_a_long_downtime() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let port = free_port();
    // Agent processes inherit RUST_LOG: their agent.log shows every call they retried.
    let options = agent_calls_logged();
    let mut daemon = Daemon::start_on(port, options, &["--heartbeat-timeout", "3s"]);
    let marker = unique_word();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, &marker, gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the script to run", |view| {
        all_nodes_are(view, "running_script")
    });
    daemon.kill();

    // The daemon stays away until the agent has tried its heartbeat for twice the heartbeat
    // time-out: long enough for a client backing off exponentially to pause for longer than
    // the time-out before its next try.
    let agent_log = daemon
        .data_dir
        .path()
        .join("work")
        .join(&id)
        .join("0-1")
        .join("agent.log");
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        POLL,
        "the agent to try its heartbeat for twice the time-out",
        || (heartbeat_failures_span(&agent_log) >= 2 * TIMEOUT).then_some(()),
    );
    daemon.restart();
    std::fs::write(gate.path().join("go-0"), "").expect("open the gate");
    let done = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    });
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(node_field(&done, "status"), ["completed"]);
    assert_eq!(stdout_of(&logs_json(&daemon, &id), 0), ["started", "done"]);
    wait_until_no_process_left(&daemon, &marker);
}

// ----- retries -----

/// Every run appends its node index to `$STATE_DIR/runs`. Node 1's first run fails (exit 1).
const FAIL_ONCE_SCRIPT: &str = r#"#!/bin/sh
echo "node $TASKFLY_NODE_INDEX starts"
echo "$TASKFLY_NODE_INDEX" >> "$STATE_DIR/runs"
if [ ! -e "$STATE_DIR/tried-$TASKFLY_NODE_INDEX" ]; then
  touch "$STATE_DIR/tried-$TASKFLY_NODE_INDEX"
  if [ "$TASKFLY_NODE_INDEX" = 1 ]; then echo "first attempt fails" >&2; exit 1; fi
fi
echo "node $TASKFLY_NODE_INDEX done"
"#;

/// How many times each node's script ran, from `runs`.
fn runs(state_dir: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(state_dir.join("runs")).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// Two marked nodes with one retry each, running [`FAIL_ONCE_SCRIPT`] with its state in
/// `state_dir`: node 1 fails its first attempt.
fn fail_once_project(marker: &str, state_dir: &Path) -> Project {
    Project::new(&local_yml(
        2,
        &format!(
            "retries: 1\n{}",
            marked(marker, &format!(", state_dir: \"{}\"", path_str(state_dir)))
        ),
    ))
    .script(FAIL_ONCE_SCRIPT)
}

#[test]
fn a_failed_node_is_retried_and_its_attempt_is_shown() {
    let daemon = Daemon::start();
    let marker = unique_word();
    let state = tempfile::tempdir().expect("temp dir");
    let project = fail_once_project(&marker, state.path());

    let view = up_wait_json(&daemon, project.path(), 0);
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["nodes_completed"], 2, "{view:#}");
    assert_eq!(view["nodes_failed"], 0, "{view:#}");
    assert_eq!(node_field(&view, "status"), ["completed", "completed"]);
    assert_eq!(node_field(&view, "attempt"), [1, 2]);
    assert_eq!(node_field(&view, "exit_code"), [0, 0]);
    // The retried node's first failure is history: its view is its last attempt's.
    assert_eq!(nodes(&view)[1]["error_message"], serde_json::Value::Null);
    for (node, attempt) in nodes(&view).iter().zip([1, 2]) {
        let node_id = node["node_id"].as_str().expect("node_id");
        assert_eq!(node["instance_id"], format!("local-{node_id}-{attempt}"));
    }
    let expected_runs: BTreeMap<String, usize> = [("0".to_owned(), 1), ("1".to_owned(), 2)].into();
    assert_eq!(runs(state.path()), expected_runs);

    let id = view["deployment_id"].as_str().expect("id");
    let text = daemon.cli(&["status", id]);
    text.expect_success();
    let attempts = attempt_column(&text.stdout);
    let expected: BTreeMap<u32, (String, u32)> = [
        (0, ("completed".to_owned(), 1)),
        (1, ("completed".to_owned(), 2)),
    ]
    .into();
    assert_eq!(attempts, expected, "{}", text.show());

    // Both attempts' output is kept.
    let logs = logs_json(&daemon, id);
    assert_eq!(stdout_of(&logs, 0), ["node 0 starts", "node 0 done"]);
    assert_eq!(
        stdout_of(&logs, 1),
        ["node 1 starts", "node 1 starts", "node 1 done"]
    );
    let stderr: Vec<(String, String)> = lines_by_node(&logs)[&1]
        .iter()
        .filter(|(stream, _)| stream == "stderr")
        .cloned()
        .collect();
    assert_eq!(
        stderr,
        [("stderr".to_owned(), "first attempt fails".to_owned())]
    );
    wait_until_no_process_left(&daemon, &marker);
}

#[test]
fn a_retry_pending_when_the_daemon_crashes_runs_once_after_the_restart() {
    let port = free_port();
    let mut daemon = Daemon::start_on(port, DaemonOptions::default(), &[]);
    let marker = unique_word();
    let state = tempfile::tempdir().expect("temp dir");
    let project = fail_once_project(&marker, state.path());
    let id = daemon.up(project.path());

    // Node 1 failed its first attempt; its retry waits out its backoff (1 s). Crash now.
    let failed_once = daemon.wait_for_status(
        &id,
        DEPLOYMENT_LIMIT,
        "node 1's first attempt to fail",
        |view| {
            let node = &nodes(view)[1];
            node["attempt"] != 1 || node["status"] == "failed"
        },
    );
    daemon.kill();
    assert_eq!(
        failed_once["status"], "running",
        "a failed node with a retry left keeps the deployment running: {failed_once:#}"
    );
    let node = &nodes(&failed_once)[1];
    assert_eq!(
        (&node["status"], &node["attempt"]),
        (&serde_json::json!("failed"), &serde_json::json!(1)),
        "the crash came while the retry waited out its backoff: {failed_once:#}"
    );
    assert_eq!(
        node["error_message"], "exited with code 1: first attempt fails",
        "{node:#}"
    );
    daemon.restart();

    let done = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    });
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(node_field(&done, "status"), ["completed", "completed"]);
    assert_eq!(node_field(&done, "attempt"), [1, 2]);
    // Node 1 ran twice in all (its failure and one retry), node 0 once.
    let expected_runs: BTreeMap<String, usize> = [("0".to_owned(), 1), ("1".to_owned(), 2)].into();
    assert_eq!(runs(state.path()), expected_runs);
    let logs = logs_json(&daemon, &id);
    assert_eq!(
        stdout_of(&logs, 1),
        ["node 1 starts", "node 1 starts", "node 1 done"]
    );
    wait_until_no_process_left(&daemon, &marker);
}

// ----- timeout -----

#[test]
fn a_script_past_its_timeout_fails_and_leaves_no_process() {
    let daemon = Daemon::start();
    let marker = unique_word();
    let project = Project::new(&local_yml(
        1,
        &format!("timeout: 2s\n{}", marked(&marker, "")),
    ))
    .script("#!/bin/sh\necho waiting\nsleep 60\necho never\n");

    let started = Instant::now();
    let view = up_wait_json(&daemon, project.path(), 1);
    let took = started.elapsed();
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["nodes_failed"], 1, "{view:#}");
    let node = &nodes(&view)[0];
    assert_eq!(node["status"], "failed", "{node:#}");
    assert_eq!(node["exit_code"], serde_json::Value::Null, "{node:#}");
    let message = node["error_message"].as_str().expect("error_message");
    assert!(message.contains("timed out"), "{message}");
    assert_eq!(message, "timed out after 2s");
    assert!(took >= Duration::from_secs(2), "failed after only {took:?}");
    assert!(took < Duration::from_secs(20), "failed only after {took:?}");
    let logs = logs_json(&daemon, view["deployment_id"].as_str().expect("id"));
    assert_eq!(stdout_of(&logs, 0), ["waiting"]);
    wait_until_no_process_left(&daemon, &marker);
}

// ----- retention -----

#[test]
fn finished_deployments_past_retention_are_removed_at_start_and_running_ones_are_kept() {
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let finished_project = Project::new(&local_yml(1, "")).script("#!/bin/sh\necho done\n");
    let finished = up_wait_json(&daemon, finished_project.path(), 0);
    let finished_id = finished["deployment_id"].as_str().expect("id").to_owned();
    assert_eq!(finished["status"], "completed");
    let marker = unique_word();
    let sleeping = Project::new(&local_yml(1, &marked(&marker, ""))).script(SLEEP_SCRIPT);
    let running_id = daemon.up(sleeping.path());
    daemon.wait_for_status(&running_id, DEPLOYMENT_LIMIT, "the script to run", |view| {
        all_nodes_are(view, "running_script")
    });
    let deployment_files = daemon
        .data_dir
        .path()
        .join("deployments")
        .join(&finished_id);
    let work_files = daemon.data_dir.path().join("work").join(&finished_id);
    assert!(deployment_files.is_dir() && work_files.is_dir());

    // Within the retention period (7 days by default), a restart keeps it.
    daemon.shut_down();
    daemon.restart();
    assert_eq!(daemon.status(&finished_id), finished);

    // Past it (1 ms), the finished deployment is removed, files and all; the running one stays.
    daemon.shut_down();
    daemon.restart_with(&["--retention", "1ms"]);
    cli_run::poll(
        PROCESS_LIMIT,
        POLL,
        "the finished deployment to be removed",
        || {
            let list = daemon.cli(&["list", "--output", "json"]);
            list.expect_success();
            let ids: Vec<String> = list
                .json()
                .as_array()
                .expect("list is an array")
                .iter()
                .map(|d| d["deployment_id"].as_str().expect("id").to_owned())
                .collect();
            (ids == [running_id.clone()]).then_some(())
        },
    );
    let gone = daemon.cli(&["status", &finished_id]);
    gone.expect_code(1);
    assert!(gone.stderr.contains(&finished_id), "{}", gone.show());
    assert!(!deployment_files.exists(), "{}", deployment_files.display());
    assert!(!work_files.exists(), "{}", work_files.display());
    assert!(daemon
        .stderr_lines()
        .iter()
        .any(|l| l.contains("deployment past retention removed") && l.contains(&finished_id)));

    let still = daemon.status(&running_id);
    assert_eq!(still["status"], "running", "{still:#}");
    assert!(all_nodes_are(&still, "running_script"), "{still:#}");
    assert!(!processes_with_env(&format!("MARKER={marker}")).is_empty());
    down(&daemon, &running_id);
    wait_until_no_process_left(&daemon, &marker);
}

// ----- graceful down -----

#[test]
fn down_lets_a_script_clean_up_on_term_and_kills_one_ignoring_it_after_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(2);
    let daemon = Daemon::start_on(
        free_port(),
        DaemonOptions::default(),
        &["--grace-period", "2s"],
    );
    let state = tempfile::tempdir().expect("temp dir");
    let lock = state.path().join("lock");

    // A script that cleans up and exits on SIGTERM.
    let polite_marker = unique_word();
    let polite = Project::new(&local_yml(
        1,
        &marked(
            &polite_marker,
            &format!(", state_dir: \"{}\"", path_str(state.path())),
        ),
    ))
    .script(
        "#!/bin/sh\n\
         trap 'echo \"got TERM\"; rm -f \"$STATE_DIR/lock\"; exit 0' TERM\n\
         touch \"$STATE_DIR/lock\"\n\
         echo started\n\
         sleep 300\n\
         echo never\n",
    );
    let polite_id = daemon.up(polite.path());
    daemon.wait_for_status(&polite_id, DEPLOYMENT_LIMIT, "the script to run", |view| {
        all_nodes_are(view, "running_script")
    });
    cli_run::poll(DEPLOYMENT_LIMIT, POLL, "the script to start", || {
        lock.exists().then_some(())
    });
    down(&daemon, &polite_id);
    let view = daemon.status(&polite_id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    assert_eq!(node_field(&view, "status"), ["terminated"]);
    assert!(!lock.exists(), "the script's TERM trap cleaned up");
    assert_eq!(
        stdout_of(&logs_json(&daemon, &polite_id), 0),
        ["started", "got TERM"]
    );
    wait_until_no_process_left(&daemon, &polite_marker);

    // A script that ignores SIGTERM (and so does its `sleep`): killed after the grace period.
    let stubborn_marker = unique_word();
    let stubborn = Project::new(&local_yml(1, &marked(&stubborn_marker, "")))
        .script("#!/bin/sh\ntrap '' TERM\necho started\nsleep 300\necho never\n");
    let stubborn_id = daemon.up(stubborn.path());
    daemon.wait_for_status(
        &stubborn_id,
        DEPLOYMENT_LIMIT,
        "the script to run",
        |view| all_nodes_are(view, "running_script"),
    );
    let (_, took) = down(&daemon, &stubborn_id);
    assert!(
        took >= GRACE,
        "down took only {took:?}: the grace period was cut short"
    );
    assert!(
        took < GRACE + Duration::from_secs(5),
        "down took {took:?}, far past the grace period"
    );
    let view = daemon.status(&stubborn_id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    assert_eq!(node_field(&view, "status"), ["terminated"]);
    assert_eq!(stdout_of(&logs_json(&daemon, &stubborn_id), 0), ["started"]);
    let env = format!("MARKER={stubborn_marker}");
    assert_eq!(
        processes_with_env(&env),
        Vec::<u32>::new(),
        "nothing of the node survives `down`"
    );
    wait_until_no_process_left(&daemon, &stubborn_marker);
}

/// A `status --output json` view without its nodes' `resources`, which a restart drops.
fn without_resources(mut view: serde_json::Value) -> serde_json::Value {
    if let Some(nodes) = view["nodes"].as_array_mut() {
        for node in nodes {
            if let Some(node) = node.as_object_mut() {
                node.remove("resources");
            }
        }
    }
    view
}
