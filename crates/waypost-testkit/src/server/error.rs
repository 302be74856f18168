//! The one error type of the server harness.

use std::fmt;
use std::time::Duration;

use super::ServerKind;

/// Why the harness could not start, probe or control a server.
#[derive(Debug)]
pub enum HarnessError {
    /// The server's binary (or, for ZooKeeper, `java` or the ZooKeeper jar) is not
    /// installed where the harness looks for it.
    MissingBinary {
        /// Which server.
        kind: ServerKind,
        /// What is missing and how to install it.
        hint: String,
    },
    /// An I/O operation of the harness itself failed (temp dir, config file, spawn...).
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server did not become ready before the deadline.
    NotReady {
        /// Which server.
        kind: ServerKind,
        /// How long the harness waited.
        waited: Duration,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// The server process exited while the harness waited for it to become ready.
    Exited {
        /// Which server.
        kind: ServerKind,
        /// The exit status, as the OS reported it.
        status: String,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// The operation needs a running process, and there is none (it was killed or stopped).
    NotRunning {
        /// Which server.
        kind: ServerKind,
    },
    /// Sending a signal to the server process failed.
    Signal {
        /// Which server.
        kind: ServerKind,
        /// The signal's name, e.g. `SIGSTOP`.
        signal: &'static str,
        /// The OS error.
        source: nix::errno::Errno,
    },
    /// The caller asked for something the harness cannot do (e.g. a 0-member cluster).
    Invalid(String),
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// The server log lines carried by this error, if any.
    pub fn log_tail(&self) -> Option<&str> {
        match self {
            HarnessError::NotReady { log_tail, .. } | HarnessError::Exited { log_tail, .. } => {
                Some(log_tail)
            }
            _ => None,
        }
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::MissingBinary { kind, hint } => {
                write!(f, "{kind} is not installed: {hint}")
            }
            HarnessError::Io { context, source } => write!(f, "{context}: {source}"),
            HarnessError::NotReady {
                kind,
                waited,
                log_tail,
            } => write!(
                f,
                "{kind} was not ready after {waited:?}; last lines of its log:\n{log_tail}"
            ),
            HarnessError::Exited {
                kind,
                status,
                log_tail,
            } => write!(
                f,
                "{kind} exited during start-up ({status}); last lines of its log:\n{log_tail}"
            ),
            HarnessError::NotRunning { kind } => write!(f, "{kind} is not running"),
            HarnessError::Signal {
                kind,
                signal,
                source,
            } => write!(f, "sending {signal} to {kind} failed: {source}"),
            HarnessError::Invalid(msg) => write!(f, "invalid harness request: {msg}"),
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io { source, .. } => Some(source),
            HarnessError::Signal { source, .. } => Some(source),
            _ => None,
        }
    }
}
