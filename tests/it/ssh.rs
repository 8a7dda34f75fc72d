//! Nodes on ssh hosts (`instance_config.local.hosts`, SPEC §1): a real `taskflyd` starting each
//! node's shell bootstrap over the system's ssh client on the test sshd, which
//! `scripts/test.sh` starts on 127.0.0.1 and 127.0.0.2 (`support::sshd`). The nodes are real
//! processes of the user running the tests, calling the daemon back over real HTTP.
//!
//! Every daemon is given the test's known_hosts with `--ssh-option`, so no test needs, or
//! writes to, the `~/.ssh` of the user running the tests. Deployment ids are unique, and every
//! check of the hosts' node directories and of /proc keeps to the test's own deployment, so
//! the tests may run in parallel.
//!
//! Nothing here waits by sleeping: anything asynchronous is waited for by the CLI itself
//! (`up --wait`, `down`) or by a bounded poll of `status`, of the hosts' node directories or of
//! /proc. With `TASKFLY_REQUIRE_SSH=1` a missing or unusable sshd fails these tests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use taskfly::LocalProvider;

use crate::support::cli_daemon::{free_port, nodes, path_str, Daemon, DaemonOptions};
use crate::support::cli_run::{self, Ran};
use crate::support::engine_util::node_lines;
use crate::support::sshd::{self, RemoveLeftovers, SshTarget, HOSTS};
use crate::support::{local_yml, Project, TestEngine};

/// How long a deployment of this file's short scripts may take, provisioning retries
/// included (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(60);
/// How long an ended node's processes and directory may take to disappear.
const CLEANUP_LIMIT: Duration = Duration::from_secs(30);
/// How often `status` and /proc are polled.
const POLL: Duration = Duration::from_millis(50);
/// How often the hosts' node directories are listed (each listing is an ssh login).
const SSH_POLL: Duration = Duration::from_millis(250);

/// Says where it runs, which address it was logged in at (both test hosts are this machine:
/// the server address of its ssh session is what tells them apart), then which shard it got.
const HELLO_SCRIPT: &str = "#!/bin/sh\n\
    echo \"hello from node $TASKFLY_NODE_INDEX on $(hostname)\"\n\
    set -- ${SSH_CONNECTION:-}\n\
    echo \"node $TASKFLY_NODE_INDEX logged in at ${3:-no ssh session}\"\n\
    echo \"node $TASKFLY_NODE_INDEX has shard $SHARD\"\n";

/// Says it sleeps, then sleeps until it is stopped.
const SLEEP_SCRIPT: &str = "#!/bin/sh\n\
    echo \"sleeping on node $TASKFLY_NODE_INDEX\"\n\
    sleep 600\n\
    echo never\n";

/// A daemon whose ssh trusts exactly the test sshd's host key, with `extra` flags.
#[track_caller]
fn ssh_daemon(target: &SshTarget, extra: &[&str]) -> Daemon {
    daemon_with(&target.daemon_args(), extra)
}

/// A daemon on 127.0.0.1:0 started with `ssh_args` (`--ssh-option …`), then `extra`.
#[track_caller]
fn daemon_with(ssh_args: &[String], extra: &[&str]) -> Daemon {
    let args = daemon_args(ssh_args, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with_args(DaemonOptions::default(), &args)
}

/// `ssh_args` followed by `extra`, owned.
fn daemon_args(ssh_args: &[String], extra: &[&str]) -> Vec<String> {
    ssh_args
        .iter()
        .cloned()
        .chain(extra.iter().map(|arg| (*arg).to_owned()))
        .collect()
}

/// A project of `count` nodes on `hosts`, logging in with `key`, running `script`, with extra
/// `nodes:` lines.
fn ssh_project(
    target: &SshTarget,
    hosts: &[&str],
    key: &Path,
    count: u32,
    nodes_extra: &str,
    script: &str,
) -> Project {
    Project::new(&format!(
        "{}{}",
        local_yml(count, nodes_extra),
        target.instance_config_yml(hosts, key)
    ))
    .script(script)
}

/// `taskfly up DIR --wait --output json`, asserting the exit code; the final deployment.
#[track_caller]
fn up_wait_json(daemon: &Daemon, project: &Path, expected_code: i32) -> serde_json::Value {
    daemon.up_wait_json(project, expected_code, DEPLOYMENT_LIMIT)
}

/// `taskfly down ID`, asserting success and what it prints.
#[track_caller]
fn down(daemon: &Daemon, id: &str) -> Ran {
    daemon.down(id, DEPLOYMENT_LIMIT)
}

fn node_ids(view: &serde_json::Value) -> Vec<String> {
    nodes(view)
        .iter()
        .map(|n| n["node_id"].as_str().expect("node_id").to_owned())
        .collect()
}

fn all_nodes_are(view: &serde_json::Value, status: &str) -> bool {
    !nodes(view).is_empty() && nodes(view).iter().all(|n| n["status"] == status)
}

fn deployment_id(view: &serde_json::Value) -> String {
    view["deployment_id"]
        .as_str()
        .expect("deployment_id")
        .to_owned()
}

/// The guard removing what this test may leave of `id` on the hosts if it fails half-way.
fn leftovers_of<'a>(target: &'a SshTarget, id: &str) -> RemoveLeftovers<'a> {
    RemoveLeftovers {
        target,
        deployment_id: id.to_owned(),
    }
}

/// Polls until no process carries the id of any node in `node_ids` and no host has a node
/// directory of the deployment `id` left.
#[track_caller]
fn wait_until_nothing_left(target: &SshTarget, id: &str, node_ids: &[String]) {
    cli_run::poll(
        CLEANUP_LIMIT,
        POLL,
        &format!("every process of the nodes of {id} to be gone"),
        || {
            node_ids
                .iter()
                .all(|node| sshd::node_processes(node).is_empty())
                .then_some(())
        },
    );
    cli_run::poll(
        CLEANUP_LIMIT,
        SSH_POLL,
        &format!("every node directory of {id} to be removed from the hosts"),
        || {
            HOSTS
                .iter()
                .all(|host| target.deployment_dirs(host, id).is_empty())
                .then_some(())
        },
    );
}

/// Waits until every node of `id` runs its script and each has a process carrying its node id;
/// returns the deployment at that point.
#[track_caller]
fn wait_until_scripts_run(daemon: &Daemon, id: &str) -> serde_json::Value {
    let view = daemon.wait_for_status(
        id,
        DEPLOYMENT_LIMIT,
        "every node to run its script",
        |view| all_nodes_are(view, "running_script"),
    );
    for node in node_ids(&view) {
        cli_run::poll(
            DEPLOYMENT_LIMIT,
            POLL,
            &format!("a process carrying TASKFLY_NODE_ID={node}"),
            || (!sshd::node_processes(&node).is_empty()).then_some(()),
        );
    }
    view
}

/// Waits until `taskfly logs ID` shows `line` for node `index`.
#[track_caller]
fn wait_for_log_line(daemon: &Daemon, id: &str, index: usize, line: &str) {
    let wanted = format!("[node {index}] {line}");
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        POLL,
        &format!("the line {wanted:?} in the logs of {id}"),
        || {
            let logs = daemon.cli(&["logs", id]);
            logs.expect_success();
            logs.stdout.lines().any(|l| l == wanted).then_some(())
        },
    );
}

/// Checks that node `node` (of a live deployment) has its directory on its host, holding its
/// bootstrap, the bootstrap's log and its pid file.
#[track_caller]
fn assert_node_dir_on_its_host(target: &SshTarget, node: &serde_json::Value) {
    let host = node["ip_address"].as_str().expect("ip_address");
    let instance_id = node["instance_id"].as_str().expect("instance_id");
    let entries = target
        .node_dir_entries(host, instance_id)
        .unwrap_or_else(|| panic!("no ~/.taskfly/nodes/{instance_id} on {host}: {node:#}"));
    for wanted in ["bootstrap.sh", "bootstrap.log", "pid"] {
        assert!(
            entries.iter().any(|e| e == wanted),
            "~/.taskfly/nodes/{instance_id} on {host} has no {wanted}: {entries:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn four_nodes_on_two_hosts_complete_with_their_slices_and_leave_nothing_behind() {
    let Some(target) = SshTarget::from_env("four_nodes_on_two_hosts") else {
        return;
    };
    let daemon = ssh_daemon(&target, &[]);
    let project = ssh_project(
        &target,
        &HOSTS,
        &target.key,
        4,
        "distributed_lists:\n  shard: [alpha, bravo, charlie, delta]",
        HELLO_SCRIPT,
    );

    let view = up_wait_json(&daemon, project.path(), 0);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["nodes_completed"], 4, "{view:#}");
    for (index, node) in nodes(&view).iter().enumerate() {
        assert_eq!(node["node_index"], index, "{view:#}");
        assert_eq!(node["status"], "completed", "{node:#}");
        assert_eq!(node["exit_code"], 0, "{node:#}");
        assert_eq!(node["ip_address"], HOSTS[index % HOSTS.len()], "{node:#}");
        let node_id = node["node_id"].as_str().expect("node_id");
        assert_eq!(
            node["instance_id"],
            format!("ssh-{node_id}-1"),
            "the first attempt's instance: {node:#}"
        );
    }

    // Each node's own lines, from its own host, reach `taskfly logs`.
    let hostname = String::from_utf8(target.ssh(HOSTS[0], "hostname").stdout)
        .expect("hostname is UTF-8")
        .trim()
        .to_owned();
    let logs = daemon.cli(&["logs", &id]);
    logs.expect_success();
    let shards = ["alpha", "bravo", "charlie", "delta"];
    for (index, shard) in shards.iter().enumerate() {
        let host = HOSTS[index % HOSTS.len()];
        for line in [
            format!("[node {index}] hello from node {index} on {hostname}"),
            format!("[node {index}] node {index} logged in at {host}"),
            format!("[node {index}] node {index} has shard {shard}"),
        ] {
            assert!(
                logs.stdout.lines().any(|l| l == line),
                "no line {line:?}\n{}",
                logs.show()
            );
        }
    }

    wait_until_nothing_left(&target, &id, &node_ids(&view));
}

#[test]
fn down_stops_sleeping_nodes_on_their_hosts_and_removes_their_directories() {
    let Some(target) = SshTarget::from_env("down_stops_sleeping_nodes") else {
        return;
    };
    let daemon = ssh_daemon(&target, &["--grace-period", "2s"]);
    let project = ssh_project(&target, &HOSTS, &target.key, 2, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);

    let running = wait_until_scripts_run(&daemon, &id);
    for index in 0..2 {
        wait_for_log_line(&daemon, &id, index, &format!("sleeping on node {index}"));
    }
    for (index, node) in nodes(&running).iter().enumerate() {
        assert_eq!(node["ip_address"], HOSTS[index], "{node:#}");
        assert_node_dir_on_its_host(&target, node);
    }

    down(&daemon, &id);
    let view = daemon.status(&id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    assert!(all_nodes_are(&view, "terminated"), "{view:#}");
    wait_until_nothing_left(&target, &id, &node_ids(&running));
    let logs = daemon.cli(&["logs", &id]);
    assert!(!logs.stdout.contains("never"), "{}", logs.show());
}

#[test]
fn a_key_the_host_refuses_fails_each_node_naming_its_host_and_what_ssh_said() {
    let Some(target) = SshTarget::from_env("a_key_the_host_refuses") else {
        return;
    };
    let keys = tempfile::tempdir().expect("temp dir");
    let unknown_key = sshd::generate_key(keys.path(), "unknown_ed25519");
    let daemon = ssh_daemon(&target, &[]);
    let project = ssh_project(&target, &HOSTS, &unknown_key, 2, "", SLEEP_SCRIPT);

    let view = up_wait_json(&daemon, project.path(), 1);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["nodes_failed"], 2, "{view:#}");
    for (index, node) in nodes(&view).iter().enumerate() {
        assert_eq!(node["status"], "failed", "{node:#}");
        let message = node["error_message"].as_str().expect("error_message");
        assert!(
            message.contains(HOSTS[index]),
            "the message names the host: {node:#}"
        );
        assert!(
            message.contains("Permission denied"),
            "the message carries what ssh said: {node:#}"
        );
    }
    for host in HOSTS {
        assert_eq!(target.deployment_dirs(host, &id), Vec::<String>::new());
    }
}

#[test]
fn a_host_whose_key_is_unknown_fails_the_node_naming_it_and_what_ssh_said() {
    let Some(target) = SshTarget::from_env("a_host_whose_key_is_unknown") else {
        return;
    };
    let files = tempfile::tempdir().expect("temp dir");
    let empty_known_hosts = files.path().join("known_hosts");
    std::fs::write(&empty_known_hosts, "").expect("write known_hosts");
    let daemon = daemon_with(&sshd::daemon_args_for(&empty_known_hosts), &[]);
    let project = ssh_project(&target, &[HOSTS[1]], &target.key, 1, "", SLEEP_SCRIPT);

    let view = up_wait_json(&daemon, project.path(), 1);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    let node = &nodes(&view)[0];
    assert_eq!(node["status"], "failed", "{view:#}");
    let message = node["error_message"].as_str().expect("error_message");
    assert!(message.contains(HOSTS[1]), "names the host: {node:#}");
    assert!(
        message.contains("Host key verification failed"),
        "carries what ssh said: {node:#}"
    );
    // The host was never logged in to: nothing of the deployment is there.
    assert_eq!(target.deployment_dirs(HOSTS[1], &id), Vec::<String>::new());
    // The empty known_hosts was only read.
    assert_eq!(
        std::fs::read_to_string(&empty_known_hosts).expect("read known_hosts"),
        ""
    );
}

#[test]
fn a_script_exiting_3_fails_its_node_with_that_code_and_both_nodes_are_cleaned_up() {
    let Some(target) = SshTarget::from_env("a_script_exiting_3") else {
        return;
    };
    let daemon = ssh_daemon(&target, &[]);
    let project = ssh_project(
        &target,
        &HOSTS,
        &target.key,
        2,
        "",
        "#!/bin/sh\necho \"working on $TASKFLY_NODE_INDEX\"\n\
         if [ \"$TASKFLY_NODE_INDEX\" = 1 ]; then echo 'disk full' >&2; exit 3; fi\n",
    );

    let view = up_wait_json(&daemon, project.path(), 1);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["nodes_completed"], 1, "{view:#}");
    assert_eq!(view["nodes_failed"], 1, "{view:#}");
    assert_eq!(nodes(&view)[0]["status"], "completed", "{view:#}");
    let failed = &nodes(&view)[1];
    assert_eq!(failed["status"], "failed", "{view:#}");
    assert_eq!(failed["exit_code"], 3, "{view:#}");
    assert_eq!(failed["ip_address"], HOSTS[1], "{view:#}");
    let message = failed["error_message"].as_str().expect("error_message");
    assert!(
        message.contains('3') && message.contains("disk full"),
        "{message}"
    );

    wait_until_nothing_left(&target, &id, &node_ids(&view));
}

#[test]
fn a_node_failing_once_is_retried_as_a_new_instance_and_both_are_cleaned_up() {
    let Some(target) = SshTarget::from_env("a_node_failing_once_is_retried") else {
        return;
    };
    let daemon = ssh_daemon(&target, &[]);
    // The first attempt leaves a file the second finds (both hosts are this machine).
    let state = tempfile::tempdir().expect("temp dir");
    let project = ssh_project(
        &target,
        &[HOSTS[1]],
        &target.key,
        1,
        &format!(
            "retries: 1\nglobal_metadata: {{state: \"{}\"}}",
            path_str(state.path())
        ),
        "#!/bin/sh\n\
         if [ -e \"$STATE/failed-once\" ]; then echo 'second attempt'; exit 0; fi\n\
         touch \"$STATE/failed-once\"\necho 'first attempt'\nexit 1\n",
    );

    let view = up_wait_json(&daemon, project.path(), 0);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    let node = &nodes(&view)[0];
    assert_eq!(node["status"], "completed", "{view:#}");
    assert_eq!(node["attempt"], 2, "{view:#}");
    let node_id = node["node_id"].as_str().expect("node_id");
    assert_eq!(node["instance_id"], format!("ssh-{node_id}-2"), "{node:#}");
    assert_eq!(node["ip_address"], HOSTS[1], "{node:#}");
    let logs = daemon.cli(&["logs", &id]);
    logs.expect_success();
    for line in [
        "[node 0 attempt 1] first attempt",
        "[node 0 attempt 2] second attempt",
    ] {
        assert!(logs.stdout.lines().any(|l| l == line), "{}", logs.show());
    }
    // Neither attempt's directory is left.
    wait_until_nothing_left(&target, &id, &node_ids(&view));
}

#[test]
fn a_key_path_under_tilde_is_in_the_daemons_home() {
    let Some(target) = SshTarget::from_env("a_key_path_under_tilde") else {
        return;
    };
    let daemon = ssh_daemon(&target, &[]);
    // The test key, copied into the daemon's HOME (a temp dir of its own) and named from `~`.
    let ssh_dir = daemon.home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).expect("mkdir ~/.ssh");
    let key_copy = ssh_dir.join("taskfly_test_ed25519");
    std::fs::copy(&target.key, &key_copy).expect("copy the key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_copy, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600");
    }
    let project = ssh_project(
        &target,
        &[HOSTS[0]],
        Path::new("~/.ssh/taskfly_test_ed25519"),
        1,
        "distributed_lists:\n  shard: [only]",
        HELLO_SCRIPT,
    );

    let view = up_wait_json(&daemon, project.path(), 0);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(nodes(&view)[0]["ip_address"], HOSTS[0], "{view:#}");
    wait_until_nothing_left(&target, &id, &node_ids(&view));
}

#[test]
fn a_node_running_when_the_daemon_is_killed_is_stopped_by_down_after_the_restart() {
    let Some(target) = SshTarget::from_env("a_node_running_when_the_daemon_is_killed") else {
        return;
    };
    let args = daemon_args(&target.daemon_args(), &["--grace-period", "2s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &args);
    let project = ssh_project(&target, &[HOSTS[1]], &target.key, 1, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);
    let running = wait_until_scripts_run(&daemon, &id);
    let node = &nodes(&running)[0];
    let node_id = node["node_id"].as_str().expect("node_id").to_owned();

    daemon.kill();
    // The node lives on its host without its daemon.
    assert!(
        !sshd::node_processes(&node_id).is_empty(),
        "the script of {node_id} ended with its daemon"
    );
    assert_node_dir_on_its_host(&target, node);

    daemon.restart();
    down(&daemon, &id);
    let view = daemon.status(&id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    wait_until_nothing_left(&target, &id, &[node_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_librarys_local_provider_runs_nodes_on_hosts_with_its_ssh_options() {
    let Some(target) = SshTarget::from_env("the_librarys_local_provider_runs_nodes_on_hosts")
    else {
        return;
    };
    let work_root = tempfile::tempdir().expect("temp dir");
    let provider = LocalProvider::new(work_root.path().to_path_buf())
        .grace_period(Duration::from_secs(2))
        .ssh_options(target.ssh_options());
    let engine = TestEngine::start_with(|config| config.provider(Arc::new(provider))).await;
    let project = ssh_project(
        &target,
        &HOSTS,
        &target.key,
        2,
        "distributed_lists:\n  shard: [alpha, bravo]",
        HELLO_SCRIPT,
    );

    let id = engine.deploy(project.path()).await;
    let _leftovers = leftovers_of(&target, &id);
    let view = tokio::time::timeout(DEPLOYMENT_LIMIT, engine.wait(&id))
        .await
        .unwrap_or_else(|_| panic!("{id} did not end within {DEPLOYMENT_LIMIT:?}"))
        .expect("wait");
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    for node in &view.nodes {
        let index = usize::try_from(node.node_index).expect("index");
        assert_eq!(node.ip_address.as_deref(), Some(HOSTS[index]), "{node:#?}");
        assert_eq!(
            node.instance_id.as_deref(),
            Some(format!("ssh-{}-1", node.node_id).as_str()),
            "{node:#?}"
        );
    }
    let logs = engine.all_logs(&id).await;
    for (index, shard) in [(0, "alpha"), (1, "bravo")] {
        assert!(
            node_lines(&logs, index).contains(&format!("node {index} has shard {shard}")),
            "node {index}: {:?}",
            node_lines(&logs, index)
        );
    }

    let node_ids: Vec<String> = view.nodes.iter().map(|n| n.node_id.clone()).collect();
    let checked = target.clone();
    let id_checked = id.clone();
    tokio::task::spawn_blocking(move || wait_until_nothing_left(&checked, &id_checked, &node_ids))
        .await
        .expect("the cleanup check");
    engine.stop().await;
}

#[test]
fn a_node_whose_deployment_the_daemon_no_longer_knows_is_stopped_by_the_leak_check() {
    let Some(target) = SshTarget::from_env("a_node_whose_deployment_the_daemon_no_longer_knows")
    else {
        return;
    };
    let args = daemon_args(&target.daemon_args(), &["--grace-period", "2s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &args);
    let project = ssh_project(&target, &[HOSTS[0]], &target.key, 1, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);
    let running = wait_until_scripts_run(&daemon, &id);
    let node_id = nodes(&running)[0]["node_id"]
        .as_str()
        .expect("node_id")
        .to_owned();

    // The daemon dies and its state with it: the deployment is unknown after the restart, and
    // only the record of the instance it started remains.
    daemon.kill();
    for entry in std::fs::read_dir(daemon.data_dir.path()).expect("data dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("state.db"))
        {
            std::fs::remove_file(&path).expect("remove the state");
        }
    }
    daemon.restart();
    let listed = daemon.cli(&["list", "--output", "json"]);
    listed.expect_success();
    assert_eq!(listed.json(), serde_json::json!([]), "the state is gone");
    // The leak check at start finds the instance of a deployment no one knows and stops it.
    wait_until_nothing_left(&target, &id, &[node_id]);
    let records = daemon.data_dir.path().join("work").join("ssh-instances");
    cli_run::poll(
        CLEANUP_LIMIT,
        POLL,
        "the instance's record to be removed",
        || {
            std::fs::read_dir(&records)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(true)
                .then_some(())
        },
    );
}

#[test]
fn a_script_left_by_a_killed_bootstrap_is_found_by_its_node_id_and_stopped() {
    let Some(target) = SshTarget::from_env("a_script_left_by_a_killed_bootstrap") else {
        return;
    };
    let daemon = ssh_daemon(&target, &["--grace-period", "2s"]);
    let project = ssh_project(&target, &[HOSTS[1]], &target.key, 1, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);
    let running = wait_until_scripts_run(&daemon, &id);
    let node = &nodes(&running)[0];
    let node_id = node["node_id"].as_str().expect("node_id").to_owned();
    let instance_id = node["instance_id"].as_str().expect("instance_id");

    // SIGKILL to the bootstrap alone: its script (a session of its own) is orphaned, and only
    // the node id in its environment still ties it to the node.
    let killed = target.ssh(
        HOSTS[1],
        &format!(r#"kill -KILL "$(cat "$HOME/.taskfly/nodes/{instance_id}/pid")""#),
    );
    assert!(
        killed.status.success(),
        "cannot kill the bootstrap: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    assert!(
        !sshd::node_processes(&node_id).is_empty(),
        "the script of {node_id} ended with its bootstrap"
    );

    down(&daemon, &id);
    wait_until_nothing_left(&target, &id, &[node_id]);
}

/// `<data-dir>/work/cm`: where the daemon keeps its ssh control sockets.
fn control_sockets(daemon: &Daemon) -> std::path::PathBuf {
    daemon.data_dir.path().join("work").join("cm")
}

#[test]
fn one_master_connection_per_host_serves_a_deployment_and_none_outlives_the_daemon() {
    let Some(target) = SshTarget::from_env("one_master_connection_per_host") else {
        return;
    };
    let mut daemon = daemon_with(&target.daemon_args(), &[]);
    let cm = control_sockets(&daemon);
    let project = ssh_project(
        &target,
        &HOSTS,
        &target.key,
        6,
        "",
        "#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX\"\n",
    );

    let view = up_wait_json(&daemon, project.path(), 0);
    let id = deployment_id(&view);
    let _leftovers = leftovers_of(&target, &id);
    assert_eq!(view["status"], "completed", "{view:#}");
    // Six starts over two hosts: one master connection each, one socket each.
    let masters = sshd::masters_in(&cm);
    assert_eq!(
        masters.len(),
        2,
        "one master per host: {:#?}",
        sshd::processes_naming(&cm)
    );
    assert_eq!(
        sshd::sockets_in(&cm).len(),
        2,
        "{:?}",
        sshd::sockets_in(&cm)
    );
    // The nodes' stops go through them too: still no more than one per host.
    wait_until_nothing_left(&target, &id, &node_ids(&view));
    assert!(
        sshd::masters_in(&cm).len() <= 2,
        "{:#?}",
        sshd::processes_naming(&cm)
    );

    assert!(daemon.shut_down().success(), "taskflyd exits cleanly");
    // No ssh process naming the folder, and no socket in it, outlives the daemon.
    cli_run::poll(CLEANUP_LIMIT, POLL, "every ssh master to end", || {
        sshd::processes_naming(&cm).is_empty().then_some(())
    });
    assert_eq!(sshd::sockets_in(&cm), Vec::<String>::new());
}

#[test]
fn a_master_connection_that_died_is_started_again_by_the_next_call() {
    let Some(target) = SshTarget::from_env("a_master_connection_that_died") else {
        return;
    };
    let daemon = ssh_daemon(&target, &["--grace-period", "2s"]);
    let cm = control_sockets(&daemon);
    let project = ssh_project(&target, &HOSTS, &target.key, 2, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);
    let running = wait_until_scripts_run(&daemon, &id);
    let killed = sshd::masters_in(&cm);
    assert_eq!(killed.len(), 2, "{:#?}", sshd::processes_naming(&cm));

    // Both masters die at once (a network outage would end them alike); their sockets stay.
    for pid in &killed {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(*pid).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL a master");
    }
    cli_run::poll(CLEANUP_LIMIT, POLL, "the killed masters to end", || {
        sshd::masters_in(&cm).is_empty().then_some(())
    });

    // The stop calls of `down` start a master per host again and reach both nodes.
    down(&daemon, &id);
    wait_until_nothing_left(&target, &id, &node_ids(&running));
    let restarted = sshd::masters_in(&cm);
    assert_eq!(restarted.len(), 2, "{:#?}", sshd::processes_naming(&cm));
    assert!(
        restarted.iter().all(|pid| !killed.contains(pid)),
        "new masters: {restarted:?}, killed: {killed:?}"
    );
}

#[test]
fn taskfly_run_with_an_advertise_url_runs_nodes_on_ssh_hosts_and_leaves_nothing_behind() {
    let Some(target) = SshTarget::from_env("taskfly_run_on_ssh_hosts") else {
        return;
    };
    let home = tempfile::tempdir().expect("temp HOME");
    // The run's data folder (its ssh control sockets among it) goes in this one.
    let tmp = tempfile::tempdir().expect("temp TMPDIR");
    let project = ssh_project(&target, &HOSTS, &target.key, 2, "", HELLO_SCRIPT);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "run".to_owned(),
        path_str(project.path()).to_owned(),
        "--advertise-url".to_owned(),
        url,
        "--listen".to_owned(),
        listen,
    ];
    for option in target.ssh_options() {
        args.extend(["--ssh-option".to_owned(), option]);
    }
    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path())
            .args(&args)
            .env("TMPDIR", tmp.path()),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    assert_eq!(
        sshd::processes_naming(tmp.path()),
        Vec::<(u32, String)>::new(),
        "no ssh master connection outlives the run"
    );
    for (index, host) in HOSTS.iter().enumerate() {
        let line = format!("[node {index}] node {index} logged in at {host}");
        assert!(
            ran.stdout.lines().any(|l| l == line),
            "no line {line:?}\n{}",
            ran.show()
        );
    }
    let summary = ran
        .stdout
        .lines()
        .find(|l| l.starts_with("deployment dep-"))
        .unwrap_or_else(|| panic!("no summary line\n{}", ran.show()));
    assert!(
        summary.contains(": 2 completed, 0 failed, 2 total"),
        "{summary}"
    );
    let id = summary
        .split_whitespace()
        .nth(1)
        .expect("the deployment id")
        .to_owned();
    let _leftovers = leftovers_of(&target, &id);
    let node_ids: Vec<String> = (0..2).map(|i| format!("{id}-{i}")).collect();
    wait_until_nothing_left(&target, &id, &node_ids);
    assert_eq!(
        crate::support::engine_util::dir_names(tmp.path()),
        Vec::<String>::new(),
        "the run's data folder is removed"
    );
}

/// The sessions sshd started for logins with the key whose public half is `key.pub`: its log
/// (`sshd.log` beside the test key, as scripts/test-sshd.sh writes it) names the key's
/// fingerprint on each connection it accepts, and each session with that connection's port.
fn sessions_with_key(target: &SshTarget, key: &Path) -> usize {
    let listed = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .expect("ssh-keygen -l");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let fingerprint = listed
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint in {listed:?}"))
        .to_owned();
    let log_path = target.key.parent().expect("key folder").join("sshd.log");
    let log = std::fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("cannot read sshd's log {}: {e}", log_path.display()));
    // "... from 127.0.0.1 port 41246 ..." -> "127.0.0.1 port 41246"
    let connection = |line: &str| -> Option<String> {
        let from = line.split(" from ").nth(1)?;
        let words: Vec<&str> = from.split_whitespace().take(3).collect();
        (words.len() == 3).then(|| words.join(" "))
    };
    let ours: std::collections::HashSet<String> = log
        .lines()
        .filter(|line| line.starts_with("Accepted publickey") && line.ends_with(&fingerprint))
        .filter_map(connection)
        .collect();
    log.lines()
        .filter(|line| line.starts_with("Starting session: command"))
        .filter_map(connection)
        .filter(|c| ours.contains(c))
        .count()
}

#[test]
fn twelve_nodes_on_one_host_start_and_stop_in_fewer_ssh_sessions_than_nodes() {
    let Some(target) = SshTarget::from_env("twelve_nodes_on_one_host_in_fewer_sessions") else {
        return;
    };
    // A key of this test's own, so sshd's log tells its sessions from other tests'.
    let keys = tempfile::tempdir().expect("temp dir");
    let key = sshd::generate_key(keys.path(), "batch_ed25519");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    {
        use std::io::Write as _;
        let authorized = target
            .key
            .parent()
            .expect("key folder")
            .join("authorized_keys");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&authorized)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", authorized.display()));
        file.write_all(public.as_bytes())
            .expect("authorize the key");
    }
    let daemon = ssh_daemon(&target, &["--grace-period", "2s"]);
    let project = ssh_project(&target, &[HOSTS[0]], &key, 12, "", SLEEP_SCRIPT);
    let id = daemon.up(project.path());
    let _leftovers = leftovers_of(&target, &id);
    let running = wait_until_scripts_run(&daemon, &id);
    assert_eq!(nodes(&running).len(), 12, "{running:#}");
    // The starts that queued while the first ones ran went in batches.
    let starts = sessions_with_key(&target, &key);
    assert!(
        (1..12).contains(&starts),
        "12 nodes started in {starts} sessions"
    );

    // `down` stops all twelve at once: their stops gather into batches too.
    down(&daemon, &id);
    wait_until_nothing_left(&target, &id, &node_ids(&running));
    let stops = sessions_with_key(&target, &key) - starts;
    assert!(
        (1..12).contains(&stops),
        "12 nodes stopped in {stops} sessions"
    );
    eprintln!("12 nodes on one host: {starts} sessions started them, {stops} stopped them");
}

/// A wrapper of the system's `ssh`, first on `PATH`: the first call through a master
/// connection (`ControlMaster=no`) fails as ssh does when the master's session cannot be had
/// (exit status 255); every call is written to `calls.log` beside it as `master`, `through`,
/// `refused` or `direct`.
fn ssh_failing_once_through_its_master(dir: &Path) -> std::path::PathBuf {
    let real = cli_run::run(std::process::Command::new("sh").args(["-c", "command -v ssh"]));
    let real = real.stdout.trim().to_owned();
    assert!(real.starts_with('/'), "no ssh client on PATH: {real:?}");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let script = format!(
        "#!/bin/sh\n\
         log='{log}'\n\
         case \" $* \" in\n\
           *' ControlMaster=yes '*) echo master >>\"$log\" ;;\n\
           *' ControlMaster=no '*)\n\
             if [ ! -e '{once}' ]; then\n\
               : >'{once}'; echo refused >>\"$log\"\n\
               echo 'mux_client_request_session: session request failed: Session open refused by peer' >&2\n\
               exit 255\n\
             fi\n\
             echo through >>\"$log\" ;;\n\
           *' -O '*) ;;\n\
           *) echo direct >>\"$log\" ;;\n\
         esac\n\
         exec '{real}' \"$@\"\n",
        log = dir.join("calls.log").display(),
        once = dir.join("refused-once").display(),
    );
    let path = bin.join("ssh");
    std::fs::write(&path, script).expect("write the wrapper");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

#[test]
fn a_call_refused_by_the_master_connection_is_made_again_on_a_connection_of_its_own() {
    let Some(target) = SshTarget::from_env("ssh_master_refuses_a_call") else {
        return;
    };
    let home = tempfile::tempdir().expect("temp HOME");
    let tmp = tempfile::tempdir().expect("temp TMPDIR");
    let wrapper = tempfile::tempdir().expect("wrapper dir");
    let bin = ssh_failing_once_through_its_master(wrapper.path());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let project = ssh_project(&target, &HOSTS[..1], &target.key, 1, "", HELLO_SCRIPT);
    let port = free_port();
    let mut args = vec![
        "run".to_owned(),
        path_str(project.path()).to_owned(),
        "--advertise-url".to_owned(),
        format!("http://127.0.0.1:{port}"),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
    ];
    for option in target.ssh_options() {
        args.extend(["--ssh-option".to_owned(), option]);
    }
    let ran = cli_run::run_with_limit(
        cli_run::command("taskfly", home.path())
            .args(&args)
            .env("TMPDIR", tmp.path())
            .env("PATH", path),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    assert!(
        ran.stdout.contains(": 1 completed, 0 failed, 1 total"),
        "{}",
        ran.show()
    );
    let calls = std::fs::read_to_string(wrapper.path().join("calls.log")).expect("calls.log");
    let calls: Vec<&str> = calls.lines().collect();
    // The refused call was made again at once, directly; later calls use a new master.
    let refused = calls
        .iter()
        .position(|c| *c == "refused")
        .unwrap_or_else(|| panic!("no call was refused: {calls:?}"));
    assert_eq!(calls.get(refused + 1), Some(&"direct"), "{calls:?}");
    assert_eq!(calls[0], "master", "{calls:?}");
    assert_eq!(
        sshd::processes_naming(tmp.path()),
        Vec::<(u32, String)>::new(),
        "no ssh master connection outlives the run"
    );
    let id = ran
        .stdout
        .lines()
        .find(|l| l.starts_with("deployment dep-"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no summary line\n{}", ran.show()))
        .to_owned();
    let _leftovers = leftovers_of(&target, &id);
    wait_until_nothing_left(&target, &id, &[format!("{id}-0")]);
}
