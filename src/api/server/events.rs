//! `GET /api/v1/events`: the engine's changes as Server-Sent Events (SPEC §4.1).
//!
//! Each stream reads the engine's event ring from its own cursor (see
//! `orchestrator::events`), so a slow reader costs the engine nothing: it falls behind, is
//! told to reload (`event: reload`), and carries on from the oldest event still held. Streams
//! are capped per server ([`MAX_STREAMS`]), send a keep-alive comment every
//! [`KEEP_ALIVE`], and end when the server stops.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::body::Body;
use super::{views, Shared};
use crate::error::{Error, Result};
use crate::orchestrator::events::{Change, Event, Received, Subscription, RING_SIZE};
use crate::wire;

/// Event streams one server holds open at once; more are refused (429) until one ends.
pub(crate) const MAX_STREAMS: usize = 256;

/// How often an idle stream sends a comment, so proxies and clients see it is alive.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a reconnecting client waits before trying again (the `retry:` field).
const RETRY_MS: u64 = 2000;

/// The server's open event streams: their cap, and the signal that ends them at shutdown.
#[derive(Debug)]
pub(crate) struct EventStreams {
    open: Arc<Semaphore>,
    stopping: CancellationToken,
}

impl EventStreams {
    pub(crate) fn new() -> EventStreams {
        EventStreams {
            open: Arc::new(Semaphore::new(MAX_STREAMS)),
            stopping: CancellationToken::new(),
        }
    }

    /// End every stream (the server is stopping: graceful shutdown would otherwise wait for
    /// them).
    pub(crate) fn stop(&self) {
        self.stopping.cancel();
    }
}

/// Answer `GET /api/v1/events` (the caller checked the API token).
pub(super) async fn stream(shared: &Shared, request: &Request<Incoming>) -> Result<Response<Body>> {
    let deployment = deployment_filter(request.uri().query())?;
    if let Some(id) = &deployment {
        shared.engine.summary(id).await?;
    }
    let after = last_event_id(request)?;
    let permit = shared
        .event_streams
        .open
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Error::rate_limited(format!(
                "{MAX_STREAMS} event streams are open on this server already; close one and try again"
            ))
        })?;
    let subscription =
        shared
            .engine
            .subscribe_events(after, deployment, &shared.event_streams.stopping);
    let state = StreamState {
        subscription,
        _permit: permit,
        started: false,
    };
    let frames = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok::<_, std::io::Error>(Frame::data(chunk)), state))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct StreamState {
    subscription: Subscription,
    _permit: OwnedSemaphorePermit,
    started: bool,
}

impl StreamState {
    /// The next piece of the stream: the opening `retry:`, an event, or a keep-alive;
    /// `None` when the stream ends (server or engine stopping).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.started {
            self.started = true;
            return Some(Bytes::from(format!(
                "retry: {RETRY_MS}\n: taskfly events; ring of {RING_SIZE}\n\n"
            )));
        }
        match tokio::time::timeout(KEEP_ALIVE, self.subscription.next()).await {
            Err(_) => Some(Bytes::from_static(b": keep-alive\n\n")),
            Ok(None) => None,
            Ok(Some(Received::Event(event))) => Some(encode(&event)),
            Ok(Some(Received::Missed)) => {
                let body = wire::ReloadEvent {
                    reason: format!(
                        "events were missed (the stream resumed from an id older than the last {RING_SIZE} events, or fell that far behind); read the state again"
                    ),
                };
                Some(frame(self.subscription.cursor(), "reload", &body))
            }
        }
    }
}

/// One event in SSE form, encoded once whatever the number of streams sending it.
pub(crate) fn encode(event: &Event) -> Bytes {
    event.encoded.get_or_init(|| encode_change(event)).clone()
}

fn encode_change(event: &Event) -> Bytes {
    match &event.change {
        Change::Deployment(deployment) => frame(
            event.id,
            "deployment",
            &wire::DeploymentEvent {
                deployment: views::deployment(deployment, &[]),
            },
        ),
        Change::Node {
            node,
            previous,
            deployment,
        } => frame(
            event.id,
            "node",
            &wire::NodeEvent {
                deployment: views::deployment(deployment, &[]),
                node: views::node(node),
                previous: *previous,
            },
        ),
    }
}

fn frame<T: serde::Serialize>(id: u64, event: &str, data: &T) -> Bytes {
    // serde_json never writes a raw newline, so the data fits on one `data:` line.
    let json = serde_json::to_string(data).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode an event");
        "{}".to_owned()
    });
    Bytes::from(format!("id: {id}\nevent: {event}\ndata: {json}\n\n"))
}

fn deployment_filter(query: Option<&str>) -> Result<Option<String>> {
    let mut deployment = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "deployment" if value.is_empty() => {
                return Err(Error::invalid_input(
                    "deployment: expected a deployment id, as in `?deployment=dep-…`",
                ))
            }
            "deployment" => deployment = Some(value.to_owned()),
            _ => {
                return Err(Error::invalid_input(format!(
                    "unknown query parameter `{key}`; the events endpoint takes `deployment=ID`"
                )))
            }
        }
    }
    Ok(deployment)
}

fn last_event_id(request: &Request<Incoming>) -> Result<Option<u64>> {
    let Some(value) = request.headers().get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        Error::invalid_input(format!(
            "Last-Event-ID: expected the id of an earlier event (a number), got `{text}`"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployment_filter_is_the_only_parameter() {
        assert_eq!(deployment_filter(None).unwrap(), None);
        assert_eq!(
            deployment_filter(Some("deployment=dep-1")).unwrap(),
            Some("dep-1".to_owned())
        );
        for bad in ["deployment=", "deployment", "after=3"] {
            let e = deployment_filter(Some(bad)).unwrap_err();
            assert!(e.is_invalid_input(), "{bad}: {e}");
        }
    }
}
