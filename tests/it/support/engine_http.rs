//! Raw HTTP requests to a test engine, for checking status codes and response bodies exactly
//! as a client other than [`taskfly::Client`] would see them.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// An answer: status, content type and the whole body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Reads the whole of `response`: its status, content type and body.
    pub async fn read(response: Response<Incoming>) -> RawResponse {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes()
            .to_vec();
        RawResponse {
            status,
            content_type,
            body,
        }
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `error` field of an error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no `error` in {}", self.text()))
            .to_owned()
    }

    /// The `details` field of an error body.
    pub fn details(&self) -> Vec<String> {
        self.json()["details"]
            .as_array()
            .map(|details| {
                details
                    .iter()
                    .map(|d| d.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One request: `method` on `base_url` + `path` (which starts with `/`), with an optional
/// bearer token and body.
pub async fn raw_request(
    base_url: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> RawResponse {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{base_url}{path}"));
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some((content_type, bytes)) => request
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(bytes))),
        None => request.body(Full::new(Bytes::new())),
    }
    .expect("request");
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request))
            .await
            .expect("the engine answers within 30 s")
            .expect("HTTP exchange");
    RawResponse::read(response).await
}

/// One call of each node endpoint as (method, path, JSON body), for checking that they refuse
/// a caller that is not the node.
pub fn node_calls() -> [(Method, &'static str, Option<&'static str>); 4] {
    [
        (Method::GET, "/api/v1/nodes/assets", None),
        (Method::POST, "/api/v1/nodes/heartbeat", Some("{}")),
        (
            Method::POST,
            "/api/v1/nodes/status",
            Some(r#"{"status":"failed","message":"forged"}"#),
        ),
        (
            Method::POST,
            "/api/v1/nodes/logs",
            Some(r#"{"lines":[{"stream":"stdout","line":"forged"}]}"#),
        ),
    ]
}

/// `GET path` with a bearer token.
pub async fn raw_get(base_url: &str, path: &str, token: Option<&str>) -> RawResponse {
    raw_request(base_url, Method::GET, path, token, None).await
}
