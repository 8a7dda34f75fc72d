//! Rate limiting of failed node registrations, per client address.
//!
//! A provision token has 256 random bits, so guessing one is hopeless; the limit keeps a
//! client that tries anyway (or a misconfigured fleet) from costing the daemon more than a
//! handful of hash lookups a minute per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// Entries kept before expired ones are swept.
const SWEEP_ABOVE: usize = 10_000;

/// Counts failures per address in fixed windows; past the limit, requests are refused (429)
/// until the window ends.
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    window: Duration,
    max_failures: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub(crate) fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            window,
            max_failures,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Refuse `address` while it is over the limit.
    pub(crate) fn check(&self, address: IpAddr) -> Result<()> {
        let now = Instant::now();
        let failures = crate::sync::lock(&self.failures);
        match failures.get(&address) {
            Some((since, count))
                if now.duration_since(*since) < self.window && *count >= self.max_failures =>
            {
                let wait = self.window - now.duration_since(*since);
                Err(Error::rate_limited(format!(
                    "too many failed registrations from {address}; try again in {} s",
                    wait.as_secs().max(1)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Count one failure of `address`.
    pub(crate) fn record_failure(&self, address: IpAddr) {
        let now = Instant::now();
        let mut failures = crate::sync::lock(&self.failures);
        if failures.len() > SWEEP_ABOVE {
            let window = self.window;
            failures.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let entry = failures.entry(address).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refuses_past_the_limit_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..3 {
            limiter.check(a).unwrap();
            limiter.record_failure(a);
        }
        let refused = limiter.check(a).unwrap_err();
        assert!(refused.is_rate_limited(), "{refused}");
        limiter.check(b).expect("another address is not limited");
        tokio::time::advance(Duration::from_secs(61)).await;
        limiter.check(a).expect("a new window");
    }
}
