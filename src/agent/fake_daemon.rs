//! One fake daemon speaking the node protocol, for the unit tests of both agents (the Rust
//! agent and the `sh` bootstrap) and of the local provider.
//!
//! It serves on 127.0.0.1:0 from a tokio task ([`fake_daemon`]), or from a thread of its own
//! for tests that block ([`BackgroundDaemon`]). Registration answers come from a list, then
//! from one default work order; what the nodes report is recorded in [`Daemon`].

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::agent::bootstrap::registration_env;
use crate::api::wire;
use crate::sync::lock;

/// The node token of [`registration`], which the default node authenticates with.
const NODE_TOKEN: &str = "node-token";
const JSON: &str = "application/json";
/// What ends a connection without an answer.
type Failure = std::io::Error;

/// A registration answer for node `dep-1` of deployment `dep`, authenticated as `node-token`,
/// running `setup.sh` with `env`.
pub(crate) fn registration(env: &[(&str, &str)]) -> wire::RegisterResponse {
    wire::RegisterResponse {
        auth_token: NODE_TOKEN.into(),
        deployment_id: "dep".into(),
        node_id: "dep-1".into(),
        node_index: 1,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        script: "setup.sh".into(),
        dest_dir: None,
        heartbeat_interval_s: 1,
        heartbeat_interval_ms: None,
        secret_names: Vec::new(),
        timeout_s: None,
        pooled: false,
        next_token: None,
        outputs: Vec::new(),
    }
}

/// What the fake daemon serves and what it received.
///
/// Node calls carrying the token of a node in `nodes` are that node's; calls carrying
/// `node-token` are the default node's (`bundle`, `shutdown`). Every status report of either
/// lands in `statuses`, every JSON log line in `lines`.
#[derive(Default)]
pub(crate) struct Daemon {
    pub(crate) statuses: Vec<wire::StatusRequest>,
    pub(crate) lines: Vec<wire::LogLineIn>,
    pub(crate) shutdown: bool,
    pub(crate) bundle: Vec<u8>,
    pub(crate) registration: Option<wire::RegisterResponse>,
    /// Answers to registrations, in order; once used up, `registration` answers, or 404
    /// without one.
    pub(crate) register_answers: VecDeque<RegisterAnswer>,
    /// The nodes [`RegisterAnswer::Node`] assigns, by auth token.
    pub(crate) nodes: BTreeMap<String, FakeNode>,
    /// When set, the provision token a registration must carry (else 401); an answer's
    /// `next_token` replaces it.
    pub(crate) provision_token: Option<String>,
    /// The token of every registration, in order.
    pub(crate) register_tokens: Vec<String>,
    /// The nonce of every registration, in order.
    pub(crate) register_nonces: Vec<Option<String>>,
    /// Heartbeats received.
    pub(crate) heartbeats: usize,
    /// When set, a log call whose body is longer is answered 413.
    pub(crate) max_logs_body: Option<usize>,
    /// Routes (`register`, `status`, ...) whose next call is handled and recorded, but whose
    /// answer is lost: the connection closes instead. Each entry loses one answer.
    pub(crate) lose_answers: Vec<&'static str>,
    /// The HTTP status of every registration answered, in order.
    pub(crate) register_statuses: Vec<u16>,
    /// Whether this path existed at each registration, when set.
    pub(crate) register_probe: Option<PathBuf>,
    pub(crate) probe_seen: Vec<bool>,
    /// Notified when a registration is held by [`RegisterAnswer::Hold`].
    pub(crate) held: Arc<tokio::sync::Notify>,
    /// Notified (all waiters) after every status or log call is recorded.
    pub(crate) recorded: Arc<tokio::sync::Notify>,
}

impl Daemon {
    /// Waits (at most 20 s) until `condition` holds of what the daemon recorded.
    pub(crate) async fn wait_until(
        daemon: &Mutex<Daemon>,
        what: &str,
        condition: impl Fn(&Daemon) -> bool,
    ) {
        let recorded = lock(daemon).recorded.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let next = recorded.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            if condition(&lock(daemon)) {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, next).await.is_ok(),
                "timed out waiting until {what}"
            );
        }
    }
}

/// One answer of the fake daemon to a registration.
pub(crate) enum RegisterAnswer {
    /// 200 with this work order, for the default node; the daemon then serves `bundle` and
    /// answers heartbeats with `shutdown`.
    Assign {
        registration: Box<wire::RegisterResponse>,
        bundle: Vec<u8>,
        shutdown: bool,
    },
    /// 200 with the work order of the node in [`Daemon::nodes`] with this auth token.
    Node(&'static str),
    /// 204: no work yet.
    NoWork,
    /// 410: the instance is retired.
    Gone,
    /// 401: unknown token.
    Unauthorized,
    /// Never answers (a long poll that does not end).
    Hold,
}

/// A node of [`Daemon::nodes`], and what its agent told the daemon.
pub(crate) struct FakeNode {
    pub(crate) registration: wire::RegisterResponse,
    pub(crate) bundle: Vec<u8>,
    /// What heartbeats answer.
    pub(crate) shutdown: bool,
    /// Each status report, in order: its status, exit code and message.
    pub(crate) statuses: Vec<(String, Option<i64>, Option<String>)>,
    /// Each plain-text log piece taken: stream, offset, text.
    pub(crate) logs: Vec<(String, u64, String)>,
}

impl FakeNode {
    /// The text of `stream` as shipped, pieces in offset order.
    pub(crate) fn output(&self, stream: &str) -> String {
        let mut pieces: Vec<_> = self.logs.iter().filter(|l| l.0 == stream).collect();
        pieces.sort_by_key(|l| l.1);
        pieces.iter().map(|l| l.2.as_str()).collect()
    }

    /// The status of each report, in order.
    pub(crate) fn status_names(&self) -> Vec<&str> {
        self.statuses.iter().map(|s| s.0.as_str()).collect()
    }
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    if !content_type.is_empty() {
        builder = builder.header(CONTENT_TYPE, content_type);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn error_response(status: u16, text: &str) -> Response<Full<Bytes>> {
    response(
        status,
        JSON,
        format!(r#"{{"error":"{text}"}}"#).into_bytes(),
    )
}

/// Answers a registration from the daemon's queue, else with its one `registration`, as JSON
/// or, for `format=sh`, as the bootstrap's variable assignments. `None`: hold the request
/// forever.
fn answer_registration(
    daemon: &mut Daemon,
    query: &str,
    body: &[u8],
) -> Option<Response<Full<Bytes>>> {
    let request: Option<wire::RegisterRequest> = serde_json::from_slice(body).ok();
    let (token, nonce) = request
        .map(|r| (r.provision_token, r.nonce))
        .unwrap_or_default();
    daemon.register_tokens.push(token.clone());
    daemon.register_nonces.push(nonce);
    if let Some(probe) = &daemon.register_probe {
        let seen = probe.exists();
        daemon.probe_seen.push(seen);
    }
    let answer = if daemon
        .provision_token
        .as_ref()
        .is_some_and(|expected| *expected != token)
    {
        Err(error_response(401, "not the provision token"))
    } else {
        match daemon.register_answers.pop_front() {
            None => daemon
                .registration
                .clone()
                .ok_or_else(|| error_response(404, "no more answers")),
            Some(RegisterAnswer::Assign {
                registration,
                bundle,
                shutdown,
            }) => {
                daemon.bundle = bundle;
                daemon.shutdown = shutdown;
                Ok(*registration)
            }
            Some(RegisterAnswer::Node(token)) => Ok(daemon.nodes[token].registration.clone()),
            Some(RegisterAnswer::NoWork) => Err(response(204, "", Vec::new())),
            Some(RegisterAnswer::Gone) => Err(error_response(410, "instance retired")),
            Some(RegisterAnswer::Unauthorized) => Err(error_response(401, "unknown token")),
            Some(RegisterAnswer::Hold) => {
                daemon.held.notify_one();
                return None;
            }
        }
    };
    let answer = match answer {
        Ok(registration) => {
            if let (Some(expected), Some(next)) =
                (&mut daemon.provision_token, &registration.next_token)
            {
                expected.clone_from(next);
            }
            if query.split('&').any(|pair| pair == "format=sh") {
                let text = registration_env(&registration).expect("the registration as sh");
                response(200, "text/plain; charset=utf-8", text.into_bytes())
            } else {
                let json = serde_json::to_vec(&registration).expect("json");
                response(200, JSON, json)
            }
        }
        Err(response) => response,
    };
    daemon.register_statuses.push(answer.status().as_u16());
    Some(answer)
}

/// Answers a node call of the node authenticated by `bearer`.
fn answer_node_call(
    daemon: &mut Daemon,
    route: &str,
    query: &str,
    bearer: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let ok = || response(200, JSON, br#"{"status":"ok"}"#.to_vec());
    let mut node = daemon.nodes.get_mut(bearer);
    if node.is_none() && bearer != NODE_TOKEN {
        return error_response(401, "bad token");
    }
    if route == "logs" && daemon.max_logs_body.is_some_and(|max| body.len() > max) {
        return error_response(413, "the body is too large");
    }
    match route {
        "assets" => {
            let bundle = node.map_or(&daemon.bundle, |node| &node.bundle).clone();
            response(200, "", bundle)
        }
        "heartbeat" => {
            daemon.heartbeats += 1;
            let shutdown = node.map_or(daemon.shutdown, |node| node.shutdown);
            response(
                200,
                JSON,
                format!(r#"{{"status":"ok","shutdown":{shutdown}}}"#).into_bytes(),
            )
        }
        "status" => {
            daemon
                .statuses
                .push(serde_json::from_slice(body).expect("status"));
            if let Some(node) = &mut node {
                let report: serde_json::Value = serde_json::from_slice(body).expect("status");
                node.statuses.push((
                    report["status"].as_str().unwrap_or_default().to_owned(),
                    report["exit_code"].as_i64(),
                    report["message"].as_str().map(str::to_owned),
                ));
            }
            daemon.recorded.notify_waiters();
            ok()
        }
        "logs" if query.contains("stream=") => {
            let mut stream = String::new();
            let mut offset = 0;
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("stream", value)) => stream = value.to_owned(),
                    Some(("offset", value)) => offset = value.parse().expect("an offset"),
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(body).into_owned();
            if let Some(node) = &mut node {
                node.logs.push((stream, offset, text));
            }
            daemon.recorded.notify_waiters();
            ok()
        }
        "logs" => {
            let logs: wire::LogsRequest = serde_json::from_slice(body).expect("logs");
            daemon.lines.extend(logs.lines);
            daemon.recorded.notify_waiters();
            ok()
        }
        other => panic!("unexpected path {other}"),
    }
}

/// A fake daemon on 127.0.0.1:0 implementing the node endpoints; its URL, and the task
/// serving it.
pub(crate) async fn fake_daemon(
    daemon: Arc<Mutex<Daemon>>,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let daemon = daemon.clone();
            connections.spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let daemon = daemon.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let query = request.uri().query().unwrap_or_default().to_string();
                        let bearer = request
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or_default()
                            .to_string();
                        let body = match request.into_body().collect().await {
                            Ok(body) => body.to_bytes(),
                            Err(e) => return Err(Failure::other(e)),
                        };
                        let Some(route) = path.strip_prefix("/api/v1/nodes/") else {
                            return Ok::<_, Failure>(error_response(404, "no such route"));
                        };
                        let answer = {
                            let mut daemon = lock(&daemon);
                            let answer = if route == "register" {
                                answer_registration(&mut daemon, &query, &body)
                            } else {
                                Some(answer_node_call(&mut daemon, route, &query, &bearer, &body))
                            };
                            let lost = daemon.lose_answers.iter().position(|r| *r == route);
                            lost.map(|at| daemon.lose_answers.remove(at));
                            answer.ok_or(()).map(|answer| (answer, lost.is_some()))
                        };
                        let answer = match answer {
                            // An error closes the connection without an answer.
                            Ok((_, true)) => {
                                return Err(Failure::other(format!(
                                    "the answer to {route} is lost"
                                )))
                            }
                            Ok((answer, false)) => Some(answer),
                            Err(()) => None,
                        };
                        match answer {
                            Some(response) => Ok(response),
                            None => std::future::pending().await,
                        }
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, task)
}

/// A fake daemon serving from a thread of its own (with its own runtime) for as long as the
/// test process lives, for tests that block while an agent runs.
#[derive(Clone)]
pub(crate) struct BackgroundDaemon {
    pub(crate) url: String,
    daemon: Arc<Mutex<Daemon>>,
}

impl BackgroundDaemon {
    pub(crate) fn start(daemon: Daemon) -> BackgroundDaemon {
        let daemon = Arc::new(Mutex::new(daemon));
        let served = Arc::clone(&daemon);
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the fake daemon");
            runtime.block_on(async move {
                let (url, server) = fake_daemon(served).await;
                sender.send(url).expect("the test waits for the URL");
                let _ = server.await;
            });
        });
        let url = receiver.recv().expect("the fake daemon's URL");
        BackgroundDaemon { url, daemon }
    }

    /// How many heartbeats the daemon received.
    pub(crate) fn heartbeats(&self) -> usize {
        self.state().heartbeats
    }

    /// What the daemon serves and received.
    pub(crate) fn state(&self) -> MutexGuard<'_, Daemon> {
        lock(&self.daemon)
    }
}

/// A gzip-compressed tar of `files` (path, text; mode 0644), as a deployment's bundle.
pub(crate) fn bundle_of(files: &[(&str, &str)]) -> Vec<u8> {
    let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut archive = tar::Builder::new(gzip);
    for (path, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, path, text.as_bytes())
            .expect("append");
    }
    archive
        .into_inner()
        .and_then(flate2::write::GzEncoder::finish)
        .expect("the bundle")
}

/// A bundle with `setup.sh` (mode 0644) holding `script`.
pub(crate) fn bundle(script: &str) -> Vec<u8> {
    bundle_of(&[("setup.sh", script)])
}
