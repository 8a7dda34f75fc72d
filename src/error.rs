//! The crate's one error type.
//!
//! [`Error`] is opaque: callers ask what went wrong with the `is_*()` queries and reach the
//! underlying cause through [`std::error::Error::source`]. No hyper, tar or AWS type appears in
//! its public surface, so those crates can change without breaking callers.

use std::fmt;

/// A boxed error, as returned by user-implemented traits ([`crate::Provider`], [`crate::Store`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as its error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. Private so new kinds can be added freely; callers use
/// the `is_*()` queries instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `taskfly.yml` (or another configuration) is invalid; `details` lists every problem.
    InvalidConfig,
    /// A bundle is malformed or hostile (path traversal, too large, ...).
    InvalidBundle,
    /// Bad input other than configuration or bundles (malformed JSON, bad parameter).
    InvalidInput,
    /// An unknown deployment, node or token.
    NotFound,
    /// An illegal state transition or an operation not allowed in the current state.
    Conflict,
    /// A missing or wrong token.
    Unauthorized,
    /// Too large a request or bundle.
    TooLarge,
    /// The cloud or process provider failed.
    Provider,
    /// The state store failed.
    Store,
    /// Talking to the daemon failed (connection refused, timeout, bad response).
    Transport,
    /// A local I/O operation failed.
    Io,
    /// A request body of the wrong content type.
    UnsupportedMedia,
    /// Too many requests (failed registrations) from one address.
    RateLimited,
    /// The daemon answered, but with an internal failure of its own (HTTP 5xx).
    Remote,
}

/// The error type of every fallible operation in this crate.
pub struct Error {
    kind: Kind,
    message: String,
    details: Vec<String>,
    source: Option<BoxError>,
}

impl Error {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            details: Vec::new(),
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn invalid_config(message: impl Into<String>, details: Vec<String>) -> Self {
        Error::new(Kind::InvalidConfig, message).with_details(details)
    }

    pub(crate) fn invalid_bundle(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidBundle, message)
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidInput, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Error::new(Kind::NotFound, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Error::new(Kind::Conflict, message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Error::new(Kind::Unauthorized, message)
    }

    pub(crate) fn too_large(message: impl Into<String>) -> Self {
        Error::new(Kind::TooLarge, message)
    }

    pub(crate) fn provider(message: impl Into<String>, source: BoxError) -> Self {
        Error::new(Kind::Provider, message).with_source(source)
    }

    pub(crate) fn store(message: impl Into<String>, source: BoxError) -> Self {
        Error::new(Kind::Store, message).with_source(source)
    }

    pub(crate) fn transport(message: impl Into<String>) -> Self {
        Error::new(Kind::Transport, message)
    }

    pub(crate) fn unsupported_media(message: impl Into<String>) -> Self {
        Error::new(Kind::UnsupportedMedia, message)
    }

    pub(crate) fn rate_limited(message: impl Into<String>) -> Self {
        Error::new(Kind::RateLimited, message)
    }

    pub(crate) fn remote(message: impl Into<String>) -> Self {
        Error::new(Kind::Remote, message)
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error::new(Kind::Io, message).with_source(source)
    }

    /// A transport error whose cause is a TLS certificate the client refused; `problem` says
    /// what is wrong with it.
    #[cfg(feature = "tls")]
    pub(crate) fn certificate(message: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::new(Kind::Transport, message).with_source(CertificateProblem(problem.into()))
    }

    /// The configuration (usually `taskfly.yml`) is invalid; [`Error::details`] lists every
    /// problem, each naming its field path.
    pub fn is_invalid_config(&self) -> bool {
        self.kind == Kind::InvalidConfig
    }

    /// A bundle was malformed or refused (path traversal, links outside, too large, ...).
    pub fn is_invalid_bundle(&self) -> bool {
        self.kind == Kind::InvalidBundle
    }

    /// Input other than a config or bundle was malformed.
    pub fn is_invalid_input(&self) -> bool {
        self.kind == Kind::InvalidInput
    }

    /// The deployment, node or token named does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == Kind::NotFound
    }

    /// The operation is not allowed in the current state (an illegal state transition,
    /// cleaning up a running deployment, reusing a provision token, ...).
    pub fn is_conflict(&self) -> bool {
        self.kind == Kind::Conflict
    }

    /// A token was missing or wrong.
    pub fn is_unauthorized(&self) -> bool {
        self.kind == Kind::Unauthorized
    }

    /// A request or bundle exceeded a size limit.
    pub fn is_too_large(&self) -> bool {
        self.kind == Kind::TooLarge
    }

    /// A [`crate::Provider`] failed; the provider's own error is the [`source`](std::error::Error::source).
    pub fn is_provider(&self) -> bool {
        self.kind == Kind::Provider
    }

    /// A [`crate::Store`] failed; the store's own error is the [`source`](std::error::Error::source).
    pub fn is_store(&self) -> bool {
        self.kind == Kind::Store
    }

    /// The daemon could not be reached or answered something unexpected.
    pub fn is_transport(&self) -> bool {
        self.kind == Kind::Transport
    }

    /// The daemon was reached over https, but its certificate was refused (signed by an
    /// authority the client does not trust, expired, issued for another name). Also
    /// [`Error::is_transport`]; unlike an unreachable daemon, it does not go away by retrying:
    /// the client needs the right CA certificate (`Client::with_ca_file`, feature `tls`).
    pub fn is_certificate(&self) -> bool {
        self.kind == Kind::Transport
            && self
                .source
                .as_ref()
                .is_some_and(|source| source.is::<CertificateProblem>())
    }

    /// A local file or process operation failed.
    pub fn is_io(&self) -> bool {
        self.kind == Kind::Io
    }

    /// A request body had the wrong content type.
    pub fn is_unsupported_media(&self) -> bool {
        self.kind == Kind::UnsupportedMedia
    }

    /// Too many requests; try again later.
    pub fn is_rate_limited(&self) -> bool {
        self.kind == Kind::RateLimited
    }

    /// The daemon was reached but failed internally (HTTP 5xx); its log says why.
    pub fn is_remote(&self) -> bool {
        self.kind == Kind::Remote
    }

    /// The one-line description, without details or cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Every individual problem, for errors that gather several (configuration validation).
    pub fn details(&self) -> &[String] {
        &self.details
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if !self.details.is_empty() {
            d.field("details", &self.details);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        for detail in &self.details {
            write!(f, "\n  - {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The cause of an [`Error::is_certificate`] error: what is wrong with the certificate.
#[derive(Debug)]
struct CertificateProblem(String);

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertificateProblem {}
