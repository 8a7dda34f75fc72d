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
    pub(crate) max_json_body: u64,
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_connections: usize,
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
            .field("max_json_body", &self.max_json_body)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_connections", &self.max_connections)
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
            max_json_body: 4 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
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

    /// Most connections served at once (default 4096); more wait to be accepted.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> ServerConfig {
        self.max_connections = connections.max(1);
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
