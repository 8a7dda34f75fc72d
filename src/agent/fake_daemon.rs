//! A fake daemon speaking the node protocol, for the agent's tests and the local provider's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::api::wire;

/// A registration answer for node `dep-1` of deployment `dep`, authenticated as `node-token`,
/// running `setup.sh` with `env`.
pub(crate) fn registration(env: &[(&str, &str)]) -> wire::RegisterResponse {
    wire::RegisterResponse {
        auth_token: "node-token".into(),
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
        timeout_s: None,
        pooled: false,
        next_token: None,
    }
}

/// What the fake daemon serves and what it received.
#[derive(Default)]
pub(crate) struct Daemon {
    pub(crate) statuses: Vec<wire::StatusRequest>,
    pub(crate) lines: Vec<wire::LogLineIn>,
    pub(crate) shutdown: bool,
    pub(crate) bundle: Vec<u8>,
    pub(crate) registration: Option<wire::RegisterResponse>,
    /// Answers to registrations, in order; once used up, `registration` answers.
    pub(crate) register_answers: std::collections::VecDeque<RegisterAnswer>,
    /// The token of every registration, in order.
    pub(crate) register_tokens: Vec<String>,
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
        let recorded = daemon.lock().expect("lock").recorded.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let next = recorded.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            if condition(&daemon.lock().expect("lock")) {
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
    /// 200 with this work order; the daemon then serves `bundle` and answers heartbeats
    /// with `shutdown`.
    Assign {
        registration: Box<wire::RegisterResponse>,
        bundle: Vec<u8>,
        shutdown: bool,
    },
    /// 204: no work yet.
    NoWork,
    /// 410: the instance is retired.
    Gone,
    /// 401: unknown token.
    Unauthorized,
    /// Never answers (a long poll that does not end).
    Hold,
}

fn empty_response(status: u16, body: &'static [u8]) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(body)))
        .expect("response")
}

/// Answers a registration from the daemon's queue, else with its one `registration`.
/// `None`: hold the request forever.
fn answer_registration(daemon: &mut Daemon, body: &[u8]) -> Option<Response<Full<Bytes>>> {
    let request: wire::RegisterRequest = serde_json::from_slice(body).expect("register");
    daemon.register_tokens.push(request.provision_token);
    if let Some(probe) = &daemon.register_probe {
        let seen = probe.exists();
        daemon.probe_seen.push(seen);
    }
    let answer = match daemon.register_answers.pop_front() {
        None => daemon.registration.clone().expect("registration"),
        Some(RegisterAnswer::Assign {
            registration,
            bundle,
            shutdown,
        }) => {
            daemon.bundle = bundle;
            daemon.shutdown = shutdown;
            *registration
        }
        Some(RegisterAnswer::NoWork) => return Some(empty_response(204, b"")),
        Some(RegisterAnswer::Gone) => {
            return Some(empty_response(410, br#"{"error":"instance retired"}"#))
        }
        Some(RegisterAnswer::Unauthorized) => {
            return Some(empty_response(401, br#"{"error":"unknown token"}"#))
        }
        Some(RegisterAnswer::Hold) => {
            daemon.held.notify_one();
            return None;
        }
    };
    let answer = serde_json::to_vec(&answer).expect("json");
    Some(Response::new(Full::new(Bytes::from(answer))))
}

/// A fake daemon on 127.0.0.1:0 implementing the node endpoints.
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
                        let authorized = request
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v == "Bearer node-token");
                        let body = request.into_body().collect().await?.to_bytes();
                        if path == "/api/v1/nodes/register" {
                            let answer =
                                answer_registration(&mut daemon.lock().expect("lock"), &body);
                            return match answer {
                                Some(response) => Ok(response),
                                None => std::future::pending().await,
                            };
                        }
                        let mut daemon = daemon.lock().expect("lock");
                        let answer = match path.as_str() {
                            _ if !authorized => {
                                return Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(401)
                                        .body(Full::new(Bytes::from_static(
                                            br#"{"error":"bad token"}"#,
                                        )))
                                        .expect("response"),
                                )
                            }
                            "/api/v1/nodes/assets" => daemon.bundle.clone(),
                            "/api/v1/nodes/heartbeat" => {
                                format!(r#"{{"status":"ok","shutdown":{}}}"#, daemon.shutdown)
                                    .into_bytes()
                            }
                            "/api/v1/nodes/status" => {
                                daemon
                                    .statuses
                                    .push(serde_json::from_slice(&body).expect("status"));
                                daemon.recorded.notify_waiters();
                                br#"{"status":"ok"}"#.to_vec()
                            }
                            "/api/v1/nodes/logs" => {
                                let logs: wire::LogsRequest =
                                    serde_json::from_slice(&body).expect("logs");
                                daemon.lines.extend(logs.lines);
                                daemon.recorded.notify_waiters();
                                br#"{"status":"ok"}"#.to_vec()
                            }
                            other => panic!("unexpected path {other}"),
                        };
                        Ok(Response::new(Full::new(Bytes::from(answer))))
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

/// A gzip-compressed tar with `setup.sh` (mode 0644) holding `script`.
pub(crate) fn bundle(script: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "setup.sh", script.as_bytes())
        .expect("append");
    builder.into_inner().expect("tar").finish().expect("gzip")
}
