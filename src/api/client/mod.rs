//! The typed HTTP client of the daemon API (SPEC §4), shared by the CLI and the node agent.
//!
//! Every method sends one request under `/api/v1` and returns the decoded [`wire`] type, so the
//! CLI, the agent and the server cannot drift apart. A non-2xx answer becomes the crate
//! [`Error`] of the matching kind (404 → [`Error::is_not_found`], 409 → [`Error::is_conflict`],
//! 400 with details → [`Error::is_invalid_config`], 415, 429, ...) carrying the server's
//! `error` text; a daemon that cannot be reached, and any other status, becomes
//! [`Error::is_transport`].
//!
//! The node-side calls (`register`, `register_for_work`, `download_assets`, `heartbeat`,
//! `report_status`, `send_logs`) retry transient failures (connection refused or reset, 429,
//! 502, 503, 504, time-outs) with exponential backoff and jitter for about two minutes, so an
//! agent survives a daemon restart. The client-side calls do not retry: a person is waiting for the answer.
//!
//! Tokens are sent as `Authorization: Bearer …` header values marked sensitive and never appear
//! in an error message, a `Debug` output or a log line.
//!
//! With the `tls` feature, `https://` daemons are verified against the platform's trust store,
//! or against the certificates of one CA file (`Client::with_ca_file`). A certificate the
//! client refuses is an `Error::is_certificate` error, and is never retried.

use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::api::wire;
use crate::error::{Error, Result};

mod events;
mod node;
mod retry;
#[cfg(test)]
mod tests;
pub(crate) mod webhook;

pub use events::EventStream;
use retry::{is_transient, Failure};

/// Every API path starts with this.
const API_PREFIX: &str = "/api/v1";
/// How long a request may take, answer included, unless [`Client::timeout`] says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long establishing a TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time a registration may take: the daemon holds the request of a pooled instance
/// waiting for work for up to about 20 s before it answers 204 No Content.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Uploading a bundle may take longer than an ordinary call.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// The asset download has no whole-body limit, only this much silence between two chunks.
const DOWNLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long node-side calls keep retrying transient failures.
const RETRY_BUDGET: Duration = Duration::from_secs(120);
/// The first delay between two attempts; it doubles after each failure. Each pause is the delay
/// jittered to between half and one and a half times it ([`crate::backoff::Backoff`]).
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(250);
/// The longest delay between two attempts, before jitter.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
/// The largest JSON answer read into memory.
const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;

const JSON: &str = "application/json";
const GZIP: &str = "application/gzip";

/// The connector under the connection pool: TCP, with TLS for `https://` daemons when the
/// `tls` feature is on.
#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
/// The connector under the connection pool: plain TCP (built without the `tls` feature).
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// A typed client of the TaskFly daemon's HTTP API.
///
/// Cheap to clone (the connection pool is shared). Used by the `taskfly` CLI with the API token
/// and by the node agent with its node token.
///
/// ```no_run
/// # async fn example() -> taskfly::Result<()> {
/// let client = taskfly::Client::new("http://127.0.0.1:8080", Some("api-token".to_string()))?;
/// for deployment in client.deployments().await? {
///     println!("{} {}", deployment.deployment_id, deployment.status);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    /// `http://host:port` (or `https://`) plus an optional path prefix, without a trailing slash.
    base: String,
    token: Option<String>,
    http: hyper_util::client::legacy::Client<Connector, RequestBody>,
    timeout: Duration,
    retry_budget: Duration,
    /// Set by [`Client::retry_reads`]: reads retry, and this is told when one starts to.
    read_retry_notice: Option<ReadRetryNotice>,
}

/// What [`Client::retry_reads`] calls when a read starts retrying.
type ReadRetryNotice = std::sync::Arc<dyn Fn(&Error, Duration) + Send + Sync>;
/// A request body: bytes in memory, or a file streamed from disk.
type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// The answer to [`Client::register_for_work`]: the one [`crate::state::model::Registration`],
/// carrying the assignment in its wire form.
pub type Registration = crate::state::model::Registration<wire::RegisterResponse>;

impl fmt::Debug for Client {
    /// Shows whether a token is set, never the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the daemon at `base_url` (`http://127.0.0.1:8080`; a trailing slash is fine),
    /// sending `token` as a bearer token when given.
    ///
    /// `https://` needs the `tls` feature; the daemon's certificate is then verified against
    /// the platform's trust store, unless `Client::with_ca_file` names a CA. A URL that cannot
    /// be parsed, has another scheme, no host, a query or credentials, or is `https://` in a
    /// build without TLS support, is an [`Error::is_invalid_input`] error naming it.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Client> {
        let base = parse_base_url(base_url)?;
        #[cfg(feature = "tls")]
        let connector = {
            let tls = if base.starts_with("https://") {
                super::tls::platform_client_config()?
            } else {
                super::tls::plain_client_config()?
            };
            hyper_rustls::HttpsConnector::from((tcp_connector(), tls))
        };
        #[cfg(not(feature = "tls"))]
        let connector = tcp_connector();
        Ok(Client {
            base,
            token,
            http: pool(connector),
            timeout: DEFAULT_TIMEOUT,
            retry_budget: RETRY_BUDGET,
            read_retry_notice: None,
        })
    }

    /// The same client whose reads ([`Client::deployment`], [`Client::deployments`],
    /// [`Client::logs`]) ride out a daemon that is away for a while (restarting, or behind a
    /// gateway answering 502 to 504): each retries transient failures with backoff and jitter
    /// for as long as a node agent does (2 minutes), and `notice` is called with the failure
    /// and that time when a read starts retrying, so a follower can say so once. Without it,
    /// a read fails at its first failure.
    #[must_use]
    pub fn retry_reads(
        mut self,
        notice: impl Fn(&Error, Duration) + Send + Sync + 'static,
    ) -> Client {
        self.read_retry_notice = Some(std::sync::Arc::new(notice));
        self
    }

    /// The same client trusting exactly the certificates in the PEM file `ca_file` for an
    /// `https://` daemon, instead of the platform's trust store: the private CA that signed
    /// the daemon's certificate, or a self-signed certificate itself (as `taskflyd` hands its
    /// nodes). The file is read and checked now, whatever the URL's scheme.
    ///
    /// ```no_run
    /// # fn example() -> taskfly::Result<()> {
    /// let client = taskfly::Client::new("https://taskfly.internal:8443", None)?
    ///     .with_ca_file("/etc/taskfly/ca.pem")?;
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: the file cannot be read ([`Error::is_io`]), or holds no usable certificate
    /// ([`Error::is_invalid_input`]); both name the file.
    #[cfg(feature = "tls")]
    pub fn with_ca_file(mut self, ca_file: impl AsRef<Path>) -> Result<Client> {
        let tls = super::tls::client_config(ca_file.as_ref())?;
        self.http = pool(hyper_rustls::HttpsConnector::from((tcp_connector(), tls)));
        Ok(self)
    }

    /// The same client sending `token` as its bearer token (the node agent switches from no
    /// token to its node token after registering).
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    /// The same client with another per-request time limit (30 s by default). It bounds a whole
    /// request, answer included; the asset download is bounded by silence between chunks only.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The daemon's URL as the client uses it, without a trailing slash (for messages).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// How long node-side calls keep retrying; shortened by tests.
    #[cfg(test)]
    fn retry_budget(mut self, budget: Duration) -> Client {
        self.retry_budget = budget;
        self
    }

    // ----- client side -----

    /// `POST /deployments`: deploys a client bundle (a gzip-compressed tar holding
    /// `taskfly.yml` and the application files).
    pub async fn create_deployment(&self, bundle: Bytes) -> Result<wire::DeploymentCreated> {
        let call = Call::new(Method::POST, "/deployments".to_string())
            .body(bundle, GZIP)
            .timeout(self.timeout.max(UPLOAD_TIMEOUT));
        self.json_once(&call).await
    }

    /// `GET /deployments`: summaries of every deployment, newest first.
    pub async fn deployments(&self) -> Result<Vec<wire::DeploymentView>> {
        self.json_read(&Call::new(Method::GET, "/deployments".to_string()))
            .await
    }

    /// `GET /deployments/{id}`: one deployment and all its nodes.
    pub async fn deployment(&self, id: &str) -> Result<wire::DeploymentView> {
        let path = format!("/deployments/{}", encode_component(id));
        self.json_read(&Call::new(Method::GET, path)).await
    }

    /// `DELETE /deployments/{id}`: terminates the deployment; returns once the daemon has
    /// accepted the request (202), not once every instance is gone.
    pub async fn terminate(&self, id: &str) -> Result<()> {
        let path = format!("/deployments/{}", encode_component(id));
        self.send_once(&Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    /// `POST /deployments/{id}/rerun`: runs some nodes of a finished deployment again, as a
    /// new deployment (its `rerun_of` is `id`); answers like [`Client::create_deployment`],
    /// with the indexes of the nodes it runs.
    pub async fn rerun(
        &self,
        id: &str,
        nodes: wire::RerunSelection,
    ) -> Result<wire::DeploymentCreated> {
        let path = format!("/deployments/{}/rerun", encode_component(id));
        let call = Call::new(Method::POST, path).json(&wire::RerunRequest::new(nodes))?;
        self.json_once(&call).await
    }

    /// `POST /deployments/{id}/cleanup`: deletes a final deployment's files (409 while it runs).
    pub async fn cleanup(&self, id: &str) -> Result<()> {
        let path = format!("/deployments/{}/cleanup", encode_component(id));
        self.send_once(&Call::new(Method::POST, path))
            .await
            .map(drop)
    }

    /// `DELETE /deployments/{id}/record`: forgets a final deployment (its files, then its
    /// record, nodes and logs; 409 while it runs).
    pub async fn forget(&self, id: &str) -> Result<()> {
        let path = format!("/deployments/{}/record", encode_component(id));
        self.send_once(&Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    /// `POST /cleanup/forget`: forgets every final deployment; with `dry_run`, only says which
    /// it would forget.
    pub async fn forget_finished(&self, dry_run: bool) -> Result<wire::Forgotten> {
        let path = format!("/cleanup/forget?dry_run={dry_run}");
        self.json_once(&Call::new(Method::POST, path)).await
    }

    /// `POST /cleanup/all`: deletes the files of every final deployment.
    pub async fn cleanup_all(&self) -> Result<wire::CleanupAll> {
        self.json_once(&Call::new(Method::POST, "/cleanup/all".to_string()))
            .await
    }

    /// `GET /deployments/{id}/logs`: up to `limit` lines after the cursor `after` (0 for the
    /// start), of one node when `node` is given. Pass the page's `next` as the following `after`.
    pub async fn logs(
        &self,
        id: &str,
        node: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<wire::LogsPage> {
        let mut path = format!(
            "/deployments/{}/logs?after={after}&limit={limit}",
            encode_component(id)
        );
        if let Some(node) = node {
            path.push_str("&node=");
            path.push_str(&encode_component(node));
        }
        self.json_read(&Call::new(Method::GET, path)).await
    }

    /// `GET /deployments/{id}/outputs[?node=]`: streams the outputs archive of a deployment
    /// (or of its node `node`), a gzip tar of `node-<index>/<path>` entries, into `dest_file`
    /// (created or truncated, mode 0600). Returns the bytes written. Not retried.
    pub async fn download_outputs(
        &self,
        id: &str,
        node: Option<u32>,
        dest_file: &Path,
    ) -> Result<u64> {
        let mut path = format!("/deployments/{}/outputs", encode_component(id));
        if let Some(node) = node {
            path.push_str(&format!("?node={node}"));
        }
        self.download_attempt(&Call::new(Method::GET, path), "outputs", dest_file, None)
            .await
            .map(|downloaded| downloaded.bytes())
            .map_err(|failure| failure.error)
    }

    /// `GET /stats`: counts of deployments and nodes.
    pub async fn stats(&self) -> Result<wire::Stats> {
        self.json_once(&Call::new(Method::GET, "/stats".to_string()))
            .await
    }

    /// `GET /health`: succeeds when the daemon answers `{"status": "ok"}`.
    pub async fn health(&self) -> Result<()> {
        let call = Call::new(Method::GET, "/health".to_string());
        let answer: wire::StatusOk = self.json_once(&call).await?;
        if answer.status == "ok" {
            Ok(())
        } else {
            Err(Error::transport(format!(
                "the daemon at {} reports status {:?}",
                self.base, answer.status
            )))
        }
    }

    /// A read: sent once, or retried as [`Client::retry_reads`] says.
    async fn json_read<T: DeserializeOwned>(&self, call: &Call) -> Result<T> {
        let Some(notice) = &self.read_retry_notice else {
            return self.json_once(call).await;
        };
        let noticed = std::sync::atomic::AtomicBool::new(false);
        self.retrying("read", || async {
            let body = match self.attempt(call).await {
                Ok(body) => body,
                Err(failure) => {
                    if failure.transient
                        && !noticed.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        notice(&failure.error, self.retry_budget);
                    }
                    return Err(failure);
                }
            };
            decode(call, &body).map_err(Failure::permanent)
        })
        .await
    }

    /// Sends `call` once and decodes its JSON answer.
    async fn json_once<T: DeserializeOwned>(&self, call: &Call) -> Result<T> {
        let body = self.send_once(call).await?;
        decode(call, &body)
    }

    /// Sends `call` once and returns its 2xx body.
    async fn send_once(&self, call: &Call) -> Result<Bytes> {
        self.attempt(call).await.map_err(|failure| failure.error)
    }

    /// One exchange whose answer must be a success: its body, or the failure its status means.
    async fn attempt(&self, call: &Call) -> Result<Bytes, Failure> {
        let (status, body) = self.exchange(call).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(status_failure(status, &body))
        }
    }

    /// One exchange: sends the request and reads the whole answer, whatever its status, within
    /// the time limit.
    async fn exchange(&self, call: &Call) -> Result<(StatusCode, Bytes), Failure> {
        let request = self.build(call).map_err(Failure::permanent)?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| self.connection_failure(&e))?;
            let status = response.status();
            let body = self.read_answer(response.into_body()).await?;
            Ok::<_, Failure>((status, body))
        };
        let limit = call.timeout.unwrap_or(self.timeout);
        match tokio::time::timeout(limit, exchange).await {
            Ok(exchanged) => exchanged,
            Err(_) => Err(self.timed_out(call, limit)),
        }
    }

    /// One download attempt: answer headers within the time limit, then the body chunk by chunk
    /// (each chunk within [`DOWNLOAD_IDLE_TIMEOUT`] of the previous one): kept in memory when
    /// the answer announces a body of at most `in_memory_up_to` bytes, else written to
    /// `dest_file`. `what` (`assets`, `outputs`) names the download in its errors.
    async fn download_attempt(
        &self,
        call: &Call,
        what: &'static str,
        dest_file: &Path,
        in_memory_up_to: Option<u64>,
    ) -> Result<Downloaded, Failure> {
        let request = self.build(call).map_err(Failure::permanent)?;
        let response = match tokio::time::timeout(self.timeout, self.http.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(self.connection_failure(&e)),
            Err(_) => return Err(self.timed_out(call, self.timeout)),
        };
        let status = response.status();
        if !status.is_success() {
            let body =
                match tokio::time::timeout(self.timeout, self.read_answer(response.into_body()))
                    .await
                {
                    Ok(body) => body?,
                    Err(_) => return Err(self.timed_out(call, self.timeout)),
                };
            return Err(status_failure(status, &body));
        }
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        let mut body = response.into_body();
        if let Some(length) = announced.filter(|length| Some(*length) <= in_memory_up_to) {
            let mut data = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
            while let Some(chunk) = self.next_chunk(&mut body, what).await? {
                data.extend_from_slice(&chunk);
            }
            if data.len() as u64 != length {
                return Err(Failure::transient(Error::transport(format!(
                    "the {what} from {} were {} bytes where the answer announced {length}",
                    self.base,
                    data.len()
                ))));
            }
            return Ok(Downloaded::InMemory(Bytes::from(data)));
        }

        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dest_file)
            .await
            .map_err(|e| {
                Failure::permanent(Error::io(
                    format!("cannot create {}", dest_file.display()),
                    e,
                ))
            })?;
        let write_error = |e| {
            Failure::permanent(Error::io(
                format!("cannot write {}", dest_file.display()),
                e,
            ))
        };
        let mut written = 0u64;
        while let Some(chunk) = self.next_chunk(&mut body, what).await? {
            file.write_all(&chunk).await.map_err(write_error)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        Ok(Downloaded::File(written))
    }

    /// The next data chunk of a download's body (`None` at its end), within
    /// [`DOWNLOAD_IDLE_TIMEOUT`]; `what` names the download in its errors.
    async fn next_chunk(
        &self,
        body: &mut Incoming,
        what: &'static str,
    ) -> Result<Option<Bytes>, Failure> {
        loop {
            let frame = match tokio::time::timeout(DOWNLOAD_IDLE_TIMEOUT, body.frame()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(self.connection_failure(&e)),
                Err(_) => {
                    return Err(Failure::transient(Error::transport(format!(
                        "the download of the {what} from {} stalled for {}",
                        self.base,
                        humantime::format_duration(DOWNLOAD_IDLE_TIMEOUT)
                    ))))
                }
            };
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// The HTTP request for `call`, with the bearer token when one is set.
    fn build(&self, call: &Call) -> Result<Request<RequestBody>> {
        let mut builder = Request::builder()
            .method(call.method.clone())
            .uri(format!("{}{API_PREFIX}{}", self.base, call.path))
            .header(ACCEPT, JSON)
            .header(USER_AGENT, concat!("taskfly/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                Error::invalid_input(
                    "the token holds characters that cannot be sent in an HTTP header",
                )
            })?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        let body = match &call.body {
            Some(CallBody::Bytes(bytes, content_type)) => {
                builder = builder.header(CONTENT_TYPE, *content_type);
                full_body(bytes.clone())
            }
            Some(CallBody::File(path, content_type)) => {
                // Opened afresh for every attempt, and streamed: never read into memory.
                let file = std::fs::File::open(path)
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
                let length = file
                    .metadata()
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?
                    .len();
                builder = builder
                    .header(CONTENT_TYPE, *content_type)
                    .header(hyper::header::CONTENT_LENGTH, length);
                let stream = tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(file),
                    64 * 1024,
                );
                BodyExt::boxed(http_body_util::StreamBody::new(
                    futures_util::TryStreamExt::map_ok(stream, hyper::body::Frame::data),
                ))
            }
            None => full_body(Bytes::new()),
        };
        builder.body(body).map_err(|e| {
            Error::invalid_input(format!(
                "cannot build the request {} {}: {e}",
                call.method, call.path
            ))
        })
    }

    /// Reads a whole answer body, refusing one larger than [`MAX_ANSWER_BYTES`].
    async fn read_answer(&self, body: Incoming) -> Result<Bytes, Failure> {
        match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Failure::permanent(Error::transport(format!(
                    "the daemon at {} sent an answer larger than {} MiB",
                    self.base,
                    MAX_ANSWER_BYTES / (1024 * 1024)
                ))))
            }
            Err(e) => Err(self.connection_failure(e.as_ref())),
        }
    }

    /// A failure of the connection itself (refused, reset, closed early, TLS refused).
    fn connection_failure(&self, error: &(dyn StdError + 'static)) -> Failure {
        #[cfg(feature = "tls")]
        if let Some(tls) = super::tls::rustls_error(error) {
            // Neither a refused certificate nor a failed handshake goes away by retrying.
            let error = if super::tls::is_certificate_problem(tls) {
                Error::certificate(
                    format!(
                        "cannot verify the TLS certificate of the daemon at {}",
                        self.base
                    ),
                    super::tls::describe_certificate_problem(tls),
                )
            } else {
                Error::transport(format!(
                    "the TLS handshake with the daemon at {} failed: {tls}",
                    self.base
                ))
            };
            return Failure::permanent(error);
        }
        Failure {
            error: Error::transport(format!(
                "cannot reach the daemon at {}: {}",
                self.base,
                crate::error::Report::new(error)
            )),
            transient: is_transient(error),
        }
    }

    /// No complete answer within `limit`.
    fn timed_out(&self, call: &Call, limit: Duration) -> Failure {
        Failure::transient(Error::transport(format!(
            "the daemon at {} did not answer {} {}{} within {}",
            self.base,
            call.method,
            API_PREFIX,
            call.path,
            humantime::format_duration(limit)
        )))
    }
}

/// What a call sends, with its content type.
enum CallBody {
    Bytes(Bytes, &'static str),
    File(std::path::PathBuf, &'static str),
}

/// A downloaded worker bundle ([`Client::download_assets_or_keep`]).
#[derive(Debug)]
pub(crate) enum Downloaded {
    /// Small enough to be kept in memory: no file was written.
    InMemory(Bytes),
    /// Written to the file named to the download: this many bytes.
    File(u64),
}

impl Downloaded {
    /// How many bytes were downloaded.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Downloaded::InMemory(data) => data.len() as u64,
            Downloaded::File(written) => *written,
        }
    }
}

/// A body of bytes in memory.
fn full_body(bytes: Bytes) -> RequestBody {
    BodyExt::boxed(Full::new(bytes).map_err(|never| match never {}))
}

/// One API call, rebuilt into a fresh request for every attempt.
struct Call {
    method: Method,
    /// The path after `/api/v1`, with its query.
    path: String,
    body: Option<CallBody>,
    /// A time limit other than the client's.
    timeout: Option<Duration>,
}

impl Call {
    fn new(method: Method, path: String) -> Call {
        Call {
            method,
            path,
            body: None,
            timeout: None,
        }
    }

    fn body(mut self, bytes: Bytes, content_type: &'static str) -> Call {
        self.body = Some(CallBody::Bytes(bytes, content_type));
        self
    }

    /// The body is the file at `path`, streamed.
    fn file_body(mut self, path: &Path, content_type: &'static str) -> Call {
        self.body = Some(CallBody::File(path.to_path_buf(), content_type));
        self
    }

    fn json<T: Serialize>(self, value: &T) -> Result<Call> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::invalid_input(format!("cannot encode the body of {}: {e}", self.path))
        })?;
        Ok(self.body(Bytes::from(bytes), JSON))
    }

    fn timeout(mut self, limit: Duration) -> Call {
        self.timeout = Some(limit);
        self
    }
}

/// The TCP connector: connection time limit, no Nagle delay.
fn tcp_connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    // The TLS connector above it decides per scheme; the TCP one must let https through.
    #[cfg(feature = "tls")]
    connector.enforce_http(false);
    connector
}

/// The connection pool over `connector`.
fn pool(connector: Connector) -> hyper_util::client::legacy::Client<Connector, RequestBody> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Checks and normalises the daemon's base URL: `http://host[:port][/prefix]`, or `https://…`
/// with the `tls` feature.
fn parse_base_url(base_url: &str) -> Result<String> {
    let trimmed = base_url.trim();
    let invalid =
        |why: &str| Error::invalid_input(format!("invalid daemon URL {trimmed:?}: {why}"));
    let uri: Uri = trimmed.parse().map_err(|e| invalid(&format!("{e}")))?;
    let Some(authority) = uri.authority() else {
        return Err(invalid("expected http://host:port"));
    };
    if authority.as_str().contains('@') {
        // The URL holds credentials: do not repeat it.
        return Err(Error::invalid_input(
            "invalid daemon URL: credentials in the URL are not supported, use a token",
        ));
    }
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        #[cfg(feature = "tls")]
        Some("https") => "https",
        #[cfg(not(feature = "tls"))]
        Some("https") => {
            return Err(invalid(
                "https:// needs TLS support, and this build of taskfly was built without TLS \
                 support (the `tls` feature); use http://",
            ))
        }
        Some(other) => {
            return Err(invalid(&format!(
                "scheme {other} is not supported, use http:// or https://"
            )))
        }
        None => return Err(invalid("expected http://host:port")),
    };
    if uri.query().is_some() {
        return Err(invalid("a query is not allowed"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("{scheme}://{authority}{prefix}"))
}

/// Decodes a 2xx JSON answer.
fn decode<T: DeserializeOwned>(call: &Call, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::transport(format!(
            "unexpected answer from the daemon to {} {API_PREFIX}{}: {e}",
            call.method, call.path
        ))
    })
}

/// The `error` text of an answer's JSON body, or the status when the body has none.
fn error_text(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<wire::ErrorBody>(body) {
        Ok(answer) => answer.error,
        Err(_) => format!("the daemon answered {status}"),
    }
}

/// The crate error for a non-2xx answer, with the server's `error` text as its message.
fn status_failure(status: StatusCode, body: &[u8]) -> Failure {
    let (message, details) = match serde_json::from_slice::<wire::ErrorBody>(body) {
        Ok(answer) => (answer.error, answer.details),
        Err(_) => (format!("the daemon answered {status}"), Vec::new()),
    };
    let error = match status.as_u16() {
        400 if !details.is_empty() => Error::invalid_config(message, details),
        400 => Error::invalid_input(message),
        401 => Error::unauthorized(message),
        404 => Error::not_found(message),
        409 => Error::conflict(message),
        413 => Error::too_large(message),
        415 => Error::unsupported_media(message),
        429 => Error::rate_limited(message),
        // Gateways in front of a daemon that is away: as good as unreachable.
        502..=504 => Error::transport(message),
        _ => Error::remote(message),
    };
    let transient = matches!(status.as_u16(), 429 | 502 | 503 | 504);
    Failure { error, transient }
}

/// Percent-encodes `value` for a path segment or a query value: everything but unreserved
/// characters (RFC 3986) is escaped.
fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}
