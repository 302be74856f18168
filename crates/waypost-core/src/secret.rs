//! [`Secret`]: a string that never shows.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A password or token. `Debug` and `Display` print `<redacted>`, so configuration structs
/// holding one can derive `Debug`; the value is read only with [`Secret::expose`], at the
/// one place it is sent to the registry.
///
/// ```
/// use waypost_core::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, to send to the registry. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl Serialize for Secret {
    /// Serializes as `<redacted>`: a config written back out never leaks the secret.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shows_in_debug_display_or_serde_output() {
        #[derive(Debug, Serialize, Deserialize)]
        struct C {
            token: Secret,
        }
        let c: C = serde_json::from_str(r#"{"token":"s3cr3t"}"#).unwrap();
        assert_eq!(c.token.expose(), "s3cr3t");
        for shown in [
            format!("{c:?}"),
            format!("{}", c.token),
            serde_json::to_string(&c).unwrap(),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }
}
