//! The one public error type.

use std::fmt;
use std::time::Duration;

/// A boxed error, the `source` of backend errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of everything in waypost.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in waypost, as variants a caller can act on.
///
/// Backends keep their own private error enums and map them into this one, always
/// chaining the original error as `source` (never stringified away). Use
/// [`Error::is_temporary`] to decide whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something invalid: a bad name, an oversized payload. Nothing was
    /// written. The message names the rule that was broken.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// Which rule was broken, naming the offending field.
        message: String,
    },

    /// The configuration (URL or serde config) is invalid. The message names the key.
    #[error("invalid configuration: {message}")]
    InvalidConfig {
        /// What is wrong, naming the key or URL part.
        message: String,
    },

    /// A URL scheme or `backend` name that this build does not know.
    #[error("unknown registry scheme `{scheme}`{}; available: {}", feature_hint(.feature), .available.join(", "))]
    UnknownScheme {
        /// The scheme that was asked for.
        scheme: String,
        /// The schemes this build supports.
        available: Vec<&'static str>,
        /// The cargo feature of the `waypost` crate that would enable it, if any.
        feature: Option<&'static str>,
    },

    /// The thing asked for does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },

    /// Another party already holds this name: e.g. a live registration of the same
    /// instance id by another process.
    #[error("already exists: {what}")]
    AlreadyExists {
        /// What already exists.
        what: String,
    },

    /// The registry cannot be reached (connection refused, reset, timed out) or is not
    /// serving. Temporary.
    #[error("registry unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// An operation did not finish within its deadline. Temporary.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },

    /// The session (ZooKeeper session, etcd lease, Consul check) that held a registration
    /// expired. Registrations come back by themselves; this is reported to callers of a
    /// single operation. Temporary.
    #[error("registry session expired")]
    SessionExpired,

    /// The registry refused the credentials, or they lack a permission.
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// What was refused.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// A conditional write ([`ConfigStore::put_if`](crate::kv::ConfigStore::put_if),
    /// [`ConfigStore::delete_if`](crate::kv::ConfigStore::delete_if)) found the key in
    /// another state than expected: nothing was written. Read the key again and decide.
    #[error("conflict: {what} (current version: {})", match .current { Some(v) => v.to_string(), None => "absent".into() })]
    Conflict {
        /// What was expected, naming the key.
        what: String,
        /// The key's current version, `None` when it does not exist (as far as the
        /// registry told).
        current: Option<u64>,
    },

    /// A lock (or another coordination primitive) is held by another contender and the
    /// caller asked not to wait ([`Coordinator::try_lock`](crate::coord::Coordinator::try_lock)).
    /// Nothing is left behind in the registry.
    #[error("busy: {what}")]
    Busy {
        /// What is held, naming the lock.
        what: String,
    },

    /// This backend does not implement the operation.
    #[error("unsupported: {what}")]
    Unsupported {
        /// The operation or option that is not supported.
        what: String,
    },

    /// The registrar, watcher or registration has been shut down.
    #[error("closed: {what}")]
    Closed {
        /// What was closed.
        what: &'static str,
    },

    /// Any other error of a backend, with its source.
    #[error("{backend} backend error")]
    Backend {
        /// The backend's name (`"zookeeper"`, `"consul"`, `"etcd"`, `"memory"`).
        backend: &'static str,
        /// Whether retrying may help.
        temporary: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
}

fn feature_hint(feature: &Option<&'static str>) -> String {
    match feature {
        Some(f) => format!(" (enable the `{f}` feature of the `waypost` crate)"),
        None => String::new(),
    }
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::SessionExpired => true,
            Error::Backend { temporary, .. } => *temporary,
            _ => false,
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::InvalidInput {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Unavailable`] without a source.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }
}

/// An error as people read it: the error and each of its causes, on one line
/// (`registry unavailable: connect to 127.0.0.1:2181: Connection refused (os error 111)`),
/// from [`Display`](fmt::Display) and from [`Debug`](fmt::Debug) alike.
///
/// A `main` that returns `Result<(), Report>` prints that line on failure, where
/// `Result<(), Error>` would print a debug dump of the error's fields:
///
/// ```no_run
/// # async fn run() -> Result<(), waypost_core::BoxError> { Ok(()) }
/// #[tokio::main]
/// async fn main() -> Result<(), waypost_core::error::Report> {
///     Ok(run().await?)
/// }
/// ```
pub struct Report(BoxError);

impl Report {
    /// The error reported.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl<E: Into<BoxError>> From<E> for Report {
    fn from(e: E) -> Self {
        Report(e.into())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Many errors also write their cause into their own text: a cause already on the
        // line is left out, and one that starts with the previous error's text replaces it.
        let mut line = self.0.to_string();
        let mut last = line.clone();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !line.contains(&text) {
                match text.strip_prefix(&last) {
                    Some(rest) if !last.is_empty() => line.push_str(rest),
                    _ => {
                        line.push_str(": ");
                        line.push_str(&text);
                    }
                }
            }
            last = text;
            source = s.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn temporary_classification() {
        assert!(Error::unavailable("x").is_temporary());
        assert!(Error::SessionExpired.is_temporary());
        assert!(!Error::invalid_input("x").is_temporary());
        assert!(!Error::unsupported("x").is_temporary());
    }

    #[test]
    fn sources_are_chained() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::Backend {
            backend: "memory",
            temporary: true,
            source: Box::new(io),
        };
        assert!(e.is_temporary());
        assert_eq!(e.source().unwrap().to_string(), "refused");
    }

    #[test]
    fn unknown_scheme_names_feature_and_available() {
        let e = Error::UnknownScheme {
            scheme: "zk".into(),
            available: vec!["memory"],
            feature: Some("zookeeper"),
        };
        let s = e.to_string();
        assert!(s.contains("`zk`") && s.contains("`zookeeper` feature") && s.contains("memory"));
    }

    #[test]
    fn a_report_is_one_line_with_every_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::Unavailable {
            message: "connect to 127.0.0.1:1".into(),
            source: Some(Box::new(io)),
        };
        let r = Report::from(e);
        let line = "registry unavailable: connect to 127.0.0.1:1: refused";
        assert_eq!(r.to_string(), line);
        assert_eq!(format!("{r:?}"), line);
        assert_eq!(
            r.error().to_string(),
            "registry unavailable: connect to 127.0.0.1:1"
        );
        // A cause that repeats its error's text, or extends it, is not written twice.
        let inner = Error::Unavailable {
            message: "connect failed: no hosts".into(),
            source: Some(Box::new(std::io::Error::other("no hosts"))),
        };
        let outer = Error::Unavailable {
            message: "connect failed".into(),
            source: Some(Box::new(inner)),
        };
        assert_eq!(
            Report::from(outer).to_string(),
            "registry unavailable: connect failed: no hosts"
        );
        let boxed: BoxError = "plain".into();
        assert_eq!(Report::from(boxed).to_string(), "plain");
        // A cause with no text of its own does not glue the next one to the line.
        #[derive(Debug)]
        struct Link(&'static str, Option<Box<Link>>);
        impl fmt::Display for Link {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Link {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let chain = Link(
            "outer",
            Some(Box::new(Link("", Some(Box::new(Link("inner", None)))))),
        );
        assert_eq!(Report::from(chain).to_string(), "outer: inner");
    }
}
