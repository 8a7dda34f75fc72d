//! Conformance of the two node agents: every scenario runs once with the Rust agent and once
//! with the shell bootstrap (`instance_config.local.agent: rust | script`), on a real engine,
//! and both must behave the same (SPEC §2–§4). Then the bootstrap's shell-friendly additions
//! to the node protocol, over raw HTTP.

use std::time::Duration;

use hyper::Method;
use taskfly::wire::{DeploymentView, NodeView};

use crate::support::engine_http::{raw_request, RawResponse};
use crate::support::engine_provider::RecordingProvider;
use crate::support::engine_util::{
    find_named, global_metadata_yml, hex, metadata_values_to_misread, node_lines, print_hex_of,
    secret_metadata, unique_marker, POLL_LIMIT, SECRET, SECRET_SCRIPT,
};
use crate::support::{
    agent_yml, local_yml, marker_metadata, processes_with_env, Project, TestEngine,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Polls (bounded by [`POLL_LIMIT`]) until every node of the deployment runs its script, at
/// least `processes` processes carry `env_marker` and, when `started` is given, exactly that
/// many `started` lines have arrived; returns the view that showed it.
async fn wait_for_running_scripts(
    agent: &str,
    engine: &TestEngine,
    id: &str,
    env_marker: &str,
    processes: usize,
    started: Option<usize>,
) -> DeploymentView {
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        let view = engine.view(id).await.expect("view");
        let started_as_expected = match started {
            Some(expected) => {
                engine
                    .all_logs(id)
                    .await
                    .iter()
                    .filter(|l| l.line == "started")
                    .count()
                    == expected
            }
            None => true,
        };
        if view
            .nodes
            .iter()
            .all(|n| n.status.as_str() == "running_script")
            && processes_with_env(env_marker).len() >= processes
            && started_as_expected
        {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent}: the scripts never all ran: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The single node of a one-node view.
fn only_node(view: &DeploymentView) -> &NodeView {
    assert_eq!(view.nodes.len(), 1, "{view:#?}");
    &view.nodes[0]
}

/// The `(stream, line)` pairs node `index` wrote, in order.
fn node_output(logs: &[taskfly::wire::LogLineView], index: u32) -> Vec<(String, String)> {
    logs.iter()
        .filter(|l| l.node_index == index)
        .map(|l| (l.stream.clone(), l.line.clone()))
        .collect()
}

/// Processes of a script-mode node's bootstrap (they carry its instance id).
fn bootstrap_processes(view: &DeploymentView) -> Vec<u32> {
    view.nodes
        .iter()
        .flat_map(|node| {
            processes_with_env(&format!(
                "TASKFLY_AGENT_INSTANCE_ID=local-{}-{}",
                node.node_id, node.attempt
            ))
        })
        .collect()
}

/// After a script-mode run, the bootstraps end (a node's final report comes just before) and
/// leave none of their private files (registration answer, token, captured output).
async fn assert_bootstrap_cleaned_up(agent: &str, engine: &TestEngine, view: &DeploymentView) {
    if agent != "script" {
        return;
    }
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    while !bootstrap_processes(view).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bootstraps still run after {POLL_LIMIT:?}: {:?}",
            bootstrap_processes(view)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let work = engine
        .data_dir
        .path()
        .join("work")
        .join(&view.deployment_id);
    assert_eq!(
        find_named(&work, ".taskfly"),
        Vec::<std::path::PathBuf>::new()
    );
}

/// Where two line lists first differ, for a readable failure.
fn first_difference(got: &[String], expected: &[String]) -> String {
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let show = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .skip(at)
            .take(3)
            .map(|l| {
                format!(
                    "({} bytes) {}",
                    l.len(),
                    l.chars().take(60).collect::<String>()
                )
            })
            .collect()
    };
    format!(
        "{} lines, {} expected; first difference at {at}: {:?} instead of {:?}",
        got.len(),
        expected.len(),
        show(got),
        show(expected)
    )
}

fn assert_status(response: &RawResponse, expected: u16, what: &str) {
    assert_eq!(
        response.status,
        expected,
        "{what}: expected {expected}, got {} {}",
        response.status,
        response.text()
    );
}

for_both_agents!(
    three_nodes_complete_each_with_its_own_slice,
    exit_3_fails_with_the_code_and_the_last_stderr_line,
    hostile_values_arrive_byte_for_byte_and_nothing_executes,
    every_output_line_arrives_once_and_in_order,
    terminating_sleeping_nodes_leaves_no_process,
    a_script_past_its_timeout_fails,
    secrets_are_masked_in_logs_and_messages,
    scripts_start_by_exec_bit_shebang_or_sh,
    a_death_by_signal_is_reported_with_the_signal_name,
    heartbeats_keep_a_long_script_alive,
    stopping_the_engine_stops_running_nodes,
    fifty_nodes_at_once_all_complete_with_their_exit_status,
);

// ---------------------------------------------------------------------------------------------
// Scenarios, each run with both agents
// ---------------------------------------------------------------------------------------------

async fn three_nodes_complete_each_with_its_own_slice(agent: &str) {
    let project = Project::new(&agent_yml(
        agent,
        3,
        "distributed_lists:\n  shard: [s0.csv, s1.csv, s2.csv]",
    ))
    .script(
        "#!/bin/sh\n\
         echo \"shard=$SHARD index=$TASKFLY_NODE_INDEX total=$TASKFLY_TOTAL_NODES\"\n\
         echo \"node=$TASKFLY_NODE_ID deployment=$TASKFLY_DEPLOYMENT_ID\"\n\
         echo \"taskfly variables: $(env | grep -c '^TASKFLY_')\"\n\
         [ -f setup.sh ] && [ \"$(pwd -P)\" = \"$(cd \"$(dirname \"$0\")\" && pwd -P)\" ] && echo in-bundle-root\n",
    );
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    let id = view.deployment_id.clone();
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    assert_eq!(
        (view.total_nodes, view.nodes_completed, view.nodes_failed),
        (3, 3, 0)
    );
    for (index, node) in view.nodes.iter().enumerate() {
        assert_eq!(node.status.as_str(), "completed", "{agent}: {node:#?}");
        assert_eq!(node.exit_code, Some(0));
        assert_eq!(node.error_message, None);
        assert_eq!(
            node.instance_id.as_deref(),
            Some(format!("local-{id}-{index}-1").as_str())
        );
    }
    let logs = engine.all_logs(&id).await;
    for index in 0..3u32 {
        assert_eq!(
            node_lines(&logs, index),
            [
                format!("shard=s{index}.csv index={index} total=3"),
                format!("node={id}-{index} deployment={id}"),
                // Exactly the four built-ins: nothing of the daemon's or the agent's own.
                "taskfly variables: 4".to_owned(),
                "in-bundle-root".to_owned(),
            ],
            "{agent}: node {index}"
        );
    }
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn exit_3_fails_with_the_code_and_the_last_stderr_line(agent: &str) {
    let project = Project::new(&agent_yml(agent, 2, "")).script(
        "#!/bin/sh\n\
         if [ \"$TASKFLY_NODE_INDEX\" = 1 ]; then\n\
           echo 'first complaint' >&2\n\
           echo '  disk full on node 1  ' >&2\n\
           echo '' >&2\n\
           exit 3\n\
         fi\n\
         echo fine\n",
    );
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "failed", "{agent}: {view:#?}");
    assert_eq!((view.nodes_completed, view.nodes_failed), (1, 1));
    let failed = &view.nodes[1];
    assert_eq!(failed.status.as_str(), "failed", "{agent}: {failed:#?}");
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(
        failed.error_message.as_deref(),
        Some("exited with code 3: disk full on node 1"),
        "{agent}"
    );
    assert_eq!(view.nodes[0].status.as_str(), "completed");
    let logs = engine.all_logs(&view.deployment_id).await;
    assert_eq!(
        node_output(&logs, 1),
        [
            ("stderr".to_owned(), "first complaint".to_owned()),
            ("stderr".to_owned(), "  disk full on node 1  ".to_owned()),
            ("stderr".to_owned(), String::new()),
        ],
        "{agent}"
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn hostile_values_arrive_byte_for_byte_and_nothing_executes(agent: &str) {
    let marker = unique_marker();
    let pwned = format!("PWNED_{marker}");
    let mut values = metadata_values_to_misread(&pwned);
    values.insert("sq", "it's 'quoted' '\\''".to_owned());
    let extra = global_metadata_yml(&values);
    let mut script = String::from("#!/bin/sh\nexport PATH=/usr/bin:/bin\n");
    for key in values.keys() {
        script.push_str(&print_hex_of(key));
    }
    script.push_str("printf 'raw uni=%s\\n' \"$UNI\"\n");
    let project = Project::new(&agent_yml(agent, 1, &extra)).script(&script);
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    let lines = node_lines(&engine.all_logs(&view.deployment_id).await, 0);
    for (key, value) in &values {
        let expected = format!("{}={}", key.to_ascii_uppercase(), hex(value.as_bytes()));
        assert!(
            lines.contains(&expected),
            "{agent}: {key}: expected {expected} ({value:?}) in {lines:#?}"
        );
    }
    assert!(
        lines.contains(&"raw uni=héllo ✓ — 日本".to_owned()),
        "{agent}: {lines:#?}"
    );
    // Nothing was executed: no PWNED file anywhere the script, the agent or the engine works.
    let mut found = Vec::new();
    for place in [
        engine.data_dir.path().to_path_buf(),
        project.path().to_path_buf(),
        std::env::current_dir().expect("cwd"),
        std::env::temp_dir(),
    ] {
        found.extend(find_named(&place, &pwned));
    }
    assert!(
        found.is_empty(),
        "{agent}: a value was evaluated: {found:?}"
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn every_output_line_arrives_once_and_in_order(agent: &str) {
    const LINES: u32 = 2000;
    let long_line = "x".repeat(100_000);
    let project = Project::new(&agent_yml(agent, 2, "")).script(&format!(
        "#!/bin/sh\n\
         i=1\n\
         while [ $i -le {LINES} ]; do\n\
           echo \"out $TASKFLY_NODE_INDEX $i\"\n\
           echo \"err $TASKFLY_NODE_INDEX $i\" >&2\n\
           i=$((i + 1))\n\
         done\n\
         printf 'crlf line\\r\\n'\n\
         printf '%s\\n' {long_line}\n\
         printf 'no newline at the end'\n"
    ));
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    let logs = engine.all_logs(&view.deployment_id).await;
    for index in 0..2u32 {
        let output = node_output(&logs, index);
        let stream = |name: &str| -> Vec<String> {
            output
                .iter()
                .filter(|(s, _)| s == name)
                .map(|(_, line)| line.clone())
                .collect()
        };
        let mut expected_out: Vec<String> =
            (1..=LINES).map(|i| format!("out {index} {i}")).collect();
        expected_out.push("crlf line".to_owned());
        // A line longer than 64 KiB arrives in pieces of 64 KiB, none lost.
        expected_out.push(long_line[..65536].to_owned());
        expected_out.push(long_line[65536..].to_owned());
        expected_out.push("no newline at the end".to_owned());
        let expected_err: Vec<String> = (1..=LINES).map(|i| format!("err {index} {i}")).collect();
        let (out, err) = (stream("stdout"), stream("stderr"));
        assert!(
            out == expected_out,
            "{agent}: node {index}: stdout: {}",
            first_difference(&out, &expected_out)
        );
        assert!(
            err == expected_err,
            "{agent}: node {index}: stderr: {}",
            first_difference(&err, &expected_err)
        );
    }
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn terminating_sleeping_nodes_leaves_no_process(agent: &str) {
    let marker = unique_marker();
    let env_marker = format!("MARKER={marker}");
    let project = Project::new(&agent_yml(agent, 3, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho started\nsleep 300 &\nsleep 300\n");
    let engine = TestEngine::start().await;
    let id = engine.deploy(project.path()).await;

    // Every node runs its script, both sleeps of each are really there, and its first line
    // has arrived.
    wait_for_running_scripts(agent, &engine, &id, &env_marker, 9, Some(3)).await;

    engine.engine.terminate(&id).await.expect("terminate");
    let view = engine.view(&id).await.expect("view");
    assert_eq!(view.status.as_str(), "terminated", "{agent}: {view:#?}");
    for node in &view.nodes {
        assert_eq!(node.status.as_str(), "terminated", "{agent}: {node:#?}");
        assert_eq!(node.exit_code, None);
    }
    assert_eq!(
        processes_with_env(&env_marker),
        Vec::<u32>::new(),
        "{agent}"
    );
    assert_eq!(bootstrap_processes(&view), Vec::<u32>::new(), "{agent}");
    let logs = engine.all_logs(&id).await;
    for index in 0..3u32 {
        assert_eq!(node_lines(&logs, index), ["started"], "{agent}");
    }
    engine.stop().await;
}

async fn a_script_past_its_timeout_fails(agent: &str) {
    let marker = unique_marker();
    let project = Project::new(&agent_yml(
        agent,
        1,
        &format!("timeout: 2s\nglobal_metadata: {{marker: {marker}}}"),
    ))
    .script("#!/bin/sh\necho waiting\nsleep 60\necho never\n");
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "failed", "{agent}: {view:#?}");
    let node = only_node(&view);
    assert_eq!(node.exit_code, None);
    assert_eq!(
        node.error_message.as_deref(),
        Some("timed out after 2s"),
        "{agent}"
    );
    assert_eq!(
        node_lines(&engine.all_logs(&view.deployment_id).await, 0),
        ["waiting"]
    );
    assert_eq!(
        processes_with_env(&format!("MARKER={marker}")),
        Vec::<u32>::new()
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn secrets_are_masked_in_logs_and_messages(agent: &str) {
    let project = Project::new(&agent_yml(agent, 1, &secret_metadata())).script(SECRET_SCRIPT);
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "failed", "{agent}: {view:#?}");
    let node = only_node(&view);
    assert_eq!(node.exit_code, Some(1));
    assert_eq!(
        node.error_message.as_deref(),
        Some("exited with code 1: stderr says ***"),
        "{agent}"
    );
    let logs = engine.all_logs(&view.deployment_id).await;
    assert_eq!(
        node_output(&logs, 0),
        [
            ("stdout".to_owned(), "match".to_owned()),
            ("stdout".to_owned(), "stdout says ***".to_owned()),
            ("stderr".to_owned(), "stderr says ***".to_owned()),
        ],
        "{agent}"
    );
    // Whatever an agent left on disk that holds the value is private to its user.
    let mut pending = vec![engine.data_dir.path().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path()).expect("read");
                if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = entry.metadata().expect("metadata").permissions().mode();
                    assert_eq!(mode & 0o777, 0o600, "{agent}: {}", entry.path().display());
                }
            }
        }
    }
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

/// Many nodes at once on this machine: the sh bootstrap used to lose a finished script's (or
/// extraction's) status now and then under such load (dash's `wait` answered 127), failing
/// about one node in twenty with "exited with code 127".
async fn fifty_nodes_at_once_all_complete_with_their_exit_status(agent: &str) {
    let project = Project::new(&agent_yml(agent, 50, ""))
        .script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX on $(hostname)\"\n");
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    let failed: Vec<String> = view
        .nodes
        .iter()
        .filter(|node| node.status.as_str() != "completed" || node.exit_code != Some(0))
        .map(|node| format!("{}: {:?}", node.node_index, node.error_message))
        .collect();
    assert!(failed.is_empty(), "{agent}: nodes that failed: {failed:?}");
    assert_eq!(
        (view.nodes_completed, view.nodes_failed),
        (50, 0),
        "{agent}"
    );
    engine.stop().await;
}

/// `agent_yml` for one node whose bundle also holds `script`, which it runs.
fn yml_running(agent: &str, script: &str) -> String {
    agent_yml(agent, 1, "")
        .replace(
            "application_files: [setup.sh]",
            &format!("application_files: [setup.sh, {script}]"),
        )
        .replace(
            "remote_script_to_run: setup.sh",
            &format!("remote_script_to_run: {script}"),
        )
}

async fn scripts_start_by_exec_bit_shebang_or_sh(agent: &str) {
    // Not executable, with a #! line: its interpreter runs it, with the line's argument.
    let shebang = Project::new(&yml_running(agent, "run.sh"))
        .script("#!/bin/sh\necho unused\n")
        .file(
            "run.sh",
            "#!/bin/sh -u\r\necho \"interpreted $TASKFLY_NODE_INDEX\"\necho \"$UNSET_VARIABLE\"\n",
            0o644,
        );
    // Neither executable nor #!: sh runs it.
    let plain = Project::new(&yml_running(agent, "plain.sh"))
        .script("#!/bin/sh\necho unused\n")
        .file(
            "plain.sh",
            "echo \"by sh in $(basename \"$PWD\")\"\n",
            0o600,
        );
    let engine = TestEngine::start().await;

    let view = engine.run(shebang.path()).await;
    let node = only_node(&view);
    // `sh -u` stops at the unset variable: the argument reached the interpreter.
    assert_eq!(node.status.as_str(), "failed", "{agent}: {view:#?}");
    assert_ne!(node.exit_code, Some(0));
    assert_eq!(
        node_lines(&engine.all_logs(&view.deployment_id).await, 0)[0],
        "interpreted 0",
        "{agent}"
    );
    let view = engine.run(plain.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    assert_eq!(
        node_lines(&engine.all_logs(&view.deployment_id).await, 0),
        ["by sh in bundle"],
        "{agent}"
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn a_death_by_signal_is_reported_with_the_signal_name(agent: &str) {
    let project = Project::new(&format!(
        "{}remote_dest_dir: job\n",
        agent_yml(agent, 1, "")
    ))
    .script(
        "#!/bin/sh\n\
         echo \"in $(basename \"$(pwd)\")\"\n\
         echo 'about to die' >&2\n\
         kill -KILL $$\n",
    );
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    let node = only_node(&view);
    assert_eq!(node.status.as_str(), "failed", "{agent}: {view:#?}");
    assert_eq!(node.exit_code, None, "{agent}");
    assert_eq!(
        node.error_message.as_deref(),
        Some("killed by signal SIGKILL: about to die"),
        "{agent}"
    );
    assert_eq!(
        node_lines(&engine.all_logs(&view.deployment_id).await, 0),
        ["in job", "about to die"],
        "{agent}"
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn heartbeats_keep_a_long_script_alive(agent: &str) {
    // A node silent for 5 s would fail; the script runs for twice that. (3 s was too tight
    // for the shell bootstrap on a loaded machine: its download, between heartbeats, took
    // 3.3 s at a load of 25.)
    let project = Project::new(&agent_yml(agent, 1, ""))
        .script("#!/bin/sh\necho begin\nsleep 11\necho end\n");
    let engine = TestEngine::start_with(|c| c.heartbeat_timeout(Duration::from_secs(5))).await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    assert_eq!(
        node_lines(&engine.all_logs(&view.deployment_id).await, 0),
        ["begin", "end"]
    );
    assert_bootstrap_cleaned_up(agent, &engine, &view).await;
    engine.stop().await;
}

async fn stopping_the_engine_stops_running_nodes(agent: &str) {
    let marker = unique_marker();
    let env_marker = format!("MARKER={marker}");
    let project = Project::new(&agent_yml(agent, 2, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho started\nsleep 300\n");
    let engine = TestEngine::start().await;
    let id = engine.deploy(project.path()).await;
    let view = wait_for_running_scripts(agent, &engine, &id, &env_marker, 4, None).await;
    if agent == "script" {
        // The bootstrap is a file of the node's work directory that only its user can read (it
        // holds the provision token), and its own output goes to bootstrap.log beside it.
        use std::os::unix::fs::PermissionsExt;
        let work = engine.data_dir.path().join("work").join(&id).join("0-1");
        let mode = std::fs::metadata(work.join("bootstrap.sh"))
            .expect("bootstrap.sh")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let log = std::fs::read_to_string(work.join("bootstrap.log")).expect("bootstrap.log");
        assert!(log.contains("registered as node"), "{log}");
    }

    // An embedded engine's local nodes end with it.
    engine.stop().await;
    assert_eq!(
        processes_with_env(&env_marker),
        Vec::<u32>::new(),
        "{agent}"
    );
    assert_eq!(bootstrap_processes(&view), Vec::<u32>::new(), "{agent}");
}

// ---------------------------------------------------------------------------------------------
// The bootstrap run by hand, as a cloud instance runs it
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_stops_its_script_when_a_heartbeat_answers_shutdown() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| {
        c.provider(provider.as_provider())
            .heartbeat_interval(Duration::from_secs(1))
    })
    .await;
    let marker = unique_marker();
    let project = Project::new(&local_yml(1, &marker_metadata(&marker)))
        // The script ignores SIGTERM, so only SIGKILL after the grace period ends it.
        .script("#!/bin/sh\ntrap '' TERM\necho started\nsleep 300 &\nwait\n");
    let id = engine.deploy(project.path()).await;
    let token = provider.wait_for_provisioned(&id, 1).await[0]
        .provision_token
        .clone();
    let script = taskfly::agent::bootstrap::bootstrap_script(&engine.url, &token, None)
        .expect("the bootstrap");
    let instance = tempfile::tempdir().expect("instance dir");
    std::fs::write(instance.path().join("user-data"), script).expect("write");
    let mut bootstrap = tokio::process::Command::new("sh")
        .arg("user-data")
        .current_dir(instance.path())
        .env("TMPDIR", instance.path())
        .env("TASKFLY_AGENT_GRACE_MS", "1000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sh");

    let env_marker = format!("MARKER={marker}");
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        let running = engine.view(&id).await.expect("view").nodes[0]
            .status
            .as_str()
            == "running_script";
        let started = engine
            .all_logs(&id)
            .await
            .iter()
            .any(|l| l.line == "started");
        if running && started && processes_with_env(&env_marker).len() >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the script never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The provider only records, so only the heartbeat answer can stop the node.
    engine.engine.terminate(&id).await.expect("terminate");
    let status = tokio::time::timeout(POLL_LIMIT, bootstrap.wait())
        .await
        .expect("the bootstrap ends")
        .expect("exit status");
    let mut stderr = String::new();
    if let Some(mut pipe) = bootstrap.stderr.take() {
        use tokio::io::AsyncReadExt;
        pipe.read_to_string(&mut stderr).await.expect("stderr");
    }
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("stopping the script: shutdown"), "{stderr}");
    assert!(!stderr.contains(&token), "the bootstrap logged its token");
    assert_eq!(processes_with_env(&env_marker), Vec::<u32>::new());
    let view = engine.view(&id).await.expect("view");
    assert_eq!(view.status.as_str(), "terminated", "{view:#?}");
    assert_eq!(
        view.nodes[0].status.as_str(),
        "terminated",
        "no final report: {view:#?}"
    );
    // Only the extracted bundle is left in the instance's temporary directory.
    assert_eq!(
        find_named(instance.path(), ".taskfly"),
        Vec::<std::path::PathBuf>::new()
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_gives_up_on_a_refused_registration() {
    let engine = TestEngine::start().await;
    let script = taskfly::agent::bootstrap::bootstrap_script(&engine.url, "0123456789abcdef", None)
        .expect("the bootstrap");
    let instance = tempfile::tempdir().expect("instance dir");
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(instance.path())
        .env("TMPDIR", instance.path())
        .stdin(std::process::Stdio::null())
        .output();
    let output = tokio::time::timeout(POLL_LIMIT, output)
        .await
        .expect("it gives up at once")
        .expect("sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot register"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert_eq!(
        find_named(instance.path(), ".taskfly"),
        Vec::<std::path::PathBuf>::new()
    );
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The shell-friendly node protocol the bootstrap uses
// ---------------------------------------------------------------------------------------------

/// Deploys a one-node project on a provider that starts nothing and returns the node's
/// provision token, for driving the node protocol by hand.
async fn recorded_node(engine: &TestEngine, provider: &RecordingProvider, yml: &str) -> String {
    let project = Project::new(yml).script("#!/bin/sh\necho unused\n");
    let id = engine.deploy(project.path()).await;
    let calls = provider.wait_for_provisioned(&id, 1).await;
    calls[0].provision_token.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_as_sh_answers_quoted_assignments_that_source_exactly() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let tricky = "it's \"x\" $(touch PWNED_REG) `id`\nline 2 ; \\ é";
    let yml = format!(
        "{}remote_dest_dir: \"~/out dir\"\n",
        local_yml(
            1,
            &format!(
                "timeout: 90s\nglobal_metadata: {{tricky: {}, n: 7}}",
                serde_json::to_string(tricky).expect("json")
            ),
        )
    );
    let token = recorded_node(&engine, &provider, &yml).await;
    let body = serde_json::json!({ "provision_token": token }).to_string();

    let unknown = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/register?format=yaml",
        None,
        Some(("application/json", body.clone().into_bytes())),
    )
    .await;
    assert_status(&unknown, 400, "an unknown format");

    let answer = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/register?format=sh",
        None,
        Some(("application/json", body.into_bytes())),
    )
    .await;
    assert_status(&answer, 200, "register?format=sh");
    assert_eq!(answer.content_type, "text/plain; charset=utf-8");
    let text = answer.text();
    let lines: Vec<&str> = text.lines().collect();
    // Not a pooled instance: no next token, but its line is there, first.
    assert_eq!(lines[0], "TASKFLY_NEXT_TOKEN=''", "{text}");
    assert!(lines[1].starts_with("TASKFLY_AUTH_TOKEN='"), "{text}");
    assert_eq!(lines[2], "TASKFLY_SCRIPT='setup.sh'");
    assert_eq!(lines[3], "TASKFLY_DEST_DIR='~/out dir'");
    assert!(
        lines[4].starts_with("TASKFLY_HEARTBEAT_INTERVAL_S='"),
        "{text}"
    );
    assert_eq!(lines[5], "TASKFLY_TIMEOUT_S='90'");
    assert!(text.contains("\nexport N='7'\n"), "{text}");
    assert!(
        text.contains("\nexport TRICKY='it'\\''s \"x\" $(touch PWNED_REG) `id`\nline 2 ; \\ é'\n"),
        "{text}"
    );
    assert!(text.contains("\nexport TASKFLY_NODE_INDEX='0'\n"), "{text}");

    // Sourced by sh, every value comes back exactly and nothing runs.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("reg"), &text).expect("write");
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            ". ./reg && printf '%s|%s|%s' \"$TRICKY\" \"$TASKFLY_DEST_DIR\" \"$TASKFLY_TIMEOUT_S\"",
        )
        .current_dir(dir.path())
        .output()
        .expect("sh");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{tricky}|~/out dir|90")
    );
    assert!(!dir.path().join("PWNED_REG").exists());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_plain_logs_are_one_line_each_and_json_logs_still_work() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let yml = local_yml(1, "secrets: {pw: hunter2-secret}");
    let token = recorded_node(&engine, &provider, &yml).await;
    let registered = taskfly::Client::new(&engine.url, None)
        .expect("client")
        .register(&token)
        .await
        .expect("register");
    let auth = registered.auth_token.as_str();
    let post = |path: &'static str, content_type: &'static str, body: &'static [u8]| {
        raw_request(
            &engine.url,
            Method::POST,
            path,
            Some(auth),
            Some((content_type, body.to_vec())),
        )
    };

    let sent = post(
        "/api/v1/nodes/logs?stream=stdout",
        "text/plain",
        b"one\r\n\ntwo hunter2-secret\nbad \xff byte\nlast without newline",
    )
    .await;
    assert_status(&sent, 200, "text/plain logs");
    let sent = post(
        "/api/v1/nodes/logs?stream=stderr",
        "text/plain; charset=utf-8",
        b"err line\n",
    )
    .await;
    assert_status(&sent, 200, "text/plain stderr");
    let sent = post("/api/v1/nodes/logs?stream=stdout", "text/plain", b"").await;
    assert_status(&sent, 200, "an empty body");
    let sent = post(
        "/api/v1/nodes/logs",
        "application/json",
        br#"{"lines":[{"stream":"stdout","line":"from json"}]}"#,
    )
    .await;
    assert_status(&sent, 200, "JSON logs");
    let missing = post("/api/v1/nodes/logs", "text/plain", b"x\n").await;
    assert_status(&missing, 400, "no stream");
    let wrong = post("/api/v1/nodes/logs?stream=stdin", "text/plain", b"x\n").await;
    assert_status(&wrong, 400, "a wrong stream");
    let unsupported = post("/api/v1/nodes/logs?stream=stdout", "text/csv", b"x\n").await;
    assert_status(&unsupported, 415, "another content type");
    let anonymous = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/logs?stream=stdout",
        None,
        Some(("text/plain", b"x\n".to_vec())),
    )
    .await;
    assert_status(&anonymous, 401, "no token");

    let logs = engine.all_logs(&registered.deployment_id).await;
    assert_eq!(
        node_output(&logs, 0),
        [
            ("stdout".to_owned(), "one".to_owned()),
            ("stdout".to_owned(), String::new()),
            ("stdout".to_owned(), "two ***".to_owned()),
            ("stdout".to_owned(), "bad \u{fffd} byte".to_owned()),
            ("stdout".to_owned(), "last without newline".to_owned()),
            ("stderr".to_owned(), "err line".to_owned()),
            ("stdout".to_owned(), "from json".to_owned()),
        ]
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_message_that_is_not_utf8_is_refused_so_the_bootstrap_falls_back_to_ascii() {
    // The bootstrap builds status JSON itself and keeps a message's bytes; a stderr line that is
    // not UTF-8 makes the daemon answer 400, and the bootstrap sends the ASCII part instead.
    let project = Project::new(&agent_yml("script", 1, ""))
        .script("#!/bin/sh\nprintf 'bad \\377 byte \\342\\234\\223\\n' >&2\nexit 4\n");
    let engine = TestEngine::start().await;
    let view = engine.run(project.path()).await;
    let node = only_node(&view);
    assert_eq!(node.status.as_str(), "failed", "{view:#?}");
    assert_eq!(node.exit_code, Some(4));
    assert_eq!(
        node.error_message.as_deref(),
        Some("exited with code 4: bad  byte "),
    );
    engine.stop().await;
}
