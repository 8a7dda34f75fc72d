//! One mapping of error kinds to HTTP answers.

use hyper::{Response, StatusCode};

use super::body::{json, Body};
use crate::error::{Error, Kind};
use crate::wire::ErrorBody;

/// The answer for `error`: its status code and `{"error", "details"}` body.
pub(super) fn error_response(error: &Error) -> Response<Body> {
    let status = match error.kind() {
        Kind::InvalidConfig | Kind::InvalidBundle | Kind::InvalidInput => StatusCode::BAD_REQUEST,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::AlreadyExists
        | Kind::InvalidTransition
        | Kind::AlreadyFinal
        | Kind::NotFinal
        | Kind::Terminated
        | Kind::ShuttingDown
        | Kind::Conflict => StatusCode::CONFLICT,
        Kind::Unauthorized => StatusCode::UNAUTHORIZED,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Kind::Provider
        | Kind::Store
        | Kind::Io
        | Kind::Transport
        | Kind::Certificate
        | Kind::Remote => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::error!(error = %error.report(), "request failed");
    }
    let message = match error.kind() {
        // Say what failed without internal paths; the daemon log has the cause.
        Kind::Io | Kind::Store => error.message().to_owned(),
        _ => error
            .report()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let body = ErrorBody {
        error: message,
        details: error.details().to_vec(),
    };
    let mut response = json(StatusCode::OK, &body);
    *response.status_mut() = status;
    response
}
