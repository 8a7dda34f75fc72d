//! `GET /metrics` (SPEC §4.3) and the HTTP request metrics: each request counted under its
//! endpoint's pattern, never its path, so ids make no series of their own.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response};

use super::body::{full, header, Body};
use super::Shared;
use crate::auth;
use crate::error::{Error, Result};
use crate::metrics::{RouteMetrics, OTHER_ROUTE};

/// Every endpoint's pattern, and its segments; `{id}` stands for any one segment. Requests to
/// paths matching none are counted as [`OTHER_ROUTE`].
const ROUTES: &[(&str, &[&str])] = &[
    ("/health", &["health"]),
    ("/metrics", &["metrics"]),
    ("/api/v1/health", &["api", "v1", "health"]),
    ("/api/v1/metrics", &["api", "v1", "metrics"]),
    (
        "/api/v1/nodes/register",
        &["api", "v1", "nodes", "register"],
    ),
    ("/api/v1/nodes/assets", &["api", "v1", "nodes", "assets"]),
    (
        "/api/v1/nodes/heartbeat",
        &["api", "v1", "nodes", "heartbeat"],
    ),
    ("/api/v1/nodes/status", &["api", "v1", "nodes", "status"]),
    ("/api/v1/nodes/logs", &["api", "v1", "nodes", "logs"]),
    ("/api/v1/deployments", &["api", "v1", "deployments"]),
    (
        "/api/v1/deployments/{id}",
        &["api", "v1", "deployments", "{id}"],
    ),
    (
        "/api/v1/deployments/{id}/logs",
        &["api", "v1", "deployments", "{id}", "logs"],
    ),
    (
        "/api/v1/deployments/{id}/cleanup",
        &["api", "v1", "deployments", "{id}", "cleanup"],
    ),
    ("/api/v1/cleanup/all", &["api", "v1", "cleanup", "all"]),
    ("/api/v1/stats", &["api", "v1", "stats"]),
    ("/api/v1/nodes/outputs", &["api", "v1", "nodes", "outputs"]),
    (
        "/api/v1/deployments/{id}/rerun",
        &["api", "v1", "deployments", "{id}", "rerun"],
    ),
    (
        "/api/v1/deployments/{id}/outputs",
        &["api", "v1", "deployments", "{id}", "outputs"],
    ),
    (
        "/api/v1/deployments/{id}/record",
        &["api", "v1", "deployments", "{id}", "record"],
    ),
    (
        "/api/v1/cleanup/forget",
        &["api", "v1", "cleanup", "forget"],
    ),
    ("/api/v1/events", &["api", "v1", "events"]),
];

/// The request metrics of every endpoint pattern, and of [`OTHER_ROUTE`] last.
pub(super) struct RequestMetrics {
    routes: Vec<RouteMetrics>,
    /// The heartbeat's position in `routes`.
    heartbeat: usize,
}

impl RequestMetrics {
    pub(super) fn new() -> RequestMetrics {
        let patterns = ROUTES
            .iter()
            .map(|(pattern, _)| *pattern)
            .chain([OTHER_ROUTE]);
        RequestMetrics {
            routes: patterns.map(RouteMetrics::new).collect(),
            heartbeat: route_index(&super::routes::HEARTBEAT_SEGMENTS),
        }
    }

    /// The metrics of `POST /api/v1/nodes/heartbeat`, the most frequent request.
    pub(super) fn heartbeat(&self) -> &RouteMetrics {
        &self.routes[self.heartbeat]
    }

    /// The metrics of the endpoint a path of these `segments` names (the path split at `/`,
    /// without the empty segment before its first `/` or after a trailing one), or of
    /// [`OTHER_ROUTE`]. Runs for every request: it compares a few short strings and
    /// allocates nothing.
    pub(super) fn of(&self, segments: &[&str]) -> &RouteMetrics {
        &self.routes[route_index(segments)]
    }
}

/// The position in [`ROUTES`] of the pattern a path of these `segments` matches, or
/// `ROUTES.len()` for none.
fn route_index(segments: &[&str]) -> usize {
    ROUTES
        .iter()
        .position(|(_, pattern)| {
            // From the last segment: the first ones (`api`, `v1`) tell few apart.
            pattern.len() == segments.len()
                && pattern
                    .iter()
                    .rev()
                    .zip(segments.iter().rev())
                    .all(|(want, got)| *want == "{id}" || want == got)
        })
        .unwrap_or(ROUTES.len())
}

/// `GET /metrics`: the engine's metrics, behind the metrics token when one is set.
pub(super) async fn serve(shared: &Shared, request: &Request<Incoming>) -> Result<Response<Body>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(Error::not_found(format!(
            "no such endpoint: {} {}",
            request.method(),
            request.uri().path()
        )));
    }
    if let Some(expected) = shared.metrics_token_hash {
        let token = auth::bearer(header(request, AUTHORIZATION)).ok_or_else(|| {
            Error::unauthorized(
                "metrics need `Authorization: Bearer <metrics token>` (taskflyd --metrics-token)",
            )
        })?;
        if !auth::hashes_equal(&auth::hash_token(token), &expected) {
            return Err(Error::unauthorized("wrong metrics token"));
        }
    }
    let text = shared.engine.metrics_text().await?;
    let mut response = Response::new(full(text.into_bytes()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::{RequestMetrics, ROUTES};

    fn segments(path: &str) -> Vec<&str> {
        path.trim_end_matches('/').split('/').skip(1).collect()
    }

    #[test]
    fn each_pattern_is_its_segments() {
        for (pattern, parts) in ROUTES {
            assert_eq!(segments(pattern), *parts, "{pattern}");
        }
    }

    #[test]
    fn the_heartbeats_metrics_are_its_patterns() {
        let metrics = RequestMetrics::new();
        assert_eq!(metrics.heartbeat().route(), "/api/v1/nodes/heartbeat");
    }

    #[test]
    fn routes_are_patterns_never_ids() {
        let metrics = RequestMetrics::new();
        for (path, route) in [
            ("/metrics", "/metrics"),
            ("/api/v1/deployments/", "/api/v1/deployments"),
            ("/api/v1/deployments/dep-0a1b2c", "/api/v1/deployments/{id}"),
            (
                "/api/v1/deployments/dep-0a1b2c/logs",
                "/api/v1/deployments/{id}/logs",
            ),
            ("/api/v1/nodes/heartbeat", "/api/v1/nodes/heartbeat"),
            ("/api/v1/nodes/heartbeat/", "/api/v1/nodes/heartbeat"),
            ("/api/v1/nodes/heartbeat/x", "other"),
            ("/api/v1/nodes", "other"),
            ("/api/v1/deployments/dep-1/nodes/7/secret", "other"),
            ("/wp-admin/index.php", "other"),
            ("/", "other"),
        ] {
            assert_eq!(metrics.of(&segments(path)).route(), route, "{path}");
        }
    }

    #[test]
    fn every_endpoint_of_the_spec_has_its_pattern() {
        let metrics = RequestMetrics::new();
        let spec = include_str!("../../../docs/SPEC.md");
        let mut endpoints = 0;
        for line in spec.lines() {
            let Some(rest) = line.strip_prefix("| `") else {
                continue;
            };
            let Some((method, path)) = rest.split_once(' ') else {
                continue;
            };
            if !["GET", "POST", "DELETE", "PUT"].contains(&method) || !path.starts_with('/') {
                continue;
            }
            let path = path
                .split(['`', '?', '['])
                .next()
                .unwrap_or_default()
                .replace("{id}", "dep-0a1b2c");
            let full = format!("/api/v1{path}");
            let route = metrics.of(&segments(&full)).route();
            assert_eq!(route.replace("{id}", "dep-0a1b2c"), full, "{line}");
            endpoints += 1;
        }
        assert!(endpoints >= 19, "the SPEC's endpoint tables were found");
    }
}
