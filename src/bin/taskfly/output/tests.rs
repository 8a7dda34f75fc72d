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
        log_line(&log(3, "stdout", "hello"), false),
        "[node 3] hello"
    );
    assert_eq!(log_line(&log(3, "stderr", "oops"), false), "[node 3] oops");
    let coloured = log_line(&log(3, "stderr", "oops"), true);
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
        "\ndeployment dep-1 completed in 3s: 2 completed, 0 failed, 2 total\n"
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
        "\ndeployment dep-1 failed in 61s: 1 completed, 1 failed, 2 total\n  \
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
    let view = deployment(
        "running",
        vec![
            node(0, "completed", Some(0), None),
            node(1, "running_script", None, None),
        ],
    );
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
