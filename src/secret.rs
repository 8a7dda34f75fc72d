//! [`Secret`]: a string that never shows itself in logs, `Debug` output or error messages.

use std::fmt;

/// A secret value (a node's provision token, say): its `Debug` and `Display` print `***`, so
/// it cannot leak through `tracing`, `{:?}` of a struct holding it, or an error message.
/// [`Secret::expose`] hands out the value where it is really needed (the agent's user data,
/// an environment variable), which makes every such place easy to find.
///
/// ```
/// use taskfly::Secret;
/// let token = Secret::new("s3cr3t");
/// assert_eq!(format!("{token} {token:?}"), "*** Secret(***)");
/// assert_eq!(token.expose(), "s3cr3t");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("PLANTED-token-123");
        let shown = format!("{secret} {secret:?} {:?}", Some(&secret));
        assert!(!shown.contains("PLANTED"), "{shown}");
        assert_eq!(shown, "*** Secret(***) Some(Secret(***))");
    }

    #[test]
    fn the_value_is_handed_out_only_on_request() {
        let secret = Secret::from("abc".to_owned());
        assert_eq!(secret.expose(), "abc");
        assert_eq!(secret.clone(), Secret::new("abc"));
    }
}
