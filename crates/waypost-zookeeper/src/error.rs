//! The backend's private errors and their mapping into [`waypost_core::Error`].

use std::time::Duration;

use waypost_core::Error;

/// What can go wrong inside this backend, before it becomes a [`waypost_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ZkError {
    /// An error of the ZooKeeper client or server.
    #[error("{operation} `{path}` failed")]
    Client {
        /// `zookeeper create`, `zookeeper get`, ...
        operation: &'static str,
        path: String,
        #[source]
        source: zookeeper_client::Error,
    },
    /// A request got no answer within the request timeout (a paused or partitioned
    /// server): it may still be applied later.
    #[error("{operation} `{path}` got no answer within {after:?}")]
    RequestTimeout {
        operation: &'static str,
        path: String,
        after: Duration,
    },
    /// Connecting did not finish within the connect timeout.
    #[error("connecting to ZooKeeper at {hosts} did not finish within {after:?}")]
    ConnectTimeout { hosts: String, after: Duration },
    /// Connecting failed.
    #[error("connecting to ZooKeeper at {hosts} failed")]
    Connect {
        hosts: String,
        #[source]
        source: zookeeper_client::Error,
    },
}

#[cfg(test)]
impl ZkError {
    pub(crate) fn op(operation: &'static str, path: &str, source: zookeeper_client::Error) -> Self {
        ZkError::Client {
            operation,
            path: path.to_string(),
            source,
        }
    }
}

/// Whether `e` says the connection (not the request) failed: the request may or may not
/// have been applied, and the client reconnects by itself. The client reports a silent
/// server as a custom error ("no response from connection in ...").
pub(crate) fn is_connection_loss(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as E;
    matches!(e, E::ConnectionLoss | E::Timeout | E::Custom(_))
}

fn is_temporary(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as E;
    is_connection_loss(e)
        || matches!(
            e,
            E::SessionExpired | E::NoHosts | E::SessionMoved | E::Throttled | E::NotReadOnly
        )
}

impl From<ZkError> for Error {
    fn from(e: ZkError) -> Self {
        use zookeeper_client::Error as E;
        match &e {
            ZkError::ConnectTimeout { after, .. } => Error::Timeout {
                operation: "connecting to ZooKeeper",
                after: *after,
            },
            ZkError::RequestTimeout {
                operation, after, ..
            } => Error::Timeout {
                operation,
                after: *after,
            },
            ZkError::Connect { source, .. } | ZkError::Client { source, .. } => match source {
                E::SessionExpired => Error::SessionExpired,
                s if is_connection_loss(s) || matches!(s, E::NoHosts | E::ClientClosed) => {
                    Error::Unavailable {
                        message: e.to_string(),
                        source: Some(Box::new(e)),
                    }
                }
                E::NoAuth | E::AuthFailed | E::InvalidAcl => Error::Unauthorized {
                    message: e.to_string(),
                    source: Some(Box::new(e)),
                },
                E::Unimplemented => Error::Unsupported {
                    what: format!("{e} (the server does not implement the operation)"),
                },
                other => {
                    let temporary = is_temporary(other);
                    Error::Backend {
                        backend: "zookeeper",
                        temporary,
                        source: Box::new(e),
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn maps_to_actionable_variants_and_chains_sources() {
        let e: Error = ZkError::op("create", "/a", zookeeper_client::Error::NoAuth).into();
        assert!(matches!(e, Error::Unauthorized { .. }));
        assert!(e.source().is_some());
        let e: Error = ZkError::op("get", "/a", zookeeper_client::Error::ConnectionLoss).into();
        assert!(e.is_temporary());
        assert!(e.source().unwrap().source().is_some());
        let e: Error = ZkError::op("x", "/a", zookeeper_client::Error::SessionExpired).into();
        assert!(matches!(e, Error::SessionExpired));
    }

    #[test]
    fn a_silent_server_is_temporary_and_names_the_operation() {
        let e: Error = ZkError::RequestTimeout {
            operation: "zookeeper create",
            path: "/services/s/a".into(),
            after: Duration::from_secs(1),
        }
        .into();
        assert!(e.is_temporary(), "{e}");
        assert!(e.to_string().contains("zookeeper create"), "{e}");
    }
}
