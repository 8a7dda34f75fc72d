//! The HTTP API (SPEC §4) on raw hyper 1.x: routing, authentication, body limits, error
//! mapping, graceful shutdown. Only this module (and the client) knows hyper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::auth;
use crate::error::{Error, Kind, Result};
use crate::orchestrator::{Orchestrator, Registration};
use crate::wire::{self, ErrorBody};

type Body = BoxBody<Bytes, std::io::Error>;

/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default and largest page of logs.
const DEFAULT_LOG_PAGE: usize = 1000;

/// Serve until `shutdown` completes, then let in-flight requests finish. With TLS configured
/// (`Config::tls`), every connection is a TLS one: its handshake runs in the
/// connection's own task, within the header read time limit.
pub(crate) async fn serve(
    orchestrator: Orchestrator,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let limits = orchestrator.limits();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registrations = Arc::new(super::limits::FailureLimiter::new(
        limits.registration_failures_per_minute,
        Duration::from_secs(60),
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    #[cfg(feature = "tls")]
    let tls = orchestrator
        .server_tls()
        .map(|tls| (tls.acceptor().clone(), limits.header_read_timeout));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let orchestrator = orchestrator.clone();
        let registrations = registrations.clone();
        let service = hyper::service::service_fn(move |request| {
            let orchestrator = orchestrator.clone();
            let registrations = registrations.clone();
            async move {
                Ok::<_, Infallible>(handle(&orchestrator, &registrations, request, peer).await)
            }
        });
        #[cfg(feature = "tls")]
        if let Some((acceptor, handshake_limit)) = &tls {
            // A slow or silent client must not hold up the accept loop: the handshake runs in
            // the connection's task, watched for shutdown like the connection itself.
            let (acceptor, handshake_limit) = (acceptor.clone(), *handshake_limit);
            let (watcher, http) = (graceful.watcher(), http.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_limit, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let connection =
                            watcher.watch(http.serve_connection(TokioIo::new(stream), service));
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(permit);
            });
            continue;
        }
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Idle pooled agents' registrations are held for a while: answer them now.
    for (_, pool) in orchestrator.pools() {
        pool.stop_holding();
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some requests were still running at shutdown");
    }
    Ok(())
}

async fn handle(
    orchestrator: &Orchestrator,
    registrations: &super::limits::FailureLimiter,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match route(orchestrator, registrations, peer, request).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    tracing::debug!(%method, %path, %peer, status = response.status().as_u16(), "request");
    response
}

async fn route(
    orchestrator: &Orchestrator,
    registrations: &super::limits::FailureLimiter,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = request.method().clone();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["health"]) | (Method::GET, ["api", "v1", "health"]) => Ok(json(
            StatusCode::OK,
            &wire::Ok {
                status: "ok".to_owned(),
            },
        )),
        (Method::GET, ["metrics"]) | (Method::GET, ["api", "v1", "metrics"]) => {
            metrics(orchestrator).await
        }
        (_, ["api", "v1", "nodes", rest @ ..]) => {
            if let (&Method::POST, ["register"]) = (&method, rest) {
                return register(orchestrator, registrations, peer, request).await;
            }
            node_route(orchestrator, &method, rest, request).await
        }
        (_, ["api", "v1", rest @ ..]) => {
            authorize_client(orchestrator, &request)?;
            client_route(orchestrator, &method, rest, request).await
        }
        _ => Err(Error::not_found(format!(
            "no such endpoint: {method} {path}"
        ))),
    }
}

async fn client_route(
    orchestrator: &Orchestrator,
    method: &Method,
    path: &[&str],
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    match (method, path) {
        (&Method::POST, ["deployments"]) => {
            let created = deploy(orchestrator, request).await?;
            Ok(json(StatusCode::ACCEPTED, &created))
        }
        (&Method::GET, ["deployments"]) => {
            Ok(json(StatusCode::OK, &orchestrator.deployments().await?))
        }
        (&Method::GET, ["deployments", id]) => {
            Ok(json(StatusCode::OK, &orchestrator.deployment(id).await?))
        }
        (&Method::DELETE, ["deployments", id]) => {
            // Terminating can take a while (instances shutting down); answer once it started.
            orchestrator.deployment(id).await?;
            let status = start_terminate(orchestrator, id).await?;
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"deployment_id": id, "status": status}),
            ))
        }
        (&Method::POST, ["deployments", id, "cleanup"]) => {
            orchestrator.cleanup(id).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"deployment_id": id, "status": "cleaned"}),
            ))
        }
        (&Method::POST, ["cleanup", "all"]) => {
            Ok(json(StatusCode::OK, &orchestrator.cleanup_all().await?))
        }
        (&Method::GET, ["deployments", id, "logs"]) => {
            let query = Query::parse(request.uri().query())?;
            let page = orchestrator
                .logs(
                    id,
                    query.node_index(orchestrator, id).await?,
                    query.after,
                    query.limit,
                )
                .await?;
            Ok(json(StatusCode::OK, &page))
        }
        (&Method::GET, ["stats"]) => Ok(json(StatusCode::OK, &orchestrator.stats().await?)),
        _ => Err(Error::not_found(format!(
            "no such endpoint: {method} /api/v1/{}",
            path.join("/")
        ))),
    }
}

/// Start terminating in the background and answer with the state it is in.
async fn start_terminate(orchestrator: &Orchestrator, id: &str) -> Result<String> {
    orchestrator.begin_terminate(id).await?;
    let this = orchestrator.clone();
    let id_owned = id.to_owned();
    orchestrator.spawn_tracked(async move {
        if let Err(e) = this.finish_terminate(&id_owned).await {
            tracing::error!(deployment_id = %id_owned, error = %e, "terminate failed");
        }
    });
    Ok("terminating".to_owned())
}

/// `POST /nodes/register`, with failed attempts rate-limited per client address.
async fn register(
    orchestrator: &Orchestrator,
    registrations: &super::limits::FailureLimiter,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    registrations.check(peer.ip())?;
    let as_shell = register_format(request.uri().query())?;
    let body: wire::RegisterRequest = read_json(orchestrator, request).await?;
    let registered = match orchestrator.register_node(&body.provision_token).await {
        Ok(Registration::Assigned(registered)) => registered,
        Ok(Registration::NoWork) => {
            let mut response = Response::new(full(Vec::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            return Ok(response);
        }
        Ok(Registration::Retired) => {
            let error = ErrorBody {
                error: "the pool retired this instance; its agent stops".to_owned(),
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
    if as_shell {
        let text = crate::agent::bootstrap::registration_env(&registered)?;
        return Ok(plain_text(text));
    }
    Ok(json(StatusCode::OK, &registered))
}

async fn node_route(
    orchestrator: &Orchestrator,
    method: &Method,
    path: &[&str],
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let token = auth::bearer(header(&request, AUTHORIZATION))
        .ok_or_else(|| Error::unauthorized("missing `Authorization: Bearer <node token>` header"))?
        .to_owned();
    let node = orchestrator.authenticate_node(&token).await?;
    match (method, path) {
        (&Method::GET, ["assets"]) => {
            let path = orchestrator.node_assets(&node);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|_| Error::not_found("this deployment's bundle is gone (cleaned up)"))?;
            let length = file.metadata().await.map(|m| m.len()).ok();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).map_ok(Frame::data);
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
            if let Some(length) = length {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
            }
            Ok(response)
        }
        (&Method::POST, ["heartbeat"]) => {
            let _body: wire::HeartbeatRequest = read_json_or_empty(orchestrator, request).await?;
            Ok(json(
                StatusCode::OK,
                &orchestrator.node_heartbeat(&node).await?,
            ))
        }
        (&Method::POST, ["status"]) => {
            let body: wire::StatusRequest = read_json(orchestrator, request).await?;
            orchestrator.node_status(&node, body).await?;
            Ok(json(
                StatusCode::OK,
                &wire::Ok {
                    status: "ok".to_owned(),
                },
            ))
        }
        (&Method::POST, ["logs"]) => {
            let body: wire::LogsRequest = if is_plain_text(&request) {
                read_text_logs(orchestrator, request).await?
            } else {
                read_json(orchestrator, request).await?
            };
            orchestrator.node_logs(&node, body).await?;
            Ok(json(
                StatusCode::OK,
                &wire::Ok {
                    status: "ok".to_owned(),
                },
            ))
        }
        _ => Err(Error::not_found(format!(
            "no such endpoint: {method} /api/v1/nodes/{}",
            path.join("/")
        ))),
    }
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

/// `POST /nodes/logs?stream=stdout|stderr` with a `text/plain` body, as the bootstrap script
/// sends its output: every line of the body is one log line of that stream.
async fn read_text_logs(
    orchestrator: &Orchestrator,
    request: Request<Incoming>,
) -> Result<wire::LogsRequest> {
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
    let body = read_limited(
        request.into_body(),
        orchestrator.limits().max_json_body,
        "log body",
    )
    .await?;
    Ok(text_log_lines(&body, &stream, offset))
}

/// Cuts a `text/plain` log body into lines of `stream`: each `\n` ends a line (a `\r` before
/// it is dropped), a last line without `\n` counts too, and bytes that are not UTF-8 are
/// replaced. The daemon's clock dates them. With `offset` (the byte position of the body in
/// its stream), each line is numbered by its own byte position, doubled, plus one for stderr:
/// unique across both streams, so a piece resent after a lost answer is stored once.
fn text_log_lines(body: &[u8], stream: &str, offset: Option<u64>) -> wire::LogsRequest {
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

/// A 200 answer with a `text/plain` body.
fn plain_text(text: String) -> Response<Body> {
    let mut response = Response::new(full(text.into_bytes()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn authorize_client(orchestrator: &Orchestrator, request: &Request<Incoming>) -> Result<()> {
    let Some(expected) = orchestrator.api_token_hash() else {
        return Err(Error::unauthorized(
            "this engine has no API token configured",
        ));
    };
    let token = auth::bearer(header(request, AUTHORIZATION))
        .ok_or_else(|| Error::unauthorized("missing `Authorization: Bearer <api token>` header"))?;
    if auth::hashes_equal(&auth::hash_token(token), &expected) {
        Ok(())
    } else {
        Err(Error::unauthorized("wrong API token"))
    }
}

async fn deploy(
    orchestrator: &Orchestrator,
    request: Request<Incoming>,
) -> Result<wire::DeploymentCreated> {
    let content_type = header(&request, CONTENT_TYPE)
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let limit = orchestrator.limits().max_bundle_upload;
    match essence.as_str() {
        "application/gzip" | "application/x-gzip" | "application/octet-stream" => {
            let stream = request
                .into_body()
                .into_data_stream()
                .map_err(std::io::Error::other);
            let reader = tokio_util::io::StreamReader::new(stream);
            orchestrator.deploy_bundle(reader).await
        }
        "multipart/form-data" => {
            let boundary = multipart_boundary(&content_type)
                .ok_or_else(|| Error::invalid_input("multipart/form-data without a boundary"))?;
            let body = read_limited(request.into_body(), limit, "bundle upload").await?;
            let bundle = multipart_field(&body, &boundary, "bundle")
                .ok_or_else(|| Error::invalid_input("the multipart body has no field named `bundle`"))?;
            orchestrator.deploy_bundle(bundle).await
        }
        _ => Err(unsupported_media(&format!(
            "send the bundle as application/gzip (or multipart/form-data with a `bundle` field), not `{essence}`"
        ))),
    }
}

async fn read_json<T: DeserializeOwned>(
    orchestrator: &Orchestrator,
    request: Request<Incoming>,
) -> Result<T> {
    require_json(&request)?;
    let body = read_limited(
        request.into_body(),
        orchestrator.limits().max_json_body,
        "JSON body",
    )
    .await?;
    parse_json(&body)
}

/// JSON, where an empty body (with or without a content type) means `{}`.
async fn read_json_or_empty<T: DeserializeOwned + Default>(
    orchestrator: &Orchestrator,
    request: Request<Incoming>,
) -> Result<T> {
    let has_type = header(&request, CONTENT_TYPE).is_some();
    if has_type {
        require_json(&request)?;
    }
    let body = read_limited(
        request.into_body(),
        orchestrator.limits().max_json_body,
        "JSON body",
    )
    .await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !has_type {
        return Err(unsupported_media(
            "send JSON bodies with `Content-Type: application/json`",
        ));
    }
    parse_json(&body)
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid_input(format!("malformed JSON body: {e}")))
}

fn require_json(request: &Request<Incoming>) -> Result<()> {
    let content_type = header(request, CONTENT_TYPE).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(unsupported_media(&format!(
            "send JSON bodies with `Content-Type: application/json`, not `{essence}`"
        )))
    }
}

async fn read_limited(body: Incoming, limit: u64, what: &str) -> Result<Bytes> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::too_large(format!(
            "the {what} is larger than its {limit}-byte limit"
        ))),
        Err(e) => Err(Error::invalid_input(format!("cannot read the {what}: {e}"))),
    }
}

fn unsupported_media(message: &str) -> Error {
    Error::unsupported_media(message.to_owned())
}

fn header(request: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<&str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

fn multipart_boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (key, value) = param.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// The content of the part named `name` in a multipart/form-data body.
fn multipart_field<'a>(body: &'a [u8], boundary: &str, name: &str) -> Option<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut rest = body;
    while let Some(start) = find(rest, delimiter) {
        rest = &rest[start + delimiter.len()..];
        if rest.starts_with(b"--") {
            return None;
        }
        let headers_end = find(rest, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&rest[..headers_end]).to_ascii_lowercase();
        let content = &rest[headers_end + 4..];
        let end = find(content, delimiter)?;
        let content = content[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&content[..end]);
        let wanted = format!("name=\"{}\"", name.to_ascii_lowercase());
        if headers
            .lines()
            .any(|l| l.starts_with("content-disposition") && l.contains(&wanted))
        {
            return Some(content);
        }
        rest = &rest[headers_end + 4 + end..];
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct Query {
    node: Option<String>,
    after: u64,
    limit: usize,
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Query> {
        let mut parsed = Query {
            node: None,
            after: 0,
            limit: DEFAULT_LOG_PAGE,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "node" if !value.is_empty() => parsed.node = Some(value.to_owned()),
                "after" => {
                    parsed.after = value.parse().map_err(|_| {
                        Error::invalid_input(format!("after: expected a number, got `{value}`"))
                    })?
                }
                "limit" => {
                    parsed.limit = value.parse().map_err(|_| {
                        Error::invalid_input(format!("limit: expected a number, got `{value}`"))
                    })?
                }
                _ => {}
            }
        }
        Ok(parsed)
    }

    /// `node` as an index: a number is an index, anything else a node id of this deployment.
    /// `node` as an index of this deployment: a node index or a node id.
    async fn node_index(
        &self,
        orchestrator: &Orchestrator,
        deployment_id: &str,
    ) -> Result<Option<u32>> {
        let Some(node) = &self.node else {
            return Ok(None);
        };
        let view = orchestrator.deployment(deployment_id).await?;
        view.nodes
            .iter()
            .find(|n| &n.node_id == node || n.node_index.to_string() == *node)
            .map(|n| Some(n.node_index))
            .ok_or_else(|| {
                Error::not_found(format!("no node `{node}` in deployment `{deployment_id}`"))
            })
    }
}

async fn metrics(orchestrator: &Orchestrator) -> Result<Response<Body>> {
    let stats = orchestrator.stats().await?;
    let mut text = String::new();
    text.push_str("# HELP taskfly_deployments Deployments known, by state.\n# TYPE taskfly_deployments gauge\n");
    for status in crate::state::model::DeploymentStatus::ALL {
        let count = stats
            .deployment_status
            .get(status.as_str())
            .copied()
            .unwrap_or(0);
        text.push_str(&format!(
            "taskfly_deployments{{status=\"{status}\"}} {count}\n"
        ));
    }
    text.push_str("# HELP taskfly_nodes Nodes of known deployments.\n# TYPE taskfly_nodes gauge\n");
    text.push_str(&format!("taskfly_nodes {}\n", stats.total_nodes));
    text.push_str("# HELP taskfly_uptime_seconds Seconds since the engine started.\n# TYPE taskfly_uptime_seconds counter\n");
    text.push_str(&format!(
        "taskfly_uptime_seconds {}\n",
        stats.uptime_seconds
    ));
    if !stats.pools.is_empty() {
        type Reading = fn(&wire::PoolStats) -> u64;
        let gauges: [(&str, &str, Reading); 4] = [
            ("taskfly_pool_instances", "gauge", |p| p.instances),
            ("taskfly_pool_idle", "gauge", |p| p.idle),
            ("taskfly_pool_launched_total", "counter", |p| {
                p.launched_total
            }),
            ("taskfly_pool_reused_total", "counter", |p| {
                p.reused_total + p.spares_used_total
            }),
        ];
        for (name, kind, value) in gauges {
            text.push_str(&format!("# TYPE {name} {kind}\n"));
            for pool in &stats.pools {
                text.push_str(&format!(
                    "{name}{{provider=\"{}\"}} {}\n",
                    pool.provider,
                    value(pool)
                ));
            }
        }
    }
    let mut response = Response::new(full(text.into_bytes()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(full(bytes));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => error_response(&Error::invalid_input(format!(
            "cannot encode the response: {e}"
        ))),
    }
}

fn error_response(error: &Error) -> Response<Body> {
    let status = match error.kind() {
        Kind::InvalidConfig | Kind::InvalidBundle | Kind::InvalidInput => StatusCode::BAD_REQUEST,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::Conflict => StatusCode::CONFLICT,
        Kind::Unauthorized => StatusCode::UNAUTHORIZED,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Kind::Provider | Kind::Store | Kind::Transport | Kind::Io | Kind::Remote => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    if status.is_server_error() {
        tracing::error!(error = %error, "request failed");
    }
    let message = match error.kind() {
        // Say what failed without internal paths; the daemon log has the cause.
        Kind::Io | Kind::Store => error.message().to_owned(),
        _ => error
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let body = ErrorBody {
        error: message,
        details: error.details().to_vec(),
    };
    let mut response = json(StatusCode::OK, &body);
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::text_log_lines;

    #[test]
    fn text_log_lines_are_numbered_by_byte_position_and_stream() {
        let out = text_log_lines(b"ab\r\ncd\nlast", "stdout", Some(10));
        let lines: Vec<(&str, Option<u64>)> = out
            .lines
            .iter()
            .map(|l| (l.line.as_str(), l.line_no))
            .collect();
        // Lines start at bytes 10, 14 and 17; doubled, stdout even.
        assert_eq!(
            lines,
            [("ab", Some(20)), ("cd", Some(28)), ("last", Some(34))]
        );
        let err = text_log_lines(b"x\n", "stderr", Some(10));
        assert_eq!(err.lines[0].line_no, Some(21), "stderr numbers are odd");
        let unnumbered = text_log_lines(b"x\n", "stdout", None);
        assert_eq!(unnumbered.lines[0].line_no, None);
    }
}
