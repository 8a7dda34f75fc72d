//! Reading request bodies within their limits, and writing responses.

use std::future::Future;
use std::task::Poll;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Shared;
use crate::error::{Error, Result};
use crate::state::MAX_LOG_LINES_PER_BATCH;

pub(super) type Body = BoxBody<Bytes, std::io::Error>;

pub(super) async fn read_json<T: DeserializeOwned>(
    shared: &Shared,
    request: Request<Incoming>,
) -> Result<T> {
    require_json(&request)?;
    let body = read_limited_in_time(shared, request.into_body(), "JSON body").await?;
    parse_json(&body)
}

/// JSON, where an empty body (with or without a content type) means `{}`.
pub(super) async fn read_json_or_empty<T: DeserializeOwned + Default>(
    shared: &Shared,
    request: Request<Incoming>,
) -> Result<T> {
    let content_type = header(&request, CONTENT_TYPE);
    let has_type = content_type.is_some();
    if let Some(content_type) = content_type {
        require_json_type(content_type)?;
    }
    let body = read_limited_in_time(shared, request.into_body(), "JSON body").await?;
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
    require_json_type(header(request, CONTENT_TYPE).unwrap_or(""))
}

fn require_json_type(content_type: &str) -> Result<()> {
    // What agents send, recognised before any splitting.
    if content_type == "application/json" {
        return Ok(());
    }
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(unsupported_media(&format!(
            "send JSON bodies with `Content-Type: application/json`, not `{essence}`"
        )))
    }
}

/// A JSON or text body, within the size limit for JSON bodies and the body read time limit.
pub(super) async fn read_limited_in_time(
    shared: &Shared,
    body: Incoming,
    what: &str,
) -> Result<Bytes> {
    let limit = shared.config.body_read_timeout;
    let read = read_limited(body, shared.config.max_json_body, what);
    tokio::pin!(read);
    // A small body usually came in with the headers: read it without arming a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    if let Poll::Ready(read) = first {
        return read;
    }
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Err(Error::invalid_input(format!(
            "the {what} did not arrive within {} s",
            limit.as_secs_f64()
        )))
    })
}

pub(super) async fn read_limited(body: Incoming, limit: u64, what: &str) -> Result<Bytes> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::too_large(format!(
            "the {what} is larger than its {limit}-byte limit"
        ))),
        Err(e) => Err(Error::invalid_input(format!("cannot read the {what}: {e}"))),
    }
}

/// Refuse a `text/plain` log body of more lines than a batch may hold before it is cut into
/// lines: a 4 MiB body of empty lines is 4 million of them.
pub(super) fn check_text_log_lines(body: &[u8]) -> Result<()> {
    let ends_open = !body.is_empty() && !body.ends_with(b"\n");
    let lines = body.iter().filter(|byte| **byte == b'\n').count() + usize::from(ends_open);
    if lines > MAX_LOG_LINES_PER_BATCH {
        return Err(Error::too_large(format!(
            "a log body of {lines} lines is over the limit of {MAX_LOG_LINES_PER_BATCH}; send fewer lines per request"
        )));
    }
    Ok(())
}

pub(super) fn unsupported_media(message: &str) -> Error {
    Error::unsupported_media(message.to_owned())
}

pub(super) fn header(request: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<&str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A 200 answer with a `text/plain` body.
pub(super) fn plain_text(text: String) -> Response<Body> {
    let mut response = Response::new(full(text.into_bytes()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(super) fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// An answer of `status` with a JSON body that is always the same.
pub(super) fn json_bytes(status: StatusCode, body: &'static [u8]) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(full(bytes));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => super::errors::error_response(&Error::invalid_input(format!(
            "cannot encode the response: {e}"
        ))),
    }
}
