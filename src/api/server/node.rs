//! The node protocol (SPEC §4, node endpoints): wire bodies turned into the engine's model
//! types and its answers back into wire bodies. A node is identified by its bearer token.

use std::net::SocketAddr;

use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::body::{
    full, header, json, json_bytes, plain_text, read_json, read_json_or_empty,
    read_limited_in_time, Body,
};
use super::{views, Shared};
use crate::api::limits::Connection;
use crate::error::{Error, Result};
use crate::orchestrator::NodeAssets;
use crate::state::model::{
    LogBatch, Node, Registration, ReportedLine, ResourceSample, StatusReport,
};
use crate::state::LogStream;
use crate::wire::{self, ErrorBody, StatusOk};

/// `POST /nodes/register`, with failed attempts rate-limited per client address.
pub(super) async fn register(
    shared: &Shared,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let registrations = &shared.registrations;
    registrations.check(peer.ip())?;
    let as_shell = register_format(request.uri().query())?;
    let body: wire::RegisterRequest = read_json(shared, request).await?;
    if body
        .nonce
        .as_ref()
        .is_some_and(|n| n.is_empty() || n.len() > 256)
    {
        return Err(Error::invalid_input("`nonce` must hold 1 to 256 bytes"));
    }
    let registered = shared
        .engine
        .register_node(&body.provision_token, body.nonce.as_deref())
        .await;
    let assignment = match registered {
        Ok(Registration::Assigned(assignment)) => assignment,
        Ok(Registration::NoWork) => {
            let mut response = Response::new(full(Vec::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            return Ok(response);
        }
        Ok(Registration::Retired { reason }) => {
            let error = ErrorBody {
                error: reason,
                details: Vec::new(),
            };
            return Ok(json(StatusCode::GONE, &error));
        }
        Err(e) => {
            if e.is_unauthorized() || e.is_conflict() {
                registrations.record_failure(peer.ip());
            }
            return Err(e);
        }
    };
    let registered = views::assignment(assignment);
    if as_shell {
        let text = crate::agent::bootstrap::registration_env(&registered)?;
        return Ok(plain_text(text));
    }
    Ok(json(StatusCode::OK, &registered))
}

/// The answers to a heartbeat, as [`wire::HeartbeatResponse`] writes them (a test checks
/// they are): every heartbeat gets one of these, so it is sent from static bytes.
const HEARTBEAT_CONTINUE: &[u8] = br#"{"status":"ok","shutdown":false}"#;
const HEARTBEAT_SHUTDOWN: &[u8] = br#"{"status":"ok","shutdown":true}"#;

/// The node protocol past registration, for the node whose token the request carries. The
/// heartbeat, every live node's most frequent request, runs inline; the rest boxed, so the
/// future of each request stays as small as the heartbeat's.
pub(super) async fn route(
    shared: &Shared,
    method: &Method,
    path: &[&str],
    request: Request<Incoming>,
    connection: &Connection,
) -> Result<Response<Body>> {
    let token_hash = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| connection.bearer_token_hash(value.as_bytes()))
        .ok_or_else(|| {
            Error::unauthorized("missing `Authorization: Bearer <node token>` header")
        })?;
    if let (&Method::POST, ["heartbeat"]) = (method, path) {
        return heartbeat(shared, &token_hash, request).await;
    }
    Box::pin(node_route(shared, method, path, request, &token_hash)).await
}

/// The node endpoints but the heartbeat, for the node holding the token of `token_hash`.
async fn node_route(
    shared: &Shared,
    method: &Method,
    path: &[&str],
    request: Request<Incoming>,
    token_hash: &[u8; 32],
) -> Result<Response<Body>> {
    let engine = &shared.engine;
    let node = engine.authenticate_node(token_hash).await?;
    match (method, path) {
        (&Method::POST, ["status"]) => {
            let body: wire::StatusRequest = read_json(shared, request).await?;
            engine.node_status(&node, status_report(body)).await?;
            Ok(json(StatusCode::OK, &StatusOk::new()))
        }
        (&Method::POST, ["logs"]) => {
            let body: wire::LogsRequest = if is_plain_text(&request) {
                read_text_logs(shared, request).await?
            } else {
                read_json(shared, request).await?
            };
            let batch = log_batch(body)?;
            if engine.accepts_logs_from(&node, &batch).await? {
                engine.node_logs(&node, batch).await?;
            }
            Ok(json(StatusCode::OK, &StatusOk::new()))
        }
        (&Method::GET, ["assets"]) => Box::pin(assets(shared, &node)).await,
        (&Method::POST, ["outputs"]) => {
            Box::pin(super::outputs::upload(shared, &node, request)).await
        }
        _ => Err(Error::not_found(format!(
            "no such endpoint: {method} /api/v1/nodes/{}",
            path.join("/")
        ))),
    }
}

/// `POST /nodes/heartbeat`: the token is checked and the node touched in one store call,
/// before the body is read; a body that is not JSON is then refused (400), though the node
/// was heard from.
async fn heartbeat(
    shared: &Shared,
    token_hash: &[u8; 32],
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let engine = &shared.engine;
    let live = engine.node_heartbeat(token_hash).await?;
    let body: wire::HeartbeatRequest = read_json_or_empty(shared, request).await?;
    let Some(node) = live else {
        return Ok(json_bytes(StatusCode::OK, HEARTBEAT_SHUTDOWN));
    };
    if let Some(sample) = body.metrics.as_ref().and_then(resource_sample) {
        engine.node_resources(&node, sample);
    }
    Ok(json_bytes(StatusCode::OK, HEARTBEAT_CONTINUE))
}

/// `GET /nodes/assets`: the node's worker bundle, from memory or streamed from its file.
async fn assets(shared: &Shared, node: &Node) -> Result<Response<Body>> {
    let mut response = match shared.engine.node_assets(node).await? {
        NodeAssets::InMemory(bytes) => Response::new(BodyExt::boxed(
            Full::new(bytes).map_err(|never| match never {}),
        )),
        NodeAssets::Shared(bundle) => {
            let length = bundle.length();
            let stream = bundle.stream().map_ok(Frame::data);
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
            response
        }
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    Ok(response)
}

/// A status report as the engine takes it (which refuses states a node may not report).
fn status_report(request: wire::StatusRequest) -> StatusReport {
    StatusReport {
        status: request.status,
        message: request.message,
        exit_code: request.exit_code,
    }
}

/// A log batch with each line's stream and time parsed; the first bad line is named.
fn log_batch(request: wire::LogsRequest) -> Result<LogBatch> {
    let mut lines = Vec::with_capacity(request.lines.len());
    for (i, line) in request.lines.into_iter().enumerate() {
        let stream = LogStream::parse(&line.stream).ok_or_else(|| {
            Error::invalid_input(format!(
                "lines[{i}].stream: expected stdout or stderr, got `{}`",
                line.stream
            ))
        })?;
        let timestamp = match &line.timestamp {
            Some(t) => Some(
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| Error::invalid_input(format!("lines[{i}].timestamp: {e}")))?,
            ),
            None => None,
        };
        lines.push(ReportedLine {
            stream,
            line: line.line,
            timestamp,
            line_no: line.line_no,
        });
    }
    Ok(LogBatch {
        lines,
        offset: request.offset,
    })
}

/// Whether `POST /nodes/register` should answer as `sh` assignments (`?format=sh`, for the
/// bootstrap script) rather than JSON (no `format`, or `format=json`).
fn register_format(query: Option<&str>) -> Result<bool> {
    match query_value(query, "format") {
        None | Some("json") => Ok(false),
        Some("sh") => Ok(true),
        Some(other) => Err(Error::invalid_input(format!(
            "format: expected json or sh, got `{other}`"
        ))),
    }
}

/// The value of the last `name=value` pair of a query string (values are taken as they are:
/// the node routes' values need no percent-decoding).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .next_back()
}

/// Whether the request body is `text/plain`.
fn is_plain_text(request: &Request<Incoming>) -> bool {
    let content_type = header(request, CONTENT_TYPE).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("text/plain")
}

/// `POST /nodes/logs?stream=stdout|stderr[&offset=N][&at=SECONDS]` with a `text/plain` body,
/// as the bootstrap script sends its output: every line of the body is one log line of that
/// stream, dated `at` (when the node read them) or else on arrival.
async fn read_text_logs(shared: &Shared, request: Request<Incoming>) -> Result<wire::LogsRequest> {
    let stream = match query_value(request.uri().query(), "stream") {
        Some(stream @ ("stdout" | "stderr")) => stream.to_owned(),
        Some(other) => {
            return Err(Error::invalid_input(format!(
                "stream: expected stdout or stderr, got `{other}`"
            )))
        }
        None => {
            return Err(Error::invalid_input(
                "a text/plain log body needs `?stream=stdout` or `?stream=stderr`",
            ))
        }
    };
    let offset = match query_value(request.uri().query(), "offset") {
        Some(value) => Some(value.parse::<u64>().map_err(|_| {
            Error::invalid_input(format!("offset: expected a byte count, got `{value}`"))
        })?),
        None => None,
    };
    let written_at = match query_value(request.uri().query(), "at") {
        Some(value) => Some(unix_seconds(value)?),
        None => None,
    };
    let body = read_limited_in_time(shared, request.into_body(), "log body").await?;
    super::body::check_text_log_lines(&body)?;
    let mut logs = text_log_lines(&body, &stream, offset);
    if let Some(at) = written_at {
        for line in &mut logs.lines {
            line.timestamp = Some(at.clone());
        }
    }
    Ok(logs)
}

/// `?at=`: when the node read the body's lines from its script's output, in whole seconds
/// since the Unix epoch (`date +%s`), as the RFC 3339 time every line of the body gets.
pub(super) fn unix_seconds(value: &str) -> Result<String> {
    value
        .parse::<u64>()
        .ok()
        // RFC 3339 ends with the year 9999.
        .filter(|secs| *secs < 253_402_300_800)
        .map(|secs| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            humantime::format_rfc3339_millis(at).to_string()
        })
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "at: expected the time the lines were read, in seconds since the Unix epoch \
                 (`date +%s`), got `{value}`"
            ))
        })
}

/// Cuts a `text/plain` log body into lines of `stream`: each `\n` ends a line (a `\r` before
/// it is dropped), a last line without `\n` counts too, and bytes that are not UTF-8 are
/// replaced. The daemon's clock dates them. With `offset` (the byte position of the body in
/// its stream), each line is numbered by its own byte position, doubled, plus one for stderr:
/// unique across both streams, so a piece resent after a lost answer is stored once.
pub(super) fn text_log_lines(body: &[u8], stream: &str, offset: Option<u64>) -> wire::LogsRequest {
    if body.is_empty() {
        return wire::LogsRequest {
            lines: Vec::new(),
            offset: None,
        };
    }
    let parity = u64::from(stream == "stderr");
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut position = offset;
    let lines = body
        .split(|byte| *byte == b'\n')
        .map(|line| {
            let line_no = position.map(|p| p.saturating_mul(2).saturating_add(parity));
            position = position.map(|p| p.saturating_add(line.len() as u64 + 1));
            wire::LogLineIn {
                stream: stream.to_owned(),
                line: String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line))
                    .into_owned(),
                timestamp: None,
                line_no,
            }
        })
        .collect();
    wire::LogsRequest {
        lines,
        offset: None,
    }
}

/// The resources a heartbeat's `metrics` names (SPEC §4.2): `cpu_percent`, `rss_bytes` and
/// `disk_bytes`, each a number of at least 0. Other keys, and values that are no such number,
/// are left out: a heartbeat is never refused for its metrics, which would fail a live node.
fn resource_sample(
    metrics: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Option<ResourceSample> {
    let bytes = |key: &str| metrics.get(key).and_then(serde_json::Value::as_u64);
    let sample = ResourceSample {
        cpu_percent: metrics
            .get("cpu_percent")
            .and_then(serde_json::Value::as_f64)
            .filter(|p| p.is_finite() && *p >= 0.0),
        rss_bytes: bytes("rss_bytes"),
        disk_bytes: bytes("disk_bytes"),
    };
    (sample != ResourceSample::default()).then_some(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_heartbeat_answers_are_the_wire_type_written() {
        for (shutdown, answer) in [(false, HEARTBEAT_CONTINUE), (true, HEARTBEAT_SHUTDOWN)] {
            let written = serde_json::to_vec(&wire::HeartbeatResponse {
                status: "ok".to_owned(),
                shutdown,
            })
            .unwrap();
            assert_eq!(answer, written.as_slice());
        }
    }
}
