//! The in-process registry that memory clients talk to, and its fault injection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, Revision, ServiceName};

/// A session's id: what a client's registrations are bound to, like a ZooKeeper session.
pub type SessionId = u64;

struct Entry {
    instance: Instance,
    session: SessionId,
}

struct Session {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    revision: Revision,
    next_session: SessionId,
    sessions: HashMap<SessionId, Session>,
    services: HashMap<ServiceName, BTreeMap<InstanceId, Entry>>,
    subscribers: HashMap<ServiceName, Vec<mpsc::UnboundedSender<WatchEvent>>>,
}

impl State {
    fn notify(&mut self, service: &ServiceName, event: WatchEvent) {
        if let Some(subs) = self.subscribers.get_mut(service) {
            subs.retain(|s| s.send(event.clone()).is_ok());
        }
    }

    fn remove_entry(&mut self, service: &ServiceName, id: &InstanceId) -> bool {
        let removed = self
            .services
            .get_mut(service)
            .and_then(|m| m.remove(id))
            .is_some();
        if removed {
            self.revision += 1;
            let revision = self.revision;
            self.notify(
                service,
                WatchEvent::Removed {
                    id: id.clone(),
                    revision,
                },
            );
        }
        removed
    }

    fn drop_session(&mut self, session: SessionId) -> usize {
        self.sessions.remove(&session);
        let doomed: Vec<(ServiceName, InstanceId)> = self
            .services
            .iter()
            .flat_map(|(s, m)| {
                m.iter()
                    .filter(|(_, e)| e.session == session)
                    .map(move |(id, _)| (s.clone(), id.clone()))
            })
            .collect();
        for (s, id) in &doomed {
            self.remove_entry(s, id);
        }
        doomed.len()
    }

    /// Expires every session past its deadline, removing its entries.
    fn reap(&mut self, now: Instant) {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let n = self.drop_session(id);
            tracing::debug!(
                session = id,
                instances = n,
                "memory registry: session expired"
            );
        }
    }
}

pub(crate) struct Inner {
    state: Mutex<State>,
    reachable: watch::Sender<bool>,
    name: String,
}

/// An in-process registry with full waypost semantics: sessions with TTL-based liveness,
/// revisions, watches; and fault injection for tests.
///
/// Clients ([`MemoryClient`](super::MemoryClient)) are made with
/// [`MemoryRegistry::client`]. Named registries shared across a process are reached by URL:
/// `memory://` is the process-wide default registry, `memory://NAME` another one.
#[derive(Clone)]
pub struct MemoryRegistry {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("MemoryRegistry")
            .field("name", &self.inner.name)
            .field("revision", &st.revision)
            .field("sessions", &st.sessions.len())
            .field("services", &st.services.len())
            .finish()
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new("anonymous")
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters more than losing the registry; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_reachable(&self) -> Result<()> {
        if *self.reachable.borrow() {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "memory registry `{}` is unreachable (fault injected)",
                self.name
            )))
        }
    }

    /// Locks the state for an operation of a client: fails when unreachable, reaps
    /// expired sessions first.
    fn op(&self) -> Result<MutexGuard<'_, State>> {
        self.check_reachable()?;
        let mut st = self.lock();
        st.reap(Instant::now());
        Ok(st)
    }

    pub(crate) fn reachability(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    /// When the next session runs out, if any is open.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.lock().sessions.values().map(|s| s.deadline).min()
    }

    pub(crate) fn reap(&self) {
        self.lock().reap(Instant::now());
    }

    pub(crate) fn open_session(&self, ttl: Duration) -> Result<SessionId> {
        let mut st = self.op()?;
        st.next_session += 1;
        let id = st.next_session;
        st.sessions.insert(
            id,
            Session {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    /// Extends a session's deadline; `SessionExpired` if the registry no longer knows it.
    pub(crate) fn heartbeat(&self, session: SessionId) -> Result<()> {
        let mut st = self.op()?;
        match st.sessions.get_mut(&session) {
            Some(s) => {
                s.deadline = Instant::now() + s.ttl;
                Ok(())
            }
            None => Err(Error::SessionExpired),
        }
    }

    pub(crate) fn close_session(&self, session: SessionId) -> Result<()> {
        let mut st = self.op()?;
        st.drop_session(session);
        Ok(())
    }

    /// Creates an entry bound to `session`. `replace_own`: an existing entry of the same
    /// session is replaced (re-registration) instead of being a conflict.
    pub(crate) fn put(
        &self,
        session: SessionId,
        instance: &Instance,
        replace_own: bool,
    ) -> Result<()> {
        let mut st = self.op()?;
        if !st.sessions.contains_key(&session) {
            return Err(Error::SessionExpired);
        }
        let existing = st
            .services
            .get(&instance.service)
            .and_then(|m| m.get(&instance.id))
            .map(|e| (e.session, e.instance == *instance));
        let event_kind_added = match existing {
            Some((owner, _)) if owner != session || !replace_own => {
                return Err(Error::AlreadyExists {
                    what: format!(
                        "instance `{}` of service `{}` is registered by another live session",
                        instance.id, instance.service
                    ),
                });
            }
            Some((_, true)) => return Ok(()),
            Some((_, false)) => false,
            None => true,
        };
        st.revision += 1;
        let revision = st.revision;
        st.services
            .entry(instance.service.clone())
            .or_default()
            .insert(
                instance.id.clone(),
                Entry {
                    instance: instance.clone(),
                    session,
                },
            );
        let event = if event_kind_added {
            WatchEvent::Added {
                instance: instance.clone(),
                revision,
            }
        } else {
            WatchEvent::Updated {
                instance: instance.clone(),
                revision,
            }
        };
        st.notify(&instance.service, event);
        Ok(())
    }

    /// Whether `session` holds the entry of this instance.
    pub(crate) fn holds(
        &self,
        session: SessionId,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<bool> {
        let st = self.op()?;
        Ok(st
            .services
            .get(service)
            .and_then(|m| m.get(id))
            .is_some_and(|e| e.session == session))
    }

    /// Removes the entry if `session` holds it.
    pub(crate) fn delete(
        &self,
        session: SessionId,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<()> {
        let mut st = self.op()?;
        let owned = st
            .services
            .get(service)
            .and_then(|m| m.get(id))
            .is_some_and(|e| e.session == session);
        if owned {
            st.remove_entry(service, id);
        }
        Ok(())
    }

    pub(crate) fn snapshot(&self, service: &ServiceName) -> Result<Snapshot> {
        let st = self.op()?;
        Ok(snapshot_of(&st, service))
    }

    /// A snapshot and a subscription to every later change, atomically.
    pub(crate) fn subscribe(
        &self,
        service: &ServiceName,
    ) -> Result<(Snapshot, mpsc::UnboundedReceiver<WatchEvent>)> {
        let mut st = self.op()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let snap = snapshot_of(&st, service);
        st.subscribers.entry(service.clone()).or_default().push(tx);
        Ok((snap, rx))
    }
}

fn snapshot_of(st: &State, service: &ServiceName) -> Snapshot {
    let instances = st
        .services
        .get(service)
        .map(|m| m.values().map(|e| e.instance.clone()).collect())
        .unwrap_or_default();
    Snapshot::new(service.clone(), instances, st.revision)
}

impl MemoryRegistry {
    /// A new, empty registry, named for logs and errors.
    pub fn new(name: impl Into<String>) -> Self {
        let (reachable, _) = watch::channel(true);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                reachable,
                name: name.into(),
            }),
        }
    }

    /// A new client with its own session, whose registrations live `ttl` without a
    /// heartbeat (the client heartbeats every quarter TTL).
    pub fn client(&self, ttl: Duration) -> super::MemoryClient {
        super::MemoryClient::new(self, ttl)
    }

    /// The registry's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Fault injection: makes the registry unreachable (`false`) or reachable again
    /// (`true`) for every client. While unreachable, every client operation fails with
    /// [`Error::Unavailable`], watches report `Stale`, and sessions whose clients cannot
    /// heartbeat expire on their TTL, as a real registry's would.
    pub fn set_reachable(&self, reachable: bool) {
        self.inner.reachable.send_replace(reachable);
    }

    /// Whether clients can reach the registry.
    pub fn is_reachable(&self) -> bool {
        *self.inner.reachable.borrow()
    }

    /// Fault injection: expires one session now, as if its client had been silent past
    /// its TTL. Its instances are removed (watchers see `Removed`); the client notices on
    /// its next heartbeat and re-registers them. Returns how many instances it held.
    pub fn expire_session(&self, session: SessionId) -> usize {
        self.inner.lock().drop_session(session)
    }

    /// Fault injection: expires every session now. Returns how many instances they held.
    pub fn expire_all_sessions(&self) -> usize {
        let mut st = self.inner.lock();
        let ids: Vec<SessionId> = st.sessions.keys().copied().collect();
        ids.into_iter().map(|id| st.drop_session(id)).sum()
    }

    /// Expires overdue sessions now (clients and watches do this by themselves).
    #[cfg(test)]
    pub(crate) fn reap_for_tests(&self) {
        self.inner.reap();
    }

    /// The ids of the live sessions.
    pub fn sessions(&self) -> Vec<SessionId> {
        let mut v: Vec<SessionId> = self.inner.lock().sessions.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The current revision: the number of changes applied so far.
    pub fn revision(&self) -> Revision {
        self.inner.lock().revision
    }

    /// What the registry holds for `service`, ignoring reachability (for assertions).
    pub fn peek(&self, service: &ServiceName) -> Snapshot {
        snapshot_of(&self.inner.lock(), service)
    }
}
