//! The session: a client's liveness unit in the registry (a ZooKeeper session, an etcd
//! lease, a Consul session or TTL heartbeat), opened on first use and kept alive by one
//! driver loop in core. Registrations bind to it, and later locks and elections.

use std::fmt::{self, Debug};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};

use crate::error::{Error, Result};

use super::options::BackoffOptions;

/// The registry primitives of a session. Core's driver calls them; a backend implements
/// nothing else of the session's life. Cheap to clone (a client behind an `Arc`): the
/// last clone of a [`Session`] closes it from a background task.
#[async_trait]
pub trait SessionDriver: Clone + Debug + Send + Sync + 'static {
    /// The registry's handle of one session: a lease id, a session id and its client.
    /// Two handles are equal only if they name the same session.
    type Handle: Clone + Debug + PartialEq + Send + Sync + 'static;

    /// Opens a new session (grants a lease, creates a session, connects a client).
    async fn open(&self) -> Result<Self::Handle>;

    /// One keep-alive round trip. `Err(Error::SessionExpired)`: the registry no longer
    /// knows the session, and every entry bound to it is gone. Any other error: the
    /// registry could not be reached; the session may still be alive.
    async fn keep_alive(&self, handle: &Self::Handle) -> Result<()>;

    /// Closes the session; the registry releases every entry bound to it at once.
    async fn close(&self, handle: &Self::Handle) -> Result<()>;

    /// How long between two keep-alives while healthy (a third of a lease's TTL, say).
    fn interval(&self) -> Duration;

    /// How long after last hearing from the client the registry may drop the session (a
    /// lease's TTL, a ZooKeeper session timeout, a Consul session TTL). Locks and
    /// leaderships count a holder as lost locally once this much time passed since the
    /// last keep-alive the registry confirmed (see [`Session::confirmed_until`]). `None`:
    /// unknown, no local deadline.
    fn bound(&self) -> Option<Duration> {
        None
    }

    /// **Test hooks.** The process "crashed" ([`Session::crash`]): stop whatever keeps
    /// `handle` alive by itself (a client library's own pings) without closing it, so the
    /// registry expires it by its timeout. Nothing by default.
    fn abandon(&self, handle: &Self::Handle) {
        let _ = handle;
    }
}

/// Where a session stands, as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionState<H> {
    /// No session was opened yet: nothing was asked of it.
    Idle,
    /// The session is alive and its last keep-alive was answered.
    Live(H),
    /// The registry does not answer; the session may still be alive there.
    Suspended(H),
    /// The registry lost the session (and everything bound to it); a new one is being
    /// opened.
    Expired,
    /// The client closed the session (or crashed, in tests). Final.
    Closed,
}

impl<H: Clone> SessionState<H> {
    /// The session's handle, if one is open (live or suspended).
    pub fn handle(&self) -> Option<H> {
        match self {
            SessionState::Live(h) | SessionState::Suspended(h) => Some(h.clone()),
            _ => None,
        }
    }
}

struct Inner<D: SessionDriver> {
    driver: D,
    state: watch::Sender<SessionState<D::Handle>>,
    /// Serializes opening a session.
    opening: tokio::sync::Mutex<()>,
    kick: Arc<Notify>,
    task_started: AtomicBool,
    crashed: AtomicBool,
    backoff: BackoffOptions,
    /// When the last keep-alive (or the open) the registry answered was *sent*: the
    /// registry heard from the client at or after this instant.
    confirmed: watch::Sender<Option<tokio::time::Instant>>,
}

impl<D: SessionDriver> Inner<D> {
    fn confirm(&self, sent: tokio::time::Instant) {
        self.confirmed.send_if_modified(|c| {
            if c.is_none_or(|at| at < sent) {
                *c = Some(sent);
                true
            } else {
                false
            }
        });
    }
}

/// A client's session in the registry; cheap to clone (clones share it).
///
/// Opened lazily by [`Session::current`], kept alive by a background driver loop for as
/// long as any clone lives, with jittered backoff between failed keep-alives. When the
/// registry loses it, the driver opens a new one at once; [`Session::state`] shows every
/// step. Dropping the last clone closes it in the background.
pub struct Session<D: SessionDriver> {
    inner: Arc<Inner<D>>,
}

impl<D: SessionDriver> Clone for Session<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D: SessionDriver> Debug for Session<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("driver", &self.inner.driver)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl<D: SessionDriver> Session<D> {
    /// A session over `driver`; nothing is opened until [`Session::current`].
    pub fn new(driver: D, backoff: BackoffOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                driver,
                state: watch::Sender::new(SessionState::Idle),
                opening: tokio::sync::Mutex::new(()),
                kick: Arc::new(Notify::new()),
                task_started: AtomicBool::new(false),
                crashed: AtomicBool::new(false),
                backoff,
                confirmed: watch::channel(None).0,
            }),
        }
    }

    /// The backend's driver.
    pub fn driver(&self) -> &D {
        &self.inner.driver
    }

    /// The backoff bounds this session (and what binds to it) retries with.
    pub fn backoff(&self) -> &BackoffOptions {
        &self.inner.backoff
    }

    /// The session's state, to follow.
    pub fn state(&self) -> watch::Receiver<SessionState<D::Handle>> {
        self.inner.state.subscribe()
    }

    /// The state now.
    pub fn current_state(&self) -> SessionState<D::Handle> {
        self.inner.state.borrow().clone()
    }

    /// `Err(Error::Closed)` once the session was closed or crashed.
    pub fn check_open(&self) -> Result<()> {
        if self.inner.crashed.load(Ordering::Acquire) {
            Err(Error::Closed {
                what: "client (crashed by a test hook)",
            })
        } else if *self.inner.state.borrow() == SessionState::Closed {
            Err(Error::Closed {
                what: "client (shut down)",
            })
        } else {
            Ok(())
        }
    }

    /// Whether the session was closed or crashed.
    pub fn is_closed(&self) -> bool {
        self.check_open().is_err()
    }

    /// Until when the open session is certainly alive in the registry, as far as this
    /// client can tell without asking: the instant the last confirmed keep-alive was sent,
    /// plus [`SessionDriver::bound`] less a tenth (the margin for the registry's clock
    /// running faster than ours, and for its own timer granularity). `None` without a
    /// bound or before the first open.
    ///
    /// The clock assumption: the local monotonic clock and the registry's run at rates
    /// within 10% of each other over one bound.
    pub fn confirmed_until(&self) -> Option<tokio::time::Instant> {
        let bound = self.inner.driver.bound()?;
        let sent = (*self.inner.confirmed.borrow())?;
        Some(sent + bound - bound / 10)
    }

    /// Waits until `handle` is confirmed alive now: [`Session::confirmed_until`] lies
    /// ahead (at once without a bound), asking for a keep-alive at once if it does not.
    /// `false` once `handle` is no longer the open session (it expired, the client
    /// closed): whatever was bound to it is gone or going.
    ///
    /// A registry can answer a read about an entry bound to a session it is about to
    /// expire (etcd revokes an overdue lease on its own timer, after a pause of the
    /// server); what is handed out as held waits for this.
    pub async fn confirmed(&self, handle: &D::Handle) -> bool {
        let mut confirmations = self.inner.confirmed.subscribe();
        let mut states = self.state();
        loop {
            if states.borrow_and_update().handle().as_ref() != Some(handle) || self.is_closed() {
                return false;
            }
            confirmations.borrow_and_update();
            if self
                .confirmed_until()
                .is_none_or(|at| at > tokio::time::Instant::now())
            {
                return true;
            }
            self.inner.kick.notify_one();
            tokio::select! {
                r = confirmations.changed() => if r.is_err() { return false },
                r = states.changed() => if r.is_err() { return false },
            }
        }
    }

    /// The open session's handle, opening one if there is none (the first call starts
    /// the keep-alive loop).
    pub async fn current(&self) -> Result<D::Handle> {
        self.check_open()?;
        self.ensure_task();
        if let Some(h) = self.inner.state.borrow().handle() {
            return Ok(h);
        }
        let _opening = self.inner.opening.lock().await;
        self.check_open()?;
        if let Some(h) = self.inner.state.borrow().handle() {
            return Ok(h);
        }
        let sent = tokio::time::Instant::now();
        let h = crate::metrics::timed("open", self.inner.driver.open()).await?;
        self.inner.confirm(sent);
        tracing::debug!(session = ?h, "session opened");
        self.inner.state.send_replace(SessionState::Live(h.clone()));
        self.inner.kick.notify_one();
        Ok(h)
    }

    /// An operation learnt that the registry lost `handle`: the driver opens a new
    /// session at once. A later handle is left alone.
    pub fn expired(&self, handle: &D::Handle) {
        let changed = self.inner.state.send_if_modified(|s| match s.handle() {
            Some(h) if h == *handle => {
                *s = SessionState::Expired;
                true
            }
            _ => false,
        });
        if changed {
            crate::metrics::session_expired();
            tracing::warn!(session = ?handle, "session expired");
            self.inner.kick.notify_one();
        }
    }

    /// Closes the session: the registry releases everything bound to it. Final.
    pub async fn close(&self) -> Result<()> {
        let old = self.inner.state.send_replace(SessionState::Closed);
        self.inner.kick.notify_one();
        if self.inner.crashed.load(Ordering::Acquire) {
            return Ok(());
        }
        match old.handle() {
            Some(h) => self.inner.driver.close(&h).await,
            None => Ok(()),
        }
    }

    /// **Test hook.** The process "crashes": keep-alives stop, nothing is closed, every
    /// later call fails with [`Error::Closed`]. The registry drops the session when its
    /// timeout runs out, as for a killed process.
    pub fn crash(&self) {
        self.inner.crashed.store(true, Ordering::Release);
        if let Some(h) = self.inner.state.borrow().handle() {
            self.inner.driver.abandon(&h);
        }
        self.inner.kick.notify_one();
    }

    fn ensure_task(&self) {
        super::spawn_once(&self.inner.task_started, || {
            drive(
                Arc::downgrade(&self.inner),
                self.inner.kick.clone(),
                self.inner.backoff.backoff(),
            )
        });
    }
}

/// The keep-alive loop: holds the session only weakly, so dropping the last clone ends it.
async fn drive<D: SessionDriver>(
    weak: Weak<Inner<D>>,
    kick: Arc<Notify>,
    mut backoff: crate::Backoff,
) {
    loop {
        let delay = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.crashed.load(Ordering::Acquire) {
                return;
            }
            let state = inner.state.borrow().clone();
            match state {
                SessionState::Closed => return,
                SessionState::Idle => None,
                SessionState::Live(h) | SessionState::Suspended(h) => {
                    let sent = tokio::time::Instant::now();
                    match crate::metrics::timed("keep_alive", inner.driver.keep_alive(&h)).await {
                        Ok(()) => {
                            inner.confirm(sent);
                            backoff.reset();
                            inner.state.send_if_modified(|s| match s {
                                SessionState::Suspended(x) if *x == h => {
                                    *s = SessionState::Live(h.clone());
                                    true
                                }
                                _ => false,
                            });
                            Some(inner.driver.interval())
                        }
                        Err(Error::SessionExpired) => {
                            inner.state.send_if_modified(|s| match s.handle() {
                                Some(x) if x == h => {
                                    crate::metrics::session_expired();
                                    tracing::warn!(session = ?h, "session expired");
                                    *s = SessionState::Expired;
                                    true
                                }
                                _ => false,
                            });
                            Some(Duration::ZERO)
                        }
                        Err(e) => {
                            inner.state.send_if_modified(|s| match s {
                                SessionState::Live(x) if *x == h => {
                                    tracing::info!(session = ?h, "session suspended: {e}");
                                    *s = SessionState::Suspended(h.clone());
                                    true
                                }
                                _ => false,
                            });
                            Some(backoff.next_delay())
                        }
                    }
                }
                SessionState::Expired => {
                    let _opening = inner.opening.lock().await;
                    if *inner.state.borrow() != SessionState::Expired {
                        continue;
                    }
                    let sent = tokio::time::Instant::now();
                    match crate::metrics::timed("open", inner.driver.open()).await {
                        Ok(h) => {
                            inner.confirm(sent);
                            tracing::info!(session = ?h, "new session opened");
                            backoff.reset();
                            inner.state.send_if_modified(|s| {
                                if *s == SessionState::Expired {
                                    *s = SessionState::Live(h.clone());
                                    true
                                } else {
                                    false
                                }
                            });
                            Some(inner.driver.interval())
                        }
                        Err(e) => {
                            let d = backoff.next_delay();
                            tracing::debug!(retry_in = ?d, "opening a session failed: {e}");
                            Some(d)
                        }
                    }
                }
            }
        };
        match delay {
            Some(d) if d.is_zero() => {}
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = kick.notified() => {}
                }
            }
            None => kick.notified().await,
        }
    }
}

impl<D: SessionDriver> Drop for Inner<D> {
    fn drop(&mut self) {
        if self.crashed.load(Ordering::Acquire) {
            return;
        }
        let Some(h) = self.state.borrow().handle() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let driver = self.driver.clone();
        rt.spawn(async move {
            if let Err(e) = driver.close(&h).await {
                tracing::debug!(session = ?h, "session not closed on drop (it runs out by its timeout): {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests;
