//! The backend's private errors and their mapping into [`waypost_core::Error`].

use std::time::Duration;

use waypost_core::Error;

/// What can go wrong inside the etcd backend, before it is mapped into the public error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    /// An error of the etcd client (transport, gRPC status, lease keep-alive).
    #[error("etcd {operation} failed")]
    Client {
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd answered, but with something this backend cannot use.
    #[error("etcd {operation}: {message}")]
    Protocol {
        operation: &'static str,
        message: String,
    },
}

impl EtcdError {
    pub(crate) fn client(operation: &'static str, source: etcd_client::Error) -> Self {
        EtcdError::Client { operation, source }
    }
}

/// Whether an etcd client error means the lease is gone.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// Whether an etcd client error is about credentials or permissions.
fn is_auth(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || s.message().contains("authentication failed")
                || s.message().contains("permission denied")
                || s.message().contains("user name is empty")
                || s.message().contains("invalid auth token")
        }
        _ => false,
    }
}

fn is_temporary(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_)
        | etcd_client::Error::LeaseKeepAliveError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Internal
            ) || s.message().contains("no leader")
                || s.message().contains("leader changed")
                || s.message().contains("timed out")
        }
        _ => false,
    }
}

/// An etcd client error as people read it. `etcd_client` shows a gRPC status with tonic's
/// `Debug` of its transport cause (`source: tonic::transport::Error(Transport, …)`): this
/// shows the status's code and message, and chains its cause as a `source`, so
/// [`waypost_core::Report`] prints `… tcp connect error: Connection refused (os error 111)`.
#[derive(Debug)]
pub(crate) struct Readable(etcd_client::Error);

impl std::fmt::Display for Readable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            etcd_client::Error::GRpcStatus(s) if s.message().is_empty() => {
                write!(f, "gRPC status {:?}", s.code())
            }
            etcd_client::Error::GRpcStatus(s) => {
                write!(f, "gRPC status {:?}: {}", s.code(), s.message())
            }
            e => e.fmt(f),
        }
    }
}

impl std::error::Error for Readable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
            e => e.source(),
        }
    }
}

/// `e` as the `source` of a public error.
fn readable(e: etcd_client::Error) -> waypost_core::BoxError {
    Box::new(Readable(e))
}

impl From<EtcdError> for Error {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Client { operation, source } => {
                if is_lease_not_found(&source) {
                    Error::SessionExpired
                } else if is_auth(&source) {
                    Error::Unauthorized {
                        message: format!("etcd refused {operation}"),
                        source: Some(readable(source)),
                    }
                } else if is_temporary(&source) {
                    Error::Unavailable {
                        message: format!("etcd {operation} failed"),
                        source: Some(readable(source)),
                    }
                } else {
                    let temporary = is_temporary(&source);
                    Error::Backend {
                        backend: "etcd",
                        temporary,
                        source: Box::new(EtcdError::Client { operation, source }),
                    }
                }
            }
            e @ EtcdError::Protocol { .. } => Error::Backend {
                backend: "etcd",
                temporary: true,
                source: Box::new(e),
            },
        }
    }
}

/// Runs an etcd call with a deadline, mapping its error.
pub(crate) async fn timed<T, F>(
    after: Duration,
    operation: &'static str,
    fut: F,
) -> Result<T, Error>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(EtcdError::client(operation, e).into()),
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}

/// Whether the call never reached a server (a dead member among several endpoints):
/// safe to send again, and another endpoint may answer.
fn is_connect_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect") || s.message().contains("transport"))
        }
        _ => false,
    }
}

/// [`timed`], sending the call again (at most `attempts` times in all) while it fails
/// without reaching a server: the balanced channel may pick a dead member first.
pub(crate) async fn retried<T, F, Fut>(
    after: Duration,
    attempts: usize,
    operation: &'static str,
    mut call: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut n = 1;
    loop {
        match tokio::time::timeout(after, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if n < attempts && is_connect_error(&e) => {
                tracing::debug!("etcd {operation}: {e}; trying another endpoint");
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(e)) => return Err(EtcdError::client(operation, e).into()),
            Err(_) => return Err(Error::Timeout { operation, after }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses_into_actionable_variants() {
        let auth = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ));
        let e: Error = EtcdError::client("authenticate", auth).into();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        let lease = etcd_client::Error::GRpcStatus(tonic::Status::not_found(
            "etcdserver: requested lease not found",
        ));
        let e: Error = EtcdError::client("put", lease).into();
        assert!(matches!(e, Error::SessionExpired));
        let down = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("down"));
        let e: Error = EtcdError::client("get", down).into();
        assert!(e.is_temporary());
        assert!(std::error::Error::source(&e).is_some(), "source chained");
    }
}
