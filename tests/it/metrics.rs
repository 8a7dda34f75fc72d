//! `GET /metrics` (SPEC §4.3): OpenMetrics text from `prometheus-client`, counters that move
//! as a deployment runs, labels that never name a deployment or a node, and the optional
//! metrics token. With `TASKFLY_REQUIRE_PROMTOOL` set (scripts/test.sh), the text must also
//! pass `promtool check metrics`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::engine_http::raw_get;
use crate::support::engine_util::poll_until_within;
use crate::support::{agent_yml, local_yml, Project, TestEngine, API_TOKEN};

/// Every sample of the text: series (name and labels as written) → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            (series.to_owned(), value)
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

async fn scrape(engine: &TestEngine) -> (String, BTreeMap<String, f64>) {
    let response = raw_get(&engine.url, "/metrics", None).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        response.content_type
    );
    let text = response.text();
    let parsed = samples(&text);
    (text, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_as_a_deployment_runs_and_no_label_names_an_id() {
    let engine = TestEngine::start().await;
    let (_, before) = scrape(&engine).await;
    assert_eq!(
        value(
            &before,
            r#"taskfly_node_transitions_total{status="completed"}"#
        ),
        0.0
    );

    let project = Project::new(&local_yml(3, "")).script("echo working\n");
    let id = engine.deploy(project.path()).await;
    let done = engine.wait(&id).await.expect("wait");
    assert_eq!(done.status.as_str(), "completed");
    let (text, after) = scrape(&engine).await;

    for (series, expected) in [
        (r#"taskfly_deployments{status="completed"}"#, 1.0),
        (r#"taskfly_nodes{status="completed"}"#, 3.0),
        (r#"taskfly_nodes{status="running_script"}"#, 0.0),
        (r#"taskfly_node_transitions_total{status="completed"}"#, 3.0),
        (
            r#"taskfly_node_transitions_total{status="running_script"}"#,
            3.0,
        ),
        (
            r#"taskfly_node_phase_seconds_count{phase="provisioning"}"#,
            3.0,
        ),
        (r#"taskfly_node_phase_seconds_count{phase="running"}"#, 3.0),
        (
            r#"taskfly_provider_calls_total{provider="local",op="provision",result="ok"}"#,
            3.0,
        ),
    ] {
        assert_eq!(value(&after, series), expected, "{series} in\n{text}");
    }
    let heartbeats_or_status = value(
        &after,
        r#"taskfly_http_requests_total{route="/api/v1/nodes/status",code="200"}"#,
    );
    assert!(
        heartbeats_or_status >= 6.0,
        "three nodes report twice at least:\n{text}"
    );
    assert!(
        value(
            &after,
            r#"taskfly_http_request_duration_seconds_count{route="/api/v1/nodes/register"}"#
        ) >= 3.0,
        "{text}"
    );
    let version = format!(
        "taskfly_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&after, &version), 1.0, "{text}");
    assert!(
        !text.contains(&id),
        "no label names the deployment:\n{text}"
    );

    // Unknown paths and ids share bounded routes.
    raw_get(
        &engine.url,
        &format!("/api/v1/deployments/{id}"),
        Some(API_TOKEN),
    )
    .await;
    raw_get(&engine.url, "/no/such/thing", None).await;
    let (text, later) = scrape(&engine).await;
    assert_eq!(
        value(
            &later,
            r#"taskfly_http_requests_total{route="/api/v1/deployments/{id}",code="200"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &later,
            r#"taskfly_http_requests_total{route="other",code="404"}"#
        ),
        1.0
    );
    assert!(text.ends_with("# EOF\n"));
    promtool_check(&text);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_closes_metrics_to_everyone_else() {
    let engine = TestEngine::start_with_server(|c| c, |s| s.metrics_token("scrape-me")).await;
    for (token, expected) in [
        (None, 401),
        (Some("wrong"), 401),
        (Some(API_TOKEN), 401),
        (Some("scrape-me"), 200),
    ] {
        let response = raw_get(&engine.url, "/api/v1/metrics", token).await;
        assert_eq!(response.status, expected, "{token:?}: {}", response.text());
    }
    engine.stop().await;
}

/// `promtool check metrics` on `text`, when the test script asks for it (fails if promtool is
/// missing then); otherwise only when promtool is installed.
fn promtool_check(text: &str) {
    let required = std::env::var_os("TASKFLY_REQUIRE_PROMTOOL").is_some();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if !required => {
            println!("skipping the promtool check: cannot run promtool ({e}); scripts/test.sh installs it");
            return;
        }
        Err(e) => panic!("TASKFLY_REQUIRE_PROMTOOL is set but promtool cannot run: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool reads Prometheus' older text format, where a counter's TYPE and HELP name the
    // series itself: OpenMetrics names the counter without `_total`, so promtool calls each
    // counter's samples help-less. That is the one problem forgiven, and only for counters
    // whose HELP is there under the OpenMetrics name.
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| {
            let forgiven = line
                .strip_suffix(" no help text")
                .and_then(|series| series.strip_suffix("_total"))
                .is_some_and(|counter| {
                    text.contains(&format!("# HELP {counter} "))
                        && text.contains(&format!("# TYPE {counter} counter"))
                });
            !forgiven && !line.trim().is_empty()
        })
        .collect();
    assert!(
        problems.is_empty() && (out.status.success() || !report.is_empty()),
        "promtool check metrics found problems:\n{}\n---\n{text}",
        problems.join("\n")
    );
}

/// A running node's view carries what its script uses (SPEC §4.2), from either agent; the
/// peak stays once the node has ended.
async fn a_running_node_shows_its_resources(agent: &str) {
    let engine = TestEngine::start_with(|c| {
        c.heartbeat_timeout(std::time::Duration::from_secs(10))
            .heartbeat_interval(std::time::Duration::from_millis(200))
    })
    .await;
    // The script holds some memory (a 4 MiB variable in a shell) and keeps a CPU busy while
    // it runs; the bundle has a file of 1 MiB.
    let yml = agent_yml(agent, 1, "").replace("[setup.sh]", "[setup.sh, data.bin]");
    let project = Project::new(&yml)
        .script("big=$(head -c 4194304 /dev/zero | tr '\\0' x)\nwhile :; do :; done\n")
        .file("data.bin", &"d".repeat(1 << 20), 0o644);
    let id = engine.deploy(project.path()).await;
    // Agents read resources when the script starts and then every 30 s; CPU needs two.
    let view = poll_until_within(
        &engine,
        &id,
        "resources with CPU, memory and disk",
        std::time::Duration::from_secs(90),
        |view| {
            view.nodes[0].resources.as_ref().is_some_and(|r| {
                r.cpu_percent.is_some() && r.rss_bytes.is_some() && r.disk_bytes.is_some()
            })
        },
    )
    .await;
    let resources = view.nodes[0].resources.clone().expect("resources");
    assert_eq!(view.nodes[0].status.as_str(), "running_script");
    assert!(
        resources.rss_bytes.expect("rss") >= 4 << 20,
        "{resources:?}"
    );
    assert!(
        resources.disk_bytes.expect("disk") >= 1 << 20,
        "{resources:?}"
    );
    assert!(
        resources.peak_rss_bytes >= resources.rss_bytes,
        "{resources:?}"
    );
    assert!(resources.cpu_percent.expect("cpu") >= 0.0, "{resources:?}");

    let shown = raw_get(
        &engine.url,
        &format!("/api/v1/deployments/{id}"),
        Some(API_TOKEN),
    )
    .await
    .json();
    let node = &shown["nodes"][0]["resources"];
    for key in [
        "cpu_percent",
        "rss_bytes",
        "peak_rss_bytes",
        "disk_bytes",
        "sampled_at",
    ] {
        assert!(!node[key].is_null(), "{key} in {node:#}");
    }

    engine.engine.terminate(&id).await.expect("terminate");
    let ended = engine.wait(&id).await.expect("wait");
    let after = ended.nodes[0].resources.clone().expect("resources kept");
    assert!(after.peak_rss_bytes.expect("peak") >= 4 << 20, "{after:?}");
    engine.stop().await;
}

for_both_agents!(a_running_node_shows_its_resources);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_get_endpoint_answers_its_headers_without_a_body() {
    let engine = TestEngine::start().await;
    let project = Project::new(&local_yml(1, "")).script("echo working\n");
    let done = engine.run(project.path()).await;
    let id = done.deployment_id.as_str();
    for path in [
        "/api/v1/deployments".to_owned(),
        format!("/api/v1/deployments/{id}"),
        format!("/api/v1/deployments/{id}/logs"),
        "/api/v1/stats".to_owned(),
        "/api/v1/health".to_owned(),
        "/metrics".to_owned(),
    ] {
        let got = raw_get(&engine.url, &path, Some(API_TOKEN)).await;
        let head = crate::support::engine_http::raw_request(
            &engine.url,
            hyper::Method::HEAD,
            &path,
            Some(API_TOKEN),
            None,
        )
        .await;
        assert_eq!((head.status, got.status), (200, 200), "{path}");
        assert_eq!(head.content_type, got.content_type, "{path}");
        assert!(head.body.is_empty(), "{path}: {}", head.text());
    }
    // Still behind the token.
    let refused = crate::support::engine_http::raw_request(
        &engine.url,
        hyper::Method::HEAD,
        "/api/v1/deployments",
        None,
        None,
    )
    .await;
    assert_eq!(refused.status, 401);
    let (_, samples) = scrape(&engine).await;
    assert!(
        value(
            &samples,
            r#"taskfly_http_requests_total{route="/api/v1/deployments/{id}/logs",code="200"}"#
        ) >= 2.0
    );
    engine.stop().await;
}
