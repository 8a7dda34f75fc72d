//! `notify:` webhooks (SPEC §1): a real HTTP receiver on loopback checks the signature,
//! answers 500 and sees the same notification again, and a notification a killed daemon left
//! pending is delivered by the daemon started again, and one it never made (killed between
//! the end and the notification) is made by it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use sha2::Sha256;

use crate::support::cli_daemon::{free_port, Daemon, DaemonOptions};
use crate::support::engine_util::poll_until;
use crate::support::{local_yml, Project, TestEngine};

/// One notification as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    signature: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Status codes to answer with, in turn; 200 once they are used up.
    answers: VecDeque<u16>,
    /// Answer this to every request while set.
    always: Option<u16>,
}

/// A webhook receiver on `127.0.0.1:0`, on a runtime of its own (so blocking tests can use it).
struct Receiver {
    url: String,
    state: Arc<Mutex<ReceiverState>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    fn start(answers: &[u16]) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let state = Arc::new(Mutex::new(ReceiverState {
            answers: answers.iter().copied().collect(),
            ..ReceiverState::default()
        }));
        // Bound here, served by the receiver's runtime (a test may itself run on one).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!(
            "http://{}/hooks/taskfly",
            listener.local_addr().expect("address")
        );
        let shared = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned)
                            };
                            let (signature, content_type) =
                                (header("x-taskfly-signature"), header("content-type"));
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let code = {
                                let mut state = state.lock().expect("state");
                                state.received.push(Received {
                                    signature,
                                    content_type,
                                    body,
                                });
                                match state.always {
                                    Some(code) => code,
                                    None => state.answers.pop_front().unwrap_or(200),
                                }
                            };
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(code).expect("status");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Receiver {
            url,
            state,
            runtime: Some(runtime),
        }
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().expect("state").received.clone()
    }

    fn answer_always(&self, code: Option<u16>) {
        self.state.lock().expect("state").always = code;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn signature_of(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// A project of two local nodes, node 1 failing, notifying `url`.
fn failing_project(url: &str, secret: &str) -> Project {
    let yml = format!(
        "{}notify:\n  webhook: {url}\n  on: [failed, completed]\n  secret: {secret}\n",
        local_yml(2, "")
    );
    Project::new(&yml).script(
        "if [ \"$TASKFLY_NODE_INDEX\" = 1 ]; then echo 'disk full' >&2; exit 3; fi\necho fine\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_is_sent_again_after_a_500_until_taken() {
    let receiver = Receiver::start(&[500]);
    let engine =
        TestEngine::start_with(|c| c.webhook_retry_backoff(Duration::from_millis(50))).await;
    let project = failing_project(&receiver.url, "s3cret-webhook-key");
    let id = engine.deploy(project.path()).await;
    let view = poll_until(&engine, &id, "the notification delivered", |view| {
        view.notify
            .as_ref()
            .is_some_and(|n| n.status == "delivered")
    })
    .await;
    assert_eq!(view.status.as_str(), "failed");
    let notify = view.notify.expect("notify");
    assert_eq!(notify.attempts, 2, "{notify:?}");
    assert_eq!(
        notify.last_error.as_deref(),
        Some("the receiver answered HTTP 500")
    );
    assert!(notify.delivered_at.is_some());

    let received = receiver.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(
        received[0].body, received[1].body,
        "the same notification, sent again"
    );
    for got in &received {
        assert_eq!(
            got.signature.as_deref(),
            Some(signature_of("s3cret-webhook-key", &got.body).as_str()),
            "the signature is the body's HMAC-SHA256 with notify.secret"
        );
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
    }
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).expect("json");
    assert_eq!(body["deployment_id"], id.as_str());
    assert_eq!(body["status"], "failed");
    assert_eq!(
        (
            body["nodes_completed"].as_u64(),
            body["nodes_failed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(body["failed_nodes"][0]["node_index"], 1);
    assert_eq!(body["failed_nodes"][0]["exit_code"], 3);
    assert!(
        body["failed_nodes"][0]["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("disk full")),
        "{body:#}"
    );
    assert!(
        body["duration_s"].as_f64().is_some_and(|s| s > 0.0),
        "{body:#}"
    );
    assert_eq!(
        body["dashboard_url"],
        format!("{}/ui/deployments/{id}", engine.url)
    );
    let text = String::from_utf8_lossy(&received[0].body);
    assert!(
        !text.contains("s3cret-webhook-key"),
        "the secret is not in the body"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_not_listed_in_on_sends_nothing() {
    let receiver = Receiver::start(&[]);
    let engine = TestEngine::start().await;
    let yml = format!(
        "{}notify:\n  webhook: {}\n  on: [failed]\n",
        local_yml(1, ""),
        receiver.url
    );
    let project = Project::new(&yml).script("echo fine\n");
    let done = engine.run(project.path()).await;
    assert_eq!(done.status.as_str(), "completed");
    // The engine's own tasks (the notification's is one) end before stop returns.
    engine.stop().await;
    assert!(receiver.received().is_empty());
    assert_eq!(done.notify, None);
}

#[test]
fn a_notification_left_pending_by_a_killed_daemon_is_delivered_after_its_restart() {
    let receiver = Receiver::start(&[]);
    receiver.answer_always(Some(503));
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let project = failing_project(&receiver.url, "restart-key");
    let id = daemon.up(project.path());
    let pending = daemon.wait_for_status(&id, Duration::from_secs(60), "a failed try", |s| {
        s["notify"]["attempts"].as_u64().is_some_and(|n| n >= 1)
    });
    assert_eq!(pending["notify"]["status"], "pending", "{pending:#}");
    assert!(
        pending["notify"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{pending:#}"
    );

    daemon.kill();
    let tried_before = receiver.received().len();
    receiver.answer_always(None);
    daemon.restart();
    let delivered = daemon.wait_for_status(&id, Duration::from_secs(60), "delivery", |s| {
        s["notify"]["status"] == "delivered"
    });
    let received = receiver.received();
    assert!(received.len() > tried_before, "{received:?}");
    let last = received.last().expect("a delivery");
    assert_eq!(
        last.signature.as_deref(),
        Some(signature_of("restart-key", &last.body).as_str())
    );
    assert_eq!(
        received[0].body, last.body,
        "the stored notification, unchanged"
    );
    assert!(
        delivered["notify"]["delivered_at"].is_string(),
        "{delivered:#}"
    );
    daemon.stop();
}

#[test]
fn a_notification_lost_with_a_killed_daemon_is_made_again_after_its_restart() {
    let receiver = Receiver::start(&[]);
    receiver.answer_always(Some(503));
    let mut daemon = Daemon::start_on(free_port(), DaemonOptions::default(), &[]);
    let project = failing_project(&receiver.url, "lost-key");
    let id = daemon.up(project.path());
    daemon.wait_for_status(&id, Duration::from_secs(60), "a failed try", |s| {
        s["notify"]["attempts"].as_u64().is_some_and(|n| n >= 1)
    });
    daemon.kill();
    // As a daemon killed between the deployment's end and its notification's making leaves
    // the store: the deployment final, no notification.
    let state = rusqlite::Connection::open(daemon.data_dir.path().join("state.db"))
        .expect("the daemon's state");
    let removed = state
        .execute("DELETE FROM webhook_deliveries", [])
        .expect("delete the notification");
    assert_eq!(removed, 1);
    drop(state);
    let tried_before = receiver.received().len();
    receiver.answer_always(None);

    daemon.restart();
    let delivered = daemon.wait_for_status(&id, Duration::from_secs(60), "delivery", |s| {
        s["notify"]["status"] == "delivered"
    });
    assert_eq!(delivered["status"], "failed", "{delivered:#}");
    let received = receiver.received();
    assert_eq!(received.len(), tried_before + 1, "{received:?}");
    let last = received.last().expect("a delivery");
    assert_eq!(
        last.signature.as_deref(),
        Some(signature_of("lost-key", &last.body).as_str())
    );
    let body: serde_json::Value = serde_json::from_slice(&last.body).expect("json");
    assert_eq!(body["deployment_id"], id.as_str());
    assert_eq!(body["status"], "failed");
    daemon.stop();
}
