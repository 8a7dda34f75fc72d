//! Issue 13 §2, "rerun only what failed": `taskfly rerun` and `POST /deployments/{id}/rerun`
//! against a real `taskflyd` (SQLite state, each local node's agent a process of its own),
//! restarted in between where the test says so.
//!
//! Each node's script prints its whole environment, so the rerun's nodes can be compared with
//! the original ones variable by variable. Whether a node fails is decided by a file the test
//! writes (`$GATE/fixed`), not by time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::chaos::raw_request;
use crate::support::cli_daemon::{free_port, nodes, path_str, Daemon, DaemonOptions};
use crate::support::cli_run;
use crate::support::{local_yml, Project};

/// How long a deployment of these short scripts may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(60);

/// Prints `ENV NAME=value` for each variable, then fails (exit 3) on the nodes listed in
/// `$FAIL_ON` unless the file `$GATE/fixed` exists.
const ENV_SCRIPT: &str = r#"#!/bin/sh
env | sort | while IFS= read -r line; do echo "ENV $line"; done
case " $FAIL_ON " in
  *" $TASKFLY_NODE_INDEX "*) [ -e "$GATE/fixed" ] || { echo "node $TASKFLY_NODE_INDEX fails" >&2; exit 3; } ;;
esac
echo "node $TASKFLY_NODE_INDEX done"
"#;

/// The variables that differ between a node and its rerun, by design: the ids of the new
/// deployment and node, and what the local provider and agent set up per node (its work
/// folder, which is named by the node id).
const DIFFERS_BY_DESIGN: [&str; 3] = ["TASKFLY_DEPLOYMENT_ID", "TASKFLY_NODE_ID", "PWD"];

/// A project of `count` nodes whose nodes `fail_on` (indexes separated by spaces) fail until
/// `gate/fixed` exists. Each node gets a slice of a distributed list and a template.
fn project(count: u32, fail_on: &str, gate: &Path) -> Project {
    let nodes = format!(
        "global_metadata: {{gate: \"{}\", fail_on: \"{fail_on}\"}}\n\
         distributed_lists:\n  shard: [alpha, beta, gamma, delta, epsilon, zeta]\n\
         config_template:\n  label: \"part {{node_index}} of {{total_nodes}}\"",
        path_str(gate)
    );
    Project::new(&local_yml(count, &nodes)).script(ENV_SCRIPT)
}

/// Each node's environment, by node index, as its script printed it.
type NodeEnvs = BTreeMap<u64, BTreeMap<String, String>>;

/// `taskfly logs ID --output json`: node index -> its `ENV` lines as a map.
fn node_envs(daemon: &Daemon, id: &str) -> NodeEnvs {
    let ran = daemon.cli(&["logs", id, "--output", "json"]);
    ran.expect_success();
    let mut envs = NodeEnvs::new();
    for line in ran.json()["logs"].as_array().expect("logs") {
        let text = line["line"].as_str().expect("line");
        let Some(pair) = text.strip_prefix("ENV ") else {
            continue;
        };
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        envs.entry(line["node_index"].as_u64().expect("node_index"))
            .or_default()
            .insert(name.to_owned(), value.to_owned());
    }
    envs
}

/// Asserts that node `index` had the same environment in `original` and `rerun`, but for
/// [`DIFFERS_BY_DESIGN`], which must name the rerun's own deployment and node.
#[track_caller]
fn assert_same_environment(envs: (&NodeEnvs, &NodeEnvs), ids: (&str, &str), index: u64) {
    let (mut before, mut after) = (envs.0[&index].clone(), envs.1[&index].clone());
    assert_eq!(before["TASKFLY_DEPLOYMENT_ID"], ids.0);
    assert_eq!(after["TASKFLY_DEPLOYMENT_ID"], ids.1);
    assert_eq!(after["TASKFLY_NODE_ID"], format!("{}-{index}", ids.1));
    assert_eq!(after["TASKFLY_NODE_INDEX"], index.to_string());
    for name in DIFFERS_BY_DESIGN {
        before.remove(name);
        after.remove(name);
    }
    assert_eq!(
        before, after,
        "node {index}'s environment, original vs rerun"
    );
}

fn indexes(view: &serde_json::Value) -> Vec<u64> {
    nodes(view)
        .iter()
        .map(|n| n["node_index"].as_u64().expect("node_index"))
        .collect()
}

/// `taskfly rerun` (default `--failed`) runs again exactly the nodes that failed, each with
/// the environment and slice it had (the original node count included), as a new deployment
/// whose view names the original.
#[test]
fn rerun_runs_the_failed_nodes_again_with_the_environment_they_had() {
    let gate = tempfile::tempdir().expect("gate");
    let daemon = Daemon::start();
    let project = project(5, "1 3", gate.path());
    let original = daemon.up_wait_json(project.path(), 1, DEPLOYMENT_LIMIT);
    let original_id = original["deployment_id"].as_str().expect("id").to_owned();
    assert_eq!(original["nodes_failed"], 2, "{original}");

    std::fs::write(gate.path().join("fixed"), "").expect("write the gate");
    // A prefix of the id, as `status` takes it.
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&["rerun", &original_id[..10], "--wait", "--output", "json"]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let rerun = ran.json();
    let rerun_id = rerun["deployment_id"].as_str().expect("id").to_owned();
    assert_ne!(rerun_id, original_id);
    assert_eq!(rerun["status"], "completed", "{rerun}");
    assert_eq!(rerun["rerun_of"], original_id.as_str());
    assert_eq!(rerun["total_nodes"], 2, "counts only the nodes it runs");
    assert_eq!(indexes(&rerun), [1, 3]);

    let envs = (
        node_envs(&daemon, &original_id),
        node_envs(&daemon, &rerun_id),
    );
    assert_eq!(envs.1.keys().copied().collect::<Vec<_>>(), [1, 3]);
    for index in [1, 3] {
        assert_same_environment((&envs.0, &envs.1), (&original_id, &rerun_id), index);
    }
    let node3 = &envs.1[&3];
    assert_eq!(node3["TASKFLY_TOTAL_NODES"], "5", "the original count");
    // Six items over five nodes: node 3 gets the list of its items.
    assert_eq!(node3["SHARD"], r#"["delta"]"#);
    assert_eq!(node3["LABEL"], "part 3 of 5");

    // The status of the rerun says what it reruns.
    let text = daemon.cli(&["status", &rerun_id]);
    text.expect_success();
    assert!(
        text.stdout
            .contains(&format!("rerun of    {original_id} (node(s) 1, 3)\n")),
        "{}",
        text.show()
    );
}

/// `--nodes` reruns any nodes, completed ones included; what cannot be rerun is refused with
/// an error that says why: nothing failed, an index that is not a node, an empty or malformed
/// list, a deployment still running or whose files are gone.
#[test]
fn rerun_of_listed_nodes_and_what_is_refused() {
    let gate = tempfile::tempdir().expect("gate");
    let daemon = Daemon::start();
    let project = project(3, "", gate.path());
    let done = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    let id = done["deployment_id"].as_str().expect("id").to_owned();

    let nothing = daemon.cli(&["rerun", &id]);
    nothing.expect_code(1);
    assert!(
        nothing.stderr.contains(&format!(
            "every node of deployment `{id}` completed: nothing failed to rerun"
        )),
        "{}",
        nothing.show()
    );

    let unknown = daemon.cli(&["rerun", &id, "--nodes", "1,3-4"]);
    unknown.expect_code(2);
    assert!(
        unknown.stderr.contains(&format!(
            "nodes 3-4 are not nodes of deployment `{id}`, whose nodes are 0-2"
        )),
        "{}",
        unknown.show()
    );
    let backwards = daemon.cli(&["rerun", &id, "--nodes", "2-1"]);
    backwards.expect_code(2);
    assert!(
        backwards.stderr.contains("runs backwards; write it as 1-2"),
        "{}",
        backwards.show()
    );
    let both = daemon.cli(&["rerun", &id, "--nodes", "1", "--failed"]);
    both.expect_code(2);

    let listed = daemon.cli(&["rerun", &id, "--nodes", "2,0", "--output", "json"]);
    listed.expect_success();
    let created = listed.json();
    assert_eq!(created["rerun_of"], id.as_str());
    assert_eq!(created["node_indexes"], serde_json::json!([0, 2]));
    assert_eq!(created["nodes"], 2);
    let rerun_id = created["deployment_id"].as_str().expect("id").to_owned();
    let rerun = daemon.wait_for_status(&rerun_id, DEPLOYMENT_LIMIT, "the rerun to end", |v| {
        v["status"] == "completed"
    });
    assert_eq!(indexes(&rerun), [0, 2]);
    assert_eq!(rerun["rerun_of"], id.as_str());

    // The API, directly: a selection that is neither "failed" nor a list, and an empty list.
    let bearer = format!("Bearer {}", daemon.token);
    let post = |body: &str| {
        raw_request(
            &daemon.url,
            "POST",
            &format!("/api/v1/deployments/{id}/rerun"),
            &[
                ("Authorization", bearer.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    let bad = post(r#"{"nodes": "all"}"#);
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.body
            .contains(r#"expected \"failed\" or a list of node indexes like [1, 4]"#),
        "{}",
        bad.body
    );
    let empty = post(r#"{"nodes": []}"#);
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert!(
        empty.body.contains("no node to rerun was named"),
        "{}",
        empty.body
    );
    let accepted = post(r#"{"nodes": [1]}"#);
    assert_eq!(accepted.status, 202, "{}", accepted.body);

    // A deployment whose files are gone (cleaned up) cannot be rerun.
    std::fs::remove_dir_all(daemon.data_dir.path().join("deployments").join(&id))
        .expect("remove the deployment's files");
    let gone = daemon.cli(&["rerun", &id, "--nodes", "0"]);
    gone.expect_code(1);
    assert!(
        gone.stderr
            .contains(&format!("the files of deployment `{id}` were cleaned up")),
        "{}",
        gone.show()
    );
}

/// A deployment that still runs is not rerun: the answer says to wait or stop it.
#[test]
fn a_running_deployment_is_not_rerun() {
    let gate = tempfile::tempdir().expect("gate");
    let daemon = Daemon::start();
    let script = "#!/bin/sh\nwhile [ ! -e \"$GATE/go\" ]; do sleep 0.1; done\n";
    let project = Project::new(&local_yml(
        1,
        &format!("global_metadata: {{gate: \"{}\"}}", path_str(gate.path())),
    ))
    .script(script);
    let id = daemon.up(project.path());
    let refused = daemon.cli(&["rerun", &id]);
    refused.expect_code(1);
    assert!(
        refused
            .stderr
            .contains("a rerun starts once it has ended (wait for it, or terminate it"),
        "{}",
        refused.show()
    );
    std::fs::write(gate.path().join("go"), "").expect("open the gate");
    daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the deployment to end", |v| {
        v["status"] == "completed"
    });
}

/// Everything a rerun needs is in the store and the deployment's folder: after a restart of
/// the daemon, the failed node runs again with the environment it had.
#[test]
fn rerun_works_after_a_daemon_restart() {
    let gate = tempfile::tempdir().expect("gate");
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let project = project(3, "2", gate.path());
    let original = daemon.up_wait_json(project.path(), 1, DEPLOYMENT_LIMIT);
    let original_id = original["deployment_id"].as_str().expect("id").to_owned();

    daemon.shut_down();
    daemon.restart();
    std::fs::write(gate.path().join("fixed"), "").expect("write the gate");
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&["rerun", "last", "--failed", "--wait", "--output", "json"]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let rerun = ran.json();
    let rerun_id = rerun["deployment_id"].as_str().expect("id").to_owned();
    assert_eq!(rerun["rerun_of"], original_id.as_str());
    assert_eq!(indexes(&rerun), [2]);
    let envs = (
        node_envs(&daemon, &original_id),
        node_envs(&daemon, &rerun_id),
    );
    assert_same_environment((&envs.0, &envs.1), (&original_id, &rerun_id), 2);
}
