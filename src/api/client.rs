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
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::api::wire;
use crate::backoff::Backoff;
use crate::error::{Error, Result};

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
/// jittered to between half and one and a half times it ([`Backoff`]).
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
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    timeout: Duration,
    retry_budget: Duration,
}

/// The answer to [`Client::register_for_work`].
///
/// An ordinary node's single-use provision token is always answered with a work order. A
/// pooled instance's token (an instance kept alive between nodes) is used again after every
/// node: the daemon then answers with the next work order, with "no work yet" after holding
/// the request for a while, or with "retired" once the pool no longer wants the instance.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Registration {
    /// 200: a node to serve. `pooled` in it says whether to register again once it has ended.
    Assigned(wire::RegisterResponse),
    /// 204 No Content: no work for this instance yet; register again (the daemon already made
    /// the request wait, so at once).
    NoWork,
    /// 410 Gone: the pool retired this instance, which is being terminated; stop.
    Retired {
        /// The daemon's `error` text, for the log.
        reason: String,
    },
}

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
        })
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
        self.json_once(&Call::new(Method::GET, "/deployments".to_string()))
            .await
    }

    /// `GET /deployments/{id}`: one deployment and all its nodes.
    pub async fn deployment(&self, id: &str) -> Result<wire::DeploymentView> {
        let path = format!("/deployments/{}", encode_component(id));
        self.json_once(&Call::new(Method::GET, path)).await
    }

    /// `DELETE /deployments/{id}`: terminates the deployment; returns once the daemon has
    /// accepted the request (202), not once every instance is gone.
    pub async fn terminate(&self, id: &str) -> Result<()> {
        let path = format!("/deployments/{}", encode_component(id));
        self.send_once(&Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    /// `POST /deployments/{id}/cleanup`: deletes a final deployment's files (409 while it runs).
    pub async fn cleanup(&self, id: &str) -> Result<()> {
        let path = format!("/deployments/{}/cleanup", encode_component(id));
        self.send_once(&Call::new(Method::POST, path))
            .await
            .map(drop)
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
        self.json_once(&Call::new(Method::GET, path)).await
    }

    /// `GET /stats`: counts of deployments and nodes.
    pub async fn stats(&self) -> Result<wire::Stats> {
        self.json_once(&Call::new(Method::GET, "/stats".to_string()))
            .await
    }

    /// `GET /health`: succeeds when the daemon answers `{"status": "ok"}`.
    pub async fn health(&self) -> Result<()> {
        let call = Call::new(Method::GET, "/health".to_string());
        let answer: wire::Ok = self.json_once(&call).await?;
        if answer.status == "ok" {
            Ok(())
        } else {
            Err(Error::transport(format!(
                "the daemon at {} reports status {:?}",
                self.base, answer.status
            )))
        }
    }

    // ----- node side -----

    /// `POST /nodes/register`: trades the node's provision token for its work order and node
    /// token. Retries transient failures.
    ///
    /// For a token that may get an answer other than a work order (a pooled instance's token),
    /// use [`Client::register_for_work`]: here "no work yet" (204) and "retired" (410) are
    /// [`Error::is_transport`] errors saying so.
    pub async fn register(&self, provision_token: &str) -> Result<wire::RegisterResponse> {
        match self.register_for_work(provision_token).await? {
            Registration::Assigned(registration) => Ok(registration),
            Registration::NoWork => Err(Error::transport(format!(
                "the daemon at {} has no work for this token yet (204 No Content): it is a \
                 pooled instance's token, which waits for work with `register_for_work`",
                self.base
            ))),
            Registration::Retired { reason } => Err(Error::transport(format!(
                "the daemon at {} retired the pooled instance of this token (410 Gone): {reason}",
                self.base
            ))),
        }
    }

    /// `POST /nodes/register`, as the agent of a pooled instance calls it again and again (with
    /// the `next_token` of its last work order): a work order, no work yet, or the instance
    /// retired.
    ///
    /// The daemon may hold the request for about 20 s before it answers "no work yet", so
    /// this call is allowed at least 60 s whatever [`Client::timeout`] says. Retries transient
    /// failures (connection problems, 429, 502, 503, 504, time-outs) like [`Client::register`].
    ///
    /// Errors: any other answer, with the kind of its status (401 is
    /// [`Error::is_unauthorized`]: the token is unknown, or the daemon forgot the instance).
    ///
    /// ```no_run
    /// # async fn example(token: &str) -> taskfly::Result<()> {
    /// use taskfly::{Client, Registration};
    /// let client = Client::new("http://127.0.0.1:8080", None)?;
    /// loop {
    ///     match client.register_for_work(token).await? {
    ///         Registration::Assigned(work) => println!("serving {}", work.node_id),
    ///         Registration::NoWork => continue,
    ///         Registration::Retired { reason } => {
    ///             println!("retired: {reason}");
    ///             return Ok(());
    ///         }
    ///         _ => return Ok(()),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn register_for_work(&self, provision_token: &str) -> Result<Registration> {
        let call = self.register_call(provision_token)?;
        self.retrying("register", || async {
            let (status, body) = self.exchange(&call).await?;
            match status {
                StatusCode::NO_CONTENT => Ok(Registration::NoWork),
                StatusCode::GONE => Ok(Registration::Retired {
                    reason: error_text(status, &body),
                }),
                status if status.is_success() => decode(&call, &body)
                    .map(Registration::Assigned)
                    .map_err(Failure::permanent),
                status => Err(status_failure(status, &body)),
            }
        })
        .await
    }

    /// The registration request, with a time limit longer than the daemon's hold.
    fn register_call(&self, provision_token: &str) -> Result<Call> {
        let request = wire::RegisterRequest {
            provision_token: provision_token.to_string(),
        };
        Ok(Call::new(Method::POST, "/nodes/register".to_string())
            .json(&request)?
            .timeout(self.timeout.max(REGISTER_TIMEOUT)))
    }

    /// `GET /nodes/assets`: streams the worker bundle into `dest_file` (created or truncated,
    /// mode 0600) chunk by chunk, never holding the whole body in memory. Returns the number of
    /// bytes written. Retries transient failures, starting the file over each time.
    pub async fn download_assets(&self, dest_file: &Path) -> Result<u64> {
        let call = Call::new(Method::GET, "/nodes/assets".to_string());
        self.retrying("download_assets", || {
            self.download_attempt(&call, dest_file)
        })
        .await
    }

    /// `POST /nodes/heartbeat`: tells the daemon the node is alive; the answer says whether the
    /// daemon wants the script stopped. Retries transient failures.
    pub async fn heartbeat(&self) -> Result<wire::HeartbeatResponse> {
        let call = Call::new(Method::POST, "/nodes/heartbeat".to_string())
            .json(&wire::HeartbeatRequest::default())?;
        self.json_retrying("heartbeat", &call).await
    }

    /// `POST /nodes/status`: reports a node state (`downloading_assets`, `running_script`,
    /// `completed`, `failed`). Retries transient failures.
    pub async fn report_status(&self, status: &wire::StatusRequest) -> Result<()> {
        let call = Call::new(Method::POST, "/nodes/status".to_string()).json(status)?;
        self.retrying("report_status", || self.attempt(&call))
            .await
            .map(drop)
    }

    /// `POST /nodes/logs`: sends a batch of output lines, in the order they were written.
    /// Retries transient failures.
    pub async fn send_logs(&self, logs: &wire::LogsRequest) -> Result<()> {
        let call = Call::new(Method::POST, "/nodes/logs".to_string()).json(logs)?;
        self.retrying("send_logs", || self.attempt(&call))
            .await
            .map(drop)
    }

    // ----- plumbing -----

    /// Sends `call` once and decodes its JSON answer.
    async fn json_once<T: DeserializeOwned>(&self, call: &Call) -> Result<T> {
        let body = self.send_once(call).await?;
        decode(call, &body)
    }

    /// Sends `call` once and returns its 2xx body.
    async fn send_once(&self, call: &Call) -> Result<Bytes> {
        self.attempt(call).await.map_err(|failure| failure.error)
    }

    /// Sends `call`, retrying transient failures, and decodes its JSON answer.
    async fn json_retrying<T: DeserializeOwned>(
        &self,
        what: &'static str,
        call: &Call,
    ) -> Result<T> {
        self.retrying(what, || async {
            let body = self.attempt(call).await?;
            decode(call, &body).map_err(Failure::permanent)
        })
        .await
    }

    /// Runs `operation` until it succeeds, fails permanently, or the retry budget is spent,
    /// pausing with exponential backoff and jitter between attempts.
    async fn retrying<T, F, Fut>(&self, what: &'static str, mut operation: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempt = 1u32;
        loop {
            match operation().await {
                Ok(value) => return Ok(value),
                Err(failure) => {
                    let pause = backoff.next_pause();
                    if !failure.transient || started.elapsed() + pause > self.retry_budget {
                        return Err(failure.error);
                    }
                    tracing::debug!(
                        call = what,
                        attempt,
                        error = %failure.error,
                        pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                        "daemon call failed; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
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
    /// into `dest_file`, each chunk within [`DOWNLOAD_IDLE_TIMEOUT`] of the previous one.
    async fn download_attempt(&self, call: &Call, dest_file: &Path) -> Result<u64, Failure> {
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
        let mut body = response.into_body();
        let mut written = 0u64;
        loop {
            let frame = match tokio::time::timeout(DOWNLOAD_IDLE_TIMEOUT, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(self.connection_failure(&e)),
                Err(_) => {
                    return Err(Failure::transient(Error::transport(format!(
                        "the download of the assets from {} stalled for {}",
                        self.base,
                        humantime::format_duration(DOWNLOAD_IDLE_TIMEOUT)
                    ))))
                }
            };
            if let Ok(data) = frame.into_data() {
                file.write_all(&data).await.map_err(write_error)?;
                written += data.len() as u64;
            }
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        Ok(written)
    }

    /// The HTTP request for `call`, with the bearer token when one is set.
    fn build(&self, call: &Call) -> Result<Request<Full<Bytes>>> {
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
            Some((bytes, content_type)) => {
                builder = builder.header(CONTENT_TYPE, *content_type);
                Full::new(bytes.clone())
            }
            None => Full::new(Bytes::new()),
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
                describe_chain(error)
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

/// One API call, rebuilt into a fresh request for every attempt.
struct Call {
    method: Method,
    /// The path after `/api/v1`, with its query.
    path: String,
    body: Option<(Bytes, &'static str)>,
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
        self.body = Some((bytes, content_type));
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

/// A failed attempt, and whether trying again may help.
struct Failure {
    error: Error,
    transient: bool,
}

impl Failure {
    fn permanent(error: Error) -> Failure {
        Failure {
            error,
            transient: false,
        }
    }

    fn transient(error: Error) -> Failure {
        Failure {
            error,
            transient: true,
        }
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
fn pool(connector: Connector) -> hyper_util::client::legacy::Client<Connector, Full<Bytes>> {
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

/// Whether a connection-level error may go away by itself (the daemon restarting, a dropped
/// connection), as opposed to a request the daemon will never accept.
fn is_transient(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if e.is_connect() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_incomplete_message() || e.is_canceled() || e.is_closed() || e.is_timeout() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                e.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | UnexpectedEof
                    | TimedOut
                    | NotConnected
            ) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// `outer: inner: innermost`, skipping a layer that repeats the one below it.
fn describe_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use hyper::http::request::Parts;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    type Handler = dyn Fn(Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync;

    /// A tiny HTTP server on 127.0.0.1:0 answering every request with `handler`.
    struct TestServer {
        url: String,
        task: JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(
        handler: impl Fn(Parts, Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let handler: Arc<Handler> = Arc::new(handler);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request: hyper::Request<Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await?.to_bytes();
                            Ok::<_, hyper::Error>(handler(parts, body))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { url, task }
    }

    fn json_response(status: u16, body: &str) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, JSON)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("response")
    }

    #[test]
    fn base_urls_are_checked_and_normalised() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:8080/").expect("valid"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            parse_base_url(" http://example.test/prefix/ ").expect("valid"),
            "http://example.test/prefix"
        );
        #[cfg(feature = "tls")]
        assert_eq!(
            parse_base_url("https://example.test:8443/").expect("valid"),
            "https://example.test:8443"
        );
        #[cfg(not(feature = "tls"))]
        {
            let error = parse_base_url("https://example.test").expect_err("no TLS");
            assert!(error.is_invalid_input(), "{error}");
            assert!(error.message().contains("without TLS support"), "{error}");
        }
        for bad in ["127.0.0.1:8080", "http://", "not a url", "http://h/?a=b"] {
            let error = parse_base_url(bad).expect_err(bad);
            assert!(error.is_invalid_input(), "{bad}: {error}");
        }
        let error = parse_base_url("ftp://example.test").expect_err("ftp");
        assert!(error.message().contains("ftp://example.test"), "{error}");
        let error = parse_base_url("http://user:secret@example.test").expect_err("credentials");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn components_are_percent_encoded() {
        assert_eq!(encode_component("dep-1_a.b~c"), "dep-1_a.b~c");
        assert_eq!(encode_component("a b/c?d&e"), "a%20b%2Fc%3Fd%26e");
        assert_eq!(encode_component("é"), "%C3%A9");
    }

    #[test]
    fn error_answers_map_to_error_kinds() {
        let body = br#"{"error": "no deployment abc", "details": []}"#;
        let failure = status_failure(StatusCode::NOT_FOUND, body);
        assert!(failure.error.is_not_found());
        assert_eq!(failure.error.message(), "no deployment abc");
        assert!(!failure.transient);

        let body =
            br#"{"error": "invalid taskfly.yml", "details": ["nodes.count: must be at least 1"]}"#;
        let failure = status_failure(StatusCode::BAD_REQUEST, body);
        assert!(failure.error.is_invalid_config());
        assert_eq!(failure.error.details(), ["nodes.count: must be at least 1"]);

        let body = br#"{"error": "bad after"}"#;
        assert!(status_failure(StatusCode::BAD_REQUEST, body)
            .error
            .is_invalid_input());
        assert!(status_failure(StatusCode::UNAUTHORIZED, body)
            .error
            .is_unauthorized());
        assert!(status_failure(StatusCode::CONFLICT, body)
            .error
            .is_conflict());
        assert!(status_failure(StatusCode::PAYLOAD_TOO_LARGE, body)
            .error
            .is_too_large());
        assert!(status_failure(StatusCode::UNSUPPORTED_MEDIA_TYPE, body)
            .error
            .is_unsupported_media());
        let failure = status_failure(StatusCode::TOO_MANY_REQUESTS, body);
        assert!(failure.error.is_rate_limited() && failure.transient);
        let failure = status_failure(StatusCode::SERVICE_UNAVAILABLE, b"<html>busy</html>");
        assert!(failure.error.is_transport() && failure.transient);
        assert!(failure.error.message().contains("503"), "{}", failure.error);
        assert!(!status_failure(StatusCode::INTERNAL_SERVER_ERROR, body).transient);
    }

    #[tokio::test]
    async fn requests_carry_the_token_and_decode_answers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let server = serve(move |parts, body| {
            let auth = parts
                .headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let content_type = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            record.lock().expect("lock").push((
                parts.method.to_string(),
                parts.uri.to_string(),
                auth,
                content_type,
                body,
            ));
            match parts.uri.path() {
                "/api/v1/deployments" => json_response(
                    202,
                    r#"{"deployment_id":"d1","status":"pending","nodes":2,"status_url":"/api/v1/deployments/d1"}"#,
                ),
                "/api/v1/deployments/d%201/logs" => json_response(200, r#"{"logs":[],"next":7}"#),
                "/api/v1/health" => json_response(200, r#"{"status":"ok"}"#),
                _ => json_response(404, r#"{"error":"nothing here"}"#),
            }
        })
        .await;

        let client =
            Client::new(&format!("{}/", server.url), Some("api-secret".into())).expect("client");
        let created = client
            .create_deployment(Bytes::from_static(b"\x1f\x8bbundle"))
            .await
            .expect("created");
        assert_eq!(created.deployment_id, "d1");
        let page = client
            .logs("d 1", Some("d1-0"), 5, 100)
            .await
            .expect("logs");
        assert_eq!(page.next, 7);
        client.health().await.expect("healthy");
        let error = client.deployment("zzz").await.expect_err("unknown");
        assert!(error.is_not_found());
        assert_eq!(error.message(), "nothing here");

        let seen = seen.lock().expect("lock");
        let (method, uri, auth, content_type, body) = &seen[0];
        assert_eq!(method, "POST");
        assert_eq!(uri, "/api/v1/deployments");
        assert_eq!(auth, "Bearer api-secret");
        assert_eq!(content_type, GZIP);
        assert_eq!(&body[..], b"\x1f\x8bbundle");
        assert_eq!(
            seen[1].1,
            "/api/v1/deployments/d%201/logs?after=5&limit=100&node=d1-0"
        );
        assert_eq!(seen[3].1, "/api/v1/deployments/zzz");
    }

    #[tokio::test]
    async fn node_calls_retry_transient_failures() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = serve(move |parts, body| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            assert_eq!(parts.uri.path(), "/api/v1/nodes/status");
            let status: wire::StatusRequest = serde_json::from_slice(&body).expect("status body");
            assert_eq!(status.status, "running_script");
            if n < 2 {
                json_response(503, r#"{"error":"restarting"}"#)
            } else {
                json_response(200, r#"{"status":"ok"}"#)
            }
        })
        .await;
        let client = Client::new(&server.url, Some("node-token".into())).expect("client");
        client
            .report_status(&wire::StatusRequest {
                status: "running_script".into(),
                message: None,
                exit_code: None,
            })
            .await
            .expect("retried until accepted");
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        // Client-side calls are not retried.
        let error = client.stats().await.expect_err("503 once");
        assert!(error.is_transport());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_unreachable_daemon_is_a_transport_error_without_the_token() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        drop(listener);
        let client = Client::new(&url, Some("very-secret-token".into()))
            .expect("client")
            .retry_budget(Duration::from_millis(600));
        let error = client.heartbeat().await.expect_err("nobody listens");
        assert!(error.is_transport());
        assert!(
            error
                .message()
                .starts_with(&format!("cannot reach the daemon at {url}: ")),
            "{error}"
        );
        assert!(!format!("{error} {error:?} {client:?}").contains("very-secret-token"));

        let error = client.stats().await.expect_err("nobody listens");
        assert!(error.is_transport());
    }

    #[tokio::test]
    async fn assets_are_streamed_to_a_file() {
        let server = serve(|parts, _| {
            assert_eq!(parts.uri.path(), "/api/v1/nodes/assets");
            let auth = parts
                .headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if auth != Some("Bearer node-token") {
                return json_response(401, r#"{"error":"bad token"}"#);
            }
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            Response::builder()
                .header(CONTENT_TYPE, GZIP)
                .body(Full::new(Bytes::from(data)))
                .expect("response")
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("assets.tar.gz");

        let client = Client::new(&server.url, Some("node-token".into())).expect("client");
        let written = client.download_assets(&dest).await.expect("downloaded");
        assert_eq!(written, 3_000_000);
        let data = std::fs::read(&dest).expect("read");
        assert_eq!(data.len(), 3_000_000);
        assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let error = Client::new(&server.url, Some("wrong".into()))
            .expect("client")
            .download_assets(&dest)
            .await
            .expect_err("unauthorized");
        assert!(error.is_unauthorized());
    }

    #[tokio::test]
    async fn register_sends_the_provision_token_and_decodes_the_work_order() {
        let server = serve(|parts, body| {
            assert_eq!(parts.uri.path(), "/api/v1/nodes/register");
            assert!(parts.headers.get(AUTHORIZATION).is_none());
            let request: wire::RegisterRequest = serde_json::from_slice(&body).expect("body");
            assert_eq!(request.provision_token, "prov");
            let env: BTreeMap<String, String> = [("SHARD".to_string(), "a.csv".to_string())].into();
            let answer = wire::RegisterResponse {
                auth_token: "auth".into(),
                deployment_id: "d1".into(),
                node_id: "d1-0".into(),
                node_index: 0,
                env,
                script: "setup.sh".into(),
                dest_dir: None,
                heartbeat_interval_s: 5,
                timeout_s: None,
                pooled: false,
                next_token: None,
            };
            json_response(200, &serde_json::to_string(&answer).expect("json"))
        })
        .await;
        let client = Client::new(&server.url, None).expect("client");
        let registered = client.register("prov").await.expect("registered");
        assert_eq!(registered.node_id, "d1-0");
        assert_eq!(registered.env["SHARD"], "a.csv");
    }

    fn work_order(pooled: bool) -> wire::RegisterResponse {
        wire::RegisterResponse {
            auth_token: "auth".into(),
            deployment_id: "d1".into(),
            node_id: "d1-3".into(),
            node_index: 3,
            env: BTreeMap::new(),
            script: "setup.sh".into(),
            dest_dir: None,
            heartbeat_interval_s: 5,
            timeout_s: Some(60),
            pooled,
            next_token: None,
        }
    }

    #[tokio::test]
    async fn register_for_work_tells_work_no_work_retired_and_unknown_apart() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = serve(move |parts, body| {
            assert_eq!(parts.uri.path(), "/api/v1/nodes/register");
            let request: wire::RegisterRequest = serde_json::from_slice(&body).expect("body");
            assert_eq!(request.provision_token, "instance-token");
            match counter.fetch_add(1, Ordering::SeqCst) {
                0 => json_response(
                    200,
                    &serde_json::to_string(&work_order(true)).expect("json"),
                ),
                1 => Response::builder()
                    .status(204)
                    .body(Full::new(Bytes::new()))
                    .expect("response"),
                2 => json_response(410, r#"{"error":"the pool retired this instance"}"#),
                _ => json_response(401, r#"{"error":"unknown token"}"#),
            }
        })
        .await;
        let client = Client::new(&server.url, None).expect("client");

        let answer = client.register_for_work("instance-token").await;
        assert_eq!(
            answer.expect("assigned"),
            Registration::Assigned(work_order(true))
        );
        let answer = client.register_for_work("instance-token").await;
        assert_eq!(answer.expect("no work"), Registration::NoWork);
        let answer = client.register_for_work("instance-token").await;
        assert_eq!(
            answer.expect("retired"),
            Registration::Retired {
                reason: "the pool retired this instance".into()
            }
        );
        let error = client
            .register_for_work("instance-token")
            .await
            .expect_err("unknown token");
        assert!(error.is_unauthorized(), "{error}");
        assert_eq!(error.message(), "unknown token");
        // A 401 is not retried.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn register_refuses_no_work_and_retired_naming_the_daemon() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = serve(move |_, _| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                Response::builder()
                    .status(204)
                    .body(Full::new(Bytes::new()))
                    .expect("response")
            } else {
                json_response(410, r#"{"error":"idle for too long"}"#)
            }
        })
        .await;
        let client = Client::new(&server.url, None).expect("client");
        let error = client.register("instance-token").await.expect_err("204");
        assert!(error.is_transport(), "{error}");
        assert!(error.message().contains(&server.url), "{error}");
        assert!(error.message().contains("204 No Content"), "{error}");
        let error = client.register("instance-token").await.expect_err("410");
        assert!(error.is_transport(), "{error}");
        assert!(error.message().contains(&server.url), "{error}");
        assert!(
            error.message().ends_with("(410 Gone): idle for too long"),
            "{error}"
        );
        assert!(!error.to_string().contains("instance-token"), "{error}");
    }

    #[test]
    fn registration_outlasts_the_daemons_hold() {
        let client = Client::new("http://127.0.0.1:1", None)
            .expect("client")
            .timeout(Duration::from_secs(1));
        let call = client.register_call("token").expect("call");
        assert!(call
            .timeout
            .is_some_and(|limit| limit >= Duration::from_secs(60)));
        // A longer client time limit is kept.
        let call = client
            .timeout(Duration::from_secs(90))
            .register_call("token")
            .expect("call");
        assert_eq!(call.timeout, Some(Duration::from_secs(90)));
    }
}
