//! The outputs endpoints (SPEC §4): a node's upload (`POST /nodes/outputs`) and the client's
//! download of a deployment's outputs (`GET /deployments/{id}/outputs`), both streamed.

use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_DISPOSITION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::body::{header, json, unsupported_media, Body};
use super::Shared;
use crate::error::{Error, Result};
use crate::state::model::Node;
use crate::wire;

/// `POST /nodes/outputs`: the node's outputs, a gzip tar streamed into the engine.
pub(super) async fn upload(
    shared: &Shared,
    node: &Node,
    request: Request<Incoming>,
) -> Result<Response<Body>> {
    let content_type = header(&request, CONTENT_TYPE).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !["application/gzip", "application/x-gzip", "application/octet-stream"]
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
    let stored = shared
        .engine
        .node_outputs(node, tokio_util::io::StreamReader::new(stream))
        .await?;
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
