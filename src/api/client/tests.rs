//! Unit tests of the client against tiny servers on 127.0.0.1:0.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

type Handler = dyn Fn(Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync;

/// A tiny HTTP server on 127.0.0.1:0 answering every request with `handler`.
struct TestServer {
    url: String,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    handler: impl Fn(Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let handler: Arc<Handler> = Arc::new(handler);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            connections.spawn(async move {
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(handler(parts, body))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestServer { url, task }
}

fn json_response(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, JSON)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

#[test]
fn base_urls_are_checked_and_normalised() {
    assert_eq!(
        parse_base_url("http://127.0.0.1:8080/").expect("valid"),
        "http://127.0.0.1:8080"
    );
    assert_eq!(
        parse_base_url(" http://example.test/prefix/ ").expect("valid"),
        "http://example.test/prefix"
    );
    #[cfg(feature = "tls")]
    assert_eq!(
        parse_base_url("https://example.test:8443/").expect("valid"),
        "https://example.test:8443"
    );
    #[cfg(not(feature = "tls"))]
    {
        let error = parse_base_url("https://example.test").expect_err("no TLS");
        assert!(error.is_invalid_input(), "{error}");
        assert!(error.message().contains("without TLS support"), "{error}");
    }
    for bad in ["127.0.0.1:8080", "http://", "not a url", "http://h/?a=b"] {
        let error = parse_base_url(bad).expect_err(bad);
        assert!(error.is_invalid_input(), "{bad}: {error}");
    }
    let error = parse_base_url("ftp://example.test").expect_err("ftp");
    assert!(error.message().contains("ftp://example.test"), "{error}");
    let error = parse_base_url("http://user:secret@example.test").expect_err("credentials");
    assert!(!error.to_string().contains("secret"), "{error}");
}

#[test]
fn components_are_percent_encoded() {
    assert_eq!(encode_component("dep-1_a.b~c"), "dep-1_a.b~c");
    assert_eq!(encode_component("a b/c?d&e"), "a%20b%2Fc%3Fd%26e");
    assert_eq!(encode_component("é"), "%C3%A9");
}

#[test]
fn error_answers_map_to_error_kinds() {
    let body = br#"{"error": "no deployment abc", "details": []}"#;
    let failure = status_failure(StatusCode::NOT_FOUND, body);
    assert!(failure.error.is_not_found());
    assert_eq!(failure.error.message(), "no deployment abc");
    assert!(!failure.transient);

    let body =
        br#"{"error": "invalid taskfly.yml", "details": ["nodes.count: must be at least 1"]}"#;
    let failure = status_failure(StatusCode::BAD_REQUEST, body);
    assert!(failure.error.is_invalid_config());
    assert_eq!(failure.error.details(), ["nodes.count: must be at least 1"]);

    let body = br#"{"error": "bad after"}"#;
    assert!(status_failure(StatusCode::BAD_REQUEST, body)
        .error
        .is_invalid_input());
    assert!(status_failure(StatusCode::UNAUTHORIZED, body)
        .error
        .is_unauthorized());
    assert!(status_failure(StatusCode::CONFLICT, body)
        .error
        .is_conflict());
    assert!(status_failure(StatusCode::PAYLOAD_TOO_LARGE, body)
        .error
        .is_too_large());
    assert!(status_failure(StatusCode::UNSUPPORTED_MEDIA_TYPE, body)
        .error
        .is_unsupported_media());
    let failure = status_failure(StatusCode::TOO_MANY_REQUESTS, body);
    assert!(failure.error.is_rate_limited() && failure.transient);
    let failure = status_failure(StatusCode::SERVICE_UNAVAILABLE, b"<html>busy</html>");
    assert!(failure.error.is_transport() && failure.transient);
    assert!(failure.error.message().contains("503"), "{}", failure.error);
    assert!(!status_failure(StatusCode::INTERNAL_SERVER_ERROR, body).transient);
}

#[tokio::test]
async fn requests_carry_the_token_and_decode_answers() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let server = serve(move |parts, body| {
        let auth = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        record.lock().expect("lock").push((
            parts.method.to_string(),
            parts.uri.to_string(),
            auth,
            content_type,
            body,
        ));
        match parts.uri.path() {
            "/api/v1/deployments" => json_response(
                202,
                r#"{"deployment_id":"d1","status":"pending","nodes":2,"status_url":"/api/v1/deployments/d1"}"#,
            ),
            "/api/v1/deployments/d%201/logs" => json_response(200, r#"{"logs":[],"next":7}"#),
            "/api/v1/health" => json_response(200, r#"{"status":"ok"}"#),
            _ => json_response(404, r#"{"error":"nothing here"}"#),
        }
    })
    .await;

    let client =
        Client::new(&format!("{}/", server.url), Some("api-secret".into())).expect("client");
    let created = client
        .create_deployment(Bytes::from_static(b"\x1f\x8bbundle"))
        .await
        .expect("created");
    assert_eq!(created.deployment_id, "d1");
    let page = client
        .logs("d 1", Some("d1-0"), 5, 100)
        .await
        .expect("logs");
    assert_eq!(page.next, 7);
    client.health().await.expect("healthy");
    let error = client.deployment("zzz").await.expect_err("unknown");
    assert!(error.is_not_found());
    assert_eq!(error.message(), "nothing here");

    let seen = seen.lock().expect("lock");
    let (method, uri, auth, content_type, body) = &seen[0];
    assert_eq!(method, "POST");
    assert_eq!(uri, "/api/v1/deployments");
    assert_eq!(auth, "Bearer api-secret");
    assert_eq!(content_type, GZIP);
    assert_eq!(&body[..], b"\x1f\x8bbundle");
    assert_eq!(
        seen[1].1,
        "/api/v1/deployments/d%201/logs?after=5&limit=100&node=d1-0"
    );
    assert_eq!(seen[3].1, "/api/v1/deployments/zzz");
}

#[tokio::test]
async fn node_calls_retry_transient_failures() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = serve(move |parts, body| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        assert_eq!(parts.uri.path(), "/api/v1/nodes/status");
        let status: wire::StatusRequest = serde_json::from_slice(&body).expect("status body");
        assert_eq!(status.status, wire::NodeStatus::RunningScript);
        if n < 2 {
            json_response(503, r#"{"error":"restarting"}"#)
        } else {
            json_response(200, r#"{"status":"ok"}"#)
        }
    })
    .await;
    let client = Client::new(&server.url, Some("node-token".into())).expect("client");
    client
        .report_status(&wire::StatusRequest {
            status: wire::NodeStatus::RunningScript,
            message: None,
            exit_code: None,
        })
        .await
        .expect("retried until accepted");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Client-side calls are not retried.
    let error = client.stats().await.expect_err("503 once");
    assert!(error.is_transport());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_unreachable_daemon_is_a_transport_error_without_the_token() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let client = Client::new(&url, Some("very-secret-token".into()))
        .expect("client")
        .retry_budget(Duration::from_millis(600));
    let error = client.heartbeat().await.expect_err("nobody listens");
    assert!(error.is_transport());
    assert!(
        error
            .message()
            .starts_with(&format!("cannot reach the daemon at {url}: ")),
        "{error}"
    );
    assert!(!format!("{error} {error:?} {client:?}").contains("very-secret-token"));

    let error = client.stats().await.expect_err("nobody listens");
    assert!(error.is_transport());
}

/// A download's answer: `len` bytes counting up modulo 251 (a prime, so no power-of-two
/// chunking lines up with it), as `application/gzip`.
fn patterned_gzip(len: u32) -> Response<Full<Bytes>> {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    Response::builder()
        .header(CONTENT_TYPE, GZIP)
        .body(Full::new(Bytes::from(data)))
        .expect("response")
}

/// Whether `data` is what [`patterned_gzip`] sends, unchanged.
fn is_patterned(data: &[u8]) -> bool {
    data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8)
}

#[tokio::test]
async fn assets_are_streamed_to_a_file() {
    let server = serve(|parts, _| {
        assert_eq!(parts.uri.path(), "/api/v1/nodes/assets");
        let auth = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if auth != Some("Bearer node-token") {
            return json_response(401, r#"{"error":"bad token"}"#);
        }
        patterned_gzip(3_000_000)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("assets.tar.gz");

    let client = Client::new(&server.url, Some("node-token".into())).expect("client");
    let written = client.download_assets(&dest).await.expect("downloaded");
    assert_eq!(written, 3_000_000);
    let data = std::fs::read(&dest).expect("read");
    assert_eq!(data.len(), 3_000_000);
    assert!(is_patterned(&data));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let error = Client::new(&server.url, Some("wrong".into()))
        .expect("client")
        .download_assets(&dest)
        .await
        .expect_err("unauthorized");
    assert!(error.is_unauthorized());
}

#[tokio::test]
async fn small_assets_stay_in_memory_and_large_ones_go_to_the_file() {
    let server = serve(|_, _| patterned_gzip(100_000)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("assets.tar.gz");
    let client = Client::new(&server.url, Some("node-token".into())).expect("client");

    let kept = client
        .download_assets_or_keep(&dest, Some(100_000))
        .await
        .expect("downloaded");
    match kept {
        Downloaded::InMemory(data) => {
            assert_eq!(data.len(), 100_000);
            assert!(is_patterned(&data));
        }
        Downloaded::File(_) => panic!("100,000 bytes fit in memory"),
    }
    assert!(!dest.exists(), "no file for a bundle kept in memory");

    let written = client
        .download_assets_or_keep(&dest, Some(99_999))
        .await
        .expect("downloaded");
    assert!(matches!(written, Downloaded::File(100_000)), "{written:?}");
    assert_eq!(std::fs::read(&dest).expect("read").len(), 100_000);
}

#[tokio::test]
async fn register_sends_the_provision_token_and_decodes_the_work_order() {
    let server = serve(|parts, body| {
        assert_eq!(parts.uri.path(), "/api/v1/nodes/register");
        assert!(parts.headers.get(AUTHORIZATION).is_none());
        let request: wire::RegisterRequest = serde_json::from_slice(&body).expect("body");
        assert_eq!(request.provision_token, "prov");
        let env: BTreeMap<String, String> = [("SHARD".to_string(), "a.csv".to_string())].into();
        let answer = wire::RegisterResponse {
            auth_token: "auth".into(),
            deployment_id: "d1".into(),
            node_id: "d1-0".into(),
            node_index: 0,
            env,
            script: "setup.sh".into(),
            dest_dir: None,
            heartbeat_interval_s: 5,
            heartbeat_interval_ms: None,
            secret_names: Vec::new(),
            timeout_s: None,
            pooled: false,
            next_token: None,
            outputs: Vec::new(),
        };
        json_response(200, &serde_json::to_string(&answer).expect("json"))
    })
    .await;
    let client = Client::new(&server.url, None).expect("client");
    let registered = client.register("prov").await.expect("registered");
    assert_eq!(registered.node_id, "d1-0");
    assert_eq!(registered.env["SHARD"], "a.csv");
}

fn work_order(pooled: bool) -> wire::RegisterResponse {
    wire::RegisterResponse {
        auth_token: "auth".into(),
        deployment_id: "d1".into(),
        node_id: "d1-3".into(),
        node_index: 3,
        env: BTreeMap::new(),
        script: "setup.sh".into(),
        dest_dir: None,
        heartbeat_interval_s: 5,
        heartbeat_interval_ms: None,
        secret_names: Vec::new(),
        timeout_s: Some(60),
        pooled,
        next_token: None,
        outputs: Vec::new(),
    }
}

#[tokio::test]
async fn register_for_work_tells_work_no_work_retired_and_unknown_apart() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = serve(move |parts, body| {
        assert_eq!(parts.uri.path(), "/api/v1/nodes/register");
        let request: wire::RegisterRequest = serde_json::from_slice(&body).expect("body");
        assert_eq!(request.provision_token, "instance-token");
        match counter.fetch_add(1, Ordering::SeqCst) {
            0 => json_response(
                200,
                &serde_json::to_string(&work_order(true)).expect("json"),
            ),
            1 => Response::builder()
                .status(204)
                .body(Full::new(Bytes::new()))
                .expect("response"),
            2 => json_response(410, r#"{"error":"the pool retired this instance"}"#),
            _ => json_response(401, r#"{"error":"unknown token"}"#),
        }
    })
    .await;
    let client = Client::new(&server.url, None).expect("client");

    let answer = client.register_for_work("instance-token").await;
    assert_eq!(
        answer.expect("assigned"),
        Registration::Assigned(work_order(true))
    );
    let answer = client.register_for_work("instance-token").await;
    assert_eq!(answer.expect("no work"), Registration::NoWork);
    let answer = client.register_for_work("instance-token").await;
    assert_eq!(
        answer.expect("retired"),
        Registration::Retired {
            reason: "the pool retired this instance".into()
        }
    );
    let error = client
        .register_for_work("instance-token")
        .await
        .expect_err("unknown token");
    assert!(error.is_unauthorized(), "{error}");
    assert_eq!(error.message(), "unknown token");
    // A 401 is not retried.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn register_refuses_no_work_and_retired_naming_the_daemon() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = serve(move |_, _| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Response::builder()
                .status(204)
                .body(Full::new(Bytes::new()))
                .expect("response")
        } else {
            json_response(410, r#"{"error":"idle for too long"}"#)
        }
    })
    .await;
    let client = Client::new(&server.url, None).expect("client");
    let error = client.register("instance-token").await.expect_err("204");
    assert!(error.is_transport(), "{error}");
    assert!(error.message().contains(&server.url), "{error}");
    assert!(error.message().contains("204 No Content"), "{error}");
    let error = client.register("instance-token").await.expect_err("410");
    assert!(error.is_transport(), "{error}");
    assert!(error.message().contains(&server.url), "{error}");
    assert!(
        error.message().ends_with("(410 Gone): idle for too long"),
        "{error}"
    );
    assert!(!error.to_string().contains("instance-token"), "{error}");
}

#[test]
fn registration_outlasts_the_daemons_hold() {
    let client = Client::new("http://127.0.0.1:1", None)
        .expect("client")
        .timeout(Duration::from_secs(1));
    let call = client.register_call("token").expect("call");
    assert!(call
        .timeout
        .is_some_and(|limit| limit >= Duration::from_secs(60)));
    // A longer client time limit is kept.
    let call = client
        .timeout(Duration::from_secs(90))
        .register_call("token")
        .expect("call");
    assert_eq!(call.timeout, Some(Duration::from_secs(90)));
}
