//! The HTTP API (SPEC §4) on raw hyper 1.x. Only `api` knows hyper; the engine
//! ([`crate::Orchestrator`]) knows nothing of HTTP, URLs or JSON.
//!
//! - this file: [`Server`] (the accept loop and the order things stop in) and its handle;
//! - [`config`]: [`ServerConfig`], the server's own settings (API token, limits, TLS);
//! - `routes`: the client API and the health and metrics endpoints;
//! - `node`: the node protocol, wire bodies turned into model types and back;
//! - `views`: model types to their wire form; `body`: reading and writing bodies;
//! - `errors`: one mapping of [`crate::Error`] kinds to status codes.

mod body;
pub(crate) mod config;
mod errors;
mod events;
mod metrics;
mod node;
mod outputs;
mod routes;
#[cfg(test)]
mod tests;
mod ui;
mod views;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};

pub use config::ServerConfig;

use super::limits::Closing;
use crate::auth;
use crate::error::{Error, Result};
use crate::orchestrator::Orchestrator;

/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every request handler reads: the engine, the server's settings, the registration
/// failure counts and the open connections.
pub(crate) struct Shared {
    pub(crate) engine: Orchestrator,
    pub(crate) config: ServerConfig,
    pub(crate) api_token_hash: Option<[u8; 32]>,
    /// SHA-256 of [`ServerConfig::metrics_token`], when metrics need one.
    pub(crate) metrics_token_hash: Option<[u8; 32]>,
    pub(crate) registrations: super::limits::FailureLimiter,
    pub(crate) connections: super::limits::ConnectionTable,
    /// The open event streams (`GET /api/v1/events`), ended when the server stops.
    pub(crate) event_streams: events::EventStreams,
    /// Each endpoint's request metrics, looked up once.
    request_metrics: metrics::RequestMetrics,
}

/// Serves an engine's HTTP API — the client endpoints and the node protocol — and stops it in
/// the right order: stop accepting, let in-flight requests finish, then shut the engine down.
///
/// ```no_run
/// # async fn demo() -> taskfly::Result<()> {
/// use taskfly::{Config, Orchestrator, Server, ServerConfig};
/// let engine = Orchestrator::new(Config::new("/tmp/taskfly"))?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
/// let server = Server::new(engine, ServerConfig::default().api_token("secret"))?;
/// server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub struct Server {
    shared: Arc<Shared>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<super::tls::ServerTls>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `engine`. With `ServerConfig::tls` (feature `tls`), the certificate and
    /// key are read here, so a missing or malformed file fails now; and when the engine's
    /// advertise URL is `https://`, it checks that nodes will accept the certificate for it
    /// (issued for its host, not expired, not a CA, chain complete), failing with what to fix
    /// ([`crate::Error::is_invalid_input`]) if not.
    pub fn new(engine: Orchestrator, config: ServerConfig) -> Result<Server> {
        #[cfg(feature = "tls")]
        let tls = match &config.tls {
            Some((cert_file, key_file)) => {
                Some(Arc::new(super::tls::ServerTls::load(cert_file, key_file)?))
            }
            None => None,
        };
        #[cfg(feature = "tls")]
        if let (Some(tls), Some(url)) = (&tls, engine.configured_advertise_url()) {
            if url.starts_with("https://") {
                tls.check_for_nodes(&url)?;
            }
        }
        engine.set_webhook_transport(Arc::new(super::client::webhook::WebhookClient::new()));
        let shared = Shared {
            api_token_hash: config.api_token.as_deref().map(auth::hash_token),
            metrics_token_hash: config.metrics_token.as_deref().map(auth::hash_token),
            registrations: super::limits::FailureLimiter::new(
                config.registration_failures_per_minute,
                Duration::from_secs(60),
            ),
            connections: super::limits::ConnectionTable::new(
                config.max_connections,
                config.max_unauthenticated_per_address,
            ),
            event_streams: events::EventStreams::new(),
            request_metrics: metrics::RequestMetrics::new(),
            engine,
            config,
        };
        Ok(Server {
            shared: Arc::new(shared),
            #[cfg(feature = "tls")]
            tls,
        })
    }

    /// Serve on `listener` until `shutdown` completes; then stop accepting, let in-flight
    /// requests finish (at most 10 s), and shut the engine down
    /// ([`Orchestrator::shutdown`]). Returns once all of that is done.
    ///
    /// If the engine has no advertise URL, nodes are told to call `http://<listener
    /// address>` (`https://` with TLS). If serving cannot start (the TLS check of
    /// [`Server::new`] fails for that URL), the engine is shut down and the error returned.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let started = local_address(&listener).and_then(|address| self.start_at(address));
        if started.is_ok() {
            self.accept_until(listener, shutdown).await;
        }
        self.shared.engine.shutdown().await;
        started.map(drop)
    }

    /// Serve on `listener` in a task of its own; the returned handle tells where, and
    /// [`ServerHandle::stop`] stops the server and the engine in the order [`Server::run`]
    /// does. Dropping the handle stops them too, without waiting. On an error (see
    /// [`Server::run`]) nothing was started and the engine keeps running.
    pub fn spawn(self, listener: tokio::net::TcpListener) -> Result<ServerHandle> {
        let address = local_address(&listener)?;
        let advertise_url = self.start_at(address)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            self.accept_until(listener, async {
                let _ = stopped.await;
            })
            .await;
            self.shared.engine.shutdown().await;
        });
        Ok(ServerHandle {
            local_addr: address,
            advertise_url,
            stop: Some(stop),
            task,
        })
    }

    /// Tell the engine where nodes call back (and which certificates they trust), and check
    /// that nodes will accept the certificate for that URL. Returns the advertise URL.
    fn start_at(&self, address: SocketAddr) -> Result<String> {
        let scheme = if self.serves_tls() { "https" } else { "http" };
        #[cfg(feature = "tls")]
        let ca_pem = self.tls.as_ref().map(|tls| tls.certificates_pem());
        #[cfg(not(feature = "tls"))]
        let ca_pem = None;
        let url = self
            .shared
            .engine
            .served_at(format!("{scheme}://{address}"), ca_pem);
        // Nodes verify the daemon as the check does: better to refuse to start than to have
        // every node fail to register.
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            if url.starts_with("https://") {
                tls.check_for_nodes(&url)?;
            }
        }
        Ok(url)
    }

    fn serves_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Accept and serve connections until `shutdown` completes, then let in-flight requests
    /// finish. With TLS, every connection is a TLS one: its handshake runs in the
    /// connection's own task, within the header read time limit. Connections are taken and
    /// closed to make room as [`super::limits::ConnectionTable`] says.
    async fn accept_until(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let shared = &self.shared;
        // The connections' tasks, waited for at shutdown. Each is told to stop through its
        // entry in the connection table, which it polls anyway: nothing more runs per request.
        let tasks = tokio_util::task::TaskTracker::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(shared.config.header_read_timeout);
        #[cfg(feature = "tls")]
        let tls = self
            .tls
            .as_ref()
            .map(|tls| (tls.acceptor().clone(), shared.config.header_read_timeout));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = shared.connections.room() => {}
                () = &mut shutdown => break,
            }
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // No Nagle delay: an answer written in parts (headers, then a streamed body) must
            // not wait for the client's delayed ACK (40 ms per asset download on keep-alive).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, %peer, "cannot set TCP_NODELAY");
            }
            if let Some(hook) = &shared.config.on_accept {
                if let Err(e) = hook(&stream) {
                    tracing::debug!(error = %e, %peer, "connection refused by the accept hook");
                    continue;
                }
            }
            let connection = shared.connections.open(peer.ip());
            let service = {
                let (shared, connection) = (shared.clone(), connection.clone());
                hyper::service::service_fn(move |request| {
                    let (shared, connection) = (shared.clone(), connection.clone());
                    async move {
                        let response = routes::handle(&shared, request, peer, &connection).await;
                        Ok::<_, Infallible>(response)
                    }
                })
            };
            let shared = shared.clone();
            #[cfg(feature = "tls")]
            if let Some((acceptor, handshake_limit)) = &tls {
                // A slow or silent client must not hold up the accept loop: the handshake runs
                // in the connection's task, watched for shutdown like the connection itself.
                let (acceptor, handshake_limit) = (acceptor.clone(), *handshake_limit);
                let http = http.clone();
                tasks.spawn(async move {
                    let handshake = tokio::time::timeout(handshake_limit, acceptor.accept(stream));
                    let handshake = tokio::select! {
                        handshake = handshake => Some(handshake),
                        closing = connection.closed() => {
                            tracing::debug!(%peer, ?closing, "connection closed during its TLS handshake");
                            None
                        }
                    };
                    match handshake {
                        Some(Ok(Ok(stream))) => {
                            let served = http.serve_connection(TokioIo::new(stream), service);
                            serve(served, &connection, peer).await;
                        }
                        Some(Ok(Err(e))) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed")
                        }
                        Some(Err(_)) => tracing::debug!(%peer, "TLS handshake timed out"),
                        None => {}
                    }
                    shared.connections.close(&connection);
                });
                continue;
            }
            let served = http.serve_connection(TokioIo::new(stream), service);
            tasks.spawn(async move {
                serve(served, &connection, peer).await;
                shared.connections.close(&connection);
            });
        }
        drop(listener);
        // Event streams never end by themselves: end them so in-flight requests can finish.
        shared.event_streams.stop();
        // Idle pooled agents' registrations are held for a while: answer them now.
        for (_, pool) in shared.engine.pools() {
            pool.stop_holding();
        }
        tasks.close();
        shared.connections.drain();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some requests were still running at shutdown");
        }
    }
}

/// Serve one connection until it ends; or until the connection table closes it: at once for
/// a newer connection, after the request in flight (idle: at once) when the server stops.
async fn serve<I, S>(
    served: hyper::server::conn::http1::Connection<I, S>,
    connection: &super::limits::Connection,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(served);
    let result = tokio::select! {
        biased;
        result = served.as_mut() => result,
        closing = connection.closed() => match closing {
            Closing::Displaced => {
                tracing::debug!(%peer, "unauthenticated connection closed for a newer one");
                return;
            }
            Closing::Draining => {
                served.as_mut().graceful_shutdown();
                served.await
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

fn local_address(listener: &tokio::net::TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the listener's address", e))
}

/// A [`Server`] running in a task of its own ([`Server::spawn`]).
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    advertise_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The address the server listens on (with port 0 bound, the port chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL nodes are told to call back on.
    pub fn advertise_url(&self) -> &str {
        &self.advertise_url
    }

    /// Stop accepting, let in-flight requests finish, shut the engine down, and return once
    /// all of that is done.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::io("the server task failed", std::io::Error::other(e)))
    }
}
