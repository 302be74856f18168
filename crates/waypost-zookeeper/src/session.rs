//! The session primitives: one ZooKeeper session is one client connection. Core's
//! [`Session`](waypost_core::backend::Session) opens it, follows its state, opens a new one
//! after expiry and closes it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::backend::SessionDriver;
use waypost_core::{Error, Result};
use zookeeper_client::{Client, SessionState};

use crate::client::{self, Ctx};

/// One ZooKeeper session: its client, until the session is closed or the process
/// "crashes" (test hook).
struct Conn {
    client: Mutex<Option<Client>>,
    id: i64,
    /// Tells the sessions of one driver apart.
    generation: u64,
}

/// The handle of one session (cheap to clone); equal only to handles of the same session.
#[derive(Clone)]
pub(crate) struct ZkSession(Arc<Conn>);

impl PartialEq for ZkSession {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for ZkSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZkSession({:#x}, #{})", self.0.id, self.0.generation)
    }
}

impl ZkSession {
    /// The session id, the `ephemeralOwner` of its nodes.
    pub(crate) fn id(&self) -> i64 {
        self.0.id
    }

    /// How many sessions the client opened before this one.
    pub(crate) fn generation(&self) -> u64 {
        self.0.generation
    }

    /// The session's client; `Closed` once the session was closed (or crashed).
    pub(crate) fn client(&self) -> Result<Client> {
        self.0
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed {
                what: "zookeeper session",
            })
    }

    /// Lets go of the client: its connection ends once no request is in flight, without
    /// closing the session (the client is detached).
    pub(crate) fn take_client(&self) -> Option<Client> {
        self.0
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Opens, checks and closes sessions.
#[derive(Clone)]
pub(crate) struct Driver {
    ctx: Arc<Ctx>,
    opened: Arc<AtomicU64>,
    /// The session timeout the server granted the last session opened, in milliseconds
    /// (the configured one before the first).
    negotiated: Arc<AtomicU64>,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkDriver")
            .field("endpoints", &self.ctx.config.endpoints)
            .field("session_timeout", &self.ctx.config.session_timeout)
            .finish()
    }
}

impl Driver {
    fn bound_now(&self) -> Duration {
        Duration::from_millis(self.negotiated.load(Ordering::Acquire))
    }

    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let asked = ctx.config.session_timeout.as_millis() as u64;
        Self {
            ctx,
            opened: Arc::new(AtomicU64::new(0)),
            negotiated: Arc::new(AtomicU64::new(asked)),
        }
    }
}

#[async_trait]
impl SessionDriver for Driver {
    type Handle = ZkSession;

    async fn open(&self) -> Result<ZkSession> {
        let client = client::open(&self.ctx.config).await?;
        let id = client.session_id().0;
        self.negotiated.store(
            client.session_timeout().as_millis() as u64,
            Ordering::Release,
        );
        self.ctx
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
        Ok(ZkSession(Arc::new(Conn {
            client: Mutex::new(Some(client)),
            id,
            generation: self.opened.fetch_add(1, Ordering::AcqRel),
        })))
    }

    /// One real round trip (`exists /`), bounded by the request timeout: only an answer of
    /// the server confirms the session (the client's own state lags behind a paused server
    /// by up to two thirds of the timeout). A disconnected client gets up to one interval
    /// to reconnect first.
    async fn keep_alive(&self, session: &ZkSession) -> Result<()> {
        let client = session.client().map_err(|_| Error::SessionExpired)?;
        let mut states = client.state_watcher();
        let mut state = states.state();
        if state == SessionState::Disconnected {
            if let Ok(s) = tokio::time::timeout(self.interval(), states.changed()).await {
                state = s;
            }
        }
        match state {
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => {}
            SessionState::Disconnected => {
                return Err(Error::unavailable(
                    "lost the connection to ZooKeeper (the client is reconnecting)",
                ))
            }
            SessionState::Expired | SessionState::Closed => return Err(Error::SessionExpired),
            SessionState::AuthFailed => {
                return Err(Error::Unauthorized {
                    message: "ZooKeeper authentication failed".into(),
                    source: None,
                })
            }
        }
        let ctx = &self.ctx;
        let limit = ctx.config.request_timeout.min(self.bound_now());
        ctx.call(
            tokio::time::Instant::now() + limit,
            "zookeeper keep-alive (exists)",
            "/",
            client.check_stat("/"),
        )
        .await
        .map(drop)
        .map_err(|f| match ctx.error(f) {
            Error::Timeout { .. } => Error::unavailable(format!(
                "ZooKeeper did not answer a keep-alive within {limit:?}"
            )),
            e => e,
        })
    }

    async fn close(&self, session: &ZkSession) -> Result<()> {
        if let Some(client) = session.take_client() {
            if !client.state().is_terminated() {
                client::close(&self.ctx.config, client).await;
            }
        }
        Ok(())
    }

    fn interval(&self) -> Duration {
        (self.ctx.config.session_timeout / 4).min(Duration::from_secs(1))
    }

    /// The negotiated session timeout: the server expires a session no earlier than this
    /// long after it last heard from the client (it rounds expiries up to its tick).
    fn bound(&self) -> Option<Duration> {
        Some(self.bound_now())
    }

    /// A crashed process: the client is dropped without closing its session (the library
    /// would keep pinging it), so the server expires it by its timeout.
    fn abandon(&self, handle: &Self::Handle) {
        drop(handle.take_client());
    }
}
