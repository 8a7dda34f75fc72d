//! [`parse_duration`]: the one reading of a duration written as text, shared by `taskfly.yml`
//! (`nodes.timeout`) and every duration flag of the binaries (`taskflyd --heartbeat-timeout`
//! and the others), so `30` means the same everywhere (SPEC §1, §5).

use std::time::Duration;

use crate::error::{Error, Result};

/// Reads a duration: a whole number of seconds (`90`), or a humantime duration (`90s`, `30m`,
/// `1h 30m`, `7days`, `250ms`). Blanks around it are ignored. Zero is accepted; whether it
/// makes sense is for the setting to say.
///
/// ```
/// use std::time::Duration;
/// use taskfly::config::parse_duration;
/// assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
/// assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
/// assert!(parse_duration("soon").unwrap_err().is_invalid_input());
/// ```
///
/// # Errors
///
/// An [`is_invalid_input`](Error::is_invalid_input) error saying what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map(Duration::from_secs).map_err(|_| {
            Error::invalid_input(format!(
                "{text} seconds is too long a duration; give at most {} seconds",
                u64::MAX
            ))
        });
    }
    humantime::parse_duration(text).map_err(|err| {
        Error::invalid_input(format!(
            "{text:?} is not a duration ({err}); give a number of seconds (90) or a duration \
             like 90s, 30m, 1h 30m or 7days"
        ))
    })
}
