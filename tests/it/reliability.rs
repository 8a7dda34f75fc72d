//! Issue 11, "nothing fails because of the daemon": black-box tests against the real binaries
//! (`taskflyd` with agent processes, `taskfly`), real HTTP on 127.0.0.1, files and /proc. They
//! use no Rust API of the crate, so they hold across its redesign.
//!
//! Nothing waits by sleeping: the test polls `taskfly status`, the daemon's log or /proc with a
//! deadline. Scripts that must outlive a step wait (bounded) for a file the test writes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::chaos::{self, BareDaemon, Started};
use crate::support::cli_daemon::{free_port, nodes, path_str, unique_word, Daemon, DaemonOptions};
use crate::support::cli_run;
use crate::support::{agent_yml, local_yml, Project};

/// Nodes in the chaos test.
const CHAOS_NODES: u32 = 300;
/// When the chaos test kills the daemon, in order: one `kill -9` and restart each.
const CHAOS_KILLS: [Phase; 3] = [Phase::Provisioning, Phase::Registration, Phase::Running];
/// How long each phase of the chaos test may take to come (300 debug-build agent processes
/// start in about a minute on two shared cores).
const CHAOS_LIMIT: Duration = Duration::from_secs(150);
/// Lines each chaos node prints before and after its gate opens.
const CHAOS_LINES_BEFORE: u32 = 3;
const CHAOS_LINES_AFTER: u32 = 2;

/// How long one deployment of this file may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(90);

/// Prints `started`, waits (at most 60 s) for the file `$GATE/go`, prints `done`.
const GATED_SCRIPT: &str = r#"#!/bin/sh
echo started
waited=0
while [ ! -e "$GATE/go" ] && [ "$waited" -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
echo done
"#;

/// A phase of a deployment, as the API shows it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Some nodes have an instance, some are still waiting for theirs.
    Provisioning,
    /// Some agents have started but not yet registered or fetched their bundle.
    Registration,
    /// Every node runs its script (held at its gate).
    Running,
}

fn statuses(view: &serde_json::Value) -> Vec<&str> {
    nodes(view)
        .iter()
        .map(|node| node["status"].as_str().expect("status"))
        .collect()
}

fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "terminated")
}

/// Whether `view` is in `phase` (for [`Phase::Running`]: every node runs or has ended).
fn in_phase(view: &serde_json::Value, phase: Phase) -> bool {
    let statuses = statuses(view);
    match phase {
        Phase::Provisioning => {
            statuses.iter().any(|s| *s != "pending")
                && statuses
                    .iter()
                    .any(|s| matches!(*s, "pending" | "provisioning"))
        }
        Phase::Registration => statuses
            .iter()
            .any(|s| matches!(*s, "booting" | "registering" | "downloading_assets")),
        Phase::Running => statuses
            .iter()
            .all(|s| *s == "running_script" || is_final(s)),
    }
}

/// A project of `count` local nodes run by `agent`, running `script`, the folder `gate` given
/// to each as `$GATE`.
fn gated_project(count: u32, agent: &str, gate: &Path, script: &str) -> Project {
    Project::new(&agent_yml(
        agent,
        count,
        &format!("global_metadata: {{gate: \"{}\"}}", path_str(gate)),
    ))
    .script(script)
}

/// Opens the gate of [`GATED_SCRIPT`].
fn open_gate(gate: &Path) {
    std::fs::write(gate.join("go"), "").expect("open the gate");
}

#[track_caller]
fn wait_until_all(daemon: &Daemon, id: &str, status: &str) -> serde_json::Value {
    daemon.wait_for_status(id, DEPLOYMENT_LIMIT, status, |view| {
        statuses(view).iter().all(|s| *s == status)
    })
}

#[track_caller]
fn wait_until_final(daemon: &Daemon, id: &str) -> serde_json::Value {
    daemon.wait_for_status(id, DEPLOYMENT_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    })
}

/// Asserts that every node completed; shows every node that did not.
#[track_caller]
fn assert_all_completed(view: &serde_json::Value) {
    let unfinished: Vec<String> = nodes(view)
        .iter()
        .filter(|node| node["status"] != "completed")
        .map(|node| {
            format!(
                "node {} {}: {}",
                node["node_index"], node["status"], node["error_message"]
            )
        })
        .collect();
    assert!(
        unfinished.is_empty(),
        "{} of {} nodes did not complete:\n{}",
        unfinished.len(),
        nodes(view).len(),
        unfinished.join("\n")
    );
}

// ----- 1: a lost answer fails no node -----

/// 300 nodes on this machine, the daemon killed while they are provisioned, while they
/// register, and while their scripts run (which then finish with no daemon listening).
///
/// The scripts wait for their gate polling once a second, and the heartbeat timeout is 20 s:
/// 300 scripts polling ten times a second forked 3,000 `sleep`s a second, which on 2 loaded
/// cores starved the daemon of the CPU to answer heartbeats (CI saw 12 nodes failed by their
/// heartbeat timeout). What is tested is the crashes, not a machine run out of CPU.
#[test]
fn chaos_every_node_completes_and_every_line_is_stored_once_across_three_daemon_crashes() {
    let script = format!(
        r#"#!/bin/sh
i=1
while [ "$i" -le {before} ]; do echo "n$TASKFLY_NODE_INDEX line $i"; i=$((i + 1)); done
waited=0
while [ ! -e "$GATE/go" ] && [ "$waited" -lt 120 ]; do sleep 1; waited=$((waited + 1)); done
while [ "$i" -le {all} ]; do echo "n$TASKFLY_NODE_INDEX line $i"; i=$((i + 1)); done
"#,
        before = CHAOS_LINES_BEFORE,
        all = CHAOS_LINES_BEFORE + CHAOS_LINES_AFTER
    );
    let started = Instant::now();
    let port = free_port();
    let mut daemon = Daemon::start_on(
        port,
        DaemonOptions::default(),
        &["--heartbeat-timeout", "20s"],
    );
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(CHAOS_NODES, "rust", gate.path(), &script);
    let id = daemon.up(project.path());

    for phase in CHAOS_KILLS {
        let seen = daemon.wait_for_status(&id, CHAOS_LIMIT, &format!("{phase:?}"), |view| {
            in_phase(view, phase)
        });
        daemon.kill();
        eprintln!(
            "killed taskflyd during {phase:?} after {:?}: {:?}",
            started.elapsed(),
            count_statuses(&seen)
        );
        if matches!(phase, Phase::Running) {
            // The scripts finish while no daemon listens; their agents hold the rest.
            open_gate(gate.path());
        }
        daemon.restart();
    }
    open_gate(gate.path());

    let done = daemon.wait_for_status(&id, CHAOS_LIMIT, "the deployment to end", |view| {
        view["status"] != "running"
    });
    let failed: Vec<String> = nodes(&done)
        .iter()
        .filter(|node| node["status"] != "completed")
        .map(|node| {
            let index = u32::try_from(node["node_index"].as_u64().expect("node_index"))
                .expect("index fits u32");
            format!(
                "node {index} {}: {}; its agent said last: {}",
                node["status"],
                node["error_message"],
                chaos::agent_log_tail(&daemon, &id, index)
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {CHAOS_NODES} nodes did not complete:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let by_node = chaos::lines_by_node(&daemon, &id);
    let mut wrong = Vec::new();
    for index in 0..CHAOS_NODES {
        let expected: Vec<String> = (1..=CHAOS_LINES_BEFORE + CHAOS_LINES_AFTER)
            .map(|i| format!("n{index} line {i}"))
            .collect();
        let stored: Vec<&str> = by_node
            .get(&u64::from(index))
            .map(|lines| chaos::stdout(lines))
            .unwrap_or_default();
        if stored != expected {
            wrong.push(format!("node {index}: {stored:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} nodes' lines are not each stored exactly once:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    eprintln!("chaos test took {:?}", started.elapsed());
}

fn count_statuses(view: &serde_json::Value) -> std::collections::BTreeMap<&str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for status in statuses(view) {
        *counts.entry(status).or_insert(0) += 1;
    }
    counts
}

// ----- 2: one daemon per data dir -----

#[test]
fn a_second_daemon_on_the_same_data_dir_exits_1_naming_the_first_and_its_nodes_complete() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(2, "rust", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let first_pid = daemon.pid().expect("daemon pid").to_string();

    let (second, started) = BareDaemon::start(daemon.data_dir.path(), &[], &[]);
    match started {
        Started::Exited(status) => {
            assert_eq!(status.code(), Some(1), "{:?}", second.stderr_lines());
            let said = second.stderr_lines().join("\n");
            assert!(
                said.contains(&first_pid),
                "the second daemon names the first one's pid {first_pid}:\n{said}"
            );
        }
        Started::Listening(url) => panic!(
            "a second taskflyd on the data dir of the running one (pid {first_pid}) started \
             serving on {url} instead of exiting 1"
        ),
    }
    drop(second);

    open_gate(gate.path());
    let done = wait_until_final(&daemon, &id);
    assert_all_completed(&done);
}

// ----- 3: SIGTERM is not the end of a deployment -----

#[test]
fn sigterm_while_a_node_waits_to_retry_provisioning_does_not_fail_it() {
    // An SSH host where nothing listens: ssh says "Connection refused", which the provider
    // reports as retryable, so the node waits between provisioning attempts.
    let closed_port = free_port();
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let project = Project::new(&format!(
        "{}instance_config:\n  local:\n    hosts: [127.0.0.1]\n    ssh_user: nobody\n    \
         ssh_port: {closed_port}\n    agent: script\n",
        local_yml(1, "")
    ))
    .script(GATED_SCRIPT);
    let id = daemon.up(project.path());
    chaos::wait_for_log(
        &daemon,
        DEPLOYMENT_LIMIT,
        &["provider call failed; retrying", "Connection refused"],
    );

    let stopped = daemon.shut_down();
    assert!(
        stopped.success(),
        "SIGTERM ends taskflyd cleanly: {stopped:?}"
    );
    let lines_before_restart = daemon.stderr_lines().len();
    daemon.restart();
    let view = daemon.status(&id);
    let node = &nodes(&view)[0];
    assert_ne!(
        node["status"], "failed",
        "a daemon shutdown failed a node that was waiting to retry provisioning: {node:#}"
    );
    // The node never got an instance, so its deployment is still provisioning (not failed).
    assert_eq!(view["status"], "provisioning", "{view:#}");
    // ...and the restarted daemon provisions it again.
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        Duration::from_millis(50),
        "a provisioning try after the restart",
        || {
            daemon.stderr_lines()[lines_before_restart..]
                .iter()
                .find(|line| line.contains("provider call failed; retrying"))
                .cloned()
        },
    );
}

// ----- 4: heartbeat timeouts below 2 s -----

#[test]
fn a_heartbeat_timeout_below_two_seconds_does_not_fail_healthy_nodes() {
    let daemon =
        Daemon::start_with_args(DaemonOptions::default(), &["--heartbeat-timeout", "800ms"]);
    let project =
        Project::new(&local_yml(2, "")).script("#!/bin/sh\necho started\nsleep 5\necho done\n");
    let view = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
    assert_all_completed(&view);
}

// ----- 6: slow clients -----

/// More connections than the daemon's 4096 connection slots.
const SLOW_CONNECTIONS: usize = 4100;

#[test]
fn slow_body_connections_without_a_token_starve_neither_heartbeats_nor_the_cli() {
    let limit = chaos::open_files_limit();
    assert!(
        limit >= SLOW_CONNECTIONS as u64 + 512,
        "this test opens {SLOW_CONNECTIONS} connections, but the open-files limit is {limit}: \
         raise it (ulimit -n) to run it"
    );
    let daemon = Daemon::start_with_args(DaemonOptions::default(), &["--heartbeat-timeout", "5s"]);
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "rust", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");

    let slow = chaos::slow_bodies(&daemon.url, SLOW_CONNECTIONS);
    let list = cli_run::run_with_limit(
        &mut daemon.taskfly(&["list", "--output", "json"]),
        Duration::from_secs(20),
    );
    list.expect_success();
    // Past the heartbeat timeout, the node still runs: its heartbeats were served.
    let heartbeat_timeout = Instant::now() + Duration::from_secs(6);
    let view = cli_run::poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the heartbeat timeout to pass",
        || {
            let view = daemon.status(&id);
            (Instant::now() > heartbeat_timeout || view["status"] != "running").then_some(view)
        },
    );
    assert_eq!(statuses(&view), ["running_script"], "{view:#}");
    open_gate(gate.path());
    let done = wait_until_final(&daemon, &id);
    assert_all_completed(&done);
    drop(slow);
}

// ----- 7: bounded memory per log request -----

/// How much the daemon's peak RSS may grow for one 4 MB log request.
const LOG_REQUEST_MEMORY_KIB: u64 = 64 * 1024;

#[test]
fn a_four_megabyte_newline_log_post_keeps_the_daemon_peak_rss_under_64_mib_more() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "script", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let token = chaos::node_token(&daemon, &id, 0);
    let pid = daemon.pid().expect("daemon pid");
    let before = chaos::memory_kib(pid, "VmHWM");

    let body = "a\n".repeat(2_000_000);
    let answer = chaos::post_text_logs(&daemon.url, &token, body.as_bytes());
    let after = chaos::memory_kib(pid, "VmHWM");
    assert!(
        after.saturating_sub(before) < LOG_REQUEST_MEMORY_KIB,
        "one 4 MB log request (answered {} {:.200}) raised the daemon's peak RSS from {before} \
         KiB to {after} KiB (+{} MiB; at most {} MiB allowed)",
        answer.status,
        answer.body,
        after.saturating_sub(before) / 1024,
        LOG_REQUEST_MEMORY_KIB / 1024
    );
    // The most lines a request may hold (65,536), nearly 4 MB of them: stored, within the
    // same bound.
    let line = format!("{}\n", "b".repeat(62));
    let answer = chaos::post_text_logs(&daemon.url, &token, line.repeat(65_536).as_bytes());
    assert_eq!(answer.status, 200, "{:.300}", answer.body);
    let after = chaos::memory_kib(pid, "VmHWM");
    assert!(
        after.saturating_sub(before) < LOG_REQUEST_MEMORY_KIB,
        "a 4 MB request of 65,536 lines raised the daemon's peak RSS from {before} KiB to \
         {after} KiB (+{} MiB; at most {} MiB allowed)",
        after.saturating_sub(before) / 1024,
        LOG_REQUEST_MEMORY_KIB / 1024
    );
    open_gate(gate.path());
    wait_until_final(&daemon, &id);
}

// ----- 8: one node's flood evicts only its own lines -----

#[test]
fn a_noisy_node_evicts_only_its_own_lines_and_a_marker_says_how_many() {
    const NOISY_LINES: u32 = 3000;
    let daemon = Daemon::start_with_args(DaemonOptions::default(), &["--max-log-lines", "1000"]);
    let gate = tempfile::tempdir().expect("temp dir");
    let script = format!(
        r#"#!/bin/sh
if [ "$TASKFLY_NODE_INDEX" = 0 ]; then
  i=1; while [ "$i" -le 10 ]; do echo "quiet $i"; i=$((i + 1)); done
  exit 0
fi
waited=0
while [ ! -e "$GATE/go" ] && [ "$waited" -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
i=1; while [ "$i" -le {NOISY_LINES} ]; do echo "noisy $i"; i=$((i + 1)); done
"#
    );
    let project = gated_project(2, "rust", gate.path(), &script);
    let id = daemon.up(project.path());
    // The quiet node's lines are stored (and older) before the noisy node starts talking.
    let quiet: Vec<String> = (1..=10).map(|i| format!("quiet {i}")).collect();
    cli_run::poll(
        DEPLOYMENT_LIMIT,
        Duration::from_millis(100),
        "the quiet node's lines to be stored",
        || {
            let by_node = chaos::lines_by_node(&daemon, &id);
            let stored = by_node
                .get(&0)
                .map(|l| chaos::stdout(l))
                .unwrap_or_default();
            (stored == quiet).then_some(())
        },
    );
    open_gate(gate.path());
    let done = wait_until_final(&daemon, &id);
    assert_all_completed(&done);

    let by_node = chaos::lines_by_node(&daemon, &id);
    let stored_quiet = by_node
        .get(&0)
        .map(|l| chaos::stdout(l))
        .unwrap_or_default();
    assert_eq!(
        stored_quiet, quiet,
        "the quiet node's lines were evicted by the noisy node's flood"
    );
    let noisy = by_node.get(&1).cloned().unwrap_or_default();
    let kept = noisy
        .iter()
        .filter(|(_, line)| {
            line.strip_prefix("noisy ")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count();
    let markers: Vec<&str> = noisy
        .iter()
        .map(|(_, line)| line.as_str())
        .filter(|line| !line.starts_with("noisy "))
        .collect();
    let dropped = NOISY_LINES as usize - kept;
    assert!(dropped > 0, "the deployment cap must have dropped lines");
    assert_eq!(
        markers.len(),
        1,
        "one marker line says where the noisy node's lines were dropped: {markers:?}"
    );
    assert!(
        markers[0].contains(&dropped.to_string()),
        "the marker says how many lines ({dropped}) were dropped: {}",
        markers[0]
    );
}

// ----- 9: no logs after the end -----

#[test]
fn logs_posted_after_the_node_is_final_are_refused_with_409() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "script", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let token = chaos::node_token(&daemon, &id, 0);
    open_gate(gate.path());
    wait_until_all(&daemon, &id, "completed");

    let answer = chaos::post_text_logs(&daemon.url, &token, b"a line after the end\n");
    assert_eq!(
        answer.status, 409,
        "a log post for a completed node: {}",
        answer.body
    );
    // A batch resent after a lost answer, already taken, is answered as taken.
    let bearer = format!("Bearer {token}");
    let resent = chaos::raw_request(
        &daemon.url,
        "POST",
        "/api/v1/nodes/logs?stream=stdout&offset=0",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "text/plain"),
        ],
        b"started\n",
    );
    assert_eq!(resent.status, 200, "a resent batch: {}", resent.body);
    let by_node = chaos::lines_by_node(&daemon, &id);
    assert_eq!(
        chaos::stdout(&by_node[&0]),
        ["started", "done"],
        "nothing is stored after the end"
    );
}

// ----- 10: failure messages are bounded -----

/// The most a stored failure message may hold, in bytes (2 KiB and room for a cut marker).
const MESSAGE_CAP: usize = 2048 + 16;

#[test]
fn a_four_mebibyte_failure_message_is_capped_and_status_prints_it_without_panicking() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "script", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let token = chaos::node_token(&daemon, &id, 0);
    let message = "m".repeat(4 * 1024 * 1024 - 100);
    let body = format!(r#"{{"status":"failed","exit_code":1,"message":"{message}"}}"#);
    let bearer = format!("Bearer {token}");
    let answer = chaos::raw_request(
        &daemon.url,
        "POST",
        "/api/v1/nodes/status",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(answer.status, 200, "{:.300}", answer.body);

    let text = daemon.cli(&["status", &id]);
    assert!(
        !text.stderr.contains("panicked"),
        "taskfly status panicked:\n{:.2000}",
        text.stderr
    );
    text.expect_success();
    let view = daemon.status(&id);
    let stored = nodes(&view)[0]["error_message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        stored.len() <= MESSAGE_CAP,
        "a failure message of {} bytes is stored whole ({} bytes; at most {MESSAGE_CAP})",
        message.len(),
        stored.len()
    );
    open_gate(gate.path());
}

// ----- 11: a page of logs is bounded by bytes -----

/// The most line text one page of logs holds (SPEC: the logs endpoint), and room for the JSON
/// around 10,000 lines at most.
const LOG_PAGE_BYTES: usize = 2 * 1024 * 1024 + 64 * 1024;

#[test]
fn a_page_of_long_lines_is_bounded_by_bytes_and_paging_reads_every_line() {
    const LONG_LINES: usize = 120;
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "script", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let token = chaos::node_token(&daemon, &id, 0);
    // Two requests of 60 lines of 60 KB: 7.2 MB of lines.
    for half in 0..2 {
        let body: String = (0..LONG_LINES / 2)
            .map(|i| format!("{:0>60000}\n", half * LONG_LINES / 2 + i))
            .collect();
        let answer = chaos::post_text_logs(&daemon.url, &token, body.as_bytes());
        assert_eq!(answer.status, 200, "{:.300}", answer.body);
    }
    open_gate(gate.path());
    wait_until_final(&daemon, &id);

    let bearer = format!("Bearer {}", daemon.token);
    let mut after = 0;
    let mut long = Vec::new();
    let mut pages = 0;
    loop {
        let path = format!("/api/v1/deployments/{id}/logs?limit=10000&after={after}");
        let answer = chaos::raw_request(
            &daemon.url,
            "GET",
            &path,
            &[("Authorization", &bearer)],
            b"",
        );
        assert_eq!(answer.status, 200, "{:.300}", answer.body);
        assert!(
            answer.body.len() <= LOG_PAGE_BYTES,
            "a page of {} bytes (at most {LOG_PAGE_BYTES})",
            answer.body.len()
        );
        let page: serde_json::Value = serde_json::from_str(&answer.body).expect("a JSON page");
        let lines = page["logs"].as_array().expect("logs is an array");
        if lines.is_empty() {
            break;
        }
        pages += 1;
        long.extend(
            lines
                .iter()
                .filter_map(|line| line["line"].as_str())
                .filter(|line| line.len() == 60_000)
                .map(|line| line.trim_start_matches('0').parse::<usize>().unwrap_or(0)),
        );
        after = page["next"].as_u64().expect("next");
    }
    assert!(pages >= 4, "7.2 MB of lines came in {pages} pages");
    assert_eq!(
        long,
        (0..LONG_LINES).collect::<Vec<_>>(),
        "every line, once, in order"
    );
}

// ----- 14: secrets are masked before a message is cut -----

#[test]
fn a_secret_cut_by_the_failure_message_limit_is_not_leaked_in_part() {
    let secret = format!("s3cr3t-{}", unique_word());
    let head = &secret[..10];
    let daemon = Daemon::start();
    let mut leaks: Vec<String> = Vec::new();
    for agent in ["rust", "script"] {
        // The last stderr line: 490 `x` and the secret, so the 500-character cut falls inside
        // the secret.
        let project = Project::new(&agent_yml(
            agent,
            1,
            &format!("secrets: {{api_key: {secret}}}"),
        ))
        .script(
            "#!/bin/sh\nprintf '%0490d' 0 | tr 0 x >&2\nprintf '%s\\n' \"$API_KEY\" >&2\nexit 1\n",
        );
        let view = daemon.up_wait_json(project.path(), 1, DEPLOYMENT_LIMIT);
        let message = nodes(&view)[0]["error_message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.starts_with("exited with code 1: xxx"),
            "the failure quotes the last stderr line: {message:.100}"
        );
        if message.contains(head) {
            let tail: Vec<char> = message.chars().rev().take(40).collect();
            let tail: String = tail.into_iter().rev().collect();
            leaks.push(format!("{agent} agent: …{tail}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "failure messages leak the start of the secret ({head}…):\n{}",
        leaks.join("\n")
    );
}

// ----- 15: secret values are never quoted -----

#[test]
fn a_huge_numeric_secret_is_never_quoted_in_a_yaml_error() {
    const NUMBER: &str = "98765432109876543210987654321";
    let home = tempfile::tempdir().expect("temp HOME");
    let project =
        Project::new(&local_yml(1, &format!("secrets: {{n: {NUMBER}}}"))).script(GATED_SCRIPT);
    for command in ["validate", "run"] {
        let ran = cli_run::run(
            cli_run::command("taskfly", home.path())
                .arg(command)
                .arg(project.path()),
        );
        assert!(
            !ran.stdout.contains(NUMBER) && !ran.stderr.contains(NUMBER),
            "`taskfly {command}` quotes the secret's value:\n{}",
            ran.show()
        );
    }
}

// ----- 16: the daemon's environment stays with the daemon -----

#[test]
fn local_node_scripts_do_not_see_the_daemons_environment() {
    let planted = format!("planted-{}", unique_word());
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (daemon, started) = BareDaemon::start(
        data_dir.path(),
        &[("AWS_SECRET_ACCESS_KEY", planted.as_str())],
        &[],
    );
    assert!(
        matches!(started, Started::Listening(_)),
        "{:?}",
        daemon.stderr_lines()
    );
    let mut leaks = Vec::new();
    for agent in ["rust", "script"] {
        let project = Project::new(&agent_yml(agent, 1, "")).script("#!/bin/sh\nenv\n");
        let up = daemon.cli(&["up", path_str(project.path()), "--wait", "--output", "json"]);
        up.expect_success();
        let id = up.json()["deployment_id"]
            .as_str()
            .expect("deployment_id")
            .to_owned();
        let logs = daemon.cli(&["logs", &id]);
        logs.expect_success();
        leaks.extend(
            logs.stdout
                .lines()
                .filter(|line| line.contains(&planted))
                .map(|line| format!("{agent} agent: {line}")),
        );
    }
    assert!(
        leaks.is_empty(),
        "local nodes see the daemon's environment:\n{}",
        leaks.join("\n")
    );
}

// ----- 17: private files -----

#[test]
fn worker_bundles_are_0600_and_node_work_folders_0700() {
    let daemon = Daemon::start();
    let gate = tempfile::tempdir().expect("temp dir");
    let project = gated_project(1, "rust", gate.path(), GATED_SCRIPT);
    let id = daemon.up(project.path());
    wait_until_all(&daemon, &id, "running_script");
    let bundle = daemon
        .data_dir
        .path()
        .join("deployments")
        .join(&id)
        .join("worker.tar.gz");
    let work = chaos::work_dir(&daemon, &id, 0);
    let modes = format!("{:o} {:o}", chaos::mode(&bundle), chaos::mode(&work));
    open_gate(gate.path());
    assert_eq!(
        modes,
        "600 700",
        "modes of {} and {}",
        bundle.display(),
        work.display()
    );
    wait_until_final(&daemon, &id);
}

// ----- 18: long lines -----

#[test]
fn a_script_printing_300_lines_of_30_kb_has_every_line_stored() {
    const LINES: usize = 300;
    const WIDTH: usize = 30_000;
    let daemon = Daemon::start();
    // The lines are written to a file first and then printed at once, so the agent reads them
    // faster than it sends them and fills its batches.
    let script = format!(
        "#!/bin/sh\ni=1\nwhile [ \"$i\" -le {LINES} ]; do\n  printf '%05d' \"$i\"\n  \
         head -c {WIDTH} /dev/zero | tr '\\0' x\n  echo\n  i=$((i + 1))\ndone >lines.txt\n\
         cat lines.txt\n"
    );
    let mut lost = Vec::new();
    for agent in ["rust", "script"] {
        let project = Project::new(&agent_yml(agent, 1, "")).script(&script);
        let view = daemon.up_wait_json(project.path(), 0, DEPLOYMENT_LIMIT);
        let id = view["deployment_id"].as_str().expect("deployment_id");
        let by_node = chaos::lines_by_node(&daemon, id);
        let stored = by_node
            .get(&0)
            .map(|l| chaos::stdout(l))
            .unwrap_or_default();
        let numbers: Vec<String> = stored
            .iter()
            .map(|line| line.get(..5).unwrap_or(line).to_owned())
            .collect();
        let expected: Vec<String> = (1..=LINES).map(|i| format!("{i:05}")).collect();
        let missing: Vec<&String> = expected.iter().filter(|n| !numbers.contains(n)).collect();
        if numbers != expected || stored.iter().any(|line| line.len() != 5 + WIDTH) {
            lost.push(format!(
                "{agent} agent: {} of {LINES} lines stored; {} missing, {:?} … {:?}",
                stored.len(),
                missing.len(),
                missing.first(),
                missing.last()
            ));
        }
    }
    assert!(lost.is_empty(), "lines were lost:\n{}", lost.join("\n"));
}
