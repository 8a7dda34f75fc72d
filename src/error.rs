//! The crate's one error type.
//!
//! [`Error`] is opaque: callers ask what went wrong with the `is_*()` queries and reach the
//! underlying cause through [`std::error::Error::source`]. No hyper, tar, SQLite or AWS type
//! appears in its public surface, so those crates can change without breaking callers.
//!
//! An error's [`Display`](fmt::Display) prints only its own message (and, for invalid
//! configuration, one line per problem), never its cause: a program that prints the whole
//! chain (an error reporter, `tracing`) would otherwise show every cause twice. To show a
//! person everything, print [`Error::report`] (or [`Report`] for any error), which gives
//! "message: cause: cause".
//!
//! # Kinds
//!
//! Each kind means one thing, answered by its query. The API server answers each with one
//! HTTP status, and the client turns a status back into the kind.
//!
//! Engine and library kinds:
//!
//! | query | meaning | HTTP |
//! |---|---|---|
//! | [`is_invalid_config`](Error::is_invalid_config) | `taskfly.yml` is invalid; [`details`](Error::details) lists every problem | 400 |
//! | [`is_invalid_bundle`](Error::is_invalid_bundle) | a bundle is malformed or hostile | 400 |
//! | [`is_invalid_input`](Error::is_invalid_input) | other bad input (malformed JSON, parameter, URL, file) | 400 |
//! | [`is_not_found`](Error::is_not_found) | no such deployment, node or instance | 404 |
//! | [`is_already_exists`](Error::is_already_exists) | the thing to create exists already | 409 |
//! | [`is_invalid_transition`](Error::is_invalid_transition) | the state machine refused the change | 409 |
//! | [`is_already_final`](Error::is_already_final) | the deployment has ended: nothing to terminate | 409 |
//! | [`is_not_final`](Error::is_not_final) | the deployment still runs: terminate it first | 409 |
//! | [`is_terminated`](Error::is_terminated) | the work was abandoned: its deployment or node is being terminated | 409 |
//! | [`is_shutting_down`](Error::is_shutting_down) | the engine or a provider is shutting down | 409 |
//! | [`is_provider`](Error::is_provider) | a [`crate::Provider`] failed (cause: its error) | 500 |
//! | [`is_store`](Error::is_store) | a [`crate::Store`] failed (cause: its error) | 500 |
//! | [`is_io`](Error::is_io) | a local file or process operation failed | 500 |
//!
//! Request kinds, raised by the API server and given back by the client from the status:
//!
//! | query | meaning | HTTP |
//! |---|---|---|
//! | [`is_unauthorized`](Error::is_unauthorized) | a token is missing or wrong | 401 |
//! | [`is_too_large`](Error::is_too_large) | a request or bundle is over a size limit | 413 |
//! | [`is_unsupported_media`](Error::is_unsupported_media) | a request body of the wrong content type | 415 |
//! | [`is_rate_limited`](Error::is_rate_limited) | too many (failed) requests from one address | 429 |
//!
//! Client-side kinds, only made by [`crate::Client`] and the node agent:
//!
//! | query | meaning |
//! |---|---|
//! | [`is_transport`](Error::is_transport) | the daemon could not be reached or answered something unexpected |
//! | [`is_certificate`](Error::is_certificate) | the daemon's TLS certificate was refused (also `is_transport`) |
//! | [`is_remote`](Error::is_remote) | the daemon failed internally (it answered 5xx) |
//! | [`is_conflict`](Error::is_conflict) | the daemon refused the operation in the current state (409) |
//!
//! [`is_conflict`](Error::is_conflict) is also true for every kind the server answers with
//! 409 (already exists, invalid transition, already final, not final, terminated, shutting
//! down), so one query covers "refused in the current state" on both sides.

use std::fmt;

/// A boxed error, as returned by user-implemented traits ([`crate::Provider`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as its error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. Private so new kinds can be added freely; callers use
/// the `is_*()` queries instead. The module docs say what each kind means and which HTTP
/// status the API answers it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    // Engine and library kinds.
    /// `taskfly.yml` (or another configuration) is invalid; `details` lists every problem.
    InvalidConfig,
    /// A bundle is malformed or hostile (path traversal, too large, ...).
    InvalidBundle,
    /// Bad input other than configuration or bundles (malformed JSON, bad parameter).
    InvalidInput,
    /// An unknown deployment, node or instance.
    NotFound,
    /// What was to be created exists already (a deployment id, a running instance).
    AlreadyExists,
    /// A state machine refused the change (see [`crate::state::model`]).
    InvalidTransition,
    /// The deployment has ended: there is nothing to terminate.
    AlreadyFinal,
    /// The deployment has not ended: it must be terminated first.
    NotFinal,
    /// The work was abandoned because its deployment or node is being terminated.
    Terminated,
    /// The engine or a provider is shutting down and takes no more work.
    ShuttingDown,
    /// The cloud or process provider failed.
    Provider,
    /// The state store failed.
    Store,
    /// A local I/O operation failed.
    Io,

    // Request kinds: raised by the API server, rebuilt by the client from the status.
    /// A missing or wrong token.
    Unauthorized,
    /// Too large a request or bundle.
    TooLarge,
    /// A request body of the wrong content type.
    UnsupportedMedia,
    /// Too many requests (failed registrations) from one address.
    RateLimited,

    // Client-side kinds.
    /// Talking to the daemon failed (connection refused, timeout, bad response).
    Transport,
    /// The daemon's TLS certificate was refused; a kind of transport failure.
    Certificate,
    /// The daemon answered, but with an internal failure of its own (HTTP 5xx).
    Remote,
    /// The daemon refused the operation in the current state (HTTP 409), for one of the
    /// reasons of the 409 engine kinds, which the status does not tell apart.
    Conflict,
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

    /// An unknown deployment or node. For [`crate::Store`] implementations, which answer
    /// with it when asked to change or list what they do not hold.
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(Kind::NotFound, message)
    }

    /// What was to be created exists already. For [`crate::Store`] implementations, which
    /// answer with it when asked to create a deployment whose id they hold.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Error::new(Kind::AlreadyExists, message)
    }

    pub(crate) fn invalid_transition(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidTransition, message)
    }

    pub(crate) fn already_final(message: impl Into<String>) -> Self {
        Error::new(Kind::AlreadyFinal, message)
    }

    pub(crate) fn not_final(message: impl Into<String>) -> Self {
        Error::new(Kind::NotFinal, message)
    }

    pub(crate) fn terminated(message: impl Into<String>) -> Self {
        Error::new(Kind::Terminated, message)
    }

    pub(crate) fn shutting_down(message: impl Into<String>) -> Self {
        Error::new(Kind::ShuttingDown, message)
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

    /// The state store failed; `source` says why. For [`crate::Store`] implementations, for
    /// every failure of their own (a lost database connection, unreadable data).
    pub fn store(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
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

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Error::new(Kind::Conflict, message)
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error::new(Kind::Io, message).with_source(source)
    }

    /// A transport error whose cause is a TLS certificate the client refused; `problem` says
    /// what is wrong with it.
    #[cfg(feature = "tls")]
    pub(crate) fn certificate(message: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::new(Kind::Certificate, message).with_source(CertificateProblem(problem.into()))
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

    /// What was to be created exists already (a deployment id in the store, an instance
    /// that is running); use another id, or the one that exists.
    pub fn is_already_exists(&self) -> bool {
        self.kind == Kind::AlreadyExists
    }

    /// A state machine refused the change: the deployment or node is in a state it cannot
    /// leave that way (a final node asked to run, a provision token used twice). Usually
    /// another change came first; read the current state before deciding.
    pub fn is_invalid_transition(&self) -> bool {
        self.kind == Kind::InvalidTransition
    }

    /// The deployment has ended already: there is nothing to terminate.
    pub fn is_already_final(&self) -> bool {
        self.kind == Kind::AlreadyFinal
    }

    /// The deployment has not ended: terminate it (or wait until it ends) before cleaning
    /// it up.
    pub fn is_not_final(&self) -> bool {
        self.kind == Kind::NotFinal
    }

    /// The work was abandoned because its deployment or node is being (or was) terminated;
    /// nothing is left to do for it.
    pub fn is_terminated(&self) -> bool {
        self.kind == Kind::Terminated
    }

    /// The engine or a provider is shutting down and takes no more work; try again with
    /// the next one.
    pub fn is_shutting_down(&self) -> bool {
        self.kind == Kind::ShuttingDown
    }

    /// The operation is refused in the current state: true for every kind the API answers
    /// with HTTP 409 ([`is_already_exists`](Error::is_already_exists),
    /// [`is_invalid_transition`](Error::is_invalid_transition),
    /// [`is_already_final`](Error::is_already_final), [`is_not_final`](Error::is_not_final),
    /// [`is_terminated`](Error::is_terminated), [`is_shutting_down`](Error::is_shutting_down)),
    /// and for a 409 answer the client got, which does not say which of them it was.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.kind,
            Kind::AlreadyExists
                | Kind::InvalidTransition
                | Kind::AlreadyFinal
                | Kind::NotFinal
                | Kind::Terminated
                | Kind::ShuttingDown
                | Kind::Conflict
        )
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

    /// The daemon could not be reached or answered something unexpected (including a
    /// refused certificate, [`Error::is_certificate`]).
    pub fn is_transport(&self) -> bool {
        matches!(self.kind, Kind::Transport | Kind::Certificate)
    }

    /// The daemon was reached over https, but its certificate was refused (signed by an
    /// authority the client does not trust, expired, issued for another name). Also
    /// [`Error::is_transport`]; unlike an unreachable daemon, it does not go away by retrying:
    /// the client needs the right CA certificate (`Client::with_ca_file`, feature `tls`).
    pub fn is_certificate(&self) -> bool {
        self.kind == Kind::Certificate
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

    /// The error with its causes, for a person to read: "message: cause: cause", then the
    /// details, one per line.
    ///
    /// ```
    /// # fn show(error: &taskfly::Error) {
    /// eprintln!("error: {}", error.report());
    /// # }
    /// ```
    pub fn report(&self) -> Report<'_> {
        Report::new(self)
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

/// The message and, for invalid configuration, one line per problem; never the cause (see
/// [`Error::report`]).
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        write_details(f, &self.details)
    }
}

fn write_details(f: &mut fmt::Formatter<'_>, details: &[String]) -> fmt::Result {
    for detail in details {
        write!(f, "\n  - {detail}")?;
    }
    Ok(())
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Displays an error and every cause behind it, "message: cause: cause", for a person to
/// read (a CLI message, a log line, a node's failure message). An [`Error`]'s details follow,
/// one per line. A cause whose text its error already printed (some libraries' errors
/// include their cause) is not printed twice.
pub struct Report<'a> {
    error: &'a (dyn std::error::Error + 'static),
}

impl<'a> Report<'a> {
    /// The report of `error`, for any error type (a [`BoxError`] from a provider, say).
    pub fn new(error: &'a (dyn std::error::Error + 'static)) -> Self {
        Report { error }
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut details: &[String] = &[];
        let mut printed = String::new();
        let mut next = Some(self.error);
        while let Some(error) = next {
            let text = match error.downcast_ref::<Error>() {
                Some(ours) => {
                    if details.is_empty() {
                        details = &ours.details;
                    }
                    ours.message.clone()
                }
                None => error.to_string(),
            };
            if printed.is_empty() {
                printed = text;
            } else if !printed.ends_with(&text) {
                printed.push_str(": ");
                printed.push_str(&text);
            }
            next = error.source();
        }
        f.write_str(&printed)?;
        write_details(f, details)
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The cause of an [`Error::is_certificate`] error: what is wrong with the certificate.
#[cfg(feature = "tls")]
#[derive(Debug)]
struct CertificateProblem(String);

#[cfg(feature = "tls")]
impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "tls")]
impl std::error::Error for CertificateProblem {}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(text: &str) -> std::io::Error {
        std::io::Error::other(text.to_owned())
    }

    #[test]
    fn display_prints_the_message_and_details_but_never_the_source() {
        let error = Error::io("cannot read taskfly.yml", io_error("permission denied"));
        assert_eq!(error.to_string(), "cannot read taskfly.yml");
        let source = std::error::Error::source(&error).expect("a source");
        assert_eq!(source.to_string(), "permission denied");

        let config = Error::invalid_config("invalid taskfly.yml", vec!["nodes.count: 0".into()])
            .with_source(io_error("hidden"));
        assert_eq!(
            config.to_string(),
            "invalid taskfly.yml\n  - nodes.count: 0"
        );
    }

    #[test]
    fn report_prints_each_cause_once_then_the_details() {
        let inner = Error::store("the state store failed", io_error("disk full"));
        let outer = Error::provider("aws could not start the node", Box::new(inner));
        assert_eq!(
            outer.report().to_string(),
            "aws could not start the node: the state store failed: disk full"
        );
        assert_eq!(
            Error::not_found("no deployment `x`").report().to_string(),
            "no deployment `x`"
        );

        let config = Error::invalid_config("invalid taskfly.yml", vec!["a: b".into()])
            .with_source(io_error("while parsing"));
        assert_eq!(
            config.report().to_string(),
            "invalid taskfly.yml: while parsing\n  - a: b"
        );
    }

    /// An error whose Display includes its cause, as some libraries' errors do.
    #[derive(Debug)]
    struct Chatty(std::io::Error);

    impl fmt::Display for Chatty {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "request failed: {}", self.0)
        }
    }

    impl std::error::Error for Chatty {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn report_does_not_repeat_a_cause_its_error_already_printed() {
        let error =
            Error::transport("cannot reach the daemon").with_source(Chatty(io_error("refused")));
        assert_eq!(
            error.report().to_string(),
            "cannot reach the daemon: request failed: refused"
        );
        let boxed: BoxError = Box::new(Chatty(io_error("reset")));
        assert_eq!(
            Report::new(boxed.as_ref()).to_string(),
            "request failed: reset"
        );
    }

    /// One of the `is_*()` queries.
    type Query = fn(&Error) -> bool;

    /// Every kind, with the one query that names it.
    fn every_kind() -> Vec<(Error, Query)> {
        vec![
            (
                Error::invalid_config("m", Vec::new()),
                Error::is_invalid_config,
            ),
            (Error::invalid_bundle("m"), Error::is_invalid_bundle),
            (Error::invalid_input("m"), Error::is_invalid_input),
            (Error::not_found("m"), Error::is_not_found),
            (Error::already_exists("m"), Error::is_already_exists),
            (Error::invalid_transition("m"), Error::is_invalid_transition),
            (Error::already_final("m"), Error::is_already_final),
            (Error::not_final("m"), Error::is_not_final),
            (Error::terminated("m"), Error::is_terminated),
            (Error::shutting_down("m"), Error::is_shutting_down),
            (
                Error::provider("m", Box::new(io_error("e"))),
                Error::is_provider,
            ),
            (Error::store("m", io_error("e")), Error::is_store),
            (Error::io("m", io_error("e")), Error::is_io),
            (Error::unauthorized("m"), Error::is_unauthorized),
            (Error::too_large("m"), Error::is_too_large),
            (Error::unsupported_media("m"), Error::is_unsupported_media),
            (Error::rate_limited("m"), Error::is_rate_limited),
            (Error::transport("m"), Error::is_transport),
            (Error::remote("m"), Error::is_remote),
            (Error::conflict("m"), Error::is_conflict),
        ]
    }

    #[test]
    fn each_kind_answers_its_own_query_and_no_other() {
        let kinds = every_kind();
        for (i, (error, _)) in kinds.iter().enumerate() {
            for (j, (other, query)) in kinds.iter().enumerate() {
                // `is_conflict` also answers for every 409 kind; tested below.
                if other.kind == Kind::Conflict {
                    continue;
                }
                assert_eq!(
                    query(error),
                    i == j,
                    "{:?} asked the query of {:?}",
                    error.kind,
                    other.kind
                );
            }
        }
    }

    #[test]
    fn is_conflict_is_true_for_the_kinds_answered_with_409() {
        let conflicts: Vec<Kind> = every_kind()
            .into_iter()
            .map(|(error, _)| error)
            .filter(Error::is_conflict)
            .map(|error| error.kind)
            .collect();
        assert_eq!(
            conflicts,
            [
                Kind::AlreadyExists,
                Kind::InvalidTransition,
                Kind::AlreadyFinal,
                Kind::NotFinal,
                Kind::Terminated,
                Kind::ShuttingDown,
                Kind::Conflict,
            ]
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_refused_certificate_is_a_transport_error_of_its_own_kind() {
        let error = Error::certificate("cannot reach https://x", "unknown issuer");
        assert!(error.is_certificate() && error.is_transport());
        assert!(!Error::transport("refused").is_certificate());
        assert_eq!(
            error.report().to_string(),
            "cannot reach https://x: unknown issuer"
        );
    }
}
