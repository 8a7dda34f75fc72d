//! [`ServerConfig`]: how the HTTP API is served (the engine's own knobs are in
//! [`crate::Config`]).

use std::fmt;
#[cfg(feature = "tls")]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Called with every accepted connection before it is served; an error drops the connection.
pub(crate) type AcceptHook =
    Arc<dyn Fn(&tokio::net::TcpStream) -> std::io::Result<()> + Send + Sync>;

/// The HTTP server's settings: who may call the client API, request limits, and TLS. Start
/// from [`ServerConfig::default`] and chain the setters:
///
/// ```
/// use std::time::Duration;
/// let server = taskfly::ServerConfig::default()
///     .api_token("a long random token")
///     .header_read_timeout(Duration::from_secs(5));
/// # let _ = server;
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    pub(crate) api_token: Option<String>,
    pub(crate) metrics_token: Option<String>,
    pub(crate) max_json_body: u64,
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_unauthenticated_per_address: usize,
    pub(crate) registration_failures_per_minute: u32,
    /// The PEM certificate chain and private key files to serve https with.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    pub(crate) on_accept: Option<AcceptHook>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ServerConfig");
        d.field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "***"))
            .field("max_json_body", &self.max_json_body)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("max_connections", &self.max_connections)
            .field(
                "max_unauthenticated_per_address",
                &self.max_unauthenticated_per_address,
            )
            .field(
                "registration_failures_per_minute",
                &self.registration_failures_per_minute,
            );
        // File names only: the key itself is read when the server is made, never kept here.
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls);
        d.finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            api_token: None,
            metrics_token: None,
            max_json_body: 4 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_unauthenticated_per_address: 512,
            registration_failures_per_minute: 20,
            #[cfg(feature = "tls")]
            tls: None,
            on_accept: None,
        }
    }
}

impl ServerConfig {
    /// The bearer token client endpoints require. Without it they refuse every request
    /// (the engine is then driven only through the library API). Kept only as a hash.
    #[must_use]
    pub fn api_token(mut self, token: impl Into<String>) -> ServerConfig {
        self.api_token = Some(token.into());
        self
    }

    /// The bearer token `GET /metrics` requires (SPEC §4.3). Without it (the default) metrics
    /// are open to anyone who reaches the server: they name no deployment, node or secret.
    /// Kept only as a hash. The API token is not accepted in its place, so a scraper's
    /// configuration never holds a token that can deploy or terminate.
    #[must_use]
    pub fn metrics_token(mut self, token: impl Into<String>) -> ServerConfig {
        self.metrics_token = Some(token.into());
        self
    }

    /// Largest accepted JSON request body (default 4 MiB).
    #[must_use]
    pub fn max_json_body(mut self, bytes: u64) -> ServerConfig {
        self.max_json_body = bytes;
        self
    }

    /// A client must send its request headers within this long, or it is dropped (default
    /// 10 s): a slow-headers (slowloris) client cannot hold connections open.
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> ServerConfig {
        self.header_read_timeout = timeout;
        self
    }

    /// A JSON or `text/plain` request body must arrive within this long once its headers
    /// did, or the request fails (400) and the connection is closed (default 30 s): with
    /// [`ServerConfig::header_read_timeout`], this bounds the time to read a whole request. (A
    /// bundle upload, which only API-token holders may send, is bounded by its size alone.)
    #[must_use]
    pub fn body_read_timeout(mut self, timeout: Duration) -> ServerConfig {
        self.body_read_timeout = timeout;
        self
    }

    /// Most connections open at once (default 4096). A connection is unauthenticated until
    /// one of its requests carries a valid API or node token; past this many connections, the
    /// oldest unauthenticated one is closed to make room for a new one. Authenticated
    /// connections are never closed for others: when all of them are, new ones wait to be
    /// accepted.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> ServerConfig {
        self.max_connections = connections.max(1);
        self
    }

    /// Most unauthenticated connections from one client address (default 512); past it,
    /// that address' oldest unauthenticated connection is closed. With
    /// [`ServerConfig::max_connections`], clients without a token cannot keep registered
    /// nodes or API clients from being served.
    #[must_use]
    pub fn max_unauthenticated_connections_per_address(
        mut self,
        connections: usize,
    ) -> ServerConfig {
        self.max_unauthenticated_per_address = connections.max(1);
        self
    }

    /// Failed node registrations allowed per client address and minute (default 20); past
    /// it, registrations from that address get 429 until the minute is over.
    #[must_use]
    pub fn registration_failures_per_minute(mut self, failures: u32) -> ServerConfig {
        self.registration_failures_per_minute = failures.max(1);
        self
    }

    /// Serve the HTTP API over TLS (feature `tls`): `cert_file` holds the PEM certificate chain
    /// (the server's certificate first, then any intermediates) and `key_file` its PEM private
    /// key (PKCS#8, PKCS#1 or SEC1). Both are read by [`crate::Server::new`], which fails
    /// if either is missing or malformed, or the key does not belong to the certificate.
    ///
    /// The server then speaks only https. When the engine's advertise URL is `https://`,
    /// every node is handed the certificates of `cert_file` as the ones to trust
    /// ([`crate::InstanceSpec::ca_pem`]): a self-signed certificate needs nothing more. The
    /// advertise URL's host must be a name (or IP address) the certificate is issued for.
    ///
    /// ```no_run
    /// let server = taskfly::ServerConfig::default()
    ///     .tls("/etc/taskfly/cert.pem", "/etc/taskfly/key.pem");
    /// # let _ = server;
    /// ```
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> ServerConfig {
        self.tls = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Called with every accepted TCP connection before it is served, to set socket options
    /// (`set_nodelay`, keepalive through `socket2::SockRef`, ...); an error drops the
    /// connection.
    ///
    /// ```
    /// let server = taskfly::ServerConfig::default().on_accept(|stream| stream.set_nodelay(true));
    /// # let _ = server;
    /// ```
    #[must_use]
    pub fn on_accept(
        mut self,
        hook: impl Fn(&tokio::net::TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> ServerConfig {
        self.on_accept = Some(Arc::new(hook));
        self
    }
}
