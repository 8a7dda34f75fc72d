//! The outputs endpoints (SPEC §4): a node's upload (`POST /nodes/outputs`) and the client's
//! download of a deployment's outputs (`GET /deployments/{id}/outputs`), both streamed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_DISPOSITION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::body::{header, json, unsupported_media, Body};
use super::Shared;
use crate::error::{Error, Result};
use crate::state::model::Node;
use crate::wire;

/// How long an outputs upload may send nothing before it is given up (the engine keeps what
/// arrived under its rules, and the agent sends it again).
const UPLOAD_IDLE_LIMIT: Duration = Duration::from_secs(60);

/// `POST /nodes/outputs`: the node's outputs, a gzip tar streamed into the engine.
pub(super) async fn upload(
    shared: &Shared,
    node: &Node,
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let content_type = header(&request, CONTENT_TYPE).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if ![
        "application/gzip",
        "application/x-gzip",
        "application/octet-stream",
    ]
    .iter()
    .any(|accepted| essence.eq_ignore_ascii_case(accepted))
    {
        return Err(unsupported_media(&format!(
            "send the outputs as application/gzip (a gzip tar), not `{essence}`"
        )));
    }
    let stream = request
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let upload = IdleLimited::new(tokio_util::io::StreamReader::new(stream), UPLOAD_IDLE_LIMIT);
    let stored = shared.engine.node_outputs(node, upload).await?;
    Ok(json(
        StatusCode::OK,
        &wire::OutputsStored {
            status: "ok".to_owned(),
            files: stored.files,
            bytes: stored.bytes,
        },
    ))
}

/// `GET /deployments/{id}/outputs[?node=<index>]`: a gzip tar of `node-<index>/<path>`
/// entries, written while it is sent.
pub(super) async fn download(
    shared: &Shared,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>> {
    let mut node = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "node" {
            node = Some(value.parse::<u32>().map_err(|_| {
                Error::invalid_input(format!("node: expected a node index, got `{value}`"))
            })?);
        }
    }
    let archive = shared.engine.outputs(id, node).await?;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(archive, 64 * 1024).map_ok(Frame::data);
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    let name = match node {
        Some(index) => format!("attachment; filename=\"{id}-node-{index}-outputs.tar.gz\""),
        None => format!("attachment; filename=\"{id}-outputs.tar.gz\""),
    };
    if let Ok(value) = HeaderValue::from_str(&name) {
        headers.insert(CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// A reader that fails once its inner reader has given nothing for `limit`: a node that stops
/// sending mid-upload does not hold the daemon's reader (a blocking thread) forever.
struct IdleLimited<R> {
    inner: R,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Whether the last poll was left waiting for data (the deadline then runs on); a poll
    /// after an answer starts a fresh deadline, so a slow consumer is never counted.
    waiting: bool,
}

impl<R> IdleLimited<R> {
    fn new(inner: R, limit: Duration) -> IdleLimited<R> {
        IdleLimited {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            waiting: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for IdleLimited<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.waiting {
            let next = Instant::now() + this.limit;
            this.deadline.as_mut().reset(next);
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.waiting = false;
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the outputs upload sent nothing for {} s",
                        this.limit.as_secs()
                    ),
                ))),
                Poll::Pending => {
                    this.waiting = true;
                    Poll::Pending
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::IdleLimited;

    #[tokio::test(start_paused = true)]
    async fn an_upload_silent_past_the_limit_fails_and_a_slow_reader_does_not() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut limited = IdleLimited::new(reader, Duration::from_secs(60));
        writer.write_all(b"first").await.expect("write");
        let mut buf = [0u8; 5];
        limited
            .read_exact(&mut buf)
            .await
            .expect("data within the limit");
        // The reader itself takes its time: that is not the sender's silence.
        tokio::time::sleep(Duration::from_secs(600)).await;
        writer.write_all(b"again").await.expect("write");
        limited.read_exact(&mut buf).await.expect("data waiting");
        let error = limited.read(&mut buf).await.expect_err("silent");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            error.to_string().contains("sent nothing for 60 s"),
            "{error}"
        );
    }
}
