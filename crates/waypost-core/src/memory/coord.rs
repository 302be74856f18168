//! Locks and elections in the memory registry: core's [`Coord`](crate::backend::Coord)
//! over in-process queues of contenders bound to sessions, ordered by the registry
//! revision of their creation (which is also their fencing token).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use async_trait::async_trait;
use tokio::sync::watch;

use super::registry::{MemoryRegistry, SessionId, State};
use crate::backend::watch::{Entry as Listed, Feed, Listing, Next};
use crate::backend::{Contender, CoordDriver, Kind, Position};
use crate::coord::{FencingToken, Leader, Name};
use crate::error::{Error, Result};
use crate::model::Revision;

/// One queued contender.
struct Queued {
    session: SessionId,
    id: String,
    value: Vec<u8>,
}

/// Which queue: locks and elections of one name are apart (as ZooKeeper's `-lock-` and
/// `-latch-` nodes are told apart).
type QueueKey = (Name, bool);

fn queue_key(name: &Name, kind: Kind) -> QueueKey {
    (name.clone(), kind == Kind::Election)
}

/// The registry's contender queues, and a revision that rises with each change of any.
pub(crate) struct CoordState {
    queues: HashMap<QueueKey, BTreeMap<u64, Queued>>,
    changed: watch::Sender<Revision>,
}

impl Default for CoordState {
    fn default() -> Self {
        Self {
            queues: HashMap::new(),
            changed: watch::Sender::new(0),
        }
    }
}

impl State {
    fn coord_changed(&mut self) {
        self.revision += 1;
        self.coord.changed.send_replace(self.revision);
    }

    /// Drops every contender of `session` (its session ended).
    pub(super) fn coord_drop_session(&mut self, session: SessionId) {
        let mut any = false;
        for q in self.coord.queues.values_mut() {
            let before = q.len();
            q.retain(|_, c| c.session != session);
            any |= q.len() != before;
        }
        self.coord.queues.retain(|_, q| !q.is_empty());
        if any {
            self.coord_changed();
        }
    }

    fn queue(&self, key: &QueueKey) -> Option<&BTreeMap<u64, Queued>> {
        self.coord.queues.get(key)
    }

    fn leader_of(&self, election: &Name) -> Option<Leader> {
        let q = self.queue(&(election.clone(), true))?;
        let (token, c) = q.iter().next()?;
        Some(Leader::new(
            election.clone(),
            c.value.clone(),
            FencingToken(*token),
        ))
    }
}

/// A contender's place: its queue, its token, its session.
#[derive(Clone, Debug)]
pub struct Ticket {
    queue: QueueKey,
    kind: Kind,
    token: u64,
    session: SessionId,
}

/// The memory backend's coordination primitives.
#[derive(Clone)]
pub struct MemoryCoord {
    pub(crate) registry: MemoryRegistry,
}

impl fmt::Debug for MemoryCoord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCoord")
            .field("registry", &self.registry.name())
            .finish()
    }
}

impl MemoryCoord {
    /// Waits until `done` holds of the state, or the registry becomes unreachable.
    /// Expires overdue sessions on time meanwhile (a waiter alone sees a holder crash).
    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<()> {
        let inner = &self.registry.inner;
        let mut reach = inner.reachability();
        let mut changed = inner.op()?.coord.changed.subscribe();
        loop {
            {
                let st = inner.op()?;
                if done(&st) {
                    return Ok(());
                }
            }
            let reap_at = inner.next_deadline();
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return Err(Error::unavailable("memory registry dropped"));
                    }
                }
                _ = reach.changed() => {}
                _ = sleep_until(reap_at) => inner.reap(),
            }
        }
    }
}

impl MemoryRegistry {
    /// How many contenders (holding and waiting) lock `name` has, or election `name`
    /// with `election`.
    pub fn contenders(&self, name: &Name, election: bool) -> usize {
        let st = self.inner.lock();
        st.queue(&(name.clone(), election)).map_or(0, BTreeMap::len)
    }

    /// Fault injection, as a foreign writer (`zkCli.sh delete`, `etcdctl del`): deletes
    /// every contender of lock `name` (or election `name` with `election`), holders
    /// included. Returns how many there were.
    pub fn delete_contenders(&self, name: &Name, election: bool) -> usize {
        let mut st = self.inner.lock();
        let removed = st
            .coord
            .queues
            .remove(&(name.clone(), election))
            .map_or(0, |q| q.len());
        if removed > 0 {
            st.coord_changed();
        }
        removed
    }

    /// Fault injection: after the next `after` coordination requests of clients (enqueue,
    /// position, wait, dequeue, forget), the `n` following are refused with
    /// [`Error::Unauthorized`], as by a registry whose ACL stopped admitting the client: an
    /// error that retrying cannot fix.
    pub fn refuse_coordination(&self, after: usize, n: usize) {
        *self
            .inner
            .refuse_coordination
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (after, n);
    }
}

impl super::registry::Inner {
    /// `Err` for a coordination request that [`MemoryRegistry::refuse_coordination`] refuses.
    fn admit(&self, operation: &str) -> Result<()> {
        let mut r = self
            .refuse_coordination
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *r {
            (0, 0) => Ok(()),
            (0, ref mut n) => {
                *n -= 1;
                Err(Error::Unauthorized {
                    message: format!("memory registry refused {operation} (fault injected)"),
                    source: None,
                })
            }
            (ref mut after, _) => {
                *after -= 1;
                Ok(())
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

#[async_trait]
impl CoordDriver for MemoryCoord {
    type Handle = SessionId;
    type Ticket = Ticket;
    /// The predecessor's token, and how many contenders were ahead.
    type Wait = (u64, usize);
    type Feed = LeaderFeed;

    fn max_value_len(&self) -> usize {
        super::kv::MAX_VALUE_LEN
    }

    async fn enqueue(&self, session: &SessionId, c: &Contender, retry: bool) -> Result<Ticket> {
        let inner = &self.registry.inner;
        inner.admit("enqueueing a contender")?;
        let mut st = inner.op()?;
        let queue = queue_key(&c.name, c.kind);
        let found = st.queue(&queue).and_then(|q| {
            q.iter()
                .find(|(_, e)| e.id == c.id && e.session == *session)
                .map(|(t, _)| *t)
        });
        let token = match found {
            Some(t) if retry => t,
            _ => {
                if !st.sessions_contains(*session) {
                    return Err(Error::SessionExpired);
                }
                let token = st.revision + 1;
                st.coord.queues.entry(queue.clone()).or_default().insert(
                    token,
                    Queued {
                        session: *session,
                        id: c.id.clone(),
                        value: c.value.clone(),
                    },
                );
                st.coord_changed();
                token
            }
        };
        drop(st);
        inner.reply("enqueueing a contender")?;
        Ok(Ticket {
            queue,
            kind: c.kind,
            token,
            session: *session,
        })
    }

    async fn position(&self, t: &Ticket) -> Result<Position<(u64, usize)>> {
        self.registry
            .inner
            .admit("reading a contender's position")?;
        let st = self.registry.inner.op()?;
        let Some(q) = st.queue(&t.queue).filter(|q| q.contains_key(&t.token)) else {
            return Ok(Position::Gone);
        };
        let permits = match t.kind {
            Kind::Lock { permits } => permits as usize,
            Kind::Election => 1,
        };
        let ahead: Vec<u64> = q.range(..t.token).map(|(k, _)| *k).collect();
        Ok(if ahead.len() < permits {
            Position::Held(FencingToken(t.token))
        } else {
            // A lock waits on the one contender right before (herd-free); a semaphore
            // waiter on any contender ahead leaving (any holder's release frees a permit).
            Position::Waiting((*ahead.last().expect("ahead is not empty"), ahead.len()))
        })
    }

    async fn wait(&self, t: &Ticket, &(predecessor, ahead): &(u64, usize)) -> Result<()> {
        self.registry.inner.admit("waiting on a predecessor")?;
        self.wait_until(|st| {
            st.queue(&t.queue).is_none_or(|q| {
                !q.contains_key(&predecessor)
                    || !q.contains_key(&t.token)
                    || q.range(..t.token).count() < ahead
            })
        })
        .await
    }

    async fn watch_held(&self, t: &Ticket) -> Result<()> {
        self.wait_until(|st| {
            st.queue(&t.queue)
                .and_then(|q| q.get(&t.token))
                .is_none_or(|c| c.session != t.session)
        })
        .await
    }

    async fn dequeue(&self, t: &Ticket) -> Result<()> {
        let inner = &self.registry.inner;
        inner.admit("removing a contender")?;
        let mut st = inner.op()?;
        let ours = st
            .queue(&t.queue)
            .and_then(|q| q.get(&t.token))
            .is_some_and(|c| c.session == t.session);
        if ours {
            if let Some(q) = st.coord.queues.get_mut(&t.queue) {
                q.remove(&t.token);
                if q.is_empty() {
                    st.coord.queues.remove(&t.queue);
                }
            }
            st.coord_changed();
        }
        drop(st);
        inner.reply("removing a contender")
    }

    async fn forget(&self, session: &SessionId, c: &Contender) -> Result<()> {
        self.registry.inner.admit("forgetting a contender")?;
        let mut st = self.registry.inner.op()?;
        let queue = queue_key(&c.name, c.kind);
        let mut removed = false;
        if let Some(q) = st.coord.queues.get_mut(&queue) {
            let before = q.len();
            q.retain(|_, e| !(e.id == c.id && e.session == *session));
            removed = q.len() != before;
        }
        if removed {
            st.coord_changed();
        }
        Ok(())
    }

    async fn proclaim(&self, t: &Ticket, value: &[u8]) -> Result<()> {
        let mut st = self.registry.inner.op()?;
        let entry = st
            .coord
            .queues
            .get_mut(&t.queue)
            .and_then(|q| q.get_mut(&t.token))
            .filter(|c| c.session == t.session);
        match entry {
            Some(c) => {
                c.value = value.to_vec();
                st.coord_changed();
                Ok(())
            }
            None => Err(Error::Closed {
                what: "leadership (its entry is gone)",
            }),
        }
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        Ok(self.registry.inner.op()?.leader_of(election))
    }

    fn leader_feed(&self, election: &Name) -> LeaderFeed {
        LeaderFeed {
            coord: self.clone(),
            election: election.clone(),
            seen: None,
        }
    }
}

/// The leader of one election, listed again on every change of the registry's queues.
pub struct LeaderFeed {
    coord: MemoryCoord,
    election: Name,
    seen: Option<watch::Receiver<Revision>>,
}

impl fmt::Debug for LeaderFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderFeed")
            .field("election", &self.election)
            .finish()
    }
}

impl LeaderFeed {
    fn listing(&self, st: &State) -> Listing<Leader> {
        Listing {
            entries: st
                .leader_of(&self.election)
                .map(|l| Listed {
                    key: self.election.to_string(),
                    item: l,
                })
                .into_iter()
                .collect(),
            revision: st.revision,
        }
    }
}

#[async_trait]
impl Feed for LeaderFeed {
    type Item = Leader;

    async fn list(&mut self) -> Result<Listing<Leader>> {
        // Before the registry answers, wait quietly: that is no outage to report.
        let mut reach = self.coord.registry.inner.reachability();
        let _ = reach.wait_for(|r| *r).await;
        let st = self.coord.registry.inner.op()?;
        let mut rx = st.coord.changed.subscribe();
        rx.borrow_and_update();
        self.seen = Some(rx);
        Ok(self.listing(&st))
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<Leader>> {
        let inner = self.coord.registry.inner.clone();
        let mut reach = inner.reachability();
        let Some(mut rx) = self.seen.take() else {
            return Err(Error::unavailable(
                "memory registry: the watch was not listed",
            ));
        };
        loop {
            if !*reach.borrow_and_update() {
                return Err(Error::unavailable(format!(
                    "memory registry `{}` is unreachable (fault injected)",
                    self.coord.registry.name()
                )));
            }
            let reap_at = inner.next_deadline();
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return Err(Error::unavailable("memory registry dropped"));
                    }
                    rx.borrow_and_update();
                    let st = inner.op()?;
                    let listing = self.listing(&st);
                    drop(st);
                    self.seen = Some(rx);
                    return Ok(Next::Listing(listing));
                }
                _ = reach.changed() => {}
                _ = sleep_until(reap_at) => inner.reap(),
            }
        }
    }
}
