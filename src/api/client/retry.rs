//! Retrying transient failures with exponential backoff and jitter, within a time budget.

use std::error::Error as StdError;
use std::future::Future;

use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{decode, Call, Client, FIRST_RETRY_DELAY, MAX_RETRY_DELAY};
use crate::backoff::Backoff;
use crate::error::{Error, Result};

impl Client {
    /// Sends `call`, retrying transient failures, and decodes its JSON answer.
    pub(super) async fn json_retrying<T: DeserializeOwned>(
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
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        what: &'static str,
        mut operation: F,
    ) -> Result<T>
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
}

/// A failed attempt, and whether trying again may help.
pub(super) struct Failure {
    pub(super) error: Error,
    pub(super) transient: bool,
}

impl Failure {
    pub(super) fn permanent(error: Error) -> Failure {
        Failure {
            error,
            transient: false,
        }
    }

    pub(super) fn transient(error: Error) -> Failure {
        Failure {
            error,
            transient: true,
        }
    }
}

/// Whether a connection-level error may go away by itself (the daemon restarting, a dropped
/// connection), as opposed to a request the daemon will never accept.
pub(super) fn is_transient(error: &(dyn StdError + 'static)) -> bool {
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
