//! The instance pool ([`taskfly::PooledProvider`]) end to end: real local agents (the Rust
//! agent as a task, or the shell bootstrap as a process), the engine on 127.0.0.1:0, and a
//! local provider underneath that counts what it really launches and terminates. Then the
//! daemon's `--pool-*` flags.
//!
//! Nothing here waits by sleeping: pool states are waited for on `PooledProvider::changed`,
//! deployments on `Orchestrator::wait`/`changed`, and every wait is bounded.

use std::collections::BTreeSet;
use std::time::Duration;

use taskfly::wire::{DeploymentView, RegisterResponse, StatusRequest};
use taskfly::{Client, PoolConfig, PooledProvider};

use crate::support::cli_daemon::{Daemon, DaemonOptions};
use crate::support::cli_run;
use crate::support::engine_http::{raw_get, raw_request};
use crate::support::engine_provider::{RecordingProvider, POOL_SLOTS};
use crate::support::engine_util::{node_lines, poll_until, unique_marker};
use crate::support::pool::PoolEngine;
use crate::support::{
    agent_yml, local_yml, marker_metadata, processes_with_env, Project, TestEngine, API_TOKEN,
};

/// How long a deployment of these tiny scripts may take (the machine is shared).
const RUN_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Waits (bounded) until the deployment is final.
async fn wait_final(engine: &TestEngine, id: &str) -> DeploymentView {
    match tokio::time::timeout(RUN_LIMIT, engine.wait(id)).await {
        Ok(view) => view.expect("wait"),
        Err(_) => {
            let view = engine.view(id).await.expect("view");
            panic!("{id} did not end within {RUN_LIMIT:?}; it is at {view:#?}")
        }
    }
}

/// Deploys the project and waits (bounded) until the deployment is final.
async fn run(engine: &TestEngine, project: &Project) -> DeploymentView {
    let id = engine.deploy(project.path()).await;
    wait_final(engine, &id).await
}

/// Asserts the deployment completed, showing every node's error otherwise.
fn assert_completed(view: &DeploymentView, what: &str) {
    let errors: Vec<(u32, &str, Option<&str>)> = view
        .nodes
        .iter()
        .filter(|n| n.status.as_str() != "completed")
        .map(|n| (n.node_index, n.status.as_str(), n.error_message.as_deref()))
        .collect();
    assert!(
        view.status.as_str() == "completed" && errors.is_empty(),
        "{what}: the deployment is {} with these nodes not completed: {errors:?}\n{view:#?}",
        view.status
    );
}

/// The instance ids a deployment's nodes ran on.
fn instance_ids(view: &DeploymentView) -> BTreeSet<String> {
    view.nodes
        .iter()
        .map(|n| {
            n.instance_id
                .clone()
                .unwrap_or_else(|| panic!("node {} has no instance: {view:#?}", n.node_index))
        })
        .collect()
}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

/// Processes of script-mode instances (a bootstrap carries its instance id).
fn bootstrap_processes(instance_id: &str) -> Vec<u32> {
    processes_with_env(&format!("TASKFLY_AGENT_INSTANCE_ID={instance_id}"))
}

for_both_agents!(
    a_second_deployment_reuses_the_idle_instances_and_sees_nothing_of_the_first,
    idle_instances_past_the_timeout_are_terminated_down_to_the_minimum,
    down_of_a_running_node_stops_its_script_and_returns_the_instance_to_the_pool,
);

// ---------------------------------------------------------------------------------------------
// Scenarios, each run with both agents
// ---------------------------------------------------------------------------------------------

/// Deployment A's script leaves this file in its working directory.
const A_LEFTOVER: &str = "left-by-a.txt";

async fn a_second_deployment_reuses_the_idle_instances_and_sees_nothing_of_the_first(agent: &str) {
    let marker = unique_marker();
    let pooled = PoolEngine::start(PoolConfig::new(4)).await;
    let engine = &pooled.engine;
    let a = Project::new(&agent_yml(
        agent,
        3,
        &format!("global_metadata: {{marker: {marker}, a_only: from-a}}"),
    ))
    .script(&format!(
        "#!/bin/sh\necho \"$A_ONLY\" >{A_LEFTOVER}\n\
         test -f {A_LEFTOVER} && echo \"a node $TASKFLY_NODE_INDEX left its file\"\n"
    ));
    // B fails, saying what it found, if anything of A is left: a file, a variable, or any
    // file besides its own script in its working directory.
    let b = Project::new(&agent_yml(
        agent,
        3,
        &marker_metadata(&marker),
    ))
    .script(&format!(
        "#!/bin/sh\n\
         if [ -e {A_LEFTOVER} ]; then echo \"A's {A_LEFTOVER} is still here\" >&2; exit 1; fi\n\
         if [ -n \"${{A_ONLY+set}}\" ]; then echo \"A's A_ONLY is still set: $A_ONLY\" >&2; exit 1; fi\n\
         files=$(ls -A)\n\
         if [ \"$files\" != setup.sh ]; then echo \"unexpected files:\" $files >&2; exit 1; fi\n\
         echo \"b node $TASKFLY_NODE_INDEX starts clean\"\n"
    ));

    let done_a = run(engine, &a).await;
    assert_completed(&done_a, &format!("{agent}: A"));
    let logs_a = engine.all_logs(&done_a.deployment_id).await;
    for index in 0..3u32 {
        assert_eq!(
            node_lines(&logs_a, index),
            [format!("a node {index} left its file")],
            "{agent}"
        );
    }
    let ids_a = instance_ids(&done_a);
    assert_eq!(
        ids_a.len(),
        3,
        "{agent}: one instance per node: {done_a:#?}"
    );
    assert_eq!(set(&pooled.counting.launched()), ids_a, "{agent}");

    // Every agent comes back for work once its node has ended.
    pooled
        .wait_for_pool(&format!("{agent}: A's 3 instances idle"), |s| {
            s.idle == 3 && s.instances == 3
        })
        .await;

    let done_b = run(engine, &b).await;
    assert_completed(
        &done_b,
        &format!("{agent}: B (it fails if it sees anything of A)"),
    );
    let logs_b = engine.all_logs(&done_b.deployment_id).await;
    for index in 0..3u32 {
        assert_eq!(
            node_lines(&logs_b, index),
            [format!("b node {index} starts clean")],
            "{agent}"
        );
    }
    assert_eq!(
        instance_ids(&done_b),
        ids_a,
        "{agent}: B runs on A's instances"
    );
    assert_eq!(
        pooled.counting.launched().len(),
        3,
        "{agent}: no new launch for B: {:?}",
        pooled.counting.launched()
    );
    assert_eq!(
        pooled.counting.terminated(),
        Vec::<String>::new(),
        "{agent}: the pool keeps its instances"
    );
    let stats = pooled
        .wait_for_pool(&format!("{agent}: the 3 instances idle again"), |s| {
            s.idle == 3 && s.instances == 3
        })
        .await;
    assert_eq!(
        (
            stats.launched_total,
            stats.reused_total,
            stats.spares_used_total,
            stats.retired_total
        ),
        (3, 3, 0, 0),
        "{agent}: {stats:#?}"
    );

    // GET /stats over HTTP shows the same pool.
    let response = raw_get(&engine.url, "/api/v1/stats", Some(API_TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let pools = body["pools"].as_array().expect("pools is an array");
    assert_eq!(pools.len(), 1, "{body:#}");
    let shown = &pools[0];
    for (field, expected) in [
        ("max_instances", 4),
        ("min_instances", 0),
        ("provision_ahead", 0),
        ("instances", 3),
        ("launching", 0),
        ("busy", 0),
        ("idle", 3),
        ("launched_total", 3),
        ("reused_total", 3),
        ("spares_used_total", 0),
        ("retired_total", 0),
    ] {
        assert_eq!(shown[field], expected, "{agent}: {field} in {shown:#}");
    }
    assert_eq!(shown["provider"], "local", "{shown:#}");
    let metrics = raw_get(&engine.url, "/api/v1/metrics", None).await.text();
    for line in [
        "taskfly_pool_instances{provider=\"local\"} 3",
        "taskfly_pool_launched_total{provider=\"local\"} 3",
        "taskfly_pool_reused_total{provider=\"local\"} 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{agent}: no `{line}` in\n{metrics}"
        );
    }

    assert_eq!(
        processes_with_env(&format!("MARKER={marker}")),
        Vec::<u32>::new(),
        "{agent}: no script is left running"
    );
    pooled.stop().await;
}

async fn idle_instances_past_the_timeout_are_terminated_down_to_the_minimum(agent: &str) {
    let marker = unique_marker();
    let pooled = PoolEngine::start(
        PoolConfig::new(4)
            .min_instances(1)
            .idle_timeout(Duration::from_secs(1)),
    )
    .await;
    let project = Project::new(&agent_yml(agent, 3, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX\"\n");

    let done = run(&pooled.engine, &project).await;
    assert_completed(&done, agent);
    let launched = pooled.counting.launched();
    assert_eq!(set(&launched), instance_ids(&done), "{agent}");

    let stats = pooled
        .wait_for_pool(
            &format!("{agent}: 2 of 3 idle instances retired, the minimum of 1 kept"),
            |s| s.instances == 1 && s.retired_total == 2,
        )
        .await;
    assert_eq!((stats.idle, stats.busy), (1, 0), "{agent}: {stats:#?}");

    // The inner provider terminated exactly two of its instances, and their agents are gone.
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    let terminated = loop {
        let terminated = pooled.counting.terminated();
        let mut gone = terminated.len() == 2;
        for id in &terminated {
            gone = gone && pooled.counting.is_gone(id).await && bootstrap_processes(id).is_empty();
        }
        if gone {
            break terminated;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent}: the retired instances' agents still run after {RUN_LIMIT:?}; \
             terminated: {terminated:?}"
        );
        pooled.pool.changed(Duration::from_millis(200)).await;
    };
    assert_eq!(set(&terminated).len(), 2, "{agent}: {terminated:?}");
    let kept: Vec<&String> = launched
        .iter()
        .filter(|id| !terminated.contains(id))
        .collect();
    assert_eq!(kept.len(), 1, "{agent}: {launched:?} minus {terminated:?}");
    assert!(
        pooled.counting.is_running(kept[0]).await,
        "{agent}: the instance kept at the minimum still runs"
    );
    if agent == "script" {
        assert!(
            !bootstrap_processes(kept[0]).is_empty(),
            "the kept instance's bootstrap still waits for work"
        );
    }
    assert_eq!(
        processes_with_env(&format!("MARKER={marker}")),
        Vec::<u32>::new(),
        "{agent}: no script is left running"
    );
    let still = pooled.stats();
    assert_eq!(
        (still.instances, still.retired_total),
        (1, 2),
        "{agent}: the minimum is never retired: {still:#?}"
    );
    pooled.stop().await;
}

async fn down_of_a_running_node_stops_its_script_and_returns_the_instance_to_the_pool(agent: &str) {
    let marker = unique_marker();
    let env_marker = format!("MARKER={marker}");
    let pooled = PoolEngine::start(PoolConfig::new(2)).await;
    let engine = &pooled.engine;
    let sleeping = Project::new(&agent_yml(agent, 1, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho started\nsleep 1000\necho never\n");
    let id = engine.deploy(sleeping.path()).await;
    let view = poll_until(engine, &id, "the script running", |view| {
        view.nodes
            .iter()
            .all(|n| n.status.as_str() == "running_script")
            && !processes_with_env(&env_marker).is_empty()
    })
    .await;
    let instance = view.nodes[0].instance_id.clone().expect("instance id");

    tokio::time::timeout(RUN_LIMIT, engine.engine.terminate(&id))
        .await
        .unwrap_or_else(|_| panic!("{agent}: down did not return within {RUN_LIMIT:?}"))
        .expect("terminate");
    let view = engine.view(&id).await.expect("view");
    assert_eq!(view.status.as_str(), "terminated", "{agent}: {view:#?}");
    assert_eq!(
        view.nodes[0].status.as_str(),
        "terminated",
        "{agent}: {view:#?}"
    );
    assert_eq!(
        processes_with_env(&env_marker),
        Vec::<u32>::new(),
        "{agent}: the script is stopped once down returns"
    );
    let stats = pooled.stats();
    assert_eq!(
        (stats.instances, stats.idle, stats.retired_total),
        (1, 1, 0),
        "{agent}: the instance is back in the pool, idle: {stats:#?}"
    );
    assert_eq!(
        pooled.counting.terminated(),
        Vec::<String>::new(),
        "{agent}"
    );
    assert!(pooled.counting.is_running(&instance).await, "{agent}");

    let next = Project::new(&agent_yml(agent, 1, "")).script("#!/bin/sh\necho next\n");
    let done = run(engine, &next).await;
    assert_completed(&done, agent);
    assert_eq!(
        done.nodes[0].instance_id.as_deref(),
        Some(instance.as_str()),
        "{agent}: the next deployment runs on the same instance"
    );
    let logs = engine.all_logs(&done.deployment_id).await;
    assert_eq!(node_lines(&logs, 0), ["next"], "{agent}");
    assert_eq!(pooled.counting.launched(), [instance], "{agent}");
    assert_eq!(pooled.stats().reused_total, 1, "{agent}");
    pooled.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Rust agent only
// ---------------------------------------------------------------------------------------------

/// A script that waits until `$GO_FILE` exists, so its node holds its instance as long as the
/// test wants.
const WAIT_FOR_GO: &str =
    "#!/bin/sh\necho waiting\nwhile [ ! -e \"$GO_FILE\" ]; do sleep 0.05; done\necho released\n";

/// A deployment whose nodes run [`WAIT_FOR_GO`]: they hold their instances until released.
struct Holding {
    id: String,
    go_file: std::path::PathBuf,
    _project: Project,
    _go_dir: tempfile::TempDir,
}

impl Holding {
    async fn deploy(engine: &TestEngine, count: u32) -> Holding {
        let go_dir = tempfile::tempdir().expect("temp dir");
        let go_file = go_dir.path().join("go");
        let project = Project::new(&local_yml(
            count,
            &format!("global_metadata: {{go_file: \"{}\"}}", go_file.display()),
        ))
        .script(WAIT_FOR_GO);
        let id = engine.deploy(project.path()).await;
        Holding {
            id,
            go_file,
            _project: project,
            _go_dir: go_dir,
        }
    }

    /// Lets the nodes finish.
    fn release(&self) {
        std::fs::write(&self.go_file, "go").expect("write the go file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_ahead_spares_are_used_by_the_next_nodes() {
    let pooled = PoolEngine::start(PoolConfig::new(4).provision_ahead(2)).await;
    let engine = &pooled.engine;
    // The first node keeps its instance busy, so only the spares are free for the next ones.
    let holding = Holding::deploy(engine, 1).await;
    let holding_id = holding.id.clone();
    let stats = pooled
        .wait_for_pool("the node's instance plus 2 spares", |s| {
            s.launched_total == 3 && s.busy == 1 && s.idle == 2 && s.launching == 0
        })
        .await;
    assert_eq!(stats.instances, 3, "{stats:#?}");
    let view = poll_until(engine, &holding_id, "the first node running", |view| {
        view.nodes[0].status.as_str() == "running_script"
    })
    .await;
    let launched = pooled.counting.launched();
    assert_eq!(launched.len(), 3, "{launched:?}");
    let first_instance = view.nodes[0].instance_id.clone().expect("instance");
    let spares: BTreeSet<String> = launched
        .iter()
        .filter(|id| **id != first_instance)
        .cloned()
        .collect();
    assert_eq!(spares.len(), 2, "{launched:?}");

    let next = Project::new(&local_yml(2, "")).script("#!/bin/sh\necho \"on a spare\"\n");
    let done = run(engine, &next).await;
    assert_completed(&done, "the next deployment");
    assert_eq!(instance_ids(&done), spares, "its nodes run on the spares");
    let stats = pooled.stats();
    assert_eq!(
        (stats.spares_used_total, stats.reused_total),
        (2, 0),
        "{stats:#?}"
    );
    assert!(
        stats.launched_total <= 4,
        "never more than the maximum: {stats:#?}"
    );

    holding.release();
    let done = wait_final(engine, &holding_id).await;
    assert_completed(&done, "the first deployment");
    pooled.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_are_kept_at_provision_ahead_however_many_nodes_start_at_once() {
    let pooled = PoolEngine::start(PoolConfig::new(10).provision_ahead(2)).await;
    let engine = &pooled.engine;
    let holding = Holding::deploy(engine, 3).await;
    let id = holding.id.clone();
    // Once every node has its instance, every provision call (spares topped up included) has
    // returned.
    poll_until(engine, &id, "every node running", |view| {
        view.nodes
            .iter()
            .all(|n| n.status.as_str() == "running_script")
    })
    .await;
    let stats = pooled
        .wait_for_pool("no launch under way", |s| s.launching == 0)
        .await;
    assert_eq!(
        (stats.busy, stats.idle, stats.launched_total),
        (3, 2, 5),
        "3 nodes and exactly 2 spares: {stats:#?}; launched: {:?}",
        pooled.counting.launched()
    );
    holding.release();
    let done = wait_final(engine, &id).await;
    assert_completed(&done, "the deployment");
    pooled.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_nodes_wait_for_an_instance_rather_than_fail() {
    let pooled = PoolEngine::start(PoolConfig::new(2)).await;
    let project =
        Project::new(&local_yml(5, "")).script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX\"\n");
    let done = run(&pooled.engine, &project).await;
    assert_completed(&done, "5 nodes on 2 instances");
    let logs = pooled.engine.all_logs(&done.deployment_id).await;
    for index in 0..5u32 {
        assert_eq!(node_lines(&logs, index), [format!("node {index}")]);
    }
    assert_eq!(
        pooled.counting.launched().len(),
        2,
        "{:?}",
        pooled.counting.launched()
    );
    assert_eq!(instance_ids(&done), set(&pooled.counting.launched()));
    let stats = pooled.stats();
    assert_eq!(
        (stats.launched_total, stats.reused_total),
        (2, 3),
        "{stats:#?}"
    );
    assert!(stats.instances <= 2, "{stats:#?}");
    pooled.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The daemon's flags
// ---------------------------------------------------------------------------------------------

/// The daemon's one pool (for `local`) as `GET /stats` shows it.
fn daemon_pool(runtime: &tokio::runtime::Runtime, daemon: &Daemon) -> serde_json::Value {
    let response = runtime.block_on(raw_get(&daemon.url, "/api/v1/stats", Some(&daemon.token)));
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let pools = body["pools"].as_array().expect("pools is an array").clone();
    pools
        .into_iter()
        .find(|p| p["provider"] == "local")
        .unwrap_or_else(|| panic!("no local pool in {body:#}"))
}

/// Polls the daemon's pool (bounded) until `done` holds; returns that state.
fn wait_daemon_pool(
    runtime: &tokio::runtime::Runtime,
    daemon: &Daemon,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    loop {
        let pool = daemon_pool(runtime, daemon);
        if done(&pool) {
            return pool;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what} after {RUN_LIMIT:?}; the pool is at {pool:#}"
        );
        // The daemon has no change feed over HTTP: poll.
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn taskflyd_pool_flags_reuse_instances_and_retire_them_when_idle() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The idle timeout leaves the second `up` time to arrive on a loaded machine; the end of
    // the test waits for the retirement as a condition, so it costs only that long.
    let daemon = Daemon::start_with_args(
        DaemonOptions::default(),
        &["--pool-max", "3", "--pool-idle-timeout", "4s"],
    );
    let project = Project::new(&local_yml(2, ""))
        .script("#!/bin/sh\necho \"hello from node $TASKFLY_NODE_INDEX\"\n");
    let up = || {
        let ran = cli_run::run_with_limit(
            &mut daemon.taskfly(&[
                "up",
                project.path().to_str().expect("UTF-8 path"),
                "--wait",
                "--output",
                "json",
            ]),
            RUN_LIMIT,
        );
        ran.expect_success();
        ran.json()
    };

    let first = up();
    assert_eq!(first["status"], "completed", "{first:#}");
    let pool = wait_daemon_pool(&runtime, &daemon, "both instances idle", |p| {
        p["idle"] == 2 && p["instances"] == 2
    });
    assert_eq!(pool["max_instances"], 3, "{pool:#}");
    assert_eq!(pool["idle_timeout_s"], 4, "{pool:#}");
    let second = up();
    assert_eq!(second["status"], "completed", "{second:#}");
    let ids = |view: &serde_json::Value| -> BTreeSet<String> {
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["instance_id"].as_str().expect("instance_id").to_owned())
            .collect()
    };
    assert_eq!(
        ids(&second),
        ids(&first),
        "the second run reuses the first's instances"
    );
    let pool = daemon_pool(&runtime, &daemon);
    assert_eq!(
        (&pool["launched_total"], &pool["reused_total"]),
        (&serde_json::json!(2), &serde_json::json!(2)),
        "{pool:#}"
    );

    // Past the idle timeout, the pool retires both, and their agent processes end.
    let pool = wait_daemon_pool(&runtime, &daemon, "every idle instance retired", |p| {
        p["instances"] == 0
    });
    assert_eq!(pool["retired_total"], 2, "{pool:#}");
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while !daemon.other_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "agent processes still run after {RUN_LIMIT:?}: {:?}",
            daemon.other_processes()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = daemon.stop();
    assert!(status.success(), "taskflyd exited with {status}");
}

#[test]
fn taskflyd_refuses_a_pool_minimum_above_its_maximum_naming_both_flags() {
    let home = tempfile::tempdir().expect("temp HOME");
    let data = tempfile::tempdir().expect("temp data dir");
    let ran = cli_run::run(
        cli_run::command("taskflyd", home.path())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(["--pool-min", "5", "--pool-max", "2"])
            .env("TASKFLY_API_TOKEN", API_TOKEN),
    );
    assert_ne!(ran.code(), 0, "{}", ran.show());
    assert!(
        ran.stderr.contains("--pool-min") && ran.stderr.contains("--pool-max"),
        "the message names both flags\n{}",
        ran.show()
    );
    assert!(
        !ran.stderr.contains("taskflyd listening"),
        "it never serves\n{}",
        ran.show()
    );
}

// ---------------------------------------------------------------------------------------------
// The protocol, call by call
// ---------------------------------------------------------------------------------------------

/// `POST /nodes/register` with `token`, as an agent sends it.
async fn register(engine: &TestEngine, token: &str) -> crate::support::engine_http::RawResponse {
    let body = serde_json::json!({ "provision_token": token }).to_string();
    raw_request(
        &engine.url,
        hyper::Method::POST,
        "/api/v1/nodes/register",
        None,
        Some(("application/json", body.into_bytes())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pooled_registration_spends_its_token_and_hands_the_agent_the_next() {
    let recording = RecordingProvider::new();
    let pool = std::sync::Arc::new(
        PooledProvider::new(
            recording.as_provider(),
            PoolConfig::new(2).hold(Duration::from_millis(300)),
        )
        .expect("pool settings"),
    );
    let engine = TestEngine::start_with(|config| config.pooled_provider(pool.clone())).await;
    let project = Project::new(&local_yml(1, "")).script("#!/bin/sh\necho hi\n");
    let first_id = engine.deploy(project.path()).await;
    // What the instance's user data would hold: the token the pool launched it with.
    let launched = recording.wait_for_provisioned(POOL_SLOTS, 1).await;
    let user_data_token = launched[0].provision_token.clone();

    let answer = register(&engine, &user_data_token).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let work: RegisterResponse = serde_json::from_slice(&answer.body).expect("a work order");
    assert!(work.pooled);
    assert_eq!(work.deployment_id, first_id);
    let next = work
        .next_token
        .clone()
        .expect("a pooled answer hands the next token");
    assert_ne!(next, user_data_token);
    assert!(next.len() >= 32, "{next}");

    // The user data's token is spent: a script that read it gets nothing.
    let stolen = register(&engine, &user_data_token).await;
    assert_eq!(stolen.status, 401, "{}", stolen.text());

    // The node runs and completes; its agent comes back with the new token: no work yet.
    let node = Client::new(&engine.url, Some(work.auth_token.clone())).expect("client");
    for state in ["downloading_assets", "running_script", "completed"] {
        let request = StatusRequest {
            status: state.parse().expect("a node status"),
            message: None,
            exit_code: (state == "completed").then_some(0),
        };
        node.report_status(&request).await.expect("status");
    }
    assert_eq!(
        wait_final(&engine, &first_id).await.status.as_str(),
        "completed"
    );
    let back = register(&engine, &next).await;
    assert_eq!(back.status, 204, "{}", back.text());

    // The next deployment's node goes to this instance, through the same token.
    let second_id = engine.deploy(project.path()).await;
    let answer = register(&engine, &next).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let work: RegisterResponse = serde_json::from_slice(&answer.body).expect("a work order");
    assert_eq!(work.deployment_id, second_id);
    let after = work.next_token.expect("another next token");
    assert_ne!(after, next);
    assert_eq!(register(&engine, &next).await.status, 401, "spent in turn");
    assert_eq!(
        recording.provisioned().len(),
        1,
        "one instance served both deployments"
    );
    engine.stop().await;
}
