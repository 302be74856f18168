//! Configuration keys: validated paths that every registry stores as they are.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest configuration key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Longest segment of a configuration key (between two `/`), in bytes.
pub const MAX_SEGMENT_LEN: usize = 128;

/// A configuration key: `/`-separated segments of `[A-Za-z0-9._-]`, such as
/// `my_app/config` or `flags/checkout.v2`.
///
/// The rule is the intersection of what the three registries accept as is: a ZooKeeper
/// path below a root (no empty segment, no `.` or `..`), a Consul KV key that needs no
/// escaping in its URL, an etcd key. At most [`MAX_KEY_LEN`] bytes, segments at most
/// [`MAX_SEGMENT_LEN`]; no leading or trailing `/`. Anything else is
/// [`Error::InvalidInput`] naming the rule.
///
/// A key is also a prefix: [`ConfigStore::list`](super::ConfigStore::list) and
/// [`ConfigStore::watch_prefix`](super::ConfigStore::watch_prefix) of `my_app` cover every
/// key below it (`my_app/config`, `my_app/flags/a`), not `my_app` itself, nor
/// `my_application`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConfigKey(Arc<str>);

impl ConfigKey {
    /// Validates a key (see the type's docs).
    pub fn new(s: impl AsRef<str>) -> Result<Self> {
        let s = s.as_ref();
        check(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key `self/child` (`child` may hold several segments).
    pub fn join(&self, child: &str) -> Result<Self> {
        Self::new(format!("{}/{child}", self.0))
    }

    /// Whether `self` is strictly below `prefix` (`a/b` is below `a`; `a` and `ab` are
    /// not).
    pub fn is_below(&self, prefix: &ConfigKey) -> bool {
        self.0.len() > prefix.0.len() + 1
            && self.0.starts_with(&*prefix.0)
            && self.0.as_bytes()[prefix.0.len()] == b'/'
    }

    /// The part of the key below `prefix`, if the key is below it.
    pub fn strip_prefix(&self, prefix: &ConfigKey) -> Option<&str> {
        self.is_below(prefix).then(|| &self.0[prefix.0.len() + 1..])
    }
}

fn check(s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_KEY_LEN {
        return Err(Error::invalid_input(format!(
            "a configuration key must be 1 to {MAX_KEY_LEN} bytes long, got {} bytes",
            s.len()
        )));
    }
    for segment in s.split('/') {
        if segment.is_empty() {
            return Err(Error::invalid_input(format!(
                "configuration key `{}` has an empty segment: no leading, trailing or double `/`",
                s.escape_debug()
            )));
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(Error::invalid_input(format!(
                "configuration key `{}` has a segment of {} bytes: at most {MAX_SEGMENT_LEN}",
                s.escape_debug(),
                segment.len()
            )));
        }
        if segment == "." || segment == ".." {
            return Err(Error::invalid_input(format!(
                "configuration key `{}` has a `{segment}` segment",
                s.escape_debug()
            )));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Error::invalid_input(format!(
                "configuration key `{}` contains {c:?}: only [A-Za-z0-9._-] and `/` between segments are allowed",
                s.escape_debug()
            )));
        }
    }
    Ok(())
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for ConfigKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ConfigKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for ConfigKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for ConfigKey {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl From<ConfigKey> for String {
    fn from(k: ConfigKey) -> String {
        k.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_keys() {
        for k in [
            "a",
            "my_app/config",
            "flags/checkout.v2",
            "a-b/c_d/E.9",
            "x".repeat(128).as_str(),
        ] {
            assert_eq!(ConfigKey::new(k).unwrap().as_str(), k);
        }
    }

    #[test]
    fn invalid_keys_name_the_rule() {
        for (k, rule) in [
            ("", "1 to 512"),
            ("/a", "empty segment"),
            ("a/", "empty segment"),
            ("a//b", "empty segment"),
            ("a/../b", "`..` segment"),
            (".", "`.` segment"),
            ("a b", "' '"),
            ("a/é", "'é'"),
            ("a\0b", "'\\0'"),
            ("a?b", "'?'"),
        ] {
            let e = ConfigKey::new(k).unwrap_err();
            assert!(matches!(e, Error::InvalidInput { .. }), "{k:?}: {e}");
            assert!(e.to_string().contains(rule), "{k:?}: {e}");
        }
        let long = "a".repeat(129);
        assert!(ConfigKey::new(&long)
            .unwrap_err()
            .to_string()
            .contains("129 bytes"));
        let long = ["a"; 300].join("/");
        assert!(ConfigKey::new(&long)
            .unwrap_err()
            .to_string()
            .contains("1 to 512"));
    }

    #[test]
    fn below_and_strip() {
        let p = ConfigKey::new("app").unwrap();
        let k = |s: &str| ConfigKey::new(s).unwrap();
        assert!(k("app/x").is_below(&p));
        assert!(k("app/x/y").is_below(&p));
        assert!(!k("app").is_below(&p));
        assert!(!k("apps/x").is_below(&p));
        assert!(!k("ap").is_below(&p));
        assert_eq!(k("app/x/y").strip_prefix(&p), Some("x/y"));
        assert_eq!(p.join("a/b").unwrap().as_str(), "app/a/b");
        assert!(p.join("").is_err());
    }

    #[test]
    fn serde_validates() {
        let k: ConfigKey = serde_json::from_str("\"a/b\"").unwrap();
        assert_eq!(k.as_str(), "a/b");
        assert!(serde_json::from_str::<ConfigKey>("\"a//b\"").is_err());
    }
}
