use super::*;
use taskfly::wire::NodeView;

// The wire types are `#[non_exhaustive]`: built here from their JSON, as the CLI gets them.
fn node(index: u32, status: &str, exit_code: Option<i32>, error: Option<&str>) -> NodeView {
    serde_json::from_value(serde_json::json!({
        "node_id": format!("dep-1-{index}"),
        "node_index": index,
        "status": status,
        "attempt": 1,
        "instance_id": exit_code.map(|_| format!("local-dep-1-{index}-1")),
        "last_update": "2026-01-02T03:04:05.000Z",
        "exit_code": exit_code,
        "error_message": error,
    }))
    .expect("node view")
}

fn deployment(status: &str, nodes: Vec<NodeView>) -> DeploymentView {
    let count = |wanted: &str| nodes.iter().filter(|n| n.status.as_str() == wanted).count() as u32;
    serde_json::from_value(serde_json::json!({
        "deployment_id": "dep-1",
        "status": status,
        "cloud_provider": "local",
        "total_nodes": nodes.len() as u32,
        "nodes_completed": count("completed"),
        "nodes_failed": count("failed"),
        "created_at": "2026-01-02T03:04:00.000Z",
        "updated_at": "2026-01-02T03:04:05.000Z",
        "nodes": nodes,
    }))
    .expect("deployment view")
}

fn log(node_index: u32, stream: &str, line: &str) -> LogLineView {
    serde_json::from_value(serde_json::json!({
        "seq": 1,
        "node_id": format!("dep-1-{node_index}"),
        "node_index": node_index,
        "stream": stream,
        "line": line,
        "timestamp": "2026-01-02T03:04:05.000Z",
    }))
    .expect("log line view")
}

#[test]
fn progress_line_counts_finished_nodes_and_every_state() {
    let view = deployment(
        "running",
        vec![
            node(0, "completed", Some(0), None),
            node(1, "running_script", None, None),
            node(2, "failed", Some(3), Some("exited with code 3")),
            node(3, "completed", Some(0), None),
            node(4, "running_script", None, None),
        ],
    );
    assert_eq!(
        progress_line(&view, Duration::from_millis(12_900)),
        "[12s] running 3/5 done (completed 2 · failed 1 · running_script 2)"
    );
}

#[test]
fn log_lines_carry_the_node_prefix_and_colour_only_when_asked() {
    assert_eq!(
        log_line(&log(3, "stdout", "hello"), false, false),
        "[node 3] hello"
    );
    assert_eq!(
        log_line(&log(3, "stderr", "oops"), false, false),
        "[node 3] oops"
    );
    let coloured = log_line(&log(3, "stderr", "oops"), true, false);
    assert!(
        coloured.contains("[node 3]") && coloured.contains("oops"),
        "{coloured:?}"
    );
    assert!(
        coloured.contains("\x1b[31moops\x1b[0m"),
        "stderr in red: {coloured:?}"
    );
}

#[test]
fn values_are_quoted_only_when_they_need_it() {
    assert_eq!(quote_for_display("data-bkt"), "data-bkt");
    assert_eq!(quote_for_display("s3://b/out/1"), "s3://b/out/1");
    assert_eq!(quote_for_display(""), "\"\"");
    assert_eq!(quote_for_display("two words"), "\"two words\"");
    assert_eq!(quote_for_display("***"), "\"***\"");
    assert_eq!(quote_for_display("a\nb"), "\"a\\nb\"");
}

#[test]
fn summary_names_each_node_that_did_not_complete() {
    let done = deployment(
        "completed",
        vec![
            node(0, "completed", Some(0), None),
            node(1, "completed", Some(0), None),
        ],
    );
    assert_eq!(
        summary(&done, Duration::from_secs(3)),
        "\ndeployment dep-1 completed in 3.00s: 2 completed, 0 failed, 2 total\n"
    );
    let failed = deployment(
        "failed",
        vec![
            node(0, "completed", Some(0), None),
            node(1, "failed", Some(3), Some("exited with code 3: disk full")),
        ],
    );
    assert_eq!(
        summary(&failed, Duration::from_secs(61)),
        "\ndeployment dep-1 failed in 1m01.0s: 1 completed, 1 failed, 2 total\n  \
         node 1 failed: exited with code 3: disk full\n"
    );
}

#[test]
fn deployments_table_aligns_its_columns() {
    assert_eq!(deployments_table(&[]), "no deployments\n");
    let mut long = deployment("provisioning", vec![node(0, "pending", None, None)]);
    long.deployment_id = "dep-0123456789abcdef".to_owned();
    let short = deployment("completed", vec![node(0, "completed", Some(0), None)]);
    let table = deployments_table(&[long, short]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID  "), "{table}");
    let status_column = lines[0].find("STATUS").expect("STATUS header");
    assert_eq!(
        lines[1].find("provisioning"),
        Some(status_column),
        "{table}"
    );
    assert_eq!(lines[2].find("completed"), Some(status_column), "{table}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        [
            "dep-1",
            "completed",
            "local",
            "1",
            "1",
            "0",
            "2026-01-02T03:04:00.000Z"
        ]
    );
}

#[test]
fn deployment_details_has_one_row_per_node() {
    let mut view = deployment(
        "running",
        vec![
            node(0, "completed", Some(0), None),
            node(1, "running_script", None, None),
        ],
    );
    view.nodes[0].duration_s = Some(12.345);
    let text = deployment_details(&view);
    assert!(
        text.starts_with("deployment  dep-1\nstatus      running\n"),
        "{text}"
    );
    assert!(
        text.contains("nodes       2 total, 1 completed, 0 failed\n"),
        "{text}"
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "0",
                "completed",
                "1",
                "0",
                "12.35s",
                "local-dep-1-0-1",
                "-",
                "-",
                "2026-01-02T03:04:05.000Z"
            ],
            vec![
                "1",
                "running_script",
                "1",
                "-",
                "-",
                "-",
                "-",
                "-",
                "2026-01-02T03:04:05.000Z"
            ],
        ]
    );
}

#[test]
fn a_huge_cell_is_cut_and_never_panics() {
    let huge = "m".repeat(4 * 1024 * 1024);
    let rows = vec![
        vec!["NODE".to_owned(), "ERROR".to_owned()],
        vec!["0".to_owned(), huge],
        vec!["1".to_owned(), "two\nlines".to_owned()],
    ];
    let text = table(&rows);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text:.500}");
    assert_eq!(lines[1].chars().count(), 6 + MAX_CELL_CHARS);
    assert!(lines[1].ends_with('…'));
    assert_eq!(lines[2], "1     two lines");
}

#[test]
fn the_summary_prefers_the_daemons_wall_time() {
    let mut done = deployment("completed", vec![node(0, "completed", Some(0), None)]);
    done.duration_s = Some(12.34);
    assert!(
        summary(&done, Duration::from_secs(20)).contains(" completed in 12.34s: "),
        "the daemon's wall time, not the client's"
    );
}

#[test]
fn durations_read_as_seconds_minutes_or_hours() {
    assert_eq!(duration(0.25), "0.25s");
    assert_eq!(duration(12.344), "12.34s");
    assert_eq!(duration(59.994), "59.99s");
    assert_eq!(duration(125.34), "2m05.3s");
    assert_eq!(duration(3725.4), "1h02m05s");
    assert_eq!(duration(-1.0), "0.00s", "a clock going back shows zero");
}

#[test]
fn index_lists_are_ranges() {
    assert_eq!(index_list(&[1, 4, 7, 8, 9]), "1, 4, 7-9");
    assert_eq!(index_list(&[0]), "0");
    assert_eq!(index_list(&[]), "");
}

#[test]
fn a_timestamped_line_starts_with_the_nodes_time() {
    let line = log(2, "stdout", "hello");
    assert_eq!(
        with_timestamp(&line, &log_line(&line, false, false)),
        "2026-01-02T03:04:05.000Z [node 2] hello"
    );
}

#[test]
fn details_of_a_rerun_name_the_original_and_the_wall_time() {
    let mut view = deployment(
        "completed",
        vec![
            node(1, "completed", Some(0), None),
            node(4, "completed", Some(0), None),
        ],
    );
    view.rerun_of = Some("dep-0".to_owned());
    view.duration_s = Some(3.5);
    let text = deployment_details(&view);
    assert!(
        text.contains("rerun of    dep-0 (node(s) 1, 4)\n"),
        "{text}"
    );
    assert!(text.contains("duration    3.50s\n"), "{text}");
}

#[test]
fn what_still_runs_is_timed_until_now() {
    let mut view = deployment(
        "running",
        vec![
            node(0, "running_script", None, None),
            node(1, "completed", Some(0), None),
            node(2, "booting", None, None),
        ],
    );
    view.nodes[0].started_at = Some("2026-01-02T03:04:02.000Z".to_owned());
    view.nodes[1].started_at = Some("2026-01-02T03:04:01.000Z".to_owned());
    view.nodes[1].finished_at = Some("2026-01-02T03:04:02.500Z".to_owned());
    view.nodes[1].duration_s = Some(1.5);
    let now = humantime::parse_rfc3339("2026-01-02T03:04:07.250Z").expect("time");
    let text = deployment_details_at(&view, now);
    assert!(text.contains("duration    7.25s so far\n"), "{text}");
    let durations: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .skip(1)
        .map(|l| l.split_whitespace().nth(4).expect("DURATION"))
        .collect();
    assert_eq!(durations, ["5.25s", "1.50s", "-"]);
}

fn with_attempt(mut view: NodeView, attempt: u32) -> NodeView {
    view.attempt = attempt;
    view
}

#[test]
fn a_node_that_ran_more_than_once_has_its_lines_marked_with_their_attempt() {
    let mut line = log(2, "stdout", "again");
    line.attempt = 2;
    assert_eq!(log_line(&line, false, true), "[node 2 attempt 2] again");
    line.attempt = 1;
    assert_eq!(log_line(&line, false, true), "[node 2 attempt 1] again");
    let view = deployment(
        "running",
        vec![
            node(0, "completed", Some(0), None),
            with_attempt(node(1, "running_script", None, None), 2),
        ],
    );
    assert_eq!(retried_nodes(&view), BTreeSet::from([1]));
}

#[test]
fn a_failed_node_waiting_for_its_retry_counts_as_retrying() {
    let nodes = vec![
        node(0, "completed", Some(0), None),
        with_attempt(node(1, "failed", Some(3), Some("exited with code 3")), 1),
        with_attempt(node(2, "failed", Some(3), Some("exited with code 3")), 3),
    ];
    let mut view = deployment("running", nodes);
    view.retries = 2;
    // Node 1 has retries left; node 2 used them all.
    view.nodes_failed = 1;
    assert_eq!(
        progress_line(&view, Duration::from_secs(3)),
        "[3s] running 2/3 done (completed 1 · failed 1 · retrying 1)"
    );
}

#[tokio::test(start_paused = true)]
async fn plain_progress_prints_at_most_one_line_per_period() {
    let mut throttle = Throttle::new(PLAIN_PROGRESS_EVERY);
    assert!(throttle.ready(), "the first line is printed at once");
    let mut printed = 0;
    // 200 changes in one second (a node finishing every 5 ms): none printed.
    for _ in 0..200 {
        tokio::time::advance(Duration::from_millis(5)).await;
        printed += usize::from(throttle.ready());
    }
    assert_eq!(printed, 0);
    tokio::time::advance(PLAIN_PROGRESS_EVERY).await;
    assert!(
        throttle.ready(),
        "a change is printed once the period is over"
    );
    assert!(!throttle.ready(), "and the period starts again");
}

#[test]
fn cpu_and_memory_show_the_last_reading_while_running_and_the_peak_after() {
    let with_resources = |status: &str| -> NodeView {
        let mut value = serde_json::to_value(node(0, status, None, None)).expect("json");
        value["resources"] = serde_json::json!({
            "cpu_percent": 187.25,
            "rss_bytes": 3 * 1024 * 1024 / 2,
            "peak_rss_bytes": 5u64 << 30,
            "sampled_at": "2026-01-02T03:04:05.000Z",
        });
        serde_json::from_value(value).expect("node view")
    };
    let running = with_resources("running_script");
    assert_eq!(
        (cpu_cell(&running), memory_cell(&running)),
        ("187.2%".to_owned(), "1.5MiB".to_owned())
    );
    let done = with_resources("completed");
    assert_eq!(
        (cpu_cell(&done), memory_cell(&done)),
        ("-".to_owned(), "5.0GiB peak".to_owned())
    );
    assert_eq!(bytes(512), "512B");
}

#[test]
fn progress_from_the_counters_alone_counts_the_nodes_under_way_as_active() {
    assert_eq!(
        counter_counts(5, 2, 1, 0),
        "active 2 · completed 2 · failed 1"
    );
    assert_eq!(counter_counts(200, 0, 0, 0), "active 200");
    assert_eq!(counter_counts(4, 4, 0, 0), "completed 4");
    assert_eq!(counter_counts(3, 1, 0, 2), "completed 1 · terminated 2");
    // Counters read mid-update never make a negative count.
    assert_eq!(counter_counts(1, 1, 1, 0), "completed 1 · failed 1");
}

#[test]
fn a_line_of_a_later_attempt_marks_the_nodes_lines_from_then_on() {
    let mut progress = Progress::new(Output::Json, 2);
    let mut second = log(1, "stdout", "second attempt");
    second.attempt = 2;
    progress.print_logs(&[log(1, "stdout", "first attempt"), second]);
    assert!(progress.retried.contains(&1));
    assert!(!progress.retried.contains(&0));
}
