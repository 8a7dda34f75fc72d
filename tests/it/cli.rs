//! The `taskfly` and `taskflyd` executables, driven as a user drives them (SPEC §5): a real
//! daemon on 127.0.0.1:0, the CLI as a child process, its exit codes, stdout and stderr.
//!
//! Nothing here waits by sleeping: the daemon's address comes from its "taskflyd listening"
//! line, and anything asynchronous is waited for by the CLI itself (`up --wait`, `logs -f`,
//! `down`) or by a bounded poll of `status --output json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::support::cli_daemon::{
    free_port, nodes, path_str, unique_word, Daemon, DaemonOptions, LogFormat,
};
use crate::support::cli_run::{self, Ran, Running};
use crate::support::{self, local_yml, marker_metadata, Project};

/// Prints two lines per node, then exits 0.
const HELLO_SCRIPT: &str = "#!/bin/sh\necho \"hello from node $TASKFLY_NODE_INDEX\"\necho \"bye from node $TASKFLY_NODE_INDEX\"\n";

/// Starts, then sleeps until it is stopped.
const SLEEP_SCRIPT: &str = "#!/bin/sh\necho started\nsleep 300\necho never\n";

/// How long a deployment of this file's tiny scripts may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(60);

fn hello_project(count: u32) -> Project {
    Project::new(&local_yml(count, "")).script(HELLO_SCRIPT)
}

/// Checks that `ran` streamed both lines of [`HELLO_SCRIPT`] for each of `nodes` nodes, each
/// with its node's prefix, and ended with a deployment summary; returns that summary line.
fn assert_hello_output(ran: &Ran, nodes: u32) -> &str {
    for i in 0..nodes {
        assert!(
            ran.stdout
                .contains(&format!("[node {i}] hello from node {i}\n")),
            "{}",
            ran.show()
        );
        assert!(
            ran.stdout
                .contains(&format!("[node {i}] bye from node {i}\n")),
            "{}",
            ran.show()
        );
    }
    let summary = ran.stdout.lines().last().unwrap_or_default();
    assert!(summary.starts_with("deployment dep-"), "{}", ran.show());
    summary
}

/// Nodes whose index is 1 write to stderr and exit 3; the others complete.
fn failing_project() -> Project {
    Project::new(&local_yml(2, "")).script(
        "#!/bin/sh\necho \"working on $TASKFLY_NODE_INDEX\"\n\
         if [ \"$TASKFLY_NODE_INDEX\" = 1 ]; then echo 'disk full' >&2; exit 3; fi\n",
    )
}

/// `taskfly ARGS…` with no daemon involved, HOME in `home`.
fn taskfly_offline(home: &Path, args: &[&str]) -> Ran {
    cli_run::run(cli_run::command("taskfly", home).args(args))
}

/// `taskfly up DIR --wait --output json`, asserting the exit code; the final deployment.
#[track_caller]
fn up_wait_json(daemon: &Daemon, project: &Path, expected_code: i32) -> serde_json::Value {
    daemon.up_wait_json(project, expected_code, DEPLOYMENT_LIMIT)
}

fn node_statuses(view: &serde_json::Value) -> Vec<String> {
    nodes(view)
        .iter()
        .map(|n| n["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

// ----- up, list, status -----

#[test]
fn up_wait_json_prints_exactly_the_final_deployment() {
    let daemon = Daemon::start();
    let project = hello_project(3);
    let view = up_wait_json(&daemon, project.path(), 0);
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["total_nodes"], 3);
    assert_eq!(view["nodes_completed"], 3);
    assert_eq!(view["nodes_failed"], 0);
    assert_eq!(view["cloud_provider"], "local");
    let indexes: Vec<u64> = nodes(&view)
        .iter()
        .map(|n| n["node_index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2]);
    for node in nodes(&view) {
        assert_eq!(node["status"], "completed", "{node:#}");
        assert_eq!(node["exit_code"], 0, "{node:#}");
    }
    // The same document the API serves for the deployment.
    let id = view["deployment_id"].as_str().unwrap();
    assert_eq!(daemon.status(id), view);
}

#[test]
fn up_wait_text_streams_logs_then_a_summary() {
    let daemon = Daemon::start();
    let project = hello_project(2);
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&["up", path_str(project.path()), "--wait"]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let summary = assert_hello_output(&ran, 2);
    assert!(summary.contains(" completed in "), "{}", ran.show());
    assert!(
        summary.ends_with(": 2 completed, 0 failed, 2 total"),
        "{}",
        ran.show()
    );
}

#[test]
fn up_wait_on_a_failing_node_exits_1_naming_its_exit_code() {
    let daemon = Daemon::start();
    let project = failing_project();

    let view = up_wait_json(&daemon, project.path(), 1);
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["nodes_completed"], 1);
    assert_eq!(view["nodes_failed"], 1);
    let failed = &nodes(&view)[1];
    assert_eq!(failed["status"], "failed", "{view:#}");
    assert_eq!(failed["exit_code"], 3, "{view:#}");
    let message = failed["error_message"].as_str().expect("error_message");
    assert!(
        message.contains('3') && message.contains("disk full"),
        "{message}"
    );
    assert_eq!(nodes(&view)[0]["status"], "completed");

    // Text: the same exit code, and the summary names the failed node and why.
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&["up", path_str(project.path()), "--wait"]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_code(1);
    assert!(ran.stdout.contains("[node 1] disk full"), "{}", ran.show());
    assert!(
        ran.stdout.contains(": 1 completed, 1 failed, 2 total"),
        "{}",
        ran.show()
    );
    let node_line = ran
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("node 1 failed"));
    let node_line = node_line.unwrap_or_else(|| panic!("no line for node 1\n{}", ran.show()));
    assert!(node_line.contains("disk full"), "{node_line}");
}

#[test]
fn up_without_wait_answers_at_once_with_the_new_id() {
    let daemon = Daemon::start();
    let project = hello_project(1);
    let ran = daemon.cli(&["up", path_str(project.path())]);
    ran.expect_success();
    let id = ran
        .stdout
        .split_whitespace()
        .find(|word| word.starts_with("dep-"))
        .unwrap_or_else(|| panic!("no deployment id\n{}", ran.show()))
        .to_owned();
    assert!(ran.stdout.contains("1 node(s)"), "{}", ran.show());
    assert!(
        ran.stdout.contains(&format!("taskfly logs {id} -f")),
        "{}",
        ran.show()
    );
    // It exists on the daemon and runs to its end.
    let view = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |v| {
        v["status"] == "completed" || v["status"] == "failed"
    });
    assert_eq!(view["status"], "completed", "{view:#}");
}

#[test]
fn list_and_status_show_the_deployment_in_text_and_json() {
    let daemon = Daemon::start();
    let project = hello_project(3);
    let view = up_wait_json(&daemon, project.path(), 0);
    let id = view["deployment_id"].as_str().unwrap().to_owned();

    let text = daemon.cli(&["list"]);
    text.expect_success();
    let header = text.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{}",
        text.show()
    );
    let row = text.stdout.lines().find(|l| l.starts_with(&id));
    let row = row.unwrap_or_else(|| panic!("no row for {id}\n{}", text.show()));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..6],
        [id.as_str(), "completed", "local", "3", "3", "0"],
        "{row}"
    );

    let json = daemon.cli(&["list", "--output", "json"]);
    json.expect_success();
    let all = json.json();
    let all = all.as_array().expect("list --output json is an array");
    let listed: Vec<&serde_json::Value> = all
        .iter()
        .filter(|d| d["deployment_id"] == id.as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{all:?}");
    assert_eq!(listed[0]["status"], "completed");

    let status = daemon.cli(&["status", &id]);
    status.expect_success();
    assert!(
        status.stdout.contains(&format!("deployment  {id}")),
        "{}",
        status.show()
    );
    assert!(
        status.stdout.contains("status      completed"),
        "{}",
        status.show()
    );
    let mut table = status.stdout.lines().skip_while(|l| !l.starts_with("NODE"));
    let node_header = table
        .next()
        .unwrap_or_else(|| panic!("no node table\n{}", status.show()));
    assert!(
        node_header.contains("STATUS") && node_header.contains("EXIT"),
        "{node_header}"
    );
    let rows: Vec<Vec<&str>> = table
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "one row per node\n{}", status.show());
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row[..4],
            [i.to_string().as_str(), "completed", "1", "0"],
            "{row:?}"
        );
    }

    let json = daemon.cli(&["status", &id, "--output", "json"]);
    json.expect_success();
    assert_eq!(json.json(), view);

    // The Go tool's spelling.
    let go = daemon.cli(&["status", "--id", &id, "--output", "json"]);
    go.expect_success();
    assert_eq!(go.json()["deployment_id"], id.as_str());
    assert_eq!(nodes(&go.json()).len(), 3);

    // No id at all is a usage error.
    let none = daemon.cli(&["status"]);
    none.expect_code(2);
    assert!(none.stderr.contains("taskfly status ID"), "{}", none.show());
}

#[test]
fn status_of_an_unknown_deployment_fails_with_its_name() {
    let daemon = Daemon::start();
    let ran = daemon.cli(&["status", "dep-0000000000000000"]);
    ran.expect_code(1);
    assert!(ran.stdout.is_empty(), "{}", ran.show());
    assert_eq!(
        ran.stderr_lines(),
        ["error: no deployment `dep-0000000000000000`"],
        "{}",
        ran.show()
    );
    // With --output json, the error is the one JSON document.
    let json = daemon.cli(&["status", "dep-0000000000000000", "--output", "json"]);
    json.expect_code(1);
    assert_eq!(json.json()["error"], "no deployment `dep-0000000000000000`");
}

/// The shortest prefix of `id` (after `dep-`) that no other of `ids` starts with.
fn unique_prefix<'a>(id: &'a str, ids: &[&str]) -> &'a str {
    (5..=id.len())
        .map(|len| &id[..len])
        .find(|prefix| ids.iter().filter(|other| other.starts_with(prefix)).count() == 1)
        .expect("ids differ")
}

#[test]
fn status_logs_and_down_take_a_unique_prefix_or_last() {
    let daemon = Daemon::start();
    // `last` with nothing deployed yet.
    let none = daemon.cli(&["status", "last"]);
    none.expect_code(1);
    assert_eq!(
        none.stderr_lines(),
        ["error: no deployments yet, so there is no `last`"],
        "{}",
        none.show()
    );

    let first = up_wait_json(&daemon, hello_project(1).path(), 0);
    let second = up_wait_json(&daemon, failing_project().path(), 1);
    let first_id = first["deployment_id"].as_str().unwrap();
    let second_id = second["deployment_id"].as_str().unwrap();
    let ids = [first_id, second_id];

    // `last` is the newest.
    let last = daemon.cli(&["status", "last", "-o", "json"]);
    last.expect_success();
    assert_eq!(last.json(), daemon.status(second_id));
    let by_flag = daemon.cli(&["status", "--id", "last", "-o", "json"]);
    by_flag.expect_success();
    assert_eq!(by_flag.json(), last.json());

    // A unique prefix, with or without `dep-`.
    let prefix = unique_prefix(first_id, &ids);
    for arg in [prefix, &prefix["dep-".len()..]] {
        let ran = daemon.cli(&["status", arg, "-o", "json"]);
        ran.expect_success();
        assert_eq!(ran.json(), daemon.status(first_id), "{arg}");
    }
    let logs = daemon.cli(&["logs", prefix]);
    logs.expect_success();
    assert_eq!(
        logs.stdout,
        "[node 0] hello from node 0\n[node 0] bye from node 0\n",
        "{}",
        logs.show()
    );
    let logs_last = daemon.cli(&["logs", "last", "--node", "1"]);
    logs_last.expect_success();
    assert!(
        logs_last.stdout.contains("[node 1] disk full"),
        "{}",
        logs_last.show()
    );
    let down = daemon.cli(&["down", "last"]);
    down.expect_success();
    assert_eq!(
        down.stdout,
        format!("deployment {second_id} was already failed; nothing to stop\n"),
        "{}",
        down.show()
    );

    // A prefix of both: a usage error naming each.
    for command in ["status", "logs", "down"] {
        let ambiguous = daemon.cli(&[command, "dep-"]);
        ambiguous.expect_code(2);
        assert!(ambiguous.stdout.is_empty(), "{}", ambiguous.show());
        let lines = ambiguous.stderr_lines();
        assert_eq!(
            lines[..2],
            [
                "error: `dep-` is the start of 2 deployment ids",
                "  give more of the id"
            ],
            "{}",
            ambiguous.show()
        );
        let listed: BTreeSet<&str> = lines[2..]
            .iter()
            .map(|l| l.strip_prefix("  - ").expect("a candidate line"))
            .collect();
        assert_eq!(listed, BTreeSet::from(ids), "{}", ambiguous.show());
    }
    // A prefix of none: the usual answer for an unknown id.
    let unknown = daemon.cli(&["status", "dep-zz"]);
    unknown.expect_code(1);
    assert_eq!(
        unknown.stderr_lines(),
        ["error: no deployment `dep-zz`"],
        "{}",
        unknown.show()
    );
}

// ----- logs -----

/// `[node N] TEXT` split into the node index and the text (stdout lines only).
fn parse_log_line(line: &str) -> Option<(u32, &str)> {
    let rest = line.strip_prefix("[node ")?;
    let (index, text) = rest.split_once("] ")?;
    Some((index.parse().ok()?, text))
}

#[test]
fn logs_prefix_every_line_with_its_node() {
    let daemon = Daemon::start();
    let project = Project::new(&local_yml(3, "")).script(
        "#!/bin/sh\nfor i in 1 2 3 4 5; do echo \"line $i of node $TASKFLY_NODE_INDEX\"; done\n",
    );
    let view = up_wait_json(&daemon, project.path(), 0);
    let id = view["deployment_id"].as_str().unwrap();

    let all = daemon.cli(&["logs", id]);
    all.expect_success();
    let mut per_node: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in all.stdout.lines() {
        let (node, text) = parse_log_line(line)
            .unwrap_or_else(|| panic!("unprefixed line {line:?}\n{}", all.show()));
        per_node.entry(node).or_default().push(text.to_owned());
    }
    for node in 0..3 {
        let expected: Vec<String> = (1..=5)
            .map(|i| format!("line {i} of node {node}"))
            .collect();
        assert_eq!(
            per_node.get(&node),
            Some(&expected),
            "node {node}\n{}",
            all.show()
        );
    }
    assert_eq!(per_node.len(), 3);

    let one = daemon.cli(&["logs", id, "--node", "1"]);
    one.expect_success();
    let expected: Vec<String> = (1..=5)
        .map(|i| format!("[node 1] line {i} of node 1"))
        .collect();
    assert_eq!(
        one.stdout.lines().collect::<Vec<_>>(),
        expected,
        "{}",
        one.show()
    );

    // By node id as well as by index.
    let by_id = daemon.cli(&["logs", id, "--node", &format!("{id}-1")]);
    by_id.expect_success();
    assert_eq!(by_id.stdout, one.stdout);

    let json = daemon.cli(&["logs", id, "--node", "2", "--output", "json"]);
    json.expect_success();
    let page = json.json();
    let lines: Vec<&str> = page["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=5).map(|i| format!("line {i} of node 2")).collect();
    assert_eq!(lines, expected);
}

#[test]
fn logs_of_a_node_the_deployment_does_not_have_is_an_error() {
    let daemon = Daemon::start();
    let project = hello_project(3);
    let view = up_wait_json(&daemon, project.path(), 0);
    let id = view["deployment_id"].as_str().unwrap();
    // Index 7 of a 3-node deployment names no node, like an unknown node id does.
    let ran = daemon.cli(&["logs", id, "--node", "7"]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("no node `7`"), "{}", ran.show());
    let ran = daemon.cli(&["logs", id, "--node", "nope"]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("no node `nope`"), "{}", ran.show());
}

#[test]
fn logs_follow_ends_with_the_deployment_showing_every_line_once() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let go_file = gate.path().join("go");
    // Each node prints 25 lines, waits for the test's go file, then prints 25 more: the
    // follower is known to be following a running deployment, not reading a finished one.
    let project = Project::new(&local_yml(
        3,
        &format!("global_metadata: {{go_file: {:?}}}", path_str(&go_file)),
    ))
    .script(
        "#!/bin/sh\ni=1\nwhile [ $i -le 25 ]; do echo \"line $i\"; i=$((i+1)); done\n\
             while [ ! -e \"$GO_FILE\" ]; do sleep 0.05; done\n\
             while [ $i -le 50 ]; do echo \"line $i\"; i=$((i+1)); done\n",
    );
    let id = daemon.up(project.path());

    let mut follower = Running::start(&mut daemon.taskfly(&["logs", &id, "-f"]));
    let mut halfway: BTreeSet<u32> = BTreeSet::new();
    follower.wait_for_line(DEPLOYMENT_LIMIT, |line| {
        if let Some((node, "line 25")) = parse_log_line(line) {
            halfway.insert(node);
        }
        halfway.len() == 3
    });
    let running = daemon.status(&id);
    assert_eq!(
        running["status"], "running",
        "the nodes wait for the go file: {running:#}"
    );
    std::fs::write(&go_file, "").expect("write go file");

    let ran = follower.finish(DEPLOYMENT_LIMIT);
    ran.expect_success();
    let mut seen: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for line in ran.stdout.lines() {
        let (node, text) = parse_log_line(line)
            .unwrap_or_else(|| panic!("unexpected line {line:?}\n{}", ran.show()));
        let number = text
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        seen.entry(node).or_default().push(number);
    }
    let every: Vec<u32> = (1..=50).collect();
    for node in 0..3 {
        assert_eq!(
            seen.get(&node),
            Some(&every),
            "node {node}: each line once, in order"
        );
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(daemon.status(&id)["status"], "completed");
}

// ----- down and cleanup -----

/// A project of `count` nodes sleeping until stopped, its scripts carrying `MARKER=<marker>`.
fn sleeping_project(count: u32, marker: &str) -> Project {
    Project::new(&local_yml(count, &marker_metadata(marker))).script(SLEEP_SCRIPT)
}

/// Waits until every node of `id` runs its script and `count` script processes carry `marker`.
fn wait_until_sleeping(daemon: &Daemon, id: &str, count: usize, marker: &str) {
    daemon.wait_for_status(
        id,
        DEPLOYMENT_LIMIT,
        "every node to run its script",
        |view| {
            nodes(view).len() == count && node_statuses(view).iter().all(|s| s == "running_script")
        },
    );
    let env = format!("MARKER={marker}");
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        Duration::from_millis(50),
        "the scripts to start",
        || (support::processes_with_env(&env).len() >= count).then_some(()),
    );
}

#[test]
fn down_terminates_every_node_and_leaves_no_process_behind() {
    let daemon = Daemon::start();
    let marker = unique_word();
    let project = sleeping_project(3, &marker);
    let id = daemon.up(project.path());
    wait_until_sleeping(&daemon, &id, 3, &marker);

    daemon.down(&id, DEPLOYMENT_LIMIT);

    let view = daemon.status(&id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    assert_eq!(node_statuses(&view), ["terminated"; 3], "{view:#}");
    assert_eq!(view["nodes_terminated"], 3, "{view:#}");

    let env = format!("MARKER={marker}");
    cli_run::poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        "every script to be gone",
        || support::processes_with_env(&env).is_empty().then_some(()),
    );
    cli_run::poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        "every agent to be gone",
        || daemon.other_processes().is_empty().then_some(()),
    );

    // A final deployment has nothing left to stop: success, saying so.
    let again = daemon.cli(&["down", &id]);
    again.expect_success();
    assert_eq!(
        again.stdout,
        format!("deployment {id} was already terminated; nothing to stop\n"),
        "{}",
        again.show()
    );
}

#[test]
fn down_of_a_finished_deployment_succeeds_naming_its_final_state() {
    let daemon = Daemon::start();
    let completed = up_wait_json(&daemon, hello_project(1).path(), 0);
    let completed_id = completed["deployment_id"].as_str().unwrap();
    let ran = daemon.cli(&["down", completed_id]);
    ran.expect_success();
    assert_eq!(
        ran.stdout,
        format!("deployment {completed_id} was already completed; nothing to stop\n"),
        "{}",
        ran.show()
    );
    assert!(ran.stderr.is_empty(), "{}", ran.show());
    // The record is left as it was.
    assert_eq!(daemon.status(completed_id), completed);

    let failed = up_wait_json(&daemon, failing_project().path(), 1);
    let failed_id = failed["deployment_id"].as_str().unwrap();
    let json = daemon.cli(&["down", failed_id, "--output", "json"]);
    json.expect_success();
    assert_eq!(json.json(), failed);
}

#[test]
fn down_json_prints_the_terminated_deployment() {
    let daemon = Daemon::start();
    let marker = unique_word();
    let project = sleeping_project(2, &marker);
    let id = daemon.up(project.path());
    // Straight after `up`, before any node runs its script.
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&["down", &id, "--output", "json"]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let view = ran.json();
    assert_eq!(view["deployment_id"], id.as_str());
    assert_eq!(view["status"], "terminated", "{view:#}");
    assert_eq!(node_statuses(&view), ["terminated"; 2], "{view:#}");
    let env = format!("MARKER={marker}");
    cli_run::poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        "every script to be gone",
        || support::processes_with_env(&env).is_empty().then_some(()),
    );
}

#[test]
fn cleanup_deletes_finished_deployments_and_refuses_running_ones() {
    let daemon = Daemon::start();
    let finished = up_wait_json(&daemon, hello_project(1).path(), 0);
    let finished_id = finished["deployment_id"].as_str().unwrap().to_owned();
    let files = daemon
        .data_dir
        .path()
        .join("deployments")
        .join(&finished_id);
    assert!(
        files.is_dir(),
        "{} holds the deployment's files",
        files.display()
    );

    let ran = daemon.cli(&["cleanup", &finished_id]);
    ran.expect_success();
    assert_eq!(
        ran.stdout,
        format!(
            "deployment {finished_id} cleaned up: its files are deleted; its status and logs \
             stay until `taskfly cleanup {finished_id} --forget`\n"
        )
    );
    assert!(!files.exists(), "{} is deleted", files.display());
    // Files only: the record stays, marked cleaned, and its logs can still be read.
    let kept = daemon.status(&finished_id);
    assert_eq!(kept["status"], "completed", "{kept:#}");
    assert!(kept["cleaned_at"].is_string(), "{kept:#}");
    let logs = daemon.cli(&["logs", &finished_id]);
    logs.expect_success();
    assert!(
        logs.stdout.contains("[node 0] hello from node 0"),
        "{}",
        logs.show()
    );

    // A running deployment is refused, with what to do instead.
    let marker = unique_word();
    let running = daemon.up(sleeping_project(2, &marker).path());
    wait_until_sleeping(&daemon, &running, 2, &marker);
    let refused = daemon.cli(&["cleanup", &running]);
    refused.expect_code(1);
    let lines = refused.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", refused.show());
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(&running),
        "{}",
        refused.show()
    );
    assert!(lines[0].contains("taskfly down"), "{}", refused.show());
    assert_eq!(daemon.status(&running)["status"], "running");

    // --all: every final deployment (a terminated and a completed one), not a running one.
    daemon.cli(&["down", &running]).expect_success();
    let completed = up_wait_json(&daemon, hello_project(1).path(), 0);
    let still_running = daemon.up(sleeping_project(1, &marker).path());
    let all = daemon.cli(&["cleanup", "--all", "--output", "json"]);
    all.expect_success();
    assert_eq!(
        all.json(),
        serde_json::json!({"cleaned_count": 2, "failed_count": 0})
    );
    let left = daemon.cli(&["list", "--output", "json"]).json();
    let cleaned: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["cleaned_at"].is_string())
        .map(|d| d["deployment_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        cleaned.len(),
        3,
        "every final one is marked cleaned: {left:#}"
    );
    assert!(!cleaned.contains(&still_running.as_str()));
    assert!(cleaned.contains(&completed["deployment_id"].as_str().unwrap()));

    let text = daemon.cli(&["cleanup", "--all"]);
    text.expect_success();
    assert_eq!(text.stdout, "cleaned up 0 deployment(s), 0 failed\n");
    daemon.cli(&["down", &still_running]).expect_success();

    // Neither an id nor --all is a usage error.
    let neither = daemon.cli(&["cleanup"]);
    neither.expect_code(2);
    assert!(
        neither.stderr.contains("--all") && neither.stderr.contains("--forget"),
        "{}",
        neither.show()
    );
}

// ----- exit codes and errors -----

#[test]
fn validate_reports_every_problem_at_once_with_exit_code_2() {
    let home = tempfile::tempdir().expect("temp HOME");
    let project = Project::new(
        "cloud_provider: local\napplication_files: [setup.sh]\nnodes:\n  cuont: 3\n  count: 0\n",
    )
    .script(HELLO_SCRIPT);
    let dir = path_str(project.path());

    let ran = taskfly_offline(home.path(), &["validate", dir]);
    ran.expect_code(2);
    assert!(ran.stdout.is_empty(), "{}", ran.show());
    let lines = ran.stderr_lines();
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("2 problems"),
        "{}",
        ran.show()
    );
    let problem = |path: &str| lines.iter().find(|l| l.contains(path)).copied();
    let unknown = problem("nodes.cuont").unwrap_or_else(|| panic!("nodes.cuont\n{}", ran.show()));
    assert!(
        unknown.contains("unknown field") && unknown.contains("did you mean `count`"),
        "{unknown}"
    );
    let count = problem("nodes.count:").unwrap_or_else(|| panic!("nodes.count\n{}", ran.show()));
    assert!(
        count.contains("1 to 100000") && count.contains("got 0"),
        "{count}"
    );

    let json = taskfly_offline(home.path(), &["validate", dir, "--output", "json"]);
    json.expect_code(2);
    let doc = json.json();
    let details = doc["details"].as_array().expect("details");
    assert_eq!(details.len(), 2, "{doc:#}");
    assert!(
        details
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("nodes.cuont:")),
        "{doc:#}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("nodes.count:")),
        "{doc:#}"
    );

    // `up` and `run` refuse it the same way, before looking for a daemon (nothing listens).
    let url = format!("http://127.0.0.1:{}", free_port());
    let up = taskfly_offline(home.path(), &["--daemon", &url, "up", dir]);
    up.expect_code(2);
    assert!(up.stderr.contains("nodes.cuont"), "{}", up.show());
    let run = taskfly_offline(home.path(), &["run", dir]);
    run.expect_code(2);
    assert!(run.stderr.contains("nodes.count"), "{}", run.show());
}

#[test]
fn a_folder_without_taskfly_yml_is_a_usage_error_and_the_file_itself_means_its_folder() {
    let home = tempfile::tempdir().expect("temp HOME");
    let empty = tempfile::tempdir().expect("empty folder");
    let empty_dir = path_str(empty.path());
    // Nothing listens there: each refusal comes before any daemon is looked for.
    let url = format!("http://127.0.0.1:{}", free_port());
    for command in ["run", "up", "validate"] {
        let ran = taskfly_offline(home.path(), &["--daemon", &url, command, empty_dir]);
        ran.expect_code(2);
        assert!(ran.stdout.is_empty(), "{}", ran.show());
        assert_eq!(
            ran.stderr_lines(),
            [format!(
                "error: {empty_dir} has no taskfly.yml; create it, or point taskfly at the \
                 folder that holds it"
            )],
            "{command}\n{}",
            ran.show()
        );
    }
    let missing = empty.path().join("missing");
    let ran = taskfly_offline(home.path(), &["validate", path_str(&missing)]);
    ran.expect_code(2);
    assert!(
        ran.stderr
            .starts_with(&format!("error: cannot open {}", missing.display())),
        "{}",
        ran.show()
    );

    let project = hello_project(2);
    let other_file = project.path().join("setup.sh");
    let ran = taskfly_offline(home.path(), &["validate", path_str(&other_file)]);
    ran.expect_code(2);
    assert_eq!(
        ran.stderr_lines(),
        [format!(
            "error: {} is a file, not a project: give the folder that holds taskfly.yml (or \
             taskfly.yml itself)",
            other_file.display()
        )],
        "{}",
        ran.show()
    );

    // taskfly.yml itself: the same as its folder.
    let file = project.path().join("taskfly.yml");
    let by_folder = taskfly_offline(home.path(), &["validate", path_str(project.path())]);
    by_folder.expect_success();
    let by_file = taskfly_offline(home.path(), &["validate", path_str(&file)]);
    by_file.expect_success();
    assert_eq!(by_file.stdout, by_folder.stdout);
    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args(["run", path_str(&file)]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    assert_hello_output(&ran, 2);
    // Relative, from inside the project.
    let relative = cli_run::run(
        cli_run::command("taskfly", home.path())
            .current_dir(project.path())
            .args(["validate", "taskfly.yml"]),
    );
    relative.expect_success();
    assert_eq!(relative.stdout, by_folder.stdout);
}

#[test]
fn dash_o_is_short_for_output_before_or_after_the_command() {
    let home = tempfile::tempdir().expect("temp HOME");
    let project = hello_project(2);
    let dir = path_str(project.path());
    let long = taskfly_offline(home.path(), &["validate", dir, "--output", "json"]);
    long.expect_success();
    for args in [
        ["validate", dir, "-o", "json"],
        ["-o", "json", "validate", dir],
    ] {
        let short = taskfly_offline(home.path(), &args);
        short.expect_success();
        assert_eq!(short.json(), long.json(), "{args:?}");
    }
    // A failure is the JSON error document too.
    let url = format!("http://127.0.0.1:{}", free_port());
    let unreachable = taskfly_offline(home.path(), &["--daemon", &url, "list", "-o", "json"]);
    unreachable.expect_code(3);
    assert!(
        unreachable.json()["error"].is_string(),
        "{}",
        unreachable.show()
    );
    // And the help says so.
    let help = taskfly_offline(home.path(), &["--help"]);
    help.expect_success();
    assert!(
        help.stdout.contains("-o, --output <OUTPUT>"),
        "{}",
        help.show()
    );
}

/// The long options a `--help` lists (`--name` at the start of an option line).
fn listed_options(help: &str) -> BTreeSet<&str> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            // `-o, --output`: past the short form.
            let line = match line.as_bytes() {
                [b'-', short, b',', b' ', ..] if short.is_ascii_alphabetic() => &line[4..],
                _ => line,
            };
            line.strip_prefix("--")?.split([' ', '=']).next()
        })
        .collect()
}

#[test]
fn help_names_each_binary_and_leaves_internals_and_daemon_flags_out() {
    let home = tempfile::tempdir().expect("temp HOME");
    let help = |binary: &str, args: &[&str]| {
        let ran = cli_run::run(cli_run::command(binary, home.path()).args(args));
        ran.expect_success();
        ran.stdout
    };

    let daemon = help("taskflyd", &["--help"]);
    assert!(daemon.starts_with("The TaskFly daemon: "), "{daemon}");
    assert!(!daemon.to_lowercase().contains("agent"), "{daemon}");

    let main = help("taskfly", &["--help"]);
    let commands: Vec<&str> = main
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        [
            "run", "up", "list", "status", "logs", "rerun", "down", "outputs", "cleanup", "watch",
            "validate", "help"
        ],
        "{main}"
    );
    assert_eq!(
        listed_options(&main),
        BTreeSet::from(["daemon", "token", "ca-file", "output", "help", "version"]),
        "{main}"
    );
    // The hidden ones still work.
    assert!(help("taskfly", &["agent", "--help"]).contains("--work-dir"));

    let status = help("taskfly", &["status", "--help"]);
    assert!(!listed_options(&status).contains("id"), "{status}");
    let up = help("taskfly", &["up", "--help"]);
    assert_eq!(
        listed_options(&up),
        BTreeSet::from([
            "daemon",
            "token",
            "ca-file",
            "output",
            "help",
            "wait",
            "down-on-interrupt"
        ]),
        "{up}"
    );
    for (offline, own) in [
        (
            "run",
            &[
                "no-outputs",
                "advertise-url",
                "listen",
                "data-dir",
                "ssh-option",
            ][..],
        ),
        ("validate", &[][..]),
    ] {
        let text = help("taskfly", &[offline, "--help"]);
        let mut expected = BTreeSet::from(["output", "help"]);
        expected.extend(own);
        assert_eq!(listed_options(&text), expected, "{offline}\n{text}");
    }
    // ... and still accept them, before or after the command.
    let project = hello_project(1);
    let dir = path_str(project.path());
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        ["--daemon", &url, "--token", "t", "validate", dir],
        ["validate", dir, "--daemon", &url, "--token", "t"],
    ] {
        taskfly_offline(home.path(), &args).expect_success();
    }
}

#[test]
fn validate_shows_each_nodes_ssh_host_and_run_refuses_hosts_it_cannot_serve() {
    let home = tempfile::tempdir().expect("temp HOME");
    // Nothing here reaches a host: validate only reads, and run refuses before starting.
    let project = Project::new(
        "cloud_provider: local\ninstance_config:\n  local:\n    \
         hosts: [127.0.0.1, 127.0.0.2]\n    ssh_user: ops\n    ssh_port: 2222\n\
         application_files: [setup.sh]\nnodes:\n  count: 3\n",
    )
    .script(HELLO_SCRIPT);
    let dir = path_str(project.path());

    let ran = taskfly_offline(home.path(), &["validate", dir]);
    ran.expect_success();
    let headers: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.starts_with("node "))
        .collect();
    assert_eq!(
        headers,
        [
            "node 0 (on ops@127.0.0.1:2222):",
            "node 1 (on ops@127.0.0.2:2222):",
            "node 2 (on ops@127.0.0.1:2222):",
        ],
        "{}",
        ran.show()
    );
    let json = taskfly_offline(home.path(), &["validate", dir, "--output", "json"]);
    json.expect_success();
    let doc = json.json();
    let hosts: Vec<&str> = nodes(&doc)
        .iter()
        .map(|n| n["ssh_host"].as_str().expect("ssh_host"))
        .collect();
    assert_eq!(
        hosts,
        [
            "ops@127.0.0.1:2222",
            "ops@127.0.0.2:2222",
            "ops@127.0.0.1:2222"
        ],
        "{}",
        json.show()
    );

    let run = taskfly_offline(home.path(), &["run", dir]);
    run.expect_code(2);
    assert!(
        run.stderr
            .contains("taskfly run runs nodes on this machine only")
            && run.stderr.contains("--advertise-url"),
        "{}",
        run.show()
    );
}

#[test]
fn an_unreachable_daemon_is_exit_code_3_with_one_line_saying_what_to_do() {
    let home = tempfile::tempdir().expect("temp HOME");
    let project = hello_project(1);
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut command = cli_run::command("taskfly", home.path());
    command
        .args(["--daemon", &url, "up", path_str(project.path())])
        .env("TASKFLY_API_TOKEN", support::API_TOKEN);
    let ran = cli_run::run(&mut command);
    ran.expect_code(3);
    assert!(ran.stdout.is_empty(), "{}", ran.show());
    let lines = ran.stderr_lines();
    assert_eq!(lines.len(), 1, "one line\n{}", ran.show());
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(lines[0].contains(&url), "names the URL tried: {}", lines[0]);
    assert!(
        lines[0].contains("taskflyd"),
        "says how to start a daemon: {}",
        lines[0]
    );
    assert!(lines[0].contains("taskfly run"), "{}", lines[0]);
    assert!(!ran.stderr.contains(support::API_TOKEN), "{}", ran.show());

    // Every daemon command, and the JSON error document.
    let list = taskfly_offline(home.path(), &["--daemon", &url, "list", "--output", "json"]);
    list.expect_code(3);
    assert!(
        list.json()["error"].as_str().unwrap().contains(&url),
        "{}",
        list.show()
    );
}

#[test]
fn a_refused_token_is_a_usage_error_saying_where_the_token_came_from() {
    let daemon = Daemon::start();

    let wrong = cli_run::run(
        daemon
            .taskfly(&["list"])
            .env("TASKFLY_API_TOKEN", "not-the-token"),
    );
    wrong.expect_code(2);
    assert!(wrong.stdout.is_empty(), "{}", wrong.show());
    let lines = wrong.stderr_lines();
    assert_eq!(lines[0], "error: wrong API token", "{}", wrong.show());
    assert!(
        lines.iter().any(|l| l.contains("TASKFLY_API_TOKEN")),
        "{}",
        wrong.show()
    );
    assert!(
        !wrong.stderr.contains("not-the-token"),
        "the token is never printed"
    );

    // No token anywhere: the message says where one was looked for.
    let token_file = daemon.home.path().join(".taskfly").join("api-token");
    let missing = cli_run::run(daemon.taskfly(&["list"]).env_remove("TASKFLY_API_TOKEN"));
    missing.expect_code(2);
    assert!(
        missing.stderr.contains(path_str(&token_file)),
        "{}",
        missing.show()
    );
    assert!(
        missing.stderr.contains("TASKFLY_API_TOKEN"),
        "{}",
        missing.show()
    );

    // ~/.taskfly/api-token is read when no token is given; a wrong one is named as the source.
    std::fs::create_dir_all(token_file.parent().unwrap()).expect("mkdir");
    std::fs::write(&token_file, "stale-token\n").expect("write token");
    let stale = cli_run::run(daemon.taskfly(&["list"]).env_remove("TASKFLY_API_TOKEN"));
    stale.expect_code(2);
    assert!(
        stale
            .stderr
            .contains(&format!("read from {}", path_str(&token_file))),
        "{}",
        stale.show()
    );
    std::fs::write(&token_file, format!("{}\n", support::API_TOKEN)).expect("write token");
    let good = cli_run::run(daemon.taskfly(&["list"]).env_remove("TASKFLY_API_TOKEN"));
    good.expect_success();
    assert_eq!(good.stdout, "no deployments\n");
}

// ----- validate -----

#[test]
fn validate_prints_each_nodes_environment_with_secrets_masked() {
    let home = tempfile::tempdir().expect("temp HOME");
    let secret = format!("pw-{}", unique_word());
    let project = Project::new(&local_yml(
        3,
        &format!(
            "global_metadata: {{bucket: data-bkt, batch: 500}}\n\
             secrets: {{db_password: {secret}}}\n\
             distributed_lists:\n  shard: [a.csv, b.csv, c.csv]\n\
             config_template:\n  out: \"s3://{{bucket}}/out/{{node_index}}\""
        ),
    ))
    .script(HELLO_SCRIPT);
    let dir = path_str(project.path());

    let ran = taskfly_offline(home.path(), &["validate", dir]);
    ran.expect_success();
    assert!(
        !ran.stdout.contains(&secret) && !ran.stderr.contains(&secret),
        "{}",
        ran.show()
    );
    assert!(
        ran.stdout
            .starts_with("taskfly.yml is valid: 3 node(s) on local"),
        "{}",
        ran.show()
    );
    // One block per node: its variables, indented, after `node N:`.
    let mut blocks: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = None;
    for line in ran.stdout.lines() {
        if let Some(index) = line.strip_prefix("node ").and_then(|l| l.strip_suffix(':')) {
            current = Some(index.parse::<u32>().expect("node index"));
        } else if let (Some(node), Some(variable)) = (current, line.strip_prefix("  ")) {
            let (name, value) = variable.split_once('=').expect("NAME=value");
            blocks
                .entry(node)
                .or_default()
                .insert(name.to_owned(), value.to_owned());
        }
    }
    assert_eq!(blocks.len(), 3, "{}", ran.show());
    for (node, shard) in [(0, "a.csv"), (1, "b.csv"), (2, "c.csv")] {
        let env = &blocks[&node];
        assert_eq!(env["DB_PASSWORD"], "\"***\"", "node {node}");
        assert_eq!(env["SHARD"], shard, "node {node}");
        assert_eq!(env["BUCKET"], "data-bkt");
        assert_eq!(env["BATCH"], "500");
        assert_eq!(env["OUT"], format!("s3://data-bkt/out/{node}"));
        assert_eq!(env["TASKFLY_NODE_INDEX"], node.to_string());
        assert_eq!(env["TASKFLY_TOTAL_NODES"], "3");
    }

    let json = taskfly_offline(home.path(), &["validate", dir, "--output", "json"]);
    json.expect_success();
    assert!(!json.stdout.contains(&secret));
    let doc = json.json();
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["total_nodes"], 3);
    let json_nodes = doc["nodes"].as_array().expect("nodes");
    assert_eq!(json_nodes.len(), 3);
    for (i, node) in json_nodes.iter().enumerate() {
        assert_eq!(node["node_index"], i);
        assert_eq!(node["env"]["DB_PASSWORD"], "***");
        assert_eq!(node["env"]["SHARD"], ["a.csv", "b.csv", "c.csv"][i]);
        assert_eq!(node["env"]["OUT"], format!("s3://data-bkt/out/{i}"));
    }
}

// ----- run (no daemon) -----

#[test]
fn run_needs_no_daemon_and_prints_every_nodes_lines_and_a_summary() {
    let home = tempfile::tempdir().expect("temp HOME");
    let project = hello_project(3);
    let dir = path_str(project.path());

    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args([
            "--daemon",
            &format!("http://127.0.0.1:{}", free_port()),
            "run",
            dir,
        ]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let summary = assert_hello_output(&ran, 3);
    assert!(
        summary.ends_with(": 3 completed, 0 failed, 3 total"),
        "{}",
        ran.show()
    );

    let json = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args(["run", dir, "--output", "json"]),
        DEPLOYMENT_LIMIT,
    );
    json.expect_success();
    let view = json.json();
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(node_statuses(&view), ["completed"; 3]);
    // stdout holds the document alone; the node lines go to stderr, without progress lines.
    let stderr = json.stderr_lines();
    assert_eq!(stderr.len(), 6, "{}", json.show());
    assert!(
        stderr.iter().all(|l| l.starts_with("[node ")),
        "json output has no progress lines\n{}",
        json.show()
    );
}

#[test]
fn run_whose_output_is_closed_terminates_its_nodes_and_leaves_nothing() {
    let home = tempfile::tempdir().expect("temp HOME");
    // `taskfly run` keeps its data in the temporary folder: this one, to see it go.
    let tmp = tempfile::tempdir().expect("temp TMPDIR");
    let marker = unique_word();
    let project = Project::new(&local_yml(2, &marker_metadata(&marker))).script(
        "#!/bin/sh\ni=0\nwhile [ $i -lt 600 ]; do echo \"line $i\"; i=$((i + 1)); sleep 0.1; done\n",
    );
    // Read one node line, then go away as `head -1` does.
    let (status, stderr) = cli_run::close_stdout_after(
        cli_run::command("taskfly", home.path())
            .args(["run", path_str(project.path())])
            .env("TMPDIR", tmp.path()),
        DEPLOYMENT_LIMIT,
        |line| line.starts_with("[node "),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("standard output was closed: terminating every node"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let env = format!("MARKER={marker}");
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        Duration::from_millis(50),
        "no script left",
        || support::processes_with_env(&env).is_empty().then_some(()),
    );
    assert_eq!(
        support::engine_util::dir_names(tmp.path()),
        Vec::<String>::new(),
        "the run's data folder is removed"
    );
}

#[test]
fn run_of_a_failing_project_exits_1() {
    let home = tempfile::tempdir().expect("temp HOME");
    let project = failing_project();
    let dir = path_str(project.path());
    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args(["run", dir]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_code(1);
    assert!(ran.stdout.contains("[node 1] disk full"), "{}", ran.show());
    assert!(
        ran.stdout.contains(": 1 completed, 1 failed, 2 total"),
        "{}",
        ran.show()
    );

    let json = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args(["run", dir, "--output", "json"]),
        DEPLOYMENT_LIMIT,
    );
    json.expect_code(1);
    let view = json.json();
    assert_eq!(view["status"], "failed");
    assert_eq!(nodes(&view)[1]["exit_code"], 3);
}

/// Whether `line` is `<RFC 3339 UTC seconds> [<n>s] <state> <done>/<total> done (<counts>)`.
fn is_progress_line(line: &str, total: u32) -> bool {
    let Some((timestamp, rest)) = line.split_once(' ') else {
        return false;
    };
    let timestamp_ok = timestamp.len() == 20
        && timestamp.ends_with('Z')
        && timestamp.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    let Some(rest) = rest.strip_prefix('[') else {
        return false;
    };
    let Some((seconds, rest)) = rest.split_once("s] ") else {
        return false;
    };
    let words: Vec<&str> = rest.splitn(4, ' ').collect();
    let [state, fraction, "done", counts] = words[..] else {
        return false;
    };
    let fraction_ok = fraction.split_once('/').is_some_and(|(done, all)| {
        done.parse::<u32>().is_ok_and(|d| d <= total) && all == total.to_string()
    });
    timestamp_ok
        && seconds.parse::<u64>().is_ok()
        && ["pending", "provisioning", "running", "completed", "failed"].contains(&state)
        && fraction_ok
        && counts.starts_with('(')
        && counts.ends_with(')')
}

#[test]
fn run_prints_plain_timestamped_progress_when_stderr_is_not_a_terminal() {
    let home = tempfile::tempdir().expect("temp HOME");
    // The nodes take a moment (their workload), so there is progress to show.
    let project = Project::new(&local_yml(2, "")).script("#!/bin/sh\nsleep 0.5\necho done\n");
    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path()).args(["run", path_str(project.path())]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let lines = ran.stderr_lines();
    assert!(!lines.is_empty(), "progress is shown\n{}", ran.show());
    for line in &lines {
        assert!(
            is_progress_line(line, 2),
            "not a progress line: {line:?}\n{}",
            ran.show()
        );
    }
    // The first state at once, at most one line per few seconds after it, and the final state
    // as the last line.
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("] completed 2/2 done")),
        "{}",
        ran.show()
    );
    // Plain text for a log file: no bar, no cursor movement, no colour.
    assert!(
        !ran.stderr.contains('\x1b') && !ran.stderr.contains('\r'),
        "{:?}",
        ran.stderr
    );
    assert!(!ran.stdout.contains('\x1b'), "{:?}", ran.stdout);
    // A line when something changed, not one per refresh.
    let distinct: BTreeSet<&str> = lines
        .iter()
        .map(|l| l.split_once("] ").unwrap().1)
        .collect();
    assert_eq!(
        distinct.len(),
        lines.len(),
        "no repeated state\n{}",
        ran.show()
    );
}

// ----- taskflyd -----

#[test]
fn taskflyd_makes_a_private_api_token_file_when_none_is_given() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start_with(DaemonOptions {
        token: None,
        ..DaemonOptions::default()
    });
    let path = daemon.token_file();
    let mode = std::fs::metadata(&path)
        .expect("api-token exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    // At least 128 random bits, written as text.
    assert!(daemon.token.len() >= 32, "{:?}", daemon.token);
    assert!(
        daemon.token.chars().all(|c| c.is_ascii_alphanumeric()),
        "{:?}",
        daemon.token
    );

    // The CLI works with that token, and not without it.
    let ran = daemon.cli(&["list", "--output", "json"]);
    ran.expect_success();
    assert_eq!(ran.json(), serde_json::json!([]));
    cli_run::run(daemon.taskfly(&["list"]).env_remove("TASKFLY_API_TOKEN")).expect_code(2);

    let token = daemon.token.clone();
    let (status, lines) = daemon.stop();
    assert!(status.success(), "{status:?}\n{}", lines.join("\n"));
    assert!(
        lines.iter().all(|l| !l.contains(&token)),
        "the token is never logged"
    );
    assert!(
        lines.iter().any(|l| l.contains("api-token")),
        "the new file is mentioned"
    );
}

#[test]
fn a_second_taskflyd_on_the_same_port_exits_with_one_line() {
    let daemon = Daemon::start();
    let address = daemon.url.trim_start_matches("http://").to_owned();
    let other_data = tempfile::tempdir().expect("temp data dir");
    let mut command = cli_run::command("taskflyd", daemon.home.path());
    command
        .args([
            "--listen",
            &address,
            "--data-dir",
            path_str(other_data.path()),
        ])
        .env("TASKFLY_API_TOKEN", support::API_TOKEN)
        .env("RUST_LOG", "info");
    let ran = cli_run::run(&mut command);
    assert_ne!(ran.code(), 0, "{}", ran.show());
    let lines = ran.stderr_lines();
    assert_eq!(lines.len(), 1, "one line\n{}", ran.show());
    assert!(
        lines[0].contains(&address) && lines[0].contains("already in use"),
        "{}",
        lines[0]
    );
    // The first daemon is unharmed.
    daemon.cli(&["list"]).expect_success();
}

#[test]
fn taskflyd_text_logs_carry_no_colour_codes_into_a_pipe() {
    let daemon = Daemon::start_with(DaemonOptions {
        log_format: LogFormat::Text,
        ..DaemonOptions::default()
    });
    let project = hello_project(1);
    up_wait_json(&daemon, project.path(), 0);
    let (status, lines) = daemon.stop();
    assert!(status.success(), "{status:?}");
    let listening = lines
        .iter()
        .find(|l| l.contains("taskflyd listening"))
        .expect("listening line");
    assert!(listening.contains(" INFO "), "{listening}");
    assert!(
        lines.iter().any(|l| l.contains("deployment accepted")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape codes in {line:?}");
    }
}

#[test]
fn taskflyd_never_logs_the_api_token_or_a_secret() {
    let daemon = Daemon::start_with(DaemonOptions {
        rust_log: "debug".to_owned(),
        ..DaemonOptions::default()
    });
    let secret = format!("s3cr3t-{}", unique_word());
    // The script prints the secret on both streams and fails with it as its last stderr line,
    // so it reaches the logs, the failure message and the daemon's own reports.
    let project = Project::new(&local_yml(2, &format!("secrets: {{db_password: {secret}}}"))).script(
        "#!/bin/sh\necho \"password is $DB_PASSWORD\"\necho \"cannot log in with $DB_PASSWORD\" >&2\nexit 4\n",
    );
    let view = up_wait_json(&daemon, project.path(), 1);
    let id = view["deployment_id"].as_str().unwrap().to_owned();
    assert!(!view.to_string().contains(&secret), "{view:#}");
    let message = nodes(&view)[0]["error_message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("cannot log in with ***"), "{message}");

    let logs = daemon.cli(&["logs", &id, "--node", "0"]);
    logs.expect_success();
    assert_eq!(
        logs.stdout,
        "[node 0] password is ***\n[node 0] cannot log in with ***\n",
        "{}",
        logs.show()
    );
    for args in [
        vec!["status", id.as_str()],
        vec!["logs", id.as_str(), "--output", "json"],
        vec!["list"],
    ] {
        let ran = daemon.cli(&args);
        ran.expect_success();
        assert!(
            !ran.stdout.contains(&secret) && !ran.stderr.contains(&secret),
            "{}",
            ran.show()
        );
    }

    // At rest, the secret is only in files of mode 0600, and in no log file.
    let data_dir = daemon.data_dir.path().to_owned();
    let (status, lines) = daemon.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        lines.iter().any(|l| l.contains(&id)),
        "the daemon logged the deployment"
    );
    for line in &lines {
        assert!(!line.contains(&secret), "secret in the daemon log: {line}");
        assert!(
            !line.contains(support::API_TOKEN),
            "API token in the daemon log: {line}"
        );
    }
    for (path, bytes) in files_under(&data_dir) {
        if !contains(&bytes, secret.as_bytes()) {
            continue;
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{} holds the secret", path.display());
        assert!(
            path.extension().is_none_or(|e| e != "log"),
            "{} holds the secret",
            path.display()
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `dir`, with its contents.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => {
                    if let Ok(bytes) = std::fs::read(&path) {
                        files.push((path, bytes));
                    }
                }
                _ => {}
            }
        }
    }
    files
}
