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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(error: Error) -> StatusCode {
        error_response(&error).status()
    }

    #[test]
    fn each_kind_has_its_status_and_every_refusal_in_the_current_state_is_409() {
        let io = || std::io::Error::other("disk full");
        let cases = [
            (
                Error::invalid_config("m", Vec::new()),
                StatusCode::BAD_REQUEST,
            ),
            (Error::invalid_bundle("m"), StatusCode::BAD_REQUEST),
            (Error::invalid_input("m"), StatusCode::BAD_REQUEST),
            (Error::not_found("m"), StatusCode::NOT_FOUND),
            (Error::already_exists("m"), StatusCode::CONFLICT),
            (Error::invalid_transition("m"), StatusCode::CONFLICT),
            (Error::already_final("m"), StatusCode::CONFLICT),
            (Error::not_final("m"), StatusCode::CONFLICT),
            (Error::terminated("m"), StatusCode::CONFLICT),
            (Error::shutting_down("m"), StatusCode::CONFLICT),
            (Error::unauthorized("m"), StatusCode::UNAUTHORIZED),
            (Error::too_large("m"), StatusCode::PAYLOAD_TOO_LARGE),
            (
                Error::unsupported_media("m"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (Error::rate_limited("m"), StatusCode::TOO_MANY_REQUESTS),
            (
                Error::provider("m", Box::new(io())),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (Error::store("m", io()), StatusCode::INTERNAL_SERVER_ERROR),
            (Error::io("m", io()), StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (error, expected) in cases {
            assert_eq!(
                error.is_conflict(),
                expected == StatusCode::CONFLICT,
                "{error:?}"
            );
            assert_eq!(status(error), expected);
        }
    }

    #[tokio::test]
    async fn the_body_names_the_cause_but_not_a_store_or_io_failures_internals() {
        use http_body_util::BodyExt;
        let body = |error: Error| async move {
            let bytes = error_response(&error)
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("json")["error"]
                .as_str()
                .expect("error text")
                .to_owned()
        };
        let provider = Error::provider(
            "aws could not start the node",
            Box::new(std::io::Error::other("quota exceeded")),
        );
        assert_eq!(
            body(provider).await,
            "aws could not start the node: quota exceeded"
        );
        let store = Error::store("the state store failed", std::io::Error::other("/var/x"));
        assert_eq!(body(store).await, "the state store failed");
    }
}
