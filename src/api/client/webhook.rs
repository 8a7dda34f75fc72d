//! The HTTP side of webhook notifications ([`crate::notify::Transport`]): one POST, answered
//! or not, with no retry of its own (the notifier keeps the schedule). An `https://` receiver
//! is verified against the platform's trust store.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioExecutor;

use super::{tcp_connector, Connector};
use crate::notify::Transport;

/// Posts webhook notifications. Its HTTP client is made at the first notification, not
/// before: loading the platform's trust store costs a daemon (or `taskfly run`) that never
/// notifies nothing.
#[derive(Default)]
pub(crate) struct WebhookClient {
    http: std::sync::OnceLock<Result<Http, String>>,
}

type Http = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

impl WebhookClient {
    /// A client for `http://` and `https://` receivers.
    pub(crate) fn new() -> WebhookClient {
        WebhookClient::default()
    }

    /// The HTTP client, made on the first call; when the platform's trust store cannot be
    /// loaded, why (each notification's attempt then fails with it, and is tried again).
    fn http(&self) -> Result<&Http, String> {
        self.http
            .get_or_init(|| {
                #[cfg(feature = "tls")]
                let connector = {
                    let tls = crate::api::tls::platform_client_config()
                        .map_err(|e| format!("cannot make an HTTPS client: {}", e.report()))?;
                    hyper_rustls::HttpsConnector::from((tcp_connector(), tls))
                };
                #[cfg(not(feature = "tls"))]
                let connector = tcp_connector();
                Ok(
                    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                        .build(connector),
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[async_trait::async_trait]
impl Transport for WebhookClient {
    async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> Result<u16, String> {
        // Messages name what went wrong, never the URL (it may hold a credential).
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(USER_AGENT, concat!("taskfly/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|_| "the webhook URL is not a valid HTTP URL".to_owned())?;
        for (name, value) in headers {
            let value =
                HeaderValue::from_str(value).map_err(|_| format!("header {name} is not valid"))?;
            request
                .headers_mut()
                .insert(HeaderName::from_static(lowercase(name)), value);
        }
        let response = self
            .http()?
            .request(request)
            .await
            .map_err(|e| describe(&e))?;
        let code = response.status().as_u16();
        // The answer's body is read and dropped, so the connection can be used again.
        let _ = response.into_body().collect().await;
        Ok(code)
    }
}

/// The lower-case name `HeaderName::from_static` wants.
fn lowercase(name: &'static str) -> &'static str {
    match name {
        "Content-Type" => "content-type",
        crate::notify::SIGNATURE_HEADER => "x-taskfly-signature",
        other => other,
    }
}

/// Why a request got no answer, from the error's causes (hyper's own message says little).
fn describe(error: &hyper_util::client::legacy::Error) -> String {
    let mut message = String::from("no answer from the webhook");
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(current) = cause {
        message.push_str(": ");
        message.push_str(&current.to_string());
        cause = current.source();
    }
    message
}
