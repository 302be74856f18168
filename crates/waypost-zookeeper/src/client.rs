//! Talking to ZooKeeper: what the session, the store and the feeds of one
//! [`ZkDiscovery`](crate::ZkDiscovery) share (configuration, ACLs, the sessions it
//! opened), connecting and closing a client, and requests bounded by the request timeout.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use tokio::time::Instant;
use waypost_core::{Error, Result, ServiceName};
use zookeeper_client::{Acl, Acls, AuthId, Client, CreateMode, Error as ZkErr, Permission};

use crate::config::ZkConfig;
use crate::error::ZkError;

/// What every part of one client shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: ZkConfig,
    /// The ACL of instance nodes.
    pub(crate) node_acls: Vec<Acl>,
    /// The ACL of service nodes.
    pub(crate) parent_acls: Vec<Acl>,
    /// Every session this client opened: a node of an earlier one is a leftover of ours
    /// (its session is gone or going), replaced rather than reported as someone else's.
    pub(crate) sessions: Mutex<Vec<i64>>,
    /// New watches use child and data watches even where persistent watches exist.
    pub(crate) child_watches: AtomicBool,
}

impl Ctx {
    pub(crate) fn new(config: ZkConfig) -> Self {
        let (node_acls, parent_acls) = if config.username.is_some() {
            (
                vec![
                    Acl::new(Permission::READ, AuthId::anyone()),
                    Acl::new(Permission::ALL, AuthId::authed()),
                ],
                vec![
                    Acl::new(Permission::READ | Permission::CREATE, AuthId::anyone()),
                    Acl::new(Permission::ALL, AuthId::authed()),
                ],
            )
        } else {
            let all = vec![Acl::new(Permission::ALL, AuthId::anyone())];
            (all.clone(), all)
        };
        Self {
            config,
            node_acls,
            parent_acls,
            sessions: Mutex::new(Vec::new()),
            child_watches: AtomicBool::new(false),
        }
    }

    pub(crate) fn service_path(&self, service: &ServiceName) -> String {
        format!("{}/{}", self.config.root, service)
    }

    /// Whether `owner` is a session this client opened before `current`.
    pub(crate) fn is_past_session(&self, owner: i64, current: i64) -> bool {
        owner != 0
            && owner != current
            && self
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&owner)
    }

    /// The deadline of an operation started now.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    /// Runs one request, failing with [`ZkError::RequestTimeout`] at `deadline`.
    pub(crate) async fn call<T>(
        &self,
        deadline: Instant,
        operation: &'static str,
        path: &str,
        request: impl Future<Output = std::result::Result<T, ZkErr>>,
    ) -> std::result::Result<T, Failed> {
        match tokio::time::timeout_at(deadline, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failed::Zk(operation, path.to_string(), e)),
            Err(_) => Err(Failed::Timeout(operation, path.to_string())),
        }
    }

    pub(crate) fn error(&self, f: Failed) -> Error {
        match f {
            Failed::Zk(operation, path, source) => ZkError::Client {
                operation,
                path,
                source,
            }
            .into(),
            Failed::Timeout(operation, path) => ZkError::RequestTimeout {
                operation,
                path,
                after: self.config.request_timeout,
            }
            .into(),
        }
    }

    /// Creates the service node `path` and its parents (container nodes where the server
    /// has them, before 3.5.3 persistent ones).
    pub(crate) async fn ensure_parents(
        &self,
        client: &Client,
        path: &str,
        deadline: Instant,
    ) -> std::result::Result<(), Failed> {
        let acls = Acls::new(&self.parent_acls);
        let opts = CreateMode::Container.with_acls(acls);
        match self
            .call(deadline, "zookeeper mkdir", path, client.mkdir(path, &opts))
            .await
        {
            Err(Failed::Zk(_, _, ZkErr::Unimplemented)) => {
                let opts = CreateMode::Persistent.with_acls(acls);
                self.call(deadline, "zookeeper mkdir", path, client.mkdir(path, &opts))
                    .await
            }
            r => r,
        }
    }
}

/// A request that failed, before it becomes an [`Error`] (see [`Ctx::error`]).
#[derive(Debug)]
pub(crate) enum Failed {
    /// The client or the server said no.
    Zk(&'static str, String, ZkErr),
    /// No answer before the deadline.
    Timeout(&'static str, String),
}

impl Failed {
    /// The server's answer, if there was one.
    pub(crate) fn code(&self) -> Option<&ZkErr> {
        match self {
            Failed::Zk(_, _, e) => Some(e),
            Failed::Timeout(..) => None,
        }
    }
}

/// Waits until `client` is connected, at most until `deadline`. A session that ended is
/// `SessionExpired`.
pub(crate) async fn connected(client: &Client, deadline: Instant) -> Result<()> {
    use zookeeper_client::SessionState as S;
    let mut states = client.state_watcher();
    loop {
        match states.state() {
            S::SyncConnected | S::ConnectedReadOnly => return Ok(()),
            S::Expired | S::Closed => return Err(Error::SessionExpired),
            S::AuthFailed => {
                return Err(Error::Unauthorized {
                    message: "ZooKeeper authentication failed".into(),
                    source: None,
                })
            }
            S::Disconnected => {}
        }
        if tokio::time::timeout_at(deadline, states.changed())
            .await
            .is_err()
        {
            return Err(Error::unavailable(
                "not connected to ZooKeeper (the client is reconnecting)",
            ));
        }
    }
}

/// Opens a new session (a detached client: dropping it does not close the session, so a
/// crash can be simulated; a clean shutdown closes it explicitly).
pub(crate) async fn open(config: &ZkConfig) -> Result<Client> {
    let mut c = Client::connector()
        .with_session_timeout(config.session_timeout)
        .with_readonly(config.readonly)
        .with_detached()
        .with_fail_eagerly();
    if let (Some(u), Some(p)) = (&config.username, &config.password) {
        c = c.with_auth("digest", format!("{u}:{}", p.expose()).as_bytes());
    }
    let hosts = config.connect_string();
    match tokio::time::timeout(config.connect_timeout, c.connect(&hosts)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(ZkError::Connect { hosts, source }.into()),
        Err(_) => Err(ZkError::ConnectTimeout {
            hosts,
            after: config.connect_timeout,
        }
        .into()),
    }
}

/// Closes the session of `client` from a second, non-detached connection (the client
/// itself is detached and dropped first). Best effort.
pub(crate) async fn close(config: &ZkConfig, client: Client) {
    let info = client.session().clone();
    drop(client);
    let c = Client::connector()
        .with_session(info)
        .with_session_timeout(config.session_timeout);
    if let Ok(Ok(closer)) =
        tokio::time::timeout(config.connect_timeout, c.connect(&config.connect_string())).await
    {
        // Dropping the last handle only asks the client's task to send CloseSession: wait
        // (bounded) until it has, so a process exiting right after `shutdown()` leaves no
        // session (and no lock contender) behind until the session timeout.
        let mut state = closer.state_watcher();
        drop(closer);
        let _ = tokio::time::timeout(config.request_timeout, async {
            while !state.changed().await.is_terminated() {}
        })
        .await;
    }
}

/// **Test hook.** Takes the session of `client` over from a second, detached connection
/// and lets it go: the server drops `client`'s connection, as a network fault would, and
/// `client` reconnects by itself.
#[cfg(feature = "test-hooks")]
pub(crate) async fn steal_connection(config: &ZkConfig, client: &Client) {
    let c = Client::connector()
        .with_session(client.session().clone())
        .with_session_timeout(config.session_timeout)
        .with_detached();
    let _ = tokio::time::timeout(config.connect_timeout, c.connect(&config.connect_string())).await;
}
