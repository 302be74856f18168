//! The shared state of one [`ZkDiscovery`](crate::ZkDiscovery): the current ZooKeeper
//! client (replaced after a session expiry), the live registrations, and the session task
//! that keeps them in place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use waypost_core::{Backoff, Error, Instance, InstanceId, RegistrationStatus, Result, ServiceName};
use zookeeper_client::{Acl, AuthId, Client, Permission, SessionState};

use crate::config::ZkConfig;
use crate::error::ZkError;
use crate::nodes;

pub(crate) type Key = (ServiceName, InstanceId);

/// One ZooKeeper session: a client and the generation that tells sessions apart.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(crate) generation: u64,
}

impl Conn {
    pub(crate) fn session_id(&self) -> i64 {
        self.client.session_id().0
    }
}

/// Where a registration's node is, and which session created it.
#[derive(Clone, Debug)]
pub(crate) struct NodeRef {
    pub(crate) path: String,
    pub(crate) session: i64,
}

#[derive(Debug)]
pub(crate) struct RegEntry {
    pub(crate) instance: Instance,
    pub(crate) status: watch::Sender<RegistrationStatus>,
    /// `None` while the node has to be (re-)created.
    pub(crate) node: Option<NodeRef>,
    /// The guid of the protected (sequential) layout.
    pub(crate) guid: String,
    /// `register()` is writing the first node: the session task leaves it alone.
    pub(crate) writing: bool,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) regs: HashMap<Key, RegEntry>,
    /// Deletions the server has not confirmed (connection lost): (path, session).
    pub(crate) pending_deletes: Vec<NodeRef>,
    /// Sessions this client had before; their nodes may be deleted and re-created.
    pub(crate) past_sessions: Vec<i64>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ZkConfig,
    /// The ACL of instance nodes and of service nodes.
    pub(crate) node_acls: Vec<Acl>,
    pub(crate) parent_acls: Vec<Acl>,
    pub(crate) conn: watch::Sender<Option<Arc<Conn>>>,
    pub(crate) state: Mutex<State>,
    pub(crate) kick: Arc<Notify>,
    pub(crate) crashed: AtomicBool,
    /// Watch with child and data watches even where persistent watches exist.
    pub(crate) child_watches: AtomicBool,
}

pub(crate) fn set_status(tx: &watch::Sender<RegistrationStatus>, s: RegistrationStatus) {
    tx.send_if_modified(|cur| {
        if *cur == s || *cur == RegistrationStatus::Deregistered {
            false
        } else {
            *cur = s;
            true
        }
    });
}

/// Opens a new session (a detached client: dropping it does not close the session, so
/// a "crash" can be simulated; a clean shutdown closes it explicitly).
pub(crate) async fn open_client(config: &ZkConfig) -> Result<Client> {
    let mut c = Client::connector()
        .with_session_timeout(config.session_timeout)
        .with_readonly(config.readonly)
        .with_detached()
        .with_fail_eagerly();
    if let (Some(u), Some(p)) = (&config.username, &config.password) {
        c = c.with_auth("digest", format!("{u}:{p}").as_bytes());
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
/// itself is detached). Best effort.
pub(crate) async fn close_session(config: &ZkConfig, client: Client) {
    let info = client.session().clone();
    drop(client);
    let c = Client::connector()
        .with_session(info)
        .with_session_timeout(config.session_timeout);
    if let Ok(Ok(closer)) =
        tokio::time::timeout(config.connect_timeout, c.connect(&config.connect_string())).await
    {
        drop(closer);
    }
}

impl Inner {
    pub(crate) fn new(config: ZkConfig, client: Client) -> Arc<Self> {
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
        let (tx, _) = watch::channel(Some(Arc::new(Conn {
            client,
            generation: 0,
        })));
        Arc::new(Self {
            config,
            node_acls,
            parent_acls,
            conn: tx,
            state: Mutex::new(State::default()),
            kick: Arc::new(Notify::new()),
            crashed: AtomicBool::new(false),
            child_watches: AtomicBool::new(false),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_crashed(&self) -> bool {
        self.crashed.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> Result<Arc<Conn>> {
        self.conn.borrow().clone().ok_or(Error::Closed {
            what: "zookeeper client",
        })
    }

    /// The current session, waiting (up to the connect timeout) for a new one when the
    /// current one has expired.
    pub(crate) async fn live_conn(&self) -> Result<Arc<Conn>> {
        let conn = self.current()?;
        if !conn.client.state().is_terminated() {
            return Ok(conn);
        }
        self.kick.notify_one();
        let gen = conn.generation;
        let mut rx = self.conn.subscribe();
        let wait = async {
            rx.wait_for(|c| c.as_ref().map_or(true, |c| c.generation > gen))
                .await
                .map(|c| c.clone())
        };
        let waited = tokio::time::timeout(self.config.connect_timeout, wait).await;
        match waited {
            Ok(Ok(c)) => c.ok_or(Error::Closed {
                what: "zookeeper client",
            }),
            Ok(Err(_)) => Err(Error::Closed {
                what: "zookeeper client",
            }),
            Err(_) => Err(Error::SessionExpired),
        }
    }

    pub(crate) fn service_path(&self, service: &ServiceName) -> String {
        format!("{}/{}", self.config.root, service)
    }

    /// Puts back every registration whose node is missing; finishes pending deletes.
    /// `Ok(true)` when everything is in place.
    async fn sync(&self, conn: &Conn) -> Result<bool> {
        let sid = conn.session_id();
        let (todo, deletes) = {
            let mut st = self.lock();
            let deletes = std::mem::take(&mut st.pending_deletes);
            let todo: Vec<(Key, Instance, String)> = st
                .regs
                .iter()
                .filter(|(_, r)| !r.writing && r.node.as_ref().map_or(true, |n| n.session != sid))
                .map(|(k, r)| (k.clone(), r.instance.clone(), r.guid.clone()))
                .collect();
            for (k, _, _) in &todo {
                if let Some(r) = st.regs.get(k) {
                    set_status(&r.status, RegistrationStatus::Reregistering);
                }
            }
            (todo, deletes)
        };
        let mut done = true;
        for d in deletes {
            if d.session != sid {
                continue; // its session is gone, and the node with it
            }
            match conn.client.delete(&d.path, None).await {
                Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
                Err(zookeeper_client::Error::SessionExpired) => {}
                Err(e) => {
                    tracing::debug!(path = %d.path, "zookeeper: pending delete failed: {e}");
                    self.lock().pending_deletes.push(d);
                    done = false;
                }
            }
        }
        for (key, instance, guid) in todo {
            match nodes::put(self, &conn.client, &instance, &guid).await {
                Ok(path) => {
                    let node = NodeRef { path, session: sid };
                    let mut st = self.lock();
                    match st.regs.get_mut(&key) {
                        Some(r) if r.instance == instance => {
                            r.node = Some(node);
                            set_status(&r.status, RegistrationStatus::Registered);
                            tracing::info!(service = %key.0, id = %key.1, "zookeeper: registered again");
                        }
                        Some(r) => {
                            // Updated meanwhile: write it again on the next round.
                            r.node = Some(NodeRef {
                                path: node.path,
                                session: -1,
                            });
                            done = false;
                        }
                        None => st.pending_deletes.push(node),
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %key.0, id = %key.1, "zookeeper: cannot register again yet: {e}");
                    done = false;
                    if matches!(e, Error::SessionExpired) {
                        return Err(e);
                    }
                }
            }
        }
        if !self.lock().pending_deletes.is_empty() {
            done = false;
        }
        Ok(done)
    }

    fn set_all(&self, from: &[RegistrationStatus], to: RegistrationStatus) {
        let st = self.lock();
        for r in st.regs.values() {
            if from.contains(&r.status.borrow()) {
                set_status(&r.status, to);
            }
        }
    }

    /// Back from a disconnect within the session: what is in place is registered.
    fn resume_registered(&self, sid: i64) {
        let st = self.lock();
        for r in st.regs.values() {
            let in_place = r.node.as_ref().is_some_and(|n| n.session == sid);
            if in_place && *r.status.borrow() == RegistrationStatus::Suspended {
                set_status(&r.status, RegistrationStatus::Registered);
            }
        }
    }

    /// After an expiry: forget the nodes (they went with the session) and open a new one.
    async fn replace_session(&self, old: &Conn) -> Result<Arc<Conn>> {
        {
            let mut st = self.lock();
            st.past_sessions.push(old.session_id());
            for r in st.regs.values_mut() {
                r.node = None;
                set_status(&r.status, RegistrationStatus::Reregistering);
            }
        }
        let client = open_client(&self.config).await?;
        let conn = Arc::new(Conn {
            client,
            generation: old.generation + 1,
        });
        tracing::info!(
            session = %conn.client.session_id(),
            "zookeeper: session expired, opened a new one"
        );
        if self.is_crashed() {
            return Err(Error::Closed {
                what: "zookeeper client",
            });
        }
        self.conn.send_replace(Some(conn.clone()));
        Ok(conn)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.is_crashed() {
            return;
        }
        let Some(conn) = self.conn.send_replace(None) else {
            return;
        };
        self.kick.notify_one();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let config = self.config.clone();
        rt.spawn(async move {
            // The session task lets go of its clone as soon as it sees the kick.
            let mut conn = conn;
            for _ in 0..50 {
                match Arc::try_unwrap(conn) {
                    Ok(conn) => {
                        if !conn.client.state().is_terminated() {
                            close_session(&config, conn.client).await;
                        }
                        return;
                    }
                    Err(c) => conn = c,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::debug!("zookeeper: session still in use at shutdown; it will time out");
        });
    }
}

/// Keeps registrations in place for as long as `inner` lives: suspends them on
/// disconnect, and after a session expiry opens a new session and registers everything
/// again, with jittered backoff and no cap on attempts.
pub(crate) async fn session_task(weak: Weak<Inner>, kick: Arc<Notify>) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_crashed() {
            return;
        }
        let Ok(conn) = inner.current() else { return };
        let mut states = conn.client.state_watcher();
        let mut retry = None;
        match conn.client.state() {
            SessionState::Expired | SessionState::Closed => {
                match inner.replace_session(&conn).await {
                    Ok(_) => backoff.reset(),
                    Err(e) => {
                        tracing::warn!("zookeeper: cannot open a new session yet: {e}");
                        retry = Some(backoff.next_delay());
                    }
                }
                if retry.is_none() {
                    continue;
                }
            }
            SessionState::AuthFailed => {
                tracing::error!("zookeeper: authentication failed; registrations stay suspended");
                inner.set_all(
                    &[RegistrationStatus::Registered],
                    RegistrationStatus::Suspended,
                );
                return;
            }
            SessionState::Disconnected => inner.set_all(
                &[RegistrationStatus::Registered],
                RegistrationStatus::Suspended,
            ),
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                inner.resume_registered(conn.session_id());
                match inner.sync(&conn).await {
                    Ok(true) => backoff.reset(),
                    Ok(false) | Err(_) => retry = Some(backoff.next_delay()),
                }
            }
        }
        drop(inner);
        let sleep = async {
            match retry {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = states.changed() => {}
            _ = kick.notified() => {}
            _ = sleep => {}
        }
    }
}
