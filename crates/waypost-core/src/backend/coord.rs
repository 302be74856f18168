//! Coordination: one implementation of the [`Coordinator`] contract over a backend's
//! contender-queue primitives ([`CoordDriver`]).
//!
//! Core owns what must be the same everywhere: queueing again after a session expiry,
//! time limits, `try_lock`, cleaning up after a dropped acquisition or an enqueue whose
//! reply was lost, one local contender per name per client, the hold task (lost signal
//! from the session's state, its confirmed deadline and the entry's own watch; release
//! until the registry confirms), and leader watches on the shared watch machine. A
//! backend supplies single round trips over its registry's entries.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::FutureExt;
use tokio::sync::{mpsc, watch, OwnedMutexGuard};
use tokio::time::Instant;

use super::options::BackoffOptions;
use super::session::{Session, SessionDriver, SessionState};
use super::watch::{self as machine, Feed, WatchHub};
use crate::coord::{
    Command, Coordinator, FencingToken, Hold, Leader, LeaderEvent, Leadership, LockGuard, Lost,
    Name, Wait,
};
use crate::error::{Error, Result};

/// What a contender contends for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A lock (`permits == 1`) or a counting semaphore: the first `permits` contenders of
    /// the queue hold.
    Lock {
        /// How many may hold at once.
        permits: u32,
    },
    /// An election: the first contender leads.
    Election,
}

/// One contender, as core hands it to [`CoordDriver::enqueue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contender {
    /// The lock or election.
    pub name: Name,
    /// What it contends for.
    pub kind: Kind,
    /// Unique per acquisition attempt (a UUID): what finds the entry again after an
    /// enqueue whose reply was lost (Curator's protected `_c_{uuid}` prefix).
    pub id: String,
    /// What its entry holds (the candidate's value of an election; empty for a lock).
    pub value: Vec<u8>,
}

/// Where a contender stands in its queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position<W> {
    /// It holds, with this token.
    Held(FencingToken),
    /// It waits, on what `W` names (its predecessor's entry, the key's index).
    Waiting(W),
    /// Its entry no longer exists (its session expired, someone deleted it).
    Gone,
}

/// A registry's coordination primitives, each one round trip (or one blocking wait).
///
/// Entries are bound to the client's session ([`SessionDriver::Handle`]), so that the
/// registry drops them with it. Errors: temporary ones (the registry did not answer) are
/// retried by core; an `enqueue` whose reply was lost is called again with `retry: true`.
#[async_trait]
pub trait CoordDriver: fmt::Debug + Send + Sync + 'static {
    /// The session's handle, as the [`SessionDriver`] hands it out.
    type Handle: Clone + fmt::Debug + PartialEq + Send + Sync + 'static;
    /// One enqueued contender: what finds its entry (a node path, a key and revision).
    type Ticket: Clone + fmt::Debug + Send + Sync + 'static;
    /// What a waiting contender waits on.
    type Wait: fmt::Debug + Send + Sync + 'static;
    /// The watch feed of an election's leader (zero or one [`Leader`]).
    type Feed: Feed<Item = Leader>;

    /// The largest value an entry holds, in bytes.
    fn max_value_len(&self) -> usize;

    /// Enters `contender` in the queue of its name, bound to `session`. With `retry`, an
    /// earlier call for the same contender may have been applied (its reply was lost):
    /// find that entry rather than write a second one.
    async fn enqueue(
        &self,
        session: &Self::Handle,
        contender: &Contender,
        retry: bool,
    ) -> Result<Self::Ticket>;

    /// Where `ticket` stands now.
    async fn position(&self, ticket: &Self::Ticket) -> Result<Position<Self::Wait>>;

    /// Returns once what `wait` names changed (the predecessor is gone, the key was
    /// released), or after a while of the driver's choosing: [`CoordDriver::position`] is
    /// asked again. Core also stops waiting when the session changes.
    async fn wait(&self, ticket: &Self::Ticket, wait: &Self::Wait) -> Result<()>;

    /// Returns `Ok` once the held `ticket`'s entry is gone or no longer bound to its
    /// session; an error when the registry cannot be reached (core calls again).
    async fn watch_held(&self, ticket: &Self::Ticket) -> Result<()>;

    /// Removes `ticket`'s entry (releases, resigns, leaves the queue). An entry already
    /// gone is success. Never removes another contender's entry.
    async fn dequeue(&self, ticket: &Self::Ticket) -> Result<()>;

    /// Removes whatever entry `contender` has under `session`, if any: after an enqueue
    /// whose outcome is unknown was given up.
    async fn forget(&self, session: &Self::Handle, contender: &Contender) -> Result<()>;

    /// Writes `value` into the held `ticket`'s entry (an election's proclaim).
    async fn proclaim(&self, ticket: &Self::Ticket, value: &[u8]) -> Result<()>;

    /// The current leader of `election`.
    async fn leader(&self, election: &Name) -> Result<Option<Leader>>;

    /// A feed of `election`'s leader, not yet listed.
    fn leader_feed(&self, election: &Name) -> Self::Feed;
}

/// How [`Coord`] retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoordOptions {
    /// Backoff between retries and of the leader watches.
    pub backoff: BackoffOptions,
    /// How long a release (or an enqueue of `try_lock`) is retried in the foreground while
    /// the registry does not answer, before its error is returned (a release then goes on
    /// in the background). 10 s by default.
    pub retry_for: Duration,
}

impl Default for CoordOptions {
    fn default() -> Self {
        Self {
            backoff: BackoffOptions::default(),
            retry_for: Duration::from_secs(10),
        }
    }
}

/// How long after acquiring a hold starts watching its own entry.
const FIRST_WATCH_DELAY: Duration = Duration::from_millis(100);

type LocalKey = (Name, Kind);
type LocalLocks = Arc<Mutex<HashMap<LocalKey, Weak<tokio::sync::Mutex<()>>>>>;

/// The [`Coordinator`] over a backend's [`CoordDriver`] and the [`Session`] its entries
/// are bound to. Cheap to clone.
pub struct Coord<C, S>
where
    C: CoordDriver<Handle = S::Handle>,
    S: SessionDriver,
{
    driver: Arc<C>,
    session: Session<S>,
    options: CoordOptions,
    hub: WatchHub<Name, Leader>,
    /// One contender per lock or election per client: etcd's keys are one per lease, and
    /// local contenders queue here in order without touching the registry.
    local: LocalLocks,
}

impl<C, S> Clone for Coord<C, S>
where
    C: CoordDriver<Handle = S::Handle>,
    S: SessionDriver,
{
    fn clone(&self) -> Self {
        Self {
            driver: self.driver.clone(),
            session: self.session.clone(),
            options: self.options,
            hub: self.hub.clone(),
            local: self.local.clone(),
        }
    }
}

impl<C, S> fmt::Debug for Coord<C, S>
where
    C: CoordDriver<Handle = S::Handle>,
    S: SessionDriver,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coord")
            .field("driver", &self.driver)
            .field("session", &self.session)
            .finish()
    }
}

/// A contender on its way into the queue. Dropped before it is defused (the caller's
/// future was dropped, a deadline passed, an error), it removes what it may have written,
/// in the background.
struct Pending<C: CoordDriver> {
    driver: Arc<C>,
    state: Option<(C::Handle, Contender, Option<C::Ticket>)>,
}

impl<C: CoordDriver> Pending<C> {
    fn defuse(&mut self) {
        self.state = None;
    }
}

impl<C: CoordDriver> Drop for Pending<C> {
    fn drop(&mut self) {
        let Some((handle, contender, ticket)) = self.state.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let driver = self.driver.clone();
        rt.spawn(async move {
            // The session ending removes it too; a few tries cover a registry blip.
            let mut backoff = BackoffOptions::default().backoff();
            for _ in 0..20 {
                let r = match &ticket {
                    Some(t) => driver.dequeue(t).await,
                    None => driver.forget(&handle, &contender).await,
                };
                match r {
                    Ok(()) => return,
                    Err(e) if e.is_temporary() => {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => {
                        tracing::warn!(name = %contender.name, "an abandoned contender was not removed: {e}");
                        return;
                    }
                }
            }
            tracing::warn!(name = %contender.name, "an abandoned contender was not removed; it goes with its session");
        });
    }
}

/// Why the wait for a position ended.
enum Woken {
    Again,
    SessionChanged,
}

impl<C, S> Coord<C, S>
where
    C: CoordDriver<Handle = S::Handle>,
    S: SessionDriver,
{
    /// Coordination over `driver`, its entries bound to `session`.
    pub fn new(driver: C, session: Session<S>, options: CoordOptions) -> Self {
        Self {
            driver: Arc::new(driver),
            session,
            options,
            hub: WatchHub::new(),
            local: LocalLocks::default(),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &C {
        &self.driver
    }

    /// The session entries are bound to.
    pub fn session(&self) -> &Session<S> {
        &self.session
    }

    fn local_lock(&self, key: LocalKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(m) = map.get(&key).and_then(Weak::upgrade) {
            return m;
        }
        let m = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key, Arc::downgrade(&m));
        m
    }

    /// Contends until held: the whole acquisition, run under the caller's deadline.
    async fn contend(
        &self,
        name: &Name,
        kind: Kind,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<(C::Ticket, C::Handle, FencingToken)> {
        let mut pending = Pending {
            driver: self.driver.clone(),
            state: None,
        };
        let mut backoff = self.options.backoff.backoff();
        loop {
            self.session.check_open()?;
            // A session that cannot be opened now (the registry is unreachable after an
            // expiry) is retried: the acquisition waits, it does not fail.
            let handle = match self.session.current().await {
                Ok(h) => h,
                Err(e) if e.is_temporary() && wait != Wait::No => {
                    tracing::debug!(%name, "no session to contend with yet: {e}");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let contender = Contender {
                name: name.clone(),
                kind,
                id: uuid::Uuid::new_v4().to_string(),
                value: value.clone(),
            };
            pending.state = Some((handle.clone(), contender.clone(), None));
            let Some(ticket) = self.enqueue(&handle, &contender, wait).await? else {
                // The session changed while enqueueing: queue again under the new one.
                drop(std::mem::replace(
                    &mut pending,
                    Pending {
                        driver: self.driver.clone(),
                        state: None,
                    },
                ));
                continue;
            };
            if let Some(s) = pending.state.as_mut() {
                s.2 = Some(ticket.clone());
            }
            // Ask where it stands until it holds, or its session changes.
            loop {
                if self.session.current_state().handle().as_ref() != Some(&handle) {
                    break;
                }
                match crate::metrics::timed("position", self.driver.position(&ticket)).await {
                    Ok(Position::Held(token)) => {
                        backoff.reset();
                        // Held only under a session the registry confirmed since: an
                        // entry read while its session is overdue (the registry paused
                        // past its TTL, not yet swept) would be lost as soon as handed out.
                        if !self.confirmed(&handle, wait).await? {
                            tracing::info!(%name, "first in the queue, but its session ended before the registry confirmed it; queueing again");
                            break;
                        }
                        pending.defuse();
                        return Ok((ticket, handle, token));
                    }
                    Ok(Position::Waiting(w)) => {
                        backoff.reset();
                        if wait == Wait::No {
                            // Leave the queue now; if this fails, `pending` retries.
                            if self.driver.dequeue(&ticket).await.is_ok() {
                                pending.defuse();
                            }
                            return Err(Error::Busy {
                                what: format!("`{name}` is held by another contender"),
                            });
                        }
                        match self.wait_on(&ticket, &w, &handle).await {
                            Ok(Woken::Again) => {}
                            Ok(Woken::SessionChanged) => break,
                            Err(e) if e.is_temporary() => {
                                tokio::time::sleep(backoff.next_delay()).await;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(Position::Gone) => {
                        tracing::info!(%name, "a waiting contender's entry is gone; queueing again");
                        break;
                    }
                    Err(e) if e.is_temporary() => {
                        tracing::debug!(%name, "contender position: {e}");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            // The session changed or the entry vanished: remove what may remain of this
            // contender (in the background), and queue again under the current session.
            drop(std::mem::replace(
                &mut pending,
                Pending {
                    driver: self.driver.clone(),
                    state: None,
                },
            ));
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One enqueue, retried while the registry does not answer (with `retry: true` after
    /// the first failure, since its reply may have been lost). `None`: the session changed
    /// meanwhile.
    async fn enqueue(
        &self,
        handle: &C::Handle,
        contender: &Contender,
        wait: Wait,
    ) -> Result<Option<C::Ticket>> {
        let mut backoff = self.options.backoff.backoff();
        let give_up = Instant::now() + self.options.retry_for;
        let mut retry = false;
        loop {
            match crate::metrics::timed("enqueue", self.driver.enqueue(handle, contender, retry))
                .await
            {
                Ok(t) => return Ok(Some(t)),
                Err(e) if e.is_temporary() => {
                    retry = true;
                    let delay = backoff.next_delay();
                    if wait == Wait::No && Instant::now() + delay > give_up {
                        return Err(e);
                    }
                    if self.session.current_state().handle().as_ref() != Some(handle) {
                        self.session.check_open()?;
                        return Ok(None);
                    }
                    tracing::debug!(name = %contender.name, retry_in = ?delay, "enqueue failed, retrying: {e}");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `handle` is still the session, confirmed alive now (see
    /// [`Session::confirmed`]). `try_lock` waits for the confirmation only `retry_for`.
    async fn confirmed(&self, handle: &C::Handle, wait: Wait) -> Result<bool> {
        let confirmed = self.session.confirmed(handle);
        if wait != Wait::No {
            return Ok(confirmed.await);
        }
        tokio::time::timeout(self.options.retry_for, confirmed)
            .await
            .map_err(|_| Error::Timeout {
                operation: "confirming the session",
                after: self.options.retry_for,
            })
    }

    async fn wait_on(&self, ticket: &C::Ticket, w: &C::Wait, handle: &C::Handle) -> Result<Woken> {
        let mut states = self.session.state();
        let changed = states.wait_for(|s| s.handle().as_ref() != Some(handle));
        tokio::select! {
            r = self.driver.wait(ticket, w) => r.map(|()| Woken::Again),
            _ = changed => Ok(Woken::SessionChanged),
        }
    }

    /// Acquires under the local lock and the caller's deadline, then starts the hold task.
    async fn hold(&self, name: &Name, kind: Kind, value: Vec<u8>, wait: Wait) -> Result<Hold> {
        if value.len() > self.driver.max_value_len() {
            return Err(Error::invalid_input(format!(
                "a value of {} bytes is larger than this registry stores ({} bytes)",
                value.len(),
                self.driver.max_value_len()
            )));
        }
        let run = async {
            let local = match kind {
                Kind::Lock { permits } if permits > 1 => None,
                _ => {
                    let m = self.local_lock((name.clone(), kind));
                    Some(match wait {
                        Wait::No => m.try_lock_owned().map_err(|_| Error::Busy {
                            what: format!("`{name}` is held by another contender of this client"),
                        })?,
                        _ => m.lock_owned().await,
                    })
                }
            };
            let (ticket, handle, token) = self.contend(name, kind, value, wait).await?;
            Ok::<_, Error>((ticket, handle, token, local))
        };
        let (ticket, handle, token, local) = match wait {
            Wait::For(d) => tokio::time::timeout(d, run)
                .await
                .map_err(|_| Error::Timeout {
                    operation: "lock",
                    after: d,
                })??,
            _ => run.await?,
        };
        let (lost_tx, lost_rx) = watch::channel(None);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = HoldTask {
            driver: self.driver.clone(),
            session: self.session.clone(),
            options: self.options,
            ticket,
            handle,
            lost: lost_tx,
            name: name.clone(),
            local: Mutex::new(local),
        };
        tokio::spawn(task.run(cmd_rx));
        Ok(Hold::new(name.clone(), token, lost_rx, cmd_tx))
    }
}

/// Keeps one hold: reports it lost, proclaims, releases.
struct HoldTask<C: CoordDriver, S: SessionDriver<Handle = C::Handle>> {
    driver: Arc<C>,
    session: Session<S>,
    options: CoordOptions,
    ticket: C::Ticket,
    handle: C::Handle,
    lost: watch::Sender<Option<Lost>>,
    name: Name,
    /// This client's turn for the name, given back once the entry is gone (before the
    /// holder hears that its release is done, so that its next `try_lock` finds it free).
    local: Mutex<Option<OwnedMutexGuard<()>>>,
}

impl<C, S> HoldTask<C, S>
where
    C: CoordDriver,
    S: SessionDriver<Handle = C::Handle>,
{
    fn set_lost(&self, why: Lost) {
        let first = self.lost.send_if_modified(|l| {
            if l.is_none() {
                *l = Some(why.clone());
                true
            } else {
                false
            }
        });
        if first && why != Lost::Released {
            crate::metrics::lock_lost(match why {
                Lost::SessionExpired => "session_expired",
                Lost::Unconfirmed => "unconfirmed",
                Lost::Deleted => "deleted",
                _ => "closed",
            });
            tracing::warn!(name = %self.name, "lost: {why}");
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    /// Why the session no longer backs the hold, if it does not.
    fn session_lost(&self, state: &SessionState<C::Handle>) -> Option<Lost> {
        match state {
            SessionState::Closed => Some(Lost::Closed),
            s if s.handle().as_ref() != Some(&self.handle) => Some(Lost::SessionExpired),
            _ if self.session.is_closed() => Some(Lost::Closed),
            _ => None,
        }
    }

    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut states = self.session.state();
        let mut backoff = self.options.backoff.backoff();
        // The entry's own watch starts a moment after acquiring: a hold released at once
        // (a short critical section) does not queue its release behind the watch's request
        // on the session's connection. A deletion in that moment is still seen (the watch
        // reports an entry already gone); losing the session is noticed from the session's
        // state and its confirmed deadline, which do not wait.
        let mut held = futures::future::pending().boxed();
        let mut retry_watch_at: Option<Instant> = Some(Instant::now() + FIRST_WATCH_DELAY);
        loop {
            if let Some(why) = self.session_lost(&states.borrow_and_update()) {
                self.set_lost(why);
            }
            if self.is_lost() {
                break;
            }
            let deadline = self.session.confirmed_until();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => return self.release(None).await,
                    Some(Command::Release(reply)) => return self.release(Some(reply)).await,
                    Some(Command::Proclaim(value, reply)) => {
                        let r = self.driver.proclaim(&self.ticket, &value).await;
                        let _ = reply.send(r);
                    }
                },
                r = states.changed() => {
                    if r.is_err() {
                        self.set_lost(Lost::Closed);
                    }
                }
                _ = sleep_until(deadline) => {
                    if self.session.confirmed_until().is_some_and(|at| at <= Instant::now()) {
                        self.set_lost(Lost::Unconfirmed);
                    }
                }
                _ = sleep_until(retry_watch_at) => {
                    retry_watch_at = None;
                    let (d, t) = (self.driver.clone(), self.ticket.clone());
                    held = async move { d.watch_held(&t).await }.boxed();
                }
                r = &mut held, if retry_watch_at.is_none() => match r {
                    Ok(()) => {
                        // Gone with the session (expired, or closed by a shutdown), or
                        // deleted behind our back.
                        let why = self.session_lost(&self.session.current_state());
                        self.set_lost(why.unwrap_or(Lost::Deleted));
                    }
                    Err(e) => {
                        tracing::debug!(name = %self.name, "watching a held entry: {e}");
                        retry_watch_at = Some(Instant::now() + backoff.next_delay());
                    }
                },
            }
        }
        // Lost: free the entry if it still exists (the registry may still hold it for an
        // unconfirmed session), then answer what the holder asks.
        self.dequeue_until_done(None).await;
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Release(reply) => {
                    let _ = reply.send(Ok(()));
                    return;
                }
                Command::Proclaim(_, reply) => {
                    let _ = reply.send(Err(Error::Closed {
                        what: "leadership (it was lost)",
                    }));
                }
            }
        }
    }

    async fn release(self, reply: Option<tokio::sync::oneshot::Sender<Result<()>>>) {
        self.set_lost(Lost::Released);
        self.dequeue_until_done(reply).await;
    }

    /// Removes the entry, retrying until the registry confirms or the session that binds
    /// it is gone. `reply` gets the outcome, or the error once `retry_for` passed (the
    /// retries go on).
    async fn dequeue_until_done(
        &self,
        mut reply: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    ) {
        let mut backoff = self.options.backoff.backoff();
        let give_up = Instant::now() + self.options.retry_for;
        loop {
            let gone_with_session = self.session.is_closed()
                || self.session.current_state().handle().as_ref() != Some(&self.handle);
            let r = if gone_with_session {
                Ok(())
            } else {
                crate::metrics::timed("dequeue", self.driver.dequeue(&self.ticket)).await
            };
            match r {
                Ok(()) => {
                    drop(self.local.lock().unwrap_or_else(|p| p.into_inner()).take());
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(()));
                    }
                    return;
                }
                Err(e) if e.is_temporary() => {
                    if Instant::now() >= give_up {
                        if let Some(reply) = reply.take() {
                            tracing::warn!(name = %self.name, "release not confirmed yet, retrying in the background: {e}");
                            let _ = reply.send(Err(e));
                        }
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!(name = %self.name, "release failed: {e}");
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(e));
                    }
                    return;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

#[async_trait]
impl<C, S> Coordinator for Coord<C, S>
where
    C: CoordDriver<Handle = S::Handle>,
    S: SessionDriver,
{
    async fn acquire(&self, name: &Name, permits: u32, wait: Wait) -> Result<LockGuard> {
        if permits == 0 {
            return Err(Error::invalid_input(
                "a semaphore needs at least one permit (permits = 0)",
            ));
        }
        let span = tracing::info_span!("waypost.lock", %name, permits);
        let hold = tracing::Instrument::instrument(
            self.hold(name, Kind::Lock { permits }, Vec::new(), wait),
            span,
        )
        .await?;
        Ok(LockGuard::new(hold))
    }

    async fn campaign(&self, election: &Name, value: Vec<u8>) -> Result<Leadership> {
        let span = tracing::info_span!("waypost.campaign", %election);
        let hold = tracing::Instrument::instrument(
            self.hold(election, Kind::Election, value, Wait::Forever),
            span,
        )
        .await?;
        Ok(Leadership::new(hold))
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        self.session.check_open()?;
        self.driver.leader(election).await
    }

    fn observe(&self, election: &Name) -> BoxStream<'static, Result<LeaderEvent>> {
        let feed = self.driver.leader_feed(election);
        let backoff = self.options.backoff;
        let what = format!("election {election}");
        self.hub.watch(election.clone(), move || {
            machine::watch(feed, &backoff, what)
        })
    }
}
