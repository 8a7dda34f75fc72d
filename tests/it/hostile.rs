//! Hostile input over real HTTP (issue 6): wrong or stolen tokens, one node reaching for
//! another's data, guessed provision tokens, oversized and malformed bodies, wrong content
//! types, slow clients, hostile tar entries, and a planted secret looked for everywhere.
//!
//! Every refusal is checked twice: its status (with the JSON error shape), and that nothing
//! changed — the deployments and their nodes, every path under the data dir, and what the
//! provider was asked to do ([`Snapshot`]).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use taskfly::bundle::BundleLimits;
use taskfly::wire::DeploymentView;
use taskfly::{Client, Config, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::cli_daemon::{Daemon, DaemonOptions};
use crate::support::cli_run::{self, Ran};
use crate::support::engine_http::{node_calls, raw_get, raw_request, RawResponse};
use crate::support::engine_provider::{Provisioned, RecordingProvider};
use crate::support::engine_util::{
    client_bundle, find_named, poll_nodes_status, unique_marker, POLL_LIMIT,
};
use crate::support::hostile_http::{expect_error, send, socket_address, Hostile};
use crate::support::hostile_state::Snapshot;
use crate::support::hostile_tar::{archive, Entry};
use crate::support::{local_yml, Project, TestEngine, API_TOKEN};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SCRIPT: &str = "#!/bin/sh\necho never run by these tests\n";

/// An engine whose provider only records, with one deployment of `nodes` nodes provisioned
/// (`booting`) and its node 0 registered (`registering`): live state for refusals to protect.
struct Fixture {
    engine: TestEngine,
    provider: Arc<RecordingProvider>,
    deployment_id: String,
    /// The provision calls, by node index; node 0's token is used up.
    calls: Vec<Provisioned>,
    /// Node 0's auth token.
    node_token: String,
}

impl Fixture {
    async fn start(nodes: u32, adjust: impl FnOnce(Config) -> Config) -> Fixture {
        Fixture::start_serving(nodes, adjust, |server| server).await
    }

    /// [`Fixture::start`], letting the test adjust the server's settings too.
    async fn start_serving(
        nodes: u32,
        adjust: impl FnOnce(Config) -> Config,
        adjust_server: impl FnOnce(ServerConfig) -> ServerConfig,
    ) -> Fixture {
        let provider = RecordingProvider::new();
        let engine = TestEngine::start_with_server(
            |config| {
                adjust(
                    config
                        .provider(provider.as_provider())
                        // Nodes these tests register stay alive however slow the machine is.
                        .heartbeat_timeout(Duration::from_secs(3600)),
                )
            },
            adjust_server,
        )
        .await;
        let (deployment_id, calls) = deploy_recorded(&engine, &provider, nodes).await;
        let node_token = Client::new(&engine.url, None)
            .expect("client")
            .register(&calls[0].provision_token)
            .await
            .expect("register node 0")
            .auth_token;
        Fixture {
            engine,
            provider,
            deployment_id,
            calls,
            node_token,
        }
    }

    async fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.engine, Some(&self.provider)).await
    }

    /// Fails the test unless nothing changed since `before`.
    async fn assert_unchanged(&self, before: &Snapshot, what: &str) {
        before.assert_unchanged(&self.snapshot().await, what);
    }

    async fn view(&self, id: &str) -> DeploymentView {
        self.engine.view(id).await.expect("deployment")
    }
}

/// Deploys a fresh `nodes`-node project and waits until every node is `booting`.
async fn deploy_recorded(
    engine: &TestEngine,
    provider: &RecordingProvider,
    nodes: u32,
) -> (String, Vec<Provisioned>) {
    let project = Project::new(&local_yml(nodes, "")).script(SCRIPT);
    let id = engine.deploy(project.path()).await;
    let calls = provider.wait_for_provisioned(&id, nodes as usize).await;
    poll_nodes_status(engine, &id, "booting").await;
    (id, calls)
}

/// A valid client bundle: `taskfly.yml` for `nodes` local nodes and `setup.sh`.
fn valid_bundle(nodes: u32) -> Vec<u8> {
    archive(&valid_entries(&local_yml(nodes, "")))
}

/// The entries of a valid bundle with this `taskfly.yml`.
fn valid_entries(yml: &str) -> Vec<Entry<'_>> {
    vec![
        Entry::file("taskfly.yml", yml.as_bytes()),
        Entry::file("setup.sh", SCRIPT.as_bytes()),
    ]
}

/// `POST /api/v1/deployments` with the API token.
async fn upload(url: &str, content_type: &str, body: Vec<u8>) -> RawResponse {
    raw_request(
        url,
        Method::POST,
        "/api/v1/deployments",
        Some(API_TOKEN),
        Some((content_type, body)),
    )
    .await
}

/// `POST path` with a node token and a JSON (or other) body.
async fn node_post(
    url: &str,
    path: &str,
    token: &str,
    content_type: &str,
    body: &[u8],
) -> RawResponse {
    send(
        url,
        Hostile::new(Method::POST, path)
            .bearer(token)
            .body(content_type, body.to_vec()),
    )
    .await
}

/// A request: method, path and an optional body with its content type.
type Call = (Method, String, Option<(&'static str, Vec<u8>)>);

/// An upload refused by a size limit: what it is, its content type and body, the expected
/// status, and the words the error (or its details) must contain.
type Oversized = (&'static str, String, Vec<u8>, u16, Vec<&'static str>);

/// `n` random bytes (incompressible).
fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes
}

// ---------------------------------------------------------------------------------------------
// 1. Tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_endpoints_refuse_missing_wrong_and_node_tokens_and_change_nothing() {
    let f = Fixture::start(2, |c| c).await;
    let live = f.deployment_id.clone();
    // A final deployment too, so that a cleanup let through would have files to delete.
    let (finished, _) = deploy_recorded(&f.engine, &f.provider, 1).await;
    f.engine
        .engine
        .terminate(&finished)
        .await
        .expect("terminate");
    assert_eq!(f.view(&finished).await.status.as_str(), "terminated");
    let before = f.snapshot().await;
    assert_eq!(before.deployment_count(), 2);

    let bundle = valid_bundle(1);
    let endpoints: Vec<Call> = vec![
        (
            Method::POST,
            "/api/v1/deployments".to_owned(),
            Some(("application/gzip", bundle)),
        ),
        (Method::GET, "/api/v1/deployments".to_owned(), None),
        (Method::GET, format!("/api/v1/deployments/{live}"), None),
        // An unknown id is refused the same way: no hint of what exists.
        (Method::GET, "/api/v1/deployments/dep-0000".to_owned(), None),
        (Method::DELETE, format!("/api/v1/deployments/{live}"), None),
        (
            Method::POST,
            format!("/api/v1/deployments/{finished}/cleanup"),
            None,
        ),
        (Method::POST, "/api/v1/cleanup/all".to_owned(), None),
        (
            Method::DELETE,
            format!("/api/v1/deployments/{finished}/record"),
            None,
        ),
        (Method::POST, "/api/v1/cleanup/forget".to_owned(), None),
        (
            Method::GET,
            format!("/api/v1/deployments/{live}/logs"),
            None,
        ),
        (Method::GET, "/api/v1/stats".to_owned(), None),
    ];
    let near_miss = format!("{API_TOKEN}x");
    let truncated = &API_TOKEN[..API_TOKEN.len() - 1];
    let authorizations: Vec<(Option<String>, &str)> = vec![
        (None, "no token"),
        (
            Some("Bearer wrong-token-0123456789abcdef".to_owned()),
            "wrong token",
        ),
        (Some("Bearer ".to_owned()), "empty bearer token"),
        (Some(format!("Bearer {near_miss}")), "API token plus a byte"),
        (Some(format!("Bearer {truncated}")), "API token less a byte"),
        (Some(API_TOKEN.to_owned()), "API token without a scheme"),
        (Some(format!("Basic {API_TOKEN}")), "API token as Basic"),
        (Some(format!("Bearer {}", f.node_token)), "a node token"),
        (
            Some(format!("Bearer {}", f.calls[1].provision_token)),
            "a provision token",
        ),
    ];
    for (method, path, body) in &endpoints {
        for (authorization, what) in &authorizations {
            let mut request =
                Hostile::new(method.clone(), path).authorization(authorization.as_deref());
            if let Some((content_type, bytes)) = body {
                request = request.body(content_type, bytes.clone());
            }
            let response = send(&f.engine.url, request).await;
            let what = format!("{what} on {method} {path}");
            let error = expect_error(&response, 401, &what);
            if let Some(sent) = authorization {
                let token = sent.rsplit(' ').next().unwrap_or_default();
                assert!(
                    token.is_empty() || !response.text().contains(token),
                    "{what}: the answer repeats the token: {error}"
                );
            }
            f.assert_unchanged(&before, &what).await;
        }
    }

    // Node endpoints refuse the API token (engine.rs covers no token and made-up ones).
    for (method, path, body) in node_calls() {
        let mut request = Hostile::new(method.clone(), path).bearer(API_TOKEN);
        if let Some(body) = body {
            request = request.body("application/json", body);
        }
        let what = format!("API token on {method} {path}");
        expect_error(&send(&f.engine.url, request).await, 401, &what);
        f.assert_unchanged(&before, &what).await;
    }

    // /health and /metrics need no token (and a wrong one does not hurt).
    for path in ["/health", "/api/v1/health", "/metrics"] {
        for authorization in [None, Some("Bearer wrong-token")] {
            let response = send(
                &f.engine.url,
                Hostile::new(Method::GET, path).authorization(authorization),
            )
            .await;
            assert_eq!(response.status, 200, "GET {path}: {}", response.text());
            if path == "/metrics" {
                assert!(
                    response
                        .content_type
                        .starts_with("application/openmetrics-text"),
                    "{}",
                    response.content_type
                );
                let nodes: f64 = response
                    .text()
                    .lines()
                    .filter(|l| l.starts_with("taskfly_nodes{"))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum();
                assert_eq!(nodes, 3.0, "{}", response.text());
            } else {
                assert_eq!(response.json(), serde_json::json!({"status": "ok"}));
            }
        }
    }
    f.assert_unchanged(&before, "/health and /metrics").await;

    // The API token itself is let through: the refusals were about the token alone.
    let response = raw_get(&f.engine.url, "/api/v1/deployments", Some(API_TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json().as_array().map(Vec::len), Some(2));
    f.engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_token_changes_and_reads_only_its_own_node() {
    let f = Fixture::start(2, |c| c).await;
    let ours = f.deployment_id.clone();
    let (theirs, their_calls) = deploy_recorded(&f.engine, &f.provider, 1).await;
    let anonymous = Client::new(&f.engine.url, None).expect("client");
    let their_token = anonymous
        .register(&their_calls[0].provision_token)
        .await
        .expect("register their node")
        .auth_token;
    let sibling_token = anonymous
        .register(&f.calls[1].provision_token)
        .await
        .expect("register the sibling")
        .auth_token;
    let their_node = format!("{theirs}-0");
    let url = f.engine.url.clone();
    let before = f.snapshot().await;

    // Naming the other node in the body is an unknown field: refused, nothing changes.
    for field in ["node_id", "deployment_id", "node_index"] {
        let body = format!(r#"{{"status":"failed","message":"forged","{field}":"{their_node}"}}"#);
        let response = node_post(
            &url,
            "/api/v1/nodes/status",
            &f.node_token,
            "application/json",
            body.as_bytes(),
        )
        .await;
        let error = expect_error(&response, 400, &format!("status with {field}"));
        assert!(
            error.contains(&format!("unknown field `{field}`")),
            "{error}"
        );
        f.assert_unchanged(&before, &format!("status with {field}"))
            .await;
    }
    // There is no path naming another node or deployment, and no log reading for nodes.
    for (method, path) in [
        (Method::POST, format!("/api/v1/nodes/{their_node}/status")),
        (Method::POST, format!("/api/v1/nodes/status/{their_node}")),
        (Method::GET, "/api/v1/nodes/logs".to_owned()),
        (Method::GET, format!("/api/v1/nodes/logs/{theirs}")),
    ] {
        let mut request = Hostile::new(method.clone(), &path).bearer(&f.node_token);
        if method == Method::POST {
            request = request.body("application/json", r#"{"status":"failed"}"#);
        }
        let what = format!("node token on {method} {path}");
        expect_error(&send(&url, request).await, 404, &what);
        f.assert_unchanged(&before, &what).await;
    }
    // Their logs and view through the client API: the node token is not an API token.
    for path in [
        format!("/api/v1/deployments/{theirs}/logs"),
        format!("/api/v1/deployments/{theirs}"),
    ] {
        let response = raw_get(&url, &path, Some(&f.node_token)).await;
        expect_error(&response, 401, &path);
    }
    // A query naming theirs is ignored: the assets are our deployment's.
    let response = raw_get(
        &url,
        &format!("/api/v1/nodes/assets?deployment_id={theirs}&node_id={their_node}"),
        Some(&f.node_token),
    )
    .await;
    assert_eq!(response.status, 200);
    let deployments = f.engine.data_dir.path().join("deployments");
    let read =
        |id: &str| std::fs::read(deployments.join(id).join("worker.tar.gz")).expect("bundle");
    assert_eq!(response.body, read(&ours));
    f.assert_unchanged(&before, "assets with a query").await;

    // Reports, whatever the query says, change our node 0 alone.
    let their_before = f.view(&theirs).await;
    let sibling_before = f.view(&ours).await.nodes[1].clone();
    // Log lines, sent while the node runs (once it has ended they are refused).
    let logs = node_post(
        &url,
        "/api/v1/nodes/logs",
        &f.node_token,
        "application/json",
        br#"{"lines":[{"stream":"stdout","line":"from node A"}]}"#,
    )
    .await;
    assert_eq!(logs.status, 200, "{}", logs.text());
    for (status, extra) in [
        ("downloading_assets", ""),
        ("running_script", ""),
        ("failed", r#","message":"node A gave up","exit_code":5"#),
    ] {
        let body = format!(r#"{{"status":"{status}"{extra}}}"#);
        let response = node_post(
            &url,
            &format!("/api/v1/nodes/status?node_id={their_node}&deployment_id={theirs}"),
            &f.node_token,
            "application/json",
            body.as_bytes(),
        )
        .await;
        assert_eq!(response.status, 200, "{status}: {}", response.text());
        let view = f.view(&ours).await;
        assert_eq!(view.nodes[0].status.as_str(), status, "{view:#?}");
        assert_eq!(view.nodes[1], sibling_before, "the sibling changed");
        assert_eq!(
            f.view(&theirs).await,
            their_before,
            "their deployment changed"
        );
    }
    let view = f.view(&ours).await;
    assert_eq!(view.nodes[0].exit_code, Some(5));
    assert_eq!(
        view.nodes[0].error_message.as_deref(),
        Some("node A gave up")
    );
    assert_eq!(
        view.status.as_str(),
        "running",
        "the sibling still runs: {view:#?}"
    );
    // A heartbeat and log lines are ours alone too.
    let beat = node_post(
        &url,
        "/api/v1/nodes/heartbeat",
        &f.node_token,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(beat.json()["shutdown"], true, "our node has failed");
    assert_eq!(
        f.view(&theirs).await,
        their_before,
        "their deployment changed"
    );
    assert!(f.engine.all_logs(&theirs).await.is_empty());
    let ours_logs = f.engine.all_logs(&ours).await;
    assert_eq!(ours_logs.len(), 1);
    assert_eq!(
        (ours_logs[0].node_index, ours_logs[0].line.as_str()),
        (0, "from node A")
    );

    // Their node and our sibling carry on untouched.
    for token in [&their_token, &sibling_token] {
        let beat = node_post(
            &url,
            "/api/v1/nodes/heartbeat",
            token,
            "application/json",
            b"{}",
        )
        .await;
        assert_eq!(beat.json()["shutdown"], false, "{}", beat.text());
    }
    assert_eq!(
        f.view(&theirs).await.nodes[0].status.as_str(),
        "registering"
    );
    assert_eq!(f.view(&ours).await.nodes[1].status.as_str(), "registering");
    f.engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Provision tokens
// ---------------------------------------------------------------------------------------------

/// `POST /nodes/register` with `token`, from `from`.
async fn register_from(url: &str, token: &str, from: IpAddr) -> RawResponse {
    let body = serde_json::json!({ "provision_token": token }).to_string();
    send(
        url,
        Hostile::new(Method::POST, "/api/v1/nodes/register")
            .body("application/json", body)
            .from(from),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_and_guessed_provision_tokens_are_refused_then_rate_limited_per_address() {
    let f = Fixture::start_serving(3, |c| c, |s| s.registration_failures_per_minute(3)).await;
    let url = f.engine.url.clone();
    let here: IpAddr = "127.0.0.1".parse().expect("address");
    let elsewhere: IpAddr = "127.0.0.2".parse().expect("address");
    let before = f.snapshot().await;

    // Three failures: the used token of node 0 (already registered by the fixture) and two
    // guesses.
    let used = f.calls[0].provision_token.clone();
    for (token, what) in [
        (used.as_str(), "a used provision token"),
        ("0".repeat(64).as_str(), "a guessed provision token"),
        ("not-even-hex", "a made-up provision token"),
    ] {
        let response = register_from(&url, token, here).await;
        assert!(
            matches!(response.status, 401 | 409),
            "{what}: {} {}",
            response.status,
            response.text()
        );
        expect_error(&response, response.status, what);
        assert!(
            !response.text().contains(token),
            "{what}: {}",
            response.text()
        );
        f.assert_unchanged(&before, what).await;
    }

    // The fourth try from that address is refused before the token is even looked at: a good
    // token is refused too, and stays unused.
    let good = f.calls[1].provision_token.clone();
    let response = register_from(&url, &good, here).await;
    let error = expect_error(&response, 429, "fourth registration");
    assert!(error.contains("too many failed registrations"), "{error}");
    assert!(!response.text().contains(&good), "{}", response.text());
    f.assert_unchanged(&before, "429").await;
    let response = register_from(&url, &f.calls[2].provision_token, here).await;
    expect_error(&response, 429, "fifth registration");
    f.assert_unchanged(&before, "second 429").await;

    // Another address is not limited, and the refused token still works there.
    let response = register_from(&url, &good, elsewhere).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["node_index"], 1);
    let view = f.view(&f.deployment_id).await;
    let statuses: Vec<&str> = view.nodes.iter().map(|n| n.status.as_str()).collect();
    assert_eq!(statuses, ["registering", "registering", "booting"]);
    f.engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Size limits
// ---------------------------------------------------------------------------------------------

/// A `multipart/form-data` body with `bundle` in the field `bundle`.
fn multipart(bundle: &[u8]) -> (String, Vec<u8>) {
    let boundary = "hostile-boundary-7d1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"bundle\"; filename=\"b.tar.gz\"\r\nContent-Type: application/gzip\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bundle);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_uploads_bodies_configs_and_bundles_are_refused_naming_the_limit() {
    let f = Fixture::start_serving(
        1,
        |c| {
            c.max_bundle_upload(64 * 1024)
                .max_config_bytes(2048)
                .max_nodes(3)
                .bundle_limits(BundleLimits {
                    max_total_bytes: 48 * 1024,
                    max_files: 8,
                })
        },
        |s| s.max_json_body(1024),
    )
    .await;
    let url = f.engine.url.clone();
    let before = f.snapshot().await;

    // Uploads: 100 KiB that gzip cannot shrink, against a 64 KiB limit.
    let yml = local_yml(1, "");
    let noise = random_bytes(100 * 1024);
    let mut entries = valid_entries(&yml);
    entries.push(Entry::file("noise.bin", &noise));
    let big = archive(&entries);
    assert!(big.len() > 100 * 1024 - 1024, "{}", big.len());
    let (multipart_type, multipart_body) = multipart(&big);
    // taskfly.yml over 2 KiB; files adding up to 60 KiB (a few hundred bytes compressed); ten
    // entries; four nodes.
    let long_yml = format!("{yml}{}", "# padding padding padding padding\n".repeat(100));
    let zeros = vec![0u8; 60 * 1024];
    let mut deep = valid_entries(&yml);
    deep.push(Entry::file("zeros.bin", &zeros));
    let names: Vec<String> = (0..8).map(|i| format!("file{i}.txt")).collect();
    let mut many = valid_entries(&yml);
    many.extend(names.iter().map(|name| Entry::file(name, b"x")));
    let four_nodes = local_yml(4, "");
    let cases: Vec<Oversized> = vec![
        (
            "a 100 KiB gzip upload",
            "application/gzip".to_owned(),
            big.clone(),
            413,
            vec!["65536"],
        ),
        (
            "a 100 KiB multipart upload",
            multipart_type,
            multipart_body,
            413,
            vec!["65536"],
        ),
        (
            "a 3 KiB taskfly.yml",
            "application/gzip".to_owned(),
            archive(&valid_entries(&long_yml)),
            413,
            vec!["taskfly.yml", "2048"],
        ),
        (
            "60 KiB decompressed",
            "application/gzip".to_owned(),
            archive(&deep),
            413,
            vec!["max_total_bytes", "49152"],
        ),
        (
            "ten entries",
            "application/gzip".to_owned(),
            archive(&many),
            413,
            vec!["max_files", "8"],
        ),
        (
            "four nodes",
            "application/gzip".to_owned(),
            archive(&valid_entries(&four_nodes)),
            400,
            vec!["nodes.count", "3"],
        ),
    ];
    for (what, content_type, body, status, named) in cases {
        let response = upload(&url, &content_type, body).await;
        let error = expect_error(&response, status, what);
        let text = format!("{error} {:?}", response.details());
        for word in named {
            assert!(text.contains(word), "{what}: should name {word}: {text}");
        }
        f.assert_unchanged(&before, what).await;
    }

    // JSON bodies over 1 KiB on every node endpoint (and the plain-text log form).
    let filler = "y".repeat(2048);
    let register = format!(r#"{{"provision_token":"{filler}"}}"#);
    let heartbeat = format!(r#"{{"metrics":{{"note":"{filler}"}}}}"#);
    let status = format!(r#"{{"status":"failed","message":"{filler}"}}"#);
    let logs = format!(r#"{{"lines":[{{"stream":"stdout","line":"{filler}"}}]}}"#);
    let plain = format!("{filler}\n");
    for (path, content_type, body) in [
        ("/api/v1/nodes/register", "application/json", &register),
        ("/api/v1/nodes/heartbeat", "application/json", &heartbeat),
        ("/api/v1/nodes/status", "application/json", &status),
        ("/api/v1/nodes/logs", "application/json", &logs),
        ("/api/v1/nodes/logs?stream=stdout", "text/plain", &plain),
    ] {
        let response = node_post(&url, path, &f.node_token, content_type, body.as_bytes()).await;
        let error = expect_error(&response, 413, path);
        assert!(error.contains("1024"), "{path}: {error}");
        f.assert_unchanged(&before, path).await;
    }
    assert!(f.engine.all_logs(&f.deployment_id).await.is_empty());

    // Under every limit, the same engine accepts a bundle.
    let response = upload(&url, "application/gzip", valid_bundle(3)).await;
    assert_eq!(response.status, 202, "{}", response.text());
    f.engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Content types and malformed bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_types_are_refused_with_415() {
    let f = Fixture::start(2, |c| c).await;
    let url = f.engine.url.clone();
    let before = f.snapshot().await;

    let bundle = valid_bundle(1);
    for content_type in [
        Some("application/json"),
        Some("text/plain"),
        Some("text/xml"),
        None,
    ] {
        let mut request = Hostile::new(Method::POST, "/api/v1/deployments").bearer(API_TOKEN);
        request.body = bundle.clone();
        if let Some(content_type) = content_type {
            request
                .headers
                .push(("content-type", content_type.to_owned()));
        }
        let what = format!("POST /deployments as {content_type:?}");
        let error = expect_error(&send(&url, request).await, 415, &what);
        assert!(error.contains("application/gzip"), "{what}: {error}");
        f.assert_unchanged(&before, &what).await;
    }

    // Valid JSON bodies, labelled text/xml.
    let register = serde_json::json!({ "provision_token": f.calls[1].provision_token }).to_string();
    let calls: [(&str, &str); 4] = [
        ("/api/v1/nodes/register", &register),
        ("/api/v1/nodes/heartbeat", "{}"),
        ("/api/v1/nodes/status", r#"{"status":"downloading_assets"}"#),
        (
            "/api/v1/nodes/logs",
            r#"{"lines":[{"stream":"stdout","line":"xml?"}]}"#,
        ),
    ];
    for (path, body) in calls {
        for content_type in ["text/xml", "application/xml"] {
            let response =
                node_post(&url, path, &f.node_token, content_type, body.as_bytes()).await;
            let what = format!("{content_type} to {path}");
            let error = expect_error(&response, 415, &what);
            assert!(error.contains("application/json"), "{what}: {error}");
            f.assert_unchanged(&before, &what).await;
        }
    }

    // The same bodies with the right types are accepted: only the type was wrong.
    for (path, body) in calls {
        let response = node_post(
            &url,
            path,
            &f.node_token,
            "application/json",
            body.as_bytes(),
        )
        .await;
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    let view = f.view(&f.deployment_id).await;
    assert_eq!(view.nodes[0].status.as_str(), "downloading_assets");
    assert_eq!(view.nodes[1].status.as_str(), "registering");
    let response = upload(&url, "application/gzip", bundle).await;
    assert_eq!(response.status, 202, "{}", response.text());
    f.engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_yaml_are_refused_with_400_naming_the_place() {
    let f = Fixture::start(2, |c| c).await;
    let url = f.engine.url.clone();
    let before = f.snapshot().await;

    // Each body, and what the error must say: the problem and where it is.
    let cases: [(&str, &str, &str); 7] = [
        (
            "/api/v1/nodes/status",
            r#"{"status": "running_script","#,
            "EOF while parsing a value at line 1 column 28",
        ),
        (
            "/api/v1/nodes/status",
            "{\n  \"status\": \"running_script\",\n}",
            "trailing comma at line 3 column 1",
        ),
        (
            "/api/v1/nodes/status",
            r#"{"status":"running_script"}}"#,
            "trailing characters at line 1 column 28",
        ),
        (
            "/api/v1/nodes/status",
            "status=running_script",
            "expected value at line 1 column 1",
        ),
        (
            "/api/v1/nodes/register",
            r#"{"provision_token": "#,
            "EOF while parsing a value at line 1 column 20",
        ),
        (
            "/api/v1/nodes/heartbeat",
            r#"{"metrics": {"cpu": }"#,
            "expected value at line 1 column 21",
        ),
        (
            "/api/v1/nodes/logs",
            r#"{"lines": [{"stream": "stdout", "line": "x"}"#,
            "EOF while parsing a list at line 1 column 44",
        ),
    ];
    for (path, body, problem) in cases {
        let response = node_post(
            &url,
            path,
            &f.node_token,
            "application/json",
            body.as_bytes(),
        )
        .await;
        let what = format!("{body:?} to {path}");
        let error = expect_error(&response, 400, &what);
        assert!(
            error.starts_with("malformed JSON") && error.contains(problem),
            "{what}: should say malformed JSON: {problem}: {error}"
        );
        f.assert_unchanged(&before, &what).await;
    }

    // Well-formed, but with a field the endpoint does not have.
    for (path, body, field) in [
        (
            "/api/v1/nodes/status",
            r#"{"status":"running_script","progress":50}"#,
            "progress",
        ),
        (
            "/api/v1/nodes/logs",
            r#"{"lines":[{"stream":"stdout","line":"x","level":"info"}]}"#,
            "level",
        ),
        (
            "/api/v1/nodes/heartbeat",
            r#"{"metrics":{},"shutdown":false}"#,
            "shutdown",
        ),
    ] {
        let response = node_post(
            &url,
            path,
            &f.node_token,
            "application/json",
            body.as_bytes(),
        )
        .await;
        let error = expect_error(&response, 400, body);
        assert!(
            error.contains(&format!("unknown field `{field}`")),
            "{error}"
        );
        f.assert_unchanged(&before, body).await;
    }

    // A valid bundle whose taskfly.yml is not YAML.
    for (yml, place) in [
        ("cloud_provider: local\nnodes:\n  count: [1\n", "line 4"),
        ("cloud_provider: local\nnodes:\n\tcount: 1\n", "line 3"),
    ] {
        let response = upload(&url, "application/gzip", archive(&valid_entries(yml))).await;
        let what = format!("taskfly.yml {yml:?}");
        let error = expect_error(&response, 400, &what);
        let details = response.details();
        assert!(error.contains("taskfly.yml"), "{what}: {error}");
        assert!(
            details
                .iter()
                .any(|d| d.contains(place) && d.contains("column")),
            "{what}: details should name {place} and a column: {details:?}"
        );
        f.assert_unchanged(&before, &what).await;
    }
    f.engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Slow clients
// ---------------------------------------------------------------------------------------------

/// What the server sends on `stream` until it closes it, waiting at most `limit`.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
    what: &str,
) -> Vec<u8> {
    let mut received = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut received)).await {
        Ok(Ok(_)) => received,
        // A reset is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => received,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: the server kept the connection open for {limit:?}"),
    }
}

/// Asserts the server answered nothing, or nothing but an error, before closing.
fn assert_not_served(received: &[u8], what: &str) {
    let text = String::from_utf8_lossy(received);
    assert!(
        received.is_empty() || text.starts_with("HTTP/1.1 4"),
        "{what}: the server answered {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_their_headers_are_dropped_while_others_are_served() {
    const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
    let engine =
        TestEngine::start_with_server(|c| c, |s| s.header_read_timeout(HEADER_TIMEOUT)).await;
    let before = Snapshot::take(&engine, None).await;
    let address = socket_address(&engine.url);

    let partial = [
        "".to_owned(),
        "GET /api/v1/sta".to_owned(),
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n".to_owned(),
        format!(
            "POST /api/v1/deployments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\nContent-Type: application/gzip\r\nContent-Len"
        ),
    ];
    let started = Instant::now();
    let mut slow = Vec::new();
    for request in &partial {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        stream.flush().await.expect("flush");
        slow.push(stream);
    }

    // Meanwhile, other clients are served.
    let health = raw_get(&engine.url, "/health", None).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let listed = raw_get(&engine.url, "/api/v1/deployments", Some(API_TOKEN)).await;
    assert_eq!(listed.status, 200, "{}", listed.text());

    for (stream, request) in slow.iter_mut().zip(&partial) {
        let what = format!("after {request:?}");
        let received = read_until_closed(stream, POLL_LIMIT, &what).await;
        assert_not_served(&received, &what);
        assert!(
            started.elapsed() >= HEADER_TIMEOUT,
            "{what}: closed after {:?}, before the header timeout",
            started.elapsed()
        );
    }
    let health = raw_get(&engine.url, "/health", None).await;
    assert_eq!(health.status, 200);
    before.assert_unchanged(&Snapshot::take(&engine, None).await, "slow clients");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_holding_every_connection_slot_are_dropped_and_the_slots_freed() {
    const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
    let engine = TestEngine::start_with_server(
        |c| c,
        |s| s.header_read_timeout(HEADER_TIMEOUT).max_connections(2),
    )
    .await;
    let before = Snapshot::take(&engine, None).await;
    let address = socket_address(&engine.url);
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHo")
            .await
            .expect("write");
        slow.push(stream);
    }
    // Both slots are held by clients without a token: the oldest makes way for this request.
    let health = raw_get(&engine.url, "/health", None).await;
    assert_eq!(health.status, 200, "{}", health.text());
    for stream in &mut slow {
        let received = read_until_closed(stream, POLL_LIMIT, "a slot holder").await;
        assert_not_served(&received, "a slot holder");
    }
    assert!(started.elapsed() >= HEADER_TIMEOUT);
    before.assert_unchanged(&Snapshot::take(&engine, None).await, "slot holders");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_refused_and_its_connection_closed() {
    const BODY_TIMEOUT: Duration = Duration::from_millis(500);
    let engine = TestEngine::start_with_server(|c| c, |s| s.body_read_timeout(BODY_TIMEOUT)).await;
    let address = socket_address(&engine.url);
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /api/v1/nodes/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"provision_token\":\"",
        )
        .await
        .expect("write");
    let received = read_until_closed(&mut stream, POLL_LIMIT, "a slow body").await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("did not arrive within"), "{text}");
    assert!(started.elapsed() >= BODY_TIMEOUT);
    let health = raw_get(&engine.url, "/health", None).await;
    assert_eq!(health.status, 200);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_per_address_the_oldest_connection_without_a_token_makes_way() {
    let engine =
        TestEngine::start_with_server(|c| c, |s| s.max_unauthenticated_connections_per_address(2))
            .await;
    let address = socket_address(&engine.url);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHo")
            .await
            .expect("write");
        slow.push(stream);
    }
    // Well before the 10 s header timeout, the oldest goes for this request.
    let health = raw_get(&engine.url, "/health", None).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let received = read_until_closed(&mut slow[0], Duration::from_secs(5), "the oldest").await;
    assert!(received.is_empty(), "{received:?}");
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile tar entries
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tar_entries_are_refused_naming_the_entry_and_write_nothing() {
    let f = Fixture::start(1, |c| c).await;
    let url = f.engine.url.clone();
    let marker = unique_marker();
    let sandbox = tempfile::tempdir().expect("sandbox");
    let sandbox_path = sandbox.path().display().to_string();
    let yml = local_yml(1, "");
    let before = f.snapshot().await;

    let traversal = format!("../evil_{marker}");
    let deep_traversal = format!("a/../../evil_{marker}");
    let absolute = format!("{sandbox_path}/abs_{marker}");
    let through = format!("inside/pwned_{marker}");
    let device = format!("null_{marker}");
    let three_nodes = local_yml(3, "");
    let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
        (traversal.as_str(), vec![Entry::file(&traversal, b"evil")]),
        (
            deep_traversal.as_str(),
            vec![Entry::file(&deep_traversal, b"evil")],
        ),
        (absolute.as_str(), vec![Entry::file(&absolute, b"evil")]),
        ("out", vec![Entry::symlink("out", &sandbox_path)]),
        ("up", vec![Entry::symlink("up", "../../../../../..")]),
        ("etc", vec![Entry::symlink("etc", "/etc")]),
        (
            through.as_str(),
            vec![
                Entry::symlink("inside", "."),
                Entry::file(&through, b"evil"),
            ],
        ),
        ("hl", vec![Entry::hard_link("hl", "/etc/passwd")]),
        ("hl2", vec![Entry::hard_link("hl2", "setup.sh")]),
        (device.as_str(), vec![Entry::char_device(&device, 1, 3)]),
        (
            "setup.sh",
            vec![Entry::file("setup.sh", b"#!/bin/sh\necho replaced\n")],
        ),
        (
            "taskfly.yml",
            vec![Entry::file("taskfly.yml", three_nodes.as_bytes())],
        ),
    ];
    for (named, hostile) in cases {
        let mut entries = valid_entries(&yml);
        entries.extend(hostile);
        let response = upload(&url, "application/gzip", archive(&entries)).await;
        let error = expect_error(&response, 400, named);
        assert!(
            error.contains(&format!("{named:?}")),
            "the error should name {named:?}: {error}"
        );
        f.assert_unchanged(&before, named).await;
    }

    // Nothing landed anywhere a hostile path pointed.
    let data_dir = f.engine.data_dir.path();
    let parent = data_dir.parent().expect("parent");
    for path in [
        data_dir.join(format!("evil_{marker}")),
        parent.join(format!("evil_{marker}")),
        Path::new("/").join(format!("evil_{marker}")),
    ] {
        assert!(!path.exists(), "{} was written", path.display());
    }
    for prefix in ["evil_", "pwned_", "abs_", "null_"] {
        assert_eq!(
            find_named(data_dir, prefix),
            Vec::<std::path::PathBuf>::new()
        );
    }
    assert_eq!(
        std::fs::read_dir(sandbox.path()).expect("sandbox").count(),
        0,
        "something was written in the sandbox"
    );

    // The same archive without the hostile entries is accepted.
    let response = upload(&url, "application/gzip", archive(&valid_entries(&yml))).await;
    assert_eq!(response.status, 202, "{}", response.text());
    f.engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. A planted secret, looked for everywhere
// ---------------------------------------------------------------------------------------------

/// Everything one command printed, kept to look for the secret in.
struct Outputs {
    secret: String,
    checked: Vec<String>,
}

impl Outputs {
    /// Asserts the exit code and that neither stdout nor stderr shows the secret.
    #[track_caller]
    fn check(&mut self, ran: Ran, code: i32) -> Ran {
        ran.expect_code(code);
        assert!(
            !ran.stdout.contains(&self.secret) && !ran.stderr.contains(&self.secret),
            "{} shows the secret\n{}",
            ran.what,
            ran.show()
        );
        self.checked.push(ran.what.clone());
        ran
    }
}

/// The `dep-…` id in a line of text.
fn deployment_id_in(text: &str) -> String {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|word| word.starts_with("dep-"))
        .unwrap_or_else(|| panic!("no deployment id in {text:?}"))
        .to_owned()
}

#[test]
fn a_planted_secret_shows_in_no_response_output_or_log() {
    let secret = format!("PLANTED-{}", unique_marker());
    let daemon = Daemon::start_with(DaemonOptions {
        rust_log: "debug".to_owned(),
        ..DaemonOptions::default()
    });
    let offline_home = tempfile::tempdir().expect("HOME");
    let nodes_extra = format!("secrets: {{api_key: \"{secret}\"}}");
    // Node 1 prints the secret on both streams, in `env` output and inside a longer word, and
    // fails with it as its last stderr line; node 0 completes.
    let failing = Project::new(&local_yml(2, &nodes_extra)).script(
        "#!/bin/sh\n\
         echo \"stdout has $API_KEY\"\n\
         env | grep '^API_KEY='\n\
         echo \"url postgres://app:$API_KEY@db/x\"\n\
         echo \"stderr has $API_KEY\" >&2\n\
         if [ \"$TASKFLY_NODE_INDEX\" = 1 ]; then echo \"failing with $API_KEY\" >&2; exit 7; fi\n",
    );
    let sleeping = Project::new(&local_yml(1, &nodes_extra))
        .script("#!/bin/sh\necho \"sleeping with $API_KEY\"\nsleep 300\n");
    let unknown_field =
        Project::new(&local_yml(1, &format!("{nodes_extra}\ncuont: 2"))).script(SCRIPT);
    let broken_yaml = Project::new(&format!(
        "cloud_provider: local\napplication_files: [setup.sh]\nnodes:\n  count: 1\n  secrets: {{api_key: \"{secret}\"\n"
    ))
    .script(SCRIPT);
    // Secrets may not be used in templates: the refusal names the key, not the value.
    let in_template = Project::new(&local_yml(
        1,
        &format!("{nodes_extra}\nconfig_template: {{db_url: \"postgres://app:{{api_key}}@db/x\"}}"),
    ))
    .script(SCRIPT);
    let dir = |p: &Project| p.path().to_str().expect("UTF-8 path").to_owned();
    let mut out = Outputs {
        secret: secret.clone(),
        checked: Vec::new(),
    };
    let offline = |args: &[&str]| {
        cli_run::run_with_limit(
            cli_run::command("taskfly", offline_home.path()).args(args),
            Duration::from_secs(120),
        )
    };
    let online = |args: &[&str]| {
        cli_run::run_with_limit(&mut daemon.taskfly(args), Duration::from_secs(120))
    };

    // validate and run need no daemon.
    let valid = out.check(offline(&["validate", &dir(&failing)]), 0);
    assert!(valid.stdout.contains("API_KEY=\"***\""), "{}", valid.show());
    out.check(
        offline(&["validate", &dir(&failing), "--output", "json"]),
        0,
    );
    for invalid in [&unknown_field, &broken_yaml, &in_template] {
        out.check(offline(&["validate", &dir(invalid)]), 2);
        out.check(offline(&["validate", &dir(invalid), "--output", "json"]), 2);
    }
    let ran = out.check(offline(&["run", &dir(&failing)]), 1);
    assert!(
        ran.stdout.contains("[node 1] failing with ***"),
        "{}",
        ran.show()
    );
    out.check(offline(&["run", &dir(&failing), "--output", "json"]), 1);

    // Against the daemon: deployments that fail, sleep, and are refused.
    let ran = out.check(online(&["up", &dir(&failing), "--wait"]), 1);
    assert!(
        ran.stdout.contains("[node 1] url postgres://app:***@db/x"),
        "{}",
        ran.show()
    );
    let failed_text = deployment_id_in(&ran.stdout);
    let ran = out.check(
        online(&["up", &dir(&failing), "--wait", "--output", "json"]),
        1,
    );
    let failed = ran.json()["deployment_id"].as_str().expect("id").to_owned();
    let ran = out.check(online(&["up", &dir(&sleeping), "--output", "json"]), 0);
    let asleep = ran.json()["deployment_id"].as_str().expect("id").to_owned();
    let ran = out.check(online(&["up", &dir(&sleeping)]), 0);
    let asleep_text = deployment_id_in(&ran.stdout);
    for invalid in [&unknown_field, &broken_yaml, &in_template] {
        out.check(online(&["up", &dir(invalid)]), 2);
        out.check(
            online(&["up", &dir(invalid), "--wait", "--output", "json"]),
            2,
        );
    }
    for output in ["text", "json"] {
        out.check(online(&["list", "--output", output]), 0);
        out.check(online(&["status", &failed, "--output", output]), 0);
        out.check(
            online(&["status", "--id", &failed_text, "--output", output]),
            0,
        );
        out.check(online(&["status", &asleep, "--output", output]), 0);
        out.check(online(&["logs", &failed, "--output", output]), 0);
        out.check(
            online(&["logs", &failed, "--node", "1", "--output", output]),
            0,
        );
        out.check(online(&["logs", &failed_text, "-f", "--output", output]), 0);
    }
    let logs = out.check(online(&["logs", &failed, "--node", "1"]), 0);
    for line in [
        "[node 1] stdout has ***",
        "[node 1] API_KEY=***",
        "[node 1] url postgres://app:***@db/x",
        "[node 1] stderr has ***",
        "[node 1] failing with ***",
    ] {
        assert!(
            logs.stdout.lines().any(|l| l == line),
            "no {line:?}\n{}",
            logs.show()
        );
    }

    // Every API answer, errors included.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let token = Some(daemon.token.as_str());
        let mut answers: Vec<(String, RawResponse)> = Vec::new();
        let mut paths = vec![
            "/api/v1/deployments".to_owned(),
            "/api/v1/stats".to_owned(),
            "/metrics".to_owned(),
            "/health".to_owned(),
        ];
        for (id, last_node) in [
            (&failed, 1),
            (&failed_text, 1),
            (&asleep, 0),
            (&asleep_text, 0),
        ] {
            paths.push(format!("/api/v1/deployments/{id}"));
            paths.push(format!("/api/v1/deployments/{id}/logs"));
            paths.push(format!(
                "/api/v1/deployments/{id}/logs?node={last_node}&limit=2"
            ));
        }
        for path in paths {
            let response = raw_get(&daemon.url, &path, token).await;
            assert_eq!(response.status, 200, "GET {path}: {}", response.text());
            answers.push((format!("GET {path}"), response));
        }
        let view = raw_get(&daemon.url, &format!("/api/v1/deployments/{failed}"), token)
            .await
            .json();
        let message = view["nodes"][1]["error_message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.contains("failing with ***"), "{view:#}");
        let logs = raw_get(
            &daemon.url,
            &format!("/api/v1/deployments/{failed}/logs?node=1"),
            token,
        )
        .await
        .json();
        let lines: Vec<&str> = logs["logs"]
            .as_array()
            .expect("logs")
            .iter()
            .filter_map(|l| l["line"].as_str())
            .collect();
        assert!(
            lines.contains(&"stdout has ***") && lines.contains(&"stderr has ***"),
            "{lines:?}"
        );

        for (project, what) in [
            (&unknown_field, "unknown field"),
            (&broken_yaml, "broken YAML"),
            (&in_template, "secret in a template"),
        ] {
            let bundle = client_bundle(project.path(), &["setup.sh"]);
            let response = raw_request(
                &daemon.url,
                Method::POST,
                "/api/v1/deployments",
                token,
                Some(("application/gzip", bundle)),
            )
            .await;
            expect_error(&response, 400, what);
            answers.push((format!("POST /deployments, {what}"), response));
        }
        let errors = [
            (
                Method::POST,
                format!("/api/v1/deployments/{asleep}/cleanup"),
                409,
            ),
            (Method::DELETE, format!("/api/v1/deployments/{failed}"), 409),
            (
                Method::GET,
                format!("/api/v1/deployments/{failed}/logs?node=9"),
                404,
            ),
        ];
        for (method, path, status) in errors {
            let response = raw_request(&daemon.url, method.clone(), &path, token, None).await;
            expect_error(&response, status, &path);
            answers.push((format!("{method} {path}"), response));
        }
        for (what, response) in &answers {
            assert!(
                !response.text().contains(&secret),
                "{what} shows the secret: {}",
                response.text()
            );
        }
    });

    // Ending them.
    out.check(online(&["down", &asleep]), 0);
    out.check(online(&["down", &asleep_text, "--output", "json"]), 0);
    out.check(online(&["cleanup", &failed]), 0);
    out.check(online(&["cleanup", "--all", "--output", "json"]), 0);
    out.check(online(&["list"]), 0);
    assert!(out.checked.len() >= 40, "{:?}", out.checked);

    // At rest: only in private files. In the daemon's debug log: nowhere.
    let data_dir = daemon.data_dir.path().to_owned();
    for (path, _) in crate::support::hostile_state::tree(&data_dir) {
        let path = data_dir.join(path);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{} holds the secret", path.display());
        }
    }
    let (status, lines) = daemon.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        lines.iter().any(|l| l.contains(&failed)) && lines.iter().any(|l| l.contains("DEBUG")),
        "the daemon logged at debug level"
    );
    for line in &lines {
        assert!(
            !line.contains(&secret),
            "the daemon logged the secret: {line}"
        );
        assert!(
            !line.contains(API_TOKEN),
            "the daemon logged the API token: {line}"
        );
    }
}
