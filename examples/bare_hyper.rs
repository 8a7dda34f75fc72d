//! The baseline of the heartbeat comparison: a bare hyper server (built from the engine's own
//! dependencies) answering `POST /api/v1/nodes/heartbeat` as the engine does — the body parsed
//! as the same wire type, the same JSON answer — and nothing else: no routing table, no token
//! check, no store, no metrics. Its connections are served as the engine serves its own:
//! `TCP_NODELAY` set, and hyper given a timer and the engine's default 10 s limit to read a
//! request's headers (the engine's defence against clients that send them slowly), so the
//! comparison counts the engine's own work and not a different hyper setup.
//!
//! Run it with (it prints `url=http://127.0.0.1:<port>`; `scripts/bench-heartbeat.sh` points
//! wrk at it and at the engine):
//!
//! ```text
//! cargo run --release --example bare_hyper
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use taskfly::wire::HeartbeatRequest;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The engine's answer to a heartbeat of a running node.
#[derive(serde::Serialize)]
struct HeartbeatResponse {
    status: &'static str,
    shutdown: bool,
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/api/v1/nodes/heartbeat" {
        return Ok(with_status(StatusCode::NOT_FOUND, Bytes::new()));
    }
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(with_status(StatusCode::BAD_REQUEST, Bytes::new())),
    };
    let parsed: Result<HeartbeatRequest, _> = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(HeartbeatRequest::default())
    } else {
        serde_json::from_slice(&body)
    };
    if parsed.is_err() {
        return Ok(with_status(StatusCode::BAD_REQUEST, Bytes::new()));
    }
    let json = serde_json::to_vec(&HeartbeatResponse {
        status: "ok",
        shutdown: false,
    })
    .unwrap_or_default();
    let mut response = with_status(StatusCode::OK, Bytes::from(json));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn with_status(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("url=http://{}", listener.local_addr()?);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let connection = http.serve_connection(TokioIo::new(stream), service_fn(answer));
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}
