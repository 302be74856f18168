//! The backend's private errors, mapped into [`waypost_core::Error`] with their sources.

use std::time::Duration;

use waypost_core::Error;

/// What went wrong talking to the agent. Never carries the ACL token: it travels in a
/// header, and no request URL holds it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsulError {
    /// Connect, send or receive failed (refused, reset, timed out).
    #[error("consul {op}: {source}")]
    Transport {
        op: &'static str,
        /// How long the request was given.
        after: Duration,
        #[source]
        source: reqwest::Error,
    },
    /// The agent answered with a non-2xx status.
    #[error("consul {op}: HTTP {status}: {body}")]
    Status {
        op: &'static str,
        status: u16,
        /// The agent's message (plain text, trimmed and capped).
        body: String,
    },
    /// The agent answered 2xx with a body that is not what its API returns.
    #[error("consul {op}: the response is not Consul's JSON: {source}")]
    Decode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A header the API promises is missing or malformed.
    #[error("consul {op}: {what}")]
    Protocol { op: &'static str, what: String },
}

impl ConsulError {
    pub(crate) fn status(op: &'static str, status: u16, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let mut body: String = text.trim().chars().take(512).collect();
        if body.is_empty() {
            body = "(empty body)".into();
        }
        ConsulError::Status { op, status, body }
    }

    /// The agent does not know this check or service (restarted agent, deregistered
    /// behind our back). Consul 1.8 answers `500 CheckID "…" does not have associated TTL`;
    /// later versions answer 404 `Unknown check`.
    pub(crate) fn is_unknown_check(&self) -> bool {
        match self {
            ConsulError::Status { status, body, .. } => {
                *status == 404
                    || (*status == 500
                        && (body.contains("does not have associated TTL")
                            || body.contains("Unknown check")
                            || body.contains("Unknown service")))
            }
            _ => false,
        }
    }

    /// Whether the agent could not be reached at all (as opposed to refusing).
    pub(crate) fn is_transport(&self) -> bool {
        matches!(self, ConsulError::Transport { .. })
    }

    /// Whether retrying can help.
    pub(crate) fn is_temporary(&self) -> bool {
        match self {
            ConsulError::Transport { .. } => true,
            ConsulError::Status { status, body, .. } => {
                (*status >= 500 && !body.contains("No path to datacenter")) || *status == 429
            }
            ConsulError::Decode { .. } | ConsulError::Protocol { .. } => false,
        }
    }
}

impl From<ConsulError> for Error {
    fn from(e: ConsulError) -> Self {
        match &e {
            ConsulError::Transport { op, after, source } if source.is_timeout() => Error::Timeout {
                operation: op,
                after: *after,
            },
            ConsulError::Transport { op, .. } => Error::Unavailable {
                message: format!("consul agent unreachable ({op})"),
                source: Some(Box::new(e)),
            },
            ConsulError::Status { status, body, .. } if *status == 401 || *status == 403 => {
                Error::Unauthorized {
                    message: format!("the consul agent refused the ACL token: {body}"),
                    source: Some(Box::new(e)),
                }
            }
            ConsulError::Status { status, body, .. }
                if *status == 500 && body.contains("No path to datacenter") =>
            {
                Error::NotFound {
                    what: format!("consul datacenter ({body})"),
                }
            }
            ConsulError::Status { status, body, .. } if *status == 400 => {
                Error::invalid_input(format!("the consul agent rejected it: {body}"))
            }
            _ => Error::Backend {
                backend: "consul",
                temporary: e.is_temporary(),
                source: Box::new(e),
            },
        }
    }
}
