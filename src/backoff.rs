//! Exponential backoff with jitter, in one place: the pause before each next try of something
//! that failed, doubling from a first delay up to a cap, each pause spread by a random factor so
//! that many clients failing at the same moment do not all come back at the same moment.

use std::time::Duration;

/// The pauses between tries: `first`, then twice as long each time, never longer than `cap`,
/// each scaled by a random factor in [0.5, 1.5) (see [`jitter`]).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    /// Pauses starting at about `first` and growing to about `cap`.
    pub(crate) fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first.min(cap),
            cap,
        }
    }

    /// The pause before the next try, jittered; the following one is twice as long.
    pub(crate) fn next_pause(&mut self) -> Duration {
        jitter(self.next_delay())
    }

    /// The next delay before jitter, and doubles it (up to the cap) for the time after.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.cap);
        delay
    }
}

/// The jittered pause after `tries` failed tries of a schedule doubling from `first` up to
/// `cap`: what the `tries`-th [`Backoff::next_pause`] of a fresh [`Backoff`] gives, for a
/// schedule kept as a count of tries (a webhook notification stored across restarts).
pub(crate) fn pause_after(first: Duration, cap: Duration, tries: u32) -> Duration {
    let mut backoff = Backoff::new(first, cap);
    for _ in 1..tries.min(64) {
        backoff.next_delay();
    }
    backoff.next_pause()
}

/// `delay` scaled by a random factor in [0.5, 1.5), so many clients retrying at once spread
/// out. Without a source of randomness the factor is 1; a product too large for a `Duration`
/// is `Duration::MAX`.
pub(crate) fn jitter(delay: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let fraction = match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    };
    Duration::try_from_secs_f64(delay.as_secs_f64() * (0.5 + fraction)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_first_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [250, 500, 1000, 2000, 2000, 2000]);
    }

    #[test]
    fn the_pause_after_n_tries_follows_the_same_doubling() {
        let (first, cap) = (Duration::from_secs(1), Duration::from_secs(8));
        for (tries, delay) in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8), (1000, 8)] {
            let pause = pause_after(first, cap, tries);
            let delay = Duration::from_secs(delay);
            assert!(
                pause >= delay / 2 && pause <= delay * 3 / 2,
                "{tries}: {pause:?}"
            );
        }
    }

    #[test]
    fn a_first_delay_above_the_cap_starts_at_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn jittered_pauses_stay_within_half_and_one_and_a_half_of_the_delay() {
        for _ in 0..200 {
            let pause = jitter(Duration::from_secs(2));
            assert!(pause >= Duration::from_secs(1), "{pause:?}");
            assert!(pause < Duration::from_secs(3), "{pause:?}");
        }
    }

    #[test]
    fn pauses_grow_and_stay_bounded_by_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<Duration> = (0..20).map(|_| backoff.next_pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] < Duration::from_millis(150));
        for pause in &pauses[4..] {
            assert!(*pause >= Duration::from_millis(500), "{pause:?}");
            assert!(*pause < Duration::from_millis(1500), "{pause:?}");
        }
    }

    #[test]
    fn a_huge_cap_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..100 {
            backoff.next_delay();
        }
        assert_eq!(backoff.next_delay(), Duration::MAX);
        assert!(backoff.next_pause() >= Duration::MAX / 2);
    }
}
