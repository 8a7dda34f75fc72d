//! Heartbeats on one keep-alive connection (issue #12): the connection keeps the hash of the
//! token it last sent, and yet a rotated token is refused, and a final node told to stop, on
//! the very next request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::support::engine_provider::RecordingProvider;
use crate::support::engine_util::{poll_nodes_status, POLL_LIMIT};
use crate::support::hostile_http::socket_address;
use crate::support::{local_yml, Project, TestEngine};

const SCRIPT: &str = "#!/bin/sh\necho never run by this test\n";

/// One HTTP/1.1 connection to the engine: every request goes over it, in turn.
struct OneConnection {
    sender: http1::SendRequest<Full<Bytes>>,
    connection: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl OneConnection {
    async fn open(url: &str) -> OneConnection {
        let stream = tokio::net::TcpStream::connect(socket_address(url))
            .await
            .expect("connect");
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        OneConnection {
            sender,
            connection: tokio::spawn(connection),
        }
    }

    /// `POST path` with a JSON `body` and the bearer `token`; the status and the body as JSON.
    async fn post(
        &mut self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", "engine")
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let answer = tokio::time::timeout(POLL_LIMIT, async {
            self.sender
                .ready()
                .await
                .expect("the connection stays open");
            self.sender.send_request(request).await
        })
        .await
        .expect("an answer in time")
        .expect("an answer on the same connection");
        let status = answer.status().as_u16();
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
        (status, json)
    }

    async fn heartbeat(&mut self, token: &str) -> (u16, serde_json::Value) {
        self.post("/api/v1/nodes/heartbeat", Some(token), "{}")
            .await
    }

    async fn register(&mut self, provision_token: &str, nonce: &str) -> String {
        let body = serde_json::json!({ "provision_token": provision_token, "nonce": nonce });
        let (status, answer) = self
            .post("/api/v1/nodes/register", None, &body.to_string())
            .await;
        assert_eq!(status, 200, "{answer}");
        answer["auth_token"]
            .as_str()
            .expect("auth_token")
            .to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_sees_a_rotated_token_and_a_final_node_on_the_next_request() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|config| {
        config
            .provider(provider.as_provider())
            .heartbeat_timeout(Duration::from_secs(3600))
    })
    .await;
    let project = Project::new(&local_yml(1, "")).script(SCRIPT);
    let id = engine.deploy(project.path()).await;
    let call = provider.wait_for_provisioned(&id, 1).await.remove(0);
    poll_nodes_status(&engine, &id, "booting").await;

    let mut connection = OneConnection::open(&engine.url).await;
    let first = connection.register(&call.provision_token, "nonce-1").await;
    let running = serde_json::json!({ "status": "ok", "shutdown": false });
    for _ in 0..3 {
        assert_eq!(connection.heartbeat(&first).await, (200, running.clone()));
    }

    // The registration resent (its answer lost): a new token replaces the first one.
    let second = connection.register(&call.provision_token, "nonce-1").await;
    assert_ne!(first, second);
    let (status, refused) = connection.heartbeat(&first).await;
    assert_eq!(
        status, 401,
        "the replaced token, sent again on its connection: {refused}"
    );
    assert_eq!(connection.heartbeat(&second).await, (200, running.clone()));
    let (status, refused) = connection.heartbeat(&first).await;
    assert_eq!(status, 401, "{refused}");

    for report in [
        r#"{"status":"running_script"}"#,
        r#"{"status":"completed","exit_code":0}"#,
    ] {
        let (status, answer) = connection
            .post("/api/v1/nodes/status", Some(&second), report)
            .await;
        assert_eq!(status, 200, "{report}: {answer}");
    }
    let stop = serde_json::json!({ "status": "ok", "shutdown": true });
    assert_eq!(
        connection.heartbeat(&second).await,
        (200, stop),
        "a completed node is told to stop on its next heartbeat"
    );
    assert!(
        !connection.connection.is_finished(),
        "every request went over the one connection"
    );
    drop(connection);
    engine.stop().await;
}

/// Reads from `stream` until `done` holds for what was read, or the stream ends.
async fn read_until(stream: &mut tokio::net::TcpStream, done: impl Fn(&str) -> bool) -> String {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    tokio::time::timeout(POLL_LIMIT, async {
        let mut buffer = [0; 4096];
        while !done(&String::from_utf8_lossy(&read)) {
            let n = stream.read(&mut buffer).await.expect("read");
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("the server answered or closed in time");
    String::from_utf8_lossy(&read).into_owned()
}

/// Stopping the server (issue #12's cheaper shutdown): an idle keep-alive connection is
/// closed at once, a request in flight is answered (then its connection closed), and the
/// stop waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_closes_idle_connections_and_answers_the_request_in_flight() {
    use tokio::io::AsyncWriteExt;
    let engine = TestEngine::start().await;
    let address = socket_address(&engine.url);

    let mut idle = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: engine\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until(&mut idle, |read| read.ends_with("}")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // In flight: its headers are in, and the server asked for its body (`100 Continue`).
    let body = br#"{"provision_token":"not-a-token"}"#;
    let mut in_flight = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/nodes/register HTTP/1.1\r\nhost: engine\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.expect("write");
    let continued = read_until(&mut in_flight, |read| read.ends_with("\r\n\r\n")).await;
    assert!(continued.starts_with("HTTP/1.1 100"), "{continued}");

    let stopping = tokio::spawn(engine.stop());
    let closed = read_until(&mut idle, |_| false).await;
    assert_eq!(
        closed, "",
        "the idle connection is closed without an answer"
    );
    assert!(
        !stopping.is_finished(),
        "the stop waits for the request in flight"
    );

    in_flight.write_all(body).await.expect("write the body");
    let answer = read_until(&mut in_flight, |_| false).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "answered: {answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "and closed: {answer}"
    );
    tokio::time::timeout(POLL_LIMIT, stopping)
        .await
        .expect("the server stopped once the request was answered")
        .expect("stop");
}
