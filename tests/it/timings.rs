//! Issue 13 §3, "time, per node": each node's script start and end and the time it spent in
//! each phase, the deployment's wall time, and `taskfly logs --timestamps`, against a real
//! `taskflyd` with local nodes run by the Rust agent and by the sh bootstrap.
//!
//! Only the order of times is asserted (a phase never ends before it starts, the phases fit in
//! the wall time), never how long anything took.

use std::time::{Duration, SystemTime};

use crate::support::cli_daemon::{nodes, Daemon};
use crate::support::{agent_yml, local_yml, Project};

/// How long a deployment of these short scripts may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(60);

/// Prints the second it starts at (`date +%s`) and a few lines on both streams.
const SCRIPT: &str = r#"#!/bin/sh
echo "began $(date +%s)"
echo "to stderr" >&2
sleep 0.2
echo "node $TASKFLY_NODE_INDEX done"
"#;

fn time(view: &serde_json::Value, field: &str) -> SystemTime {
    let text = view[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {view}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field} `{text}`: {e}"))
}

/// Seconds as whole milliseconds, so sums are exact.
fn millis(value: &serde_json::Value) -> u64 {
    let seconds = value
        .as_f64()
        .unwrap_or_else(|| panic!("not seconds: {value}"));
    (seconds * 1000.0).round() as u64
}

/// Checks one final node's times against its deployment's: every phase known, each phase
/// within the node's attempt, the attempt within the deployment's wall time.
#[track_caller]
fn check_node_times(deployment: &serde_json::Value, node: &serde_json::Value) {
    let (started, finished) = (time(node, "started_at"), time(node, "finished_at"));
    assert!(started <= finished, "{node}");
    assert!(time(deployment, "created_at") <= started, "{node}");
    assert!(finished <= time(deployment, "completed_at"), "{node}");
    let phases = &node["phases"];
    let names = ["provisioning_s", "booting_s", "downloading_s", "running_s"];
    let spent: u64 = names.iter().map(|name| millis(&phases[*name])).sum();
    assert!(
        spent <= millis(&deployment["duration_s"]),
        "the phases fit in the wall time: {node} in {deployment}"
    );
    assert_eq!(node["duration_s"], phases["running_s"], "{node}");
    let ran = finished.duration_since(started).expect("ordered");
    assert_eq!(
        millis(&node["duration_s"]),
        ran.as_millis() as u64,
        "{node}"
    );
}

/// A finished deployment's nodes have their start, end and phase times, in order, and within
/// the deployment's wall time; `taskfly status` shows them.
#[test]
fn finished_nodes_show_when_they_ran_and_how_long_each_phase_took() {
    let daemon = Daemon::start();
    let project = Project::new(&local_yml(2, "")).script(SCRIPT);
    let done = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    assert!(
        done["duration_s"].as_f64().expect("duration_s") > 0.0,
        "{done}"
    );
    for node in nodes(&done) {
        check_node_times(&done, node);
    }
    let id = done["deployment_id"].as_str().expect("id");

    // The same through `status --output json`, and as text: a DURATION column, the wall time.
    let status = daemon.status(id);
    assert_eq!(
        status["duration_s"], done["duration_s"],
        "a final wall time stays"
    );
    let text = daemon.cli(&["status", id]);
    text.expect_success();
    let duration_line = text
        .stdout
        .lines()
        .find(|line| line.starts_with("duration    "))
        .unwrap_or_else(|| panic!("no duration line: {}", text.show()));
    let shown = duration_line.trim_start_matches("duration    ");
    assert!(
        shown.ends_with('s') && shown.contains('.'),
        "sub-second precision: {}",
        text.show()
    );
    let header = text
        .stdout
        .lines()
        .find(|line| line.starts_with("NODE"))
        .expect("the node table");
    assert!(header.contains("  DURATION  "), "{header}");
}

/// `logs --timestamps` prefixes each line with the time its node wrote it. Lines of the sh
/// bootstrap are dated by the second it read them on the node (sent as `?at=`), not on
/// arrival: whole seconds, never before the second the script printed.
#[test]
fn logs_with_timestamps_show_when_the_node_wrote_each_line() {
    let daemon = Daemon::start();
    let project = Project::new(&agent_yml("script", 1, "")).script(SCRIPT);
    let done = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    let id = done["deployment_id"].as_str().expect("id");
    let node = &nodes(&done)[0];
    check_node_times(&done, node);

    let json = daemon.cli(&["logs", id, "--output", "json"]);
    json.expect_success();
    let lines = json.json()["logs"].as_array().expect("logs").clone();
    let text = daemon.cli(&["logs", id, "--timestamps"]);
    text.expect_success();
    let shown: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(shown.len(), lines.len(), "{}", text.show());

    let finished = time(node, "finished_at");
    let started_second = time(node, "started_at")
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut began = None;
    for (line, shown) in lines.iter().zip(&shown) {
        let timestamp = line["timestamp"].as_str().expect("timestamp");
        assert_eq!(
            *shown,
            format!(
                "{timestamp} [node 0] {}",
                line["line"].as_str().expect("line")
            ),
        );
        assert!(timestamp.ends_with(".000Z"), "dated by the second: {line}");
        let at = time(line, "timestamp");
        let second = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        assert!(
            started_second <= second && at <= finished,
            "written while the script ran: {line} {node}"
        );
        if let Some(printed) = line["line"].as_str().and_then(|l| l.strip_prefix("began ")) {
            let printed: u64 = printed.parse().expect("date +%s");
            assert!(printed <= second, "read after it was written: {line}");
            began = Some(printed);
        }
    }
    assert!(
        began.is_some(),
        "the script's first line arrived: {}",
        text.show()
    );
}
