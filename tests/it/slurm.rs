//! Nodes as Slurm array tasks (`cloud_provider: slurm`, SPEC §1 and §6): a real `taskflyd`
//! submitting to the one-machine Slurm cluster `scripts/test-slurm.sh` starts (munged,
//! slurmctld and slurmd; `SLURM_CONF` names its configuration). The tasks are real processes
//! run by slurmd, running the shell bootstrap, calling the daemon back over real HTTP.
//!
//! Every test has its own daemon (so its own owner id: no daemon's leak check touches another
//! test's jobs) and its own deployments; the checks of Slurm's queue and of /proc keep to the
//! test's deployment and marker, so the tests may run in parallel.
//!
//! Nothing here waits by sleeping: the CLI waits (`up --wait`, `down`), or a bounded poll of
//! `status`, `squeue` or /proc does. With `TASKFLY_REQUIRE_SLURM=1` a missing or unusable
//! Slurm fails these tests; without it they say they were not run and pass.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::cli_daemon::{free_port, nodes, path_str, unique_word, Daemon, DaemonOptions};
use crate::support::cli_run::{self, poll};
use crate::support::{marker_metadata, processes_with_env, Project};

/// How long a deployment of this file may take on the shared test machine.
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(240);
/// How long the 200-node deployment may take: 200 bootstraps on a two-core machine.
const LARGE_DEPLOYMENT_LIMIT: Duration = Duration::from_secs(600);
/// How long jobs and processes may take to disappear once stopped.
const CLEANUP_LIMIT: Duration = Duration::from_secs(60);
/// How often `status`, `squeue` and /proc are polled.
const POLL: Duration = Duration::from_millis(200);

/// Whether the Slurm tests can run; panics when the test script asked for them and Slurm is
/// missing or runs no job.
fn slurm_available(test: &str) -> bool {
    let required = std::env::var("TASKFLY_REQUIRE_SLURM").is_ok_and(|v| v == "1");
    static USABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let usable = USABLE.get_or_init(|| {
        if std::env::var_os("SLURM_CONF").is_none() {
            return Err("SLURM_CONF is not set".to_owned());
        }
        let output = Command::new("sinfo")
            .args(["--noheader", "--format=%P %a"])
            .output()
            .map_err(|e| format!("cannot run sinfo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "sinfo failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    });
    match usable {
        Ok(()) => true,
        Err(problem) => {
            assert!(
                !required,
                "TASKFLY_REQUIRE_SLURM=1 but the test Slurm cluster is unusable: {problem}; \
                 start it with scripts/test-slurm.sh (scripts/test.sh does)"
            );
            eprintln!("{test}: NOT RUN: no test Slurm cluster ({problem}); run scripts/test.sh");
            false
        }
    }
}

/// A Slurm deployment of `count` nodes running `script`, with `nodes_extra` lines under
/// `nodes:` and `slurm_extra` lines under `instance_config.slurm:`.
fn slurm_project(count: u32, nodes_extra: &str, slurm_extra: &str, script: &str) -> Project {
    let mut yml = format!(
        "cloud_provider: slurm\napplication_files: [setup.sh]\nremote_script_to_run: setup.sh\n\
         nodes:\n  count: {count}\n"
    );
    for line in nodes_extra.lines() {
        yml.push_str(&format!("  {line}\n"));
    }
    yml.push_str("instance_config:\n  slurm:\n    partition: debug\n    time_limit: '10'\n");
    for line in slurm_extra.lines() {
        yml.push_str(&format!("    {line}\n"));
    }
    Project::new(&yml).script(script)
}

/// The array tasks Slurm still lists for deployment `id`, as `<job>_<task> <state>`.
fn jobs_of(id: &str) -> Vec<String> {
    let output = Command::new("squeue")
        .args(["--noheader", "--array", "--format=%i|%T|%k"])
        .output()
        .expect("run squeue");
    assert!(
        output.status.success(),
        "squeue: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tag = format!(";deployment={id};");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&tag))
        .map(|line| line.split('|').take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Waits until Slurm lists no task of `id` and no process carries `env_marker`.
#[track_caller]
fn wait_until_nothing_left(id: &str, env_marker: &str) {
    poll(
        CLEANUP_LIMIT,
        POLL,
        "no Slurm task and no process left",
        || (jobs_of(id).is_empty() && processes_with_env(env_marker).is_empty()).then_some(()),
    );
}

fn deployment_id(view: &serde_json::Value) -> String {
    view["deployment_id"]
        .as_str()
        .expect("deployment_id")
        .to_owned()
}

/// The deployment `id` once every node's instance is recorded: a task can run to its end
/// before the `squeue` poll that sees it leave the queue, so the deployment can be final
/// moments before its last instance ids are.
#[track_caller]
fn with_every_instance(daemon: &Daemon, id: &str) -> serde_json::Value {
    daemon.wait_for_status(
        id,
        CLEANUP_LIMIT,
        "every node's instance recorded",
        |view| nodes(view).iter().all(|n| n["instance_id"].is_string()),
    )
}

/// The array job id of a node's instance (`<job>_<task>`).
fn job_of(node: &serde_json::Value) -> String {
    let instance = node["instance_id"].as_str().expect("instance_id");
    let (job, task) = instance.split_once('_').expect("a Slurm task id");
    assert_eq!(
        task,
        node["node_index"].to_string(),
        "node i is task i: {node:#}"
    );
    job.to_owned()
}

#[test]
fn a_200_node_deployment_is_one_array_with_every_slice_and_log_line() {
    if !slurm_available("a_200_node_deployment_is_one_array_with_every_slice_and_log_line") {
        return;
    }
    let daemon = Daemon::start();
    let marker = unique_word();
    let shards: Vec<String> = (0..200).map(|i| format!("s{i:03}")).collect();
    let project = slurm_project(
        200,
        &format!(
            "{}\ndistributed_lists:\n  shard: [{}]",
            marker_metadata(&marker),
            shards.join(", ")
        ),
        "",
        "#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX has shard $SHARD\"\necho \"task $SLURM_ARRAY_TASK_ID\"\n",
    );
    let view = daemon.up_wait_json(project.path(), 0, LARGE_DEPLOYMENT_LIMIT);
    let id = deployment_id(&view);
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["nodes_completed"], 200, "{view:#}");
    let view = with_every_instance(&daemon, &id);
    let jobs: std::collections::BTreeSet<String> = nodes(&view).iter().map(job_of).collect();
    assert_eq!(jobs.len(), 1, "one job array for the deployment: {jobs:?}");

    let logs = daemon.cli(&["logs", &id]);
    logs.expect_success();
    for (index, shard) in shards.iter().enumerate() {
        for line in [
            format!("[node {index}] node {index} has shard {shard}"),
            format!("[node {index}] task {index}"),
        ] {
            assert!(
                logs.stdout.lines().any(|l| l == line),
                "no line {line:?}\n{}",
                logs.show()
            );
        }
    }
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
}

#[test]
fn down_mid_run_leaves_no_job_and_no_process_even_a_daemonised_one() {
    if !slurm_available("down_mid_run_leaves_no_job_and_no_process_even_a_daemonised_one") {
        return;
    }
    let daemon = Daemon::start();
    let marker = unique_word();
    let env_marker = format!("MARKER={marker}");
    // The inner sleep leaves the script's session and its parent exits: init adopts it, and
    // proctrack/linuxproc loses it.
    let project = slurm_project(
        3,
        &marker_metadata(&marker),
        "",
        "#!/bin/sh\nsetsid sh -c 'sleep 600 & exit 0'\necho \"sleeping on node $TASKFLY_NODE_INDEX\"\nsleep 600\n",
    );
    let id = daemon.up(project.path());
    poll(
        DEPLOYMENT_LIMIT,
        POLL,
        "every node running both sleeps",
        || {
            let view = daemon.status(&id);
            let running = nodes(&view).iter().all(|n| n["status"] == "running_script");
            (running && processes_with_env(&env_marker).len() >= 6).then_some(())
        },
    );
    assert_eq!(jobs_of(&id).len(), 3, "{:?}", jobs_of(&id));

    daemon.down(&id, CLEANUP_LIMIT);
    let view = daemon.status(&id);
    assert_eq!(view["status"], "terminated", "{view:#}");
    wait_until_nothing_left(&id, &env_marker);
}

#[test]
fn a_failing_task_is_retried_alone() {
    if !slurm_available("a_failing_task_is_retried_alone") {
        return;
    }
    let daemon = Daemon::start();
    let marker = unique_word();
    let flags = tempfile::tempdir().expect("flag dir");
    let flag = flags.path().join("failed-once");
    let project = slurm_project(
        3,
        &format!("retries: 1\n{}", marker_metadata(&marker)),
        "",
        &format!(
            "#!/bin/sh\nif [ \"$TASKFLY_NODE_INDEX\" = 1 ] && ! [ -e '{0}' ]; then touch '{0}'; echo failing; exit 3; fi\necho \"done on node $TASKFLY_NODE_INDEX\"\n",
            flag.display()
        ),
    );
    let view = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    let id = deployment_id(&view);
    assert_eq!(view["status"], "completed", "{view:#}");
    let view = with_every_instance(&daemon, &id);
    let nodes = nodes(&view);
    assert_eq!(nodes[0]["attempt"], 1, "{view:#}");
    assert_eq!(nodes[1]["attempt"], 2, "{view:#}");
    assert_eq!(nodes[2]["attempt"], 1, "{view:#}");
    assert_eq!(job_of(&nodes[0]), job_of(&nodes[2]), "{view:#}");
    assert_ne!(
        job_of(&nodes[1]),
        job_of(&nodes[0]),
        "the retry is a job of its own: {view:#}"
    );
    let logs = daemon.cli(&["logs", &id]);
    logs.expect_success();
    assert!(
        logs.stdout
            .lines()
            .any(|l| l == "[node 1 attempt 2] done on node 1"),
        "{}",
        logs.show()
    );
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
}

#[test]
fn every_node_completes_across_a_daemon_kill_and_restart() {
    if !slurm_available("every_node_completes_across_a_daemon_kill_and_restart") {
        return;
    }
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let marker = unique_word();
    let gates = tempfile::tempdir().expect("gate dir");
    let gate = gates.path().join("go");
    let project = slurm_project(
        3,
        &marker_metadata(&marker),
        "",
        &format!(
            "#!/bin/sh\necho \"waiting on node $TASKFLY_NODE_INDEX\"\nwhile ! [ -e '{}' ]; do sleep 0.2; done\necho \"finished node $TASKFLY_NODE_INDEX\"\n",
            gate.display()
        ),
    );
    let id = daemon.up(project.path());
    let running = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "every node running", |view| {
        nodes(view).iter().all(|n| n["status"] == "running_script")
    });
    daemon.kill();
    daemon.restart();
    std::fs::write(&gate, "go").expect("open the gate");
    let view = wait_for_end(&daemon, &id);
    assert_eq!(view["status"], "completed", "{view:#}");
    for (before, after) in nodes(&running).iter().zip(nodes(&view)) {
        assert_eq!(after["attempt"], 1, "{view:#}");
        assert_eq!(before["instance_id"], after["instance_id"], "{view:#}");
    }
    let logs = daemon.cli(&["logs", &id]);
    for index in 0..3 {
        let line = format!("[node {index}] finished node {index}");
        assert!(logs.stdout.lines().any(|l| l == line), "{}", logs.show());
    }
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
}

#[test]
fn the_leak_check_cancels_a_job_whose_deployment_the_restarted_daemon_does_not_know() {
    if !slurm_available(
        "the_leak_check_cancels_a_job_whose_deployment_the_restarted_daemon_does_not_know",
    ) {
        return;
    }
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let marker = unique_word();
    let env_marker = format!("MARKER={marker}");
    let project = slurm_project(
        1,
        &marker_metadata(&marker),
        "",
        "#!/bin/sh\necho sleeping\nsleep 600\n",
    );
    let id = daemon.up(project.path());
    daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "the node running", |view| {
        nodes(view).iter().all(|n| n["status"] == "running_script")
    });
    daemon.kill();
    // The daemon's state is lost while it is down: its deployment ended as far as it can
    // tell. Its id stays, so the job is still its own.
    for name in ["state.db", "state.db-wal", "state.db-shm"] {
        let path = daemon.data_dir.path().join(name);
        if path.exists() {
            std::fs::remove_file(&path).expect("remove the state");
        }
    }
    assert_eq!(jobs_of(&id).len(), 1);
    daemon.restart();
    wait_until_nothing_left(&id, &env_marker);
    assert!(
        daemon
            .stderr_lines()
            .iter()
            .any(|line| line.contains("terminating a leaked instance")),
        "{}",
        daemon.stderr_lines().join("\n")
    );
}

#[test]
fn a_bad_partition_fails_the_nodes_with_sbatchs_message() {
    if !slurm_available("a_bad_partition_fails_the_nodes_with_sbatchs_message") {
        return;
    }
    let daemon = Daemon::start();
    let project = Project::new(
        "cloud_provider: slurm\napplication_files: [setup.sh]\nremote_script_to_run: setup.sh\n\
         nodes:\n  count: 2\ninstance_config:\n  slurm:\n    partition: no-such-partition\n",
    )
    .script("#!/bin/sh\necho never\n");
    let view = daemon.up_wait_json(project.path(), 1, DEPLOYMENT_LIMIT);
    assert_eq!(view["status"], "failed", "{view:#}");
    for node in nodes(&view) {
        assert_eq!(node["status"], "failed", "{node:#}");
        let message = node["error_message"].as_str().unwrap_or_default();
        assert!(
            message.contains("Invalid partition name specified"),
            "{node:#}"
        );
    }
}

#[test]
fn a_time_limit_over_the_partitions_fails_the_node_with_slurms_reason() {
    if !slurm_available("a_time_limit_over_the_partitions_fails_the_node_with_slurms_reason") {
        return;
    }
    let daemon = Daemon::start();
    // The test cluster's partition `short` allows 5 minutes.
    let project = Project::new(
        "cloud_provider: slurm\napplication_files: [setup.sh]\nremote_script_to_run: setup.sh\n\
         nodes:\n  count: 1\ninstance_config:\n  slurm:\n    partition: short\n    time_limit: '30'\n",
    )
    .script("#!/bin/sh\necho never\n");
    let view = daemon.up_wait_json(project.path(), 1, DEPLOYMENT_LIMIT);
    let id = deployment_id(&view);
    assert_eq!(view["status"], "failed", "{view:#}");
    let message = nodes(&view)[0]["error_message"]
        .as_str()
        .unwrap_or_default();
    // Slurm names the partition's limit, or its configuration as a whole.
    assert!(
        message.contains("Slurm will not start task")
            && (message.contains("PartitionTimeLimit") || message.contains("PartitionConfig")),
        "{view:#}"
    );
    poll(CLEANUP_LIMIT, POLL, "the task cancelled", || {
        jobs_of(&id).is_empty().then_some(())
    });
}

#[test]
fn a_held_node_shows_provisioning_with_slurms_reason_until_released() {
    if !slurm_available("a_held_node_shows_provisioning_with_slurms_reason_until_released") {
        return;
    }
    let daemon = Daemon::start();
    let marker = unique_word();
    let project = slurm_project(
        2,
        &marker_metadata(&marker),
        "extra_args: ['--hold']",
        "#!/bin/sh\necho \"ran node $TASKFLY_NODE_INDEX\"\n",
    );
    let id = daemon.up(project.path());
    let view = daemon.wait_for_status(&id, DEPLOYMENT_LIMIT, "a queue reason", |view| {
        nodes(view)
            .iter()
            .all(|n| n["queue_reason"].as_str().is_some())
    });
    for node in nodes(&view) {
        assert_eq!(node["status"], "provisioning", "{view:#}");
        assert_eq!(node["queue_reason"], "JobHeldUser", "{view:#}");
    }
    let job = jobs_of(&id)[0]
        .split('_')
        .next()
        .expect("job id")
        .to_owned();
    let released = Command::new("scontrol")
        .args(["release", &job])
        .output()
        .expect("run scontrol");
    assert!(released.status.success(), "{released:?}");
    let view = wait_for_end(&daemon, &id);
    assert_eq!(view["status"], "completed", "{view:#}");
    for node in nodes(&view) {
        assert!(node.get("queue_reason").is_none(), "{view:#}");
    }
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
}

/// Polls `status` until the deployment has ended.
#[track_caller]
fn wait_for_end(daemon: &Daemon, id: &str) -> serde_json::Value {
    daemon.wait_for_status(id, DEPLOYMENT_LIMIT, "the deployment's end", |view| {
        ["completed", "failed", "terminated"].contains(&view["status"].as_str().unwrap_or(""))
    })
}

#[test]
fn taskfly_run_refuses_slurm_with_a_hint() {
    let project = slurm_project(1, "", "", "#!/bin/sh\necho never\n");
    let home = tempfile::tempdir().expect("home");
    let ran = cli_run::run(
        cli_run::command("taskfly", home.path())
            .arg("run")
            .arg(path_str(project.path())),
    );
    ran.expect_code(2);
    assert!(
        ran.stderr.contains("cloud_provider: slurm"),
        "{}",
        ran.show()
    );
    assert!(ran.stderr.contains("--advertise-url"), "{}", ran.show());
    // A URL without a port says what to give instead; nothing is submitted either way.
    let ran = cli_run::run(
        cli_run::command("taskfly", home.path())
            .args(["run", "--advertise-url", "http://127.0.0.1"])
            .arg(path_str(project.path())),
    );
    ran.expect_code(2);
    assert!(
        ran.stderr.contains("names no port") && ran.stderr.contains("--listen"),
        "{}",
        ran.show()
    );
    assert!(
        !home.path().join(".taskfly").exists(),
        "nothing was made for a refused run"
    );
}

/// `taskfly run --advertise-url URL --listen ADDR DIR` (plus `extra`) started in `cwd`, with
/// `home` as its home folder.
fn taskfly_run_slurm(
    home: &std::path::Path,
    cwd: &std::path::Path,
    project: &Project,
    extra: &[&str],
) -> Command {
    let port = free_port();
    let mut command = cli_run::command("taskfly", home);
    command
        .current_dir(cwd)
        .args(["run", "--advertise-url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .arg(path_str(project.path()));
    command
}

/// The runs' data folders left under `home`'s `~/.taskfly` (the default for Slurm).
fn run_folders_left(home: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(home.join(".taskfly"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn taskfly_run_with_an_advertise_url_runs_a_slurm_project_and_collects_its_outputs() {
    if !slurm_available(
        "taskfly_run_with_an_advertise_url_runs_a_slurm_project_and_collects_its_outputs",
    ) {
        return;
    }
    let marker = unique_word();
    let project = slurm_project(
        3,
        &marker_metadata(&marker),
        "",
        "#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX as task $SLURM_ARRAY_TASK_ID\"\necho \"result of $TASKFLY_NODE_INDEX\" >result.txt\n",
    );
    // Each node sends its result.txt back (`outputs:` is a top-level key).
    let yml_path = project.path().join("taskfly.yml");
    let yml = std::fs::read_to_string(&yml_path).expect("read taskfly.yml");
    std::fs::write(&yml_path, format!("{yml}outputs: [result.txt]\n")).expect("write taskfly.yml");
    let home = tempfile::tempdir().expect("home");
    let cwd = tempfile::tempdir().expect("working folder");
    let ran = cli_run::run_with_limit(
        &mut taskfly_run_slurm(home.path(), cwd.path(), &project, &[]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    for index in 0..3 {
        let line = format!("[node {index}] node {index} as task {index}");
        assert!(ran.stdout.lines().any(|l| l == line), "{}", ran.show());
    }
    // The outputs, in ./<deployment id>/node-<i>/ of the folder it ran in.
    let collected: Vec<std::path::PathBuf> = std::fs::read_dir(cwd.path())
        .expect("working folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(collected.len(), 1, "{collected:?}\n{}", ran.show());
    let id = collected[0]
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a deployment folder")
        .to_owned();
    assert!(id.starts_with("dep-"), "{id}");
    for index in 0..3 {
        let result = std::fs::read_to_string(
            collected[0]
                .join(format!("node-{index}"))
                .join("result.txt"),
        )
        .unwrap_or_else(|e| panic!("node {index}'s result: {e}\n{}", ran.show()));
        assert_eq!(result, format!("result of {index}\n"));
    }
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
    assert!(
        run_folders_left(home.path()).is_empty(),
        "the run's data folder is removed: {:?}",
        run_folders_left(home.path())
    );
}

#[test]
fn ctrl_c_stops_a_taskfly_run_on_slurm_leaving_no_job_and_no_process() {
    if !slurm_available("ctrl_c_stops_a_taskfly_run_on_slurm_leaving_no_job_and_no_process") {
        return;
    }
    let marker = unique_word();
    let env_marker = format!("MARKER={marker}");
    let project = slurm_project(
        2,
        &marker_metadata(&marker),
        "",
        "#!/bin/sh\necho \"sleeping on node $TASKFLY_NODE_INDEX\"\nsleep 600\n",
    );
    let home = tempfile::tempdir().expect("home");
    let cwd = tempfile::tempdir().expect("working folder");
    let data = tempfile::tempdir().expect("data folder");
    let mut running = cli_run::Running::start(&mut taskfly_run_slurm(
        home.path(),
        cwd.path(),
        &project,
        &["--data-dir", path_str(data.path()), "--output", "json"],
    ));
    // With --output json the node lines go to stderr.
    let mut sleeping = std::collections::BTreeSet::new();
    while sleeping.len() < 2 {
        let line =
            running.wait_for_stderr_line(DEPLOYMENT_LIMIT, |l| l.contains("sleeping on node"));
        sleeping.insert(line);
    }
    poll(DEPLOYMENT_LIMIT, POLL, "both scripts running", || {
        (processes_with_env(&env_marker).len() >= 2).then_some(())
    });
    running.signal(nix::sys::signal::Signal::SIGINT);
    let ran = running.finish(CLEANUP_LIMIT);
    ran.expect_code(1);
    let view = ran.json();
    assert_eq!(view["status"], "terminated", "{view:#}");
    wait_until_nothing_left(&deployment_id(&view), &env_marker);
    let left: Vec<_> = std::fs::read_dir(data.path())
        .expect("data folder")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the run's data folder is removed: {left:?}"
    );
}

/// A `bin_dir` of wrappers around the real Slurm client commands, where `sbatch` and `squeue`
/// each fail their first `failures` calls exactly as they do while slurmctld is down, and
/// count their calls.
struct ControllerDownAtFirst {
    dir: tempfile::TempDir,
}

impl ControllerDownAtFirst {
    fn new(failures: u32) -> ControllerDownAtFirst {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("bin dir");
        let real = |program: &str| {
            let output = Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .expect("run sh");
            let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            assert!(
                output.status.success() && path.starts_with('/'),
                "no {program} on PATH"
            );
            path
        };
        let failing_at_first = |program: &str, what: &str| {
            format!(
                "#!/bin/sh\nn=$(($(cat '{count}' 2>/dev/null || echo 0) + 1))\necho $n >'{count}'\n\
                 if [ $n -le {failures} ]; then\n  cat >/dev/null\n  \
                 echo '{program}: error: {what}Unable to contact slurm controller (connect failure)' >&2\n  \
                 exit 1\nfi\nexec '{real}' \"$@\"\n",
                count = dir.path().join(format!("{program}.calls")).display(),
                real = real(program),
            )
        };
        for (name, text) in [
            (
                "sbatch",
                failing_at_first("sbatch", "Batch job submission failed: "),
            ),
            ("squeue", failing_at_first("squeue", "")),
            (
                "scancel",
                format!("#!/bin/sh\nexec '{}' \"$@\"\n", real("scancel")),
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a wrapper");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make it executable");
        }
        ControllerDownAtFirst { dir }
    }

    /// How many times `program` (sbatch or squeue) was called.
    fn calls(&self, program: &str) -> u32 {
        std::fs::read_to_string(self.dir.path().join(format!("{program}.calls")))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

#[test]
fn a_controller_that_is_down_at_first_is_waited_for_and_every_node_completes() {
    if !slurm_available("a_controller_that_is_down_at_first_is_waited_for_and_every_node_completes")
    {
        return;
    }
    const FAILURES: u32 = 2;
    let wrappers = ControllerDownAtFirst::new(FAILURES);
    let daemon = Daemon::start();
    let marker = unique_word();
    let project = slurm_project(
        3,
        &marker_metadata(&marker),
        &format!("bin_dir: {}", path_str(wrappers.dir.path())),
        "#!/bin/sh\necho \"done on node $TASKFLY_NODE_INDEX\"\n",
    );
    let view = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    let id = deployment_id(&view);
    assert_eq!(view["status"], "completed", "{view:#}");
    // The failed submissions were tried again: every node's first tries, gathered into one or
    // more arrays once the controller answered; squeue, failing while the tasks waited, was
    // asked again, and nothing more was submitted for it.
    let calls = wrappers.calls("sbatch");
    assert!(
        calls > FAILURES && calls <= FAILURES + 3,
        "sbatch was called {calls} times"
    );
    // A task can end before the squeue call that sees it start: wait for every instance.
    let view = with_every_instance(&daemon, &id);
    let calls = wrappers.calls("squeue");
    assert!(calls > FAILURES, "squeue was called {calls} times");
    // Nothing failed as far as the nodes can tell.
    assert!(view.get("retries").is_none(), "{view:#}");
    for node in nodes(&view) {
        assert_eq!(node["status"], "completed", "{view:#}");
        assert_eq!(node["attempt"], 1, "{view:#}");
        assert!(node.get("error_message").is_none(), "{view:#}");
    }
    let logs = daemon.cli(&["logs", &id]);
    logs.expect_success();
    for index in 0..3 {
        let line = format!("[node {index}] done on node {index}");
        assert!(logs.stdout.lines().any(|l| l == line), "{}", logs.show());
    }
    assert!(
        !logs.stdout.contains("Unable to contact"),
        "{}",
        logs.show()
    );
    wait_until_nothing_left(&id, &format!("MARKER={marker}"));
}
