//! The backend's private errors and their mapping into [`waypost_core::Error`].

use waypost_core::Error;

/// What can go wrong inside this backend, before it becomes a [`waypost_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ZkError {
    /// An error of the ZooKeeper client or server.
    #[error("zookeeper: {operation} `{path}` failed")]
    Client {
        operation: &'static str,
        path: String,
        #[source]
        source: zookeeper_client::Error,
    },
    /// Connecting did not finish within the connect timeout.
    #[error("connecting to ZooKeeper at {hosts} did not finish within {after:?}")]
    ConnectTimeout {
        hosts: String,
        after: std::time::Duration,
    },
    /// Connecting failed.
    #[error("connecting to ZooKeeper at {hosts} failed")]
    Connect {
        hosts: String,
        #[source]
        source: zookeeper_client::Error,
    },
}

impl ZkError {
    pub(crate) fn op(operation: &'static str, path: &str, source: zookeeper_client::Error) -> Self {
        ZkError::Client {
            operation,
            path: path.to_string(),
            source,
        }
    }
}

fn is_temporary(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as E;
    matches!(
        e,
        E::ConnectionLoss
            | E::SessionExpired
            | E::Timeout
            | E::NoHosts
            | E::SessionMoved
            | E::Throttled
            | E::NotReadOnly
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
            ZkError::Connect { source, .. } | ZkError::Client { source, .. } => match source {
                E::SessionExpired => Error::SessionExpired,
                E::ConnectionLoss | E::NoHosts | E::Timeout | E::ClientClosed => {
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
}
