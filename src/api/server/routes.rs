//! Routing, client authentication, and the client API (SPEC §4, client endpoints).

use std::net::SocketAddr;

use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::body::{header, json, read_json_or_empty, read_limited, unsupported_media, Body};
use super::{node, views, Shared};
use crate::api::limits::Connection;
use crate::auth;
use crate::error::{Error, Result};
use crate::orchestrator::RerunNodes;
use crate::state::model::{DeploymentDetail, DeploymentSummary};
use crate::wire::{self, DeploymentAction, StatusOk};

/// Default and largest page of logs.
const DEFAULT_LOG_PAGE: usize = 1000;

/// Most segments a path of an endpoint has (the dashboard's files included); a path of more
/// names none.
const MAX_SEGMENTS: usize = 16;

/// A path split at `/`, without the empty segment before its first `/` or after a trailing
/// one: `/api/v1/nodes/heartbeat` is `api`, `v1`, `nodes`, `heartbeat`. Kept on the stack: every
/// request is routed by it.
struct Segments<'a> {
    parts: [&'a str; MAX_SEGMENTS],
    count: usize,
}

impl<'a> Segments<'a> {
    /// `None` for a path of more than [`MAX_SEGMENTS`] segments.
    fn of(path: &'a str) -> Option<Segments<'a>> {
        let mut segments = Segments {
            parts: [""; MAX_SEGMENTS],
            count: 0,
        };
        // By bytes rather than `str::split`, which costs several times more on paths this
        // short. `/` is ASCII, so every cut is at a character boundary.
        let path = path.trim_end_matches('/');
        // The start of the segment under way, once past the first `/`.
        let mut start = None;
        for (at, byte) in path.as_bytes().iter().enumerate() {
            if *byte != b'/' {
                continue;
            }
            if let Some(start) = start {
                *segments.parts.get_mut(segments.count)? = &path[start..at];
                segments.count += 1;
            }
            start = Some(at + 1);
        }
        if let Some(start) = start {
            *segments.parts.get_mut(segments.count)? = &path[start..];
            segments.count += 1;
        }
        Some(segments)
    }

    fn as_slice(&self) -> &[&'a str] {
        &self.parts[..self.count]
    }
}

/// The heartbeat's path, and its segments: the node protocol's most frequent request is
/// recognised by its whole path, without splitting it.
pub(super) const HEARTBEAT_PATH: &str = "/api/v1/nodes/heartbeat";
pub(super) const HEARTBEAT_SEGMENTS: [&str; 4] = ["api", "v1", "nodes", "heartbeat"];

/// Answer one request; errors become their status code and error body. Heartbeats run
/// inline, every other request boxed, so that the future of a heartbeat, which hyper moves
/// into place for each request, holds no more than a heartbeat needs.
pub(super) async fn handle(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    connection: &Connection,
) -> Response<Body> {
    let started = std::time::Instant::now();
    if request.method() == Method::POST && request.uri().path() == HEARTBEAT_PATH {
        let routed =
            node_protocol(shared, &Method::POST, &["heartbeat"], request, connection).await;
        let metrics = shared.request_metrics.heartbeat();
        return answer(shared, routed, metrics, started, |status| {
            tracing::debug!(method = "POST", path = HEARTBEAT_PATH, %peer, status, "request");
        });
    }
    Box::pin(handle_split(shared, request, peer, connection, started)).await
}

/// [`handle`] for any request: its path split into segments.
async fn handle_split(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    connection: &Connection,
    started: std::time::Instant,
) -> Response<Body> {
    let method = request.method().clone();
    // A clone shares the request's bytes: the path outlives the request without a copy.
    let uri = request.uri().clone();
    let segments = Segments::of(uri.path());
    let segments = segments.as_ref().map(Segments::as_slice);
    let routed = match segments {
        Some(segments) => route(shared, peer, segments, request, connection).await,
        None => Err(no_such_endpoint(&method, uri.path())),
    };
    let metrics = shared.request_metrics.of(segments.unwrap_or_default());
    answer(shared, routed, metrics, started, |status| {
        tracing::debug!(%method, path = uri.path(), %peer, status, "request");
    })
}

/// The response to a request `routed` to an endpoint of these `metrics`, counted, timed from
/// `started`, and its status given to `log`.
fn answer(
    shared: &Shared,
    routed: Result<Response<Body>>,
    metrics: &crate::metrics::RouteMetrics,
    started: std::time::Instant,
    log: impl FnOnce(u16),
) -> Response<Body> {
    let response = routed.unwrap_or_else(|error| super::errors::error_response(&error));
    let status = response.status().as_u16();
    shared
        .engine
        .metrics()
        .http_request(metrics, status, started.elapsed());
    log(status);
    response
}

/// The node protocol (`/api/v1/nodes/...`; `rest` the segments after `nodes`). A request
/// that passes its token check marks its connection authenticated.
async fn node_protocol(
    shared: &Shared,
    method: &Method,
    rest: &[&str],
    request: Request<Incoming>,
    connection: &Connection,
) -> Result<Response<Body>> {
    let answer = node::route(shared, method, rest, request, connection).await;
    // Node routes check the node token first: anything but 401 means it was valid.
    if !matches!(&answer, Err(e) if e.is_unauthorized()) {
        shared.connections.authenticated(connection);
    }
    answer
}

/// A request that passes token authentication marks its connection authenticated
/// ([`crate::api::limits::ConnectionTable`]). The client API, the metrics and node
/// registration run boxed, so the future of every request is no larger than the node
/// protocol's.
async fn route(
    shared: &Shared,
    peer: SocketAddr,
    segments: &[&str],
    request: Request<Incoming>,
    connection: &Connection,
) -> Result<Response<Body>> {
    let method = request.method().clone();
    match (&method, segments) {
        (&Method::GET | &Method::HEAD, ["health"] | ["api", "v1", "health"]) => {
            Ok(json(StatusCode::OK, &StatusOk::new()))
        }
        (&Method::GET | &Method::HEAD, ["metrics"] | ["api", "v1", "metrics"]) => {
            Box::pin(super::metrics::serve(shared, &request)).await
        }
        (_, ["api", "v1", "nodes", rest @ ..]) => {
            if let (&Method::POST, ["register"]) = (&method, rest) {
                return Box::pin(node::register(shared, peer, request)).await;
            }
            node_protocol(shared, &method, rest, request, connection).await
        }
        (_, ["api", "v1", rest @ ..]) => {
            authorize_client(shared, &request, connection)?;
            shared.connections.authenticated(connection);
            // HEAD is answered as GET; hyper sends its headers without the body.
            let method = if method == Method::HEAD {
                Method::GET
            } else {
                method
            };
            Box::pin(client_route(shared, &method, rest, request)).await
        }
        (&Method::GET | &Method::HEAD, []) => Ok(super::ui::serve(&[])),
        (&Method::GET | &Method::HEAD, ["ui", rest @ ..]) => Ok(super::ui::serve(rest)),
        _ => Err(no_such_endpoint(&method, request.uri().path())),
    }
}

fn no_such_endpoint(method: &Method, path: &str) -> Error {
    Error::not_found(format!(
        "no such endpoint: {method} {}",
        path.trim_end_matches('/')
    ))
}

async fn client_route(
    shared: &Shared,
    method: &Method,
    path: &[&str],
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let engine = &shared.engine;
    match (method, path) {
        (&Method::POST, ["deployments"]) => {
            let created = deploy(shared, request).await?;
            Ok(json(StatusCode::ACCEPTED, &views::created(&created)))
        }
        (&Method::GET, ["deployments"]) => {
            let all: Vec<wire::DeploymentView> = engine
                .deployments()
                .await?
                .iter()
                .map(|d| views::deployment(d, &[]))
                .collect();
            Ok(json(StatusCode::OK, &all))
        }
        (&Method::GET, ["deployments", id]) => {
            let detail = engine.deployment(id).await?;
            Ok(json(StatusCode::OK, &views::detail(&detail)))
        }
        (&Method::DELETE, ["deployments", id]) => {
            // Terminating can take a while (instances shutting down); answer once it started.
            engine.summary(id).await?;
            let status = engine.request_terminate(id).await?;
            Ok(json(
                StatusCode::ACCEPTED,
                &DeploymentAction {
                    deployment_id: (*id).to_owned(),
                    status: status.as_str().to_owned(),
                },
            ))
        }
        (&Method::POST, ["deployments", id, "rerun"]) => {
            let rerun = rerun(shared, id, request).await?;
            Ok(json(StatusCode::ACCEPTED, &views::rerun_created(&rerun)))
        }
        (&Method::POST, ["deployments", id, "cleanup"]) => {
            engine.cleanup(id).await?;
            Ok(json(
                StatusCode::OK,
                &DeploymentAction {
                    deployment_id: (*id).to_owned(),
                    status: "cleaned".to_owned(),
                },
            ))
        }
        (&Method::POST, ["cleanup", "all"]) => Ok(json(
            StatusCode::OK,
            &views::cleanup_all(engine.cleanup_all().await?),
        )),
        (&Method::DELETE, ["deployments", id, "record"]) => {
            engine.forget_deployment(id).await?;
            Ok(json(
                StatusCode::OK,
                &DeploymentAction {
                    deployment_id: (*id).to_owned(),
                    status: "forgotten".to_owned(),
                },
            ))
        }
        (&Method::POST, ["cleanup", "forget"]) => {
            let dry_run = dry_run(request.uri().query())?;
            let (ids, failed) = if dry_run {
                (engine.forgettable().await?, 0)
            } else {
                engine.forget_finished().await?
            };
            Ok(json(
                StatusCode::OK,
                &wire::Forgotten {
                    forgotten_count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                    deployment_ids: ids,
                    failed_count: failed,
                    dry_run,
                },
            ))
        }
        (&Method::GET, ["deployments", id, "logs"]) => {
            let query = Query::parse(request.uri().query())?;
            let page = engine
                .logs(
                    id,
                    query.node_index(shared, id).await?,
                    query.after,
                    query.limit,
                )
                .await?;
            Ok(json(StatusCode::OK, &views::logs_page(&page)))
        }
        (&Method::GET, ["deployments", id, "outputs"]) => {
            super::outputs::download(shared, id, request.uri().query()).await
        }
        (&Method::GET, ["stats"]) => Ok(json(StatusCode::OK, &views::stats(engine).await?)),
        (&Method::GET, ["events"]) => super::events::stream(shared, &request).await,
        _ => Err(Error::not_found(format!(
            "no such endpoint: {method} /api/v1/{}",
            path.join("/")
        ))),
    }
}

/// The `dry_run` query parameter of `POST /cleanup/forget`: `true` or `false` (default false).
fn dry_run(query: Option<&str>) -> Result<bool> {
    let mut dry_run = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        dry_run = match pair.split_once('=') {
            Some(("dry_run", "true")) | Some(("dry_run", "1")) => true,
            Some(("dry_run", "false")) | Some(("dry_run", "0")) => false,
            _ => {
                return Err(Error::invalid_input(format!(
                    "unknown query `{pair}`; this endpoint takes only dry_run=true|false"
                )))
            }
        };
    }
    Ok(dry_run)
}

fn authorize_client(
    shared: &Shared,
    request: &Request<Incoming>,
    connection: &Connection,
) -> Result<()> {
    let Some(expected) = shared.api_token_hash else {
        return Err(Error::unauthorized(
            "this engine has no API token configured",
        ));
    };
    let token_hash = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| connection.bearer_token_hash(value.as_bytes()))
        .ok_or_else(|| Error::unauthorized("missing `Authorization: Bearer <api token>` header"))?;
    if auth::hashes_equal(&token_hash, &expected) {
        Ok(())
    } else {
        Err(Error::unauthorized("wrong API token"))
    }
}

/// `POST /deployments/{id}/rerun`: the wire's selection turned into the engine's.
async fn rerun(shared: &Shared, id: &str, request: Request<Incoming>) -> Result<DeploymentDetail> {
    let body: wire::RerunRequest = read_json_or_empty(shared, request).await?;
    let nodes = match body.nodes {
        wire::RerunSelection::Failed => RerunNodes::Failed,
        wire::RerunSelection::Indexes(indexes) => RerunNodes::Indexes(indexes),
    };
    shared.engine.rerun(id, nodes).await
}

async fn deploy(shared: &Shared, request: Request<Incoming>) -> Result<DeploymentSummary> {
    let content_type = header(&request, CONTENT_TYPE)
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let limit = shared.engine.limits().max_bundle_upload;
    match essence.as_str() {
        "application/gzip" | "application/x-gzip" | "application/octet-stream" => {
            let stream = request
                .into_body()
                .into_data_stream()
                .map_err(std::io::Error::other);
            let reader = tokio_util::io::StreamReader::new(stream);
            shared.engine.deploy_bundle(reader).await
        }
        "multipart/form-data" => {
            let boundary = multipart_boundary(&content_type)
                .ok_or_else(|| Error::invalid_input("multipart/form-data without a boundary"))?;
            let body = read_limited(request.into_body(), limit, "bundle upload").await?;
            let bundle = multipart_field(&body, &boundary, "bundle")
                .ok_or_else(|| Error::invalid_input("the multipart body has no field named `bundle`"))?;
            shared.engine.deploy_bundle(bundle).await
        }
        _ => Err(unsupported_media(&format!(
            "send the bundle as application/gzip (or multipart/form-data with a `bundle` field), not `{essence}`"
        ))),
    }
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

    /// `node` as an index of this deployment: a node index or a node id.
    async fn node_index(&self, shared: &Shared, deployment_id: &str) -> Result<Option<u32>> {
        let Some(node) = &self.node else {
            return Ok(None);
        };
        let detail = shared.engine.deployment(deployment_id).await?;
        detail
            .nodes
            .iter()
            .find(|n| &n.id == node || n.index.to_string() == *node)
            .map(|n| Some(n.index))
            .ok_or_else(|| {
                Error::not_found(format!("no node `{node}` in deployment `{deployment_id}`"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::{Segments, HEARTBEAT_PATH, HEARTBEAT_SEGMENTS, MAX_SEGMENTS};

    #[test]
    fn the_heartbeats_segments_are_its_path_split() {
        let split = Segments::of(HEARTBEAT_PATH).expect("few segments");
        assert_eq!(split.as_slice(), HEARTBEAT_SEGMENTS);
    }

    #[test]
    fn segments_are_the_path_split_at_slashes_without_the_first_and_trailing_ones() {
        for path in [
            "/api/v1/nodes/heartbeat",
            "/api/v1/nodes/heartbeat/",
            "/api/v1/deployments/dep-1//logs",
            "//x",
            "/",
            "///",
            "",
            "*",
            "/ui/assets/app.js",
            "/dépôt/ü",
        ] {
            let expected: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
            let segments = Segments::of(path).expect("few segments");
            assert_eq!(segments.as_slice(), expected.as_slice(), "{path:?}");
        }
        let longest = "/s".repeat(MAX_SEGMENTS);
        assert_eq!(Segments::of(&longest).map(|s| s.count), Some(MAX_SEGMENTS));
        assert!(Segments::of(&format!("{longest}/s")).is_none());
    }
}
