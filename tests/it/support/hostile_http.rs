//! Requests as a hostile client sends them: any headers (or none), any body, from any loopback
//! address, and connections that never finish their headers.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::engine_http::RawResponse;

/// How long one request may take before the test fails.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// One request to be sent by [`send`].
pub struct Hostile<'a> {
    pub method: Method,
    /// Starts with `/`.
    pub path: &'a str,
    /// Every header, exactly as sent (no `Authorization` unless listed).
    pub headers: Vec<(&'a str, String)>,
    pub body: Vec<u8>,
    /// The client's own address (any of 127.0.0.0/8); `None` lets the system choose.
    pub from: Option<IpAddr>,
}

impl<'a> Hostile<'a> {
    /// `method path`, no header, no body.
    pub fn new(method: Method, path: &'a str) -> Hostile<'a> {
        Hostile {
            method,
            path,
            headers: Vec::new(),
            body: Vec::new(),
            from: None,
        }
    }

    /// Adds `Authorization: <value>` exactly as given (`None` adds nothing).
    pub fn authorization(mut self, value: Option<&str>) -> Hostile<'a> {
        if let Some(value) = value {
            self.headers.push(("authorization", value.to_owned()));
        }
        self
    }

    /// Adds `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Hostile<'a> {
        self.authorization(Some(&format!("Bearer {token}")))
    }

    /// Sets the body and its `Content-Type`.
    pub fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Hostile<'a> {
        self.headers.push(("content-type", content_type.to_owned()));
        self.body = body.into();
        self
    }

    /// Sends from this loopback address.
    pub fn from(mut self, address: IpAddr) -> Hostile<'a> {
        self.from = Some(address);
        self
    }
}

/// Sends `request` to `base_url` and returns the whole answer.
pub async fn send(base_url: &str, request: Hostile<'_>) -> RawResponse {
    let mut connector = HttpConnector::new();
    connector.set_local_address(request.from);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let mut builder = Request::builder()
        .method(request.method.clone())
        .uri(format!("{base_url}{}", request.path));
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let built = builder
        .body(Full::new(Bytes::from(request.body)))
        .expect("request");
    let response = tokio::time::timeout(ANSWER_LIMIT, client.request(built))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {} got no answer within {ANSWER_LIMIT:?}",
                request.method, request.path
            )
        })
        .unwrap_or_else(|e| panic!("{} {}: {e:?}", request.method, request.path));
    RawResponse::read(response).await
}

/// The address of `http://HOST:PORT`.
pub fn socket_address(base_url: &str) -> SocketAddr {
    base_url
        .strip_prefix("http://")
        .and_then(|rest| rest.parse().ok())
        .unwrap_or_else(|| panic!("not http://IP:PORT: {base_url}"))
}

/// Asserts that `response` has `status` and the JSON error shape `{"error": "...",
/// "details": [...]}`; returns the error message.
#[track_caller]
pub fn expect_error(response: &RawResponse, status: u16, what: &str) -> String {
    assert_eq!(
        response.status,
        status,
        "{what}: expected {status}, got {} {}",
        response.status,
        response.text()
    );
    assert_eq!(
        response.content_type,
        "application/json",
        "{what}: {}",
        response.text()
    );
    let json = response.json();
    let object = json
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not a JSON object: {json}"));
    let error = object
        .get("error")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_else(|| panic!("{what}: no `error` string in {json}"));
    assert!(!error.is_empty(), "{what}: empty error in {json}");
    assert!(
        object
            .get("details")
            .is_some_and(serde_json::Value::is_array),
        "{what}: no `details` array in {json}"
    );
    assert!(
        object.keys().all(|k| k == "error" || k == "details"),
        "{what}: unexpected fields in {json}"
    );
    error.to_owned()
}
