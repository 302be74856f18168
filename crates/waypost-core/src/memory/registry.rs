//! The in-process registry that memory clients talk to, and its fault injection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backend::{Change, Entry as Listed, Listing, Presence};
use crate::error::{Error, Result};
use crate::event::Snapshot;
use crate::model::{Instance, Revision, ServiceName};

/// A session's id: what a client's registrations are bound to, like a ZooKeeper session.
pub type SessionId = u64;

/// One entry. Clients write theirs at the key named by the instance id, bound to their
/// session; foreign writers ([`MemoryRegistry::put_foreign`]) anywhere, bound to none.
struct Entry {
    instance: Instance,
    session: Option<SessionId>,
}

struct Session {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) revision: Revision,
    next_session: SessionId,
    sessions: HashMap<SessionId, Session>,
    /// Per service, its entries by key.
    services: HashMap<ServiceName, BTreeMap<String, Entry>>,
    subscribers: HashMap<ServiceName, Vec<mpsc::UnboundedSender<Change<Instance>>>>,
    /// Configuration keys.
    pub(super) kv: super::kv::KvState,
    /// Lock and election queues.
    pub(super) coord: super::coord::CoordState,
}

/// Every later change of one service.
pub(crate) type Subscription = mpsc::UnboundedReceiver<Change<Instance>>;

/// Where a client writes an instance: its id.
pub(crate) fn own_key(instance: &Instance) -> &str {
    instance.id.as_str()
}

impl State {
    fn notify(&mut self, service: &ServiceName, change: Change<Instance>) {
        if let Some(subs) = self.subscribers.get_mut(service) {
            subs.retain(|s| s.send(change.clone()).is_ok());
        }
    }

    fn entry(&self, service: &ServiceName, key: &str) -> Option<&Entry> {
        self.services.get(service).and_then(|m| m.get(key))
    }

    fn put_entry(&mut self, key: &str, instance: &Instance, session: Option<SessionId>) {
        self.revision += 1;
        let revision = self.revision;
        self.services
            .entry(instance.service.clone())
            .or_default()
            .insert(
                key.to_string(),
                Entry {
                    instance: instance.clone(),
                    session,
                },
            );
        self.notify(
            &instance.service,
            Change::Put {
                key: key.to_string(),
                item: Some(instance.clone()),
                revision,
            },
        );
    }

    fn remove_entry(&mut self, service: &ServiceName, key: &str) -> bool {
        let removed = self
            .services
            .get_mut(service)
            .and_then(|m| m.remove(key))
            .is_some();
        if removed {
            self.revision += 1;
            let revision = self.revision;
            self.notify(
                service,
                Change::Delete {
                    key: key.to_string(),
                    revision,
                },
            );
        }
        removed
    }

    pub(super) fn sessions_contains(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    fn drop_session(&mut self, session: SessionId) -> usize {
        self.sessions.remove(&session);
        self.coord_drop_session(session);
        let doomed: Vec<(ServiceName, String)> = self
            .services
            .iter()
            .flat_map(|(s, m)| {
                m.iter()
                    .filter(|(_, e)| e.session == Some(session))
                    .map(move |(k, _)| (s.clone(), k.clone()))
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
    /// Fault injection: how many more writes and deletes are applied but answered with a
    /// timeout (a lost reply).
    lose_replies: std::sync::atomic::AtomicUsize,
    /// Fault injection: heartbeats are applied but answered with a timeout.
    lose_heartbeat_replies: std::sync::atomic::AtomicBool,
    /// Fault injection: coordination requests to let through, then how many to refuse.
    pub(super) refuse_coordination: Mutex<(usize, usize)>,
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
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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
    pub(super) fn op(&self) -> Result<MutexGuard<'_, State>> {
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
                if self
                    .lose_heartbeat_replies
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    return Err(Error::Timeout {
                        operation: "heartbeat",
                        after: Duration::ZERO,
                    });
                }
                Ok(())
            }
            None => Err(Error::SessionExpired),
        }
    }

    /// The services with at least one entry, sorted.
    pub(crate) fn services(&self) -> Result<Vec<ServiceName>> {
        let st = self.op()?;
        let mut out: Vec<ServiceName> = st
            .services
            .iter()
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        out.sort();
        Ok(out)
    }

    pub(crate) fn close_session(&self, session: SessionId) -> Result<()> {
        let mut st = self.op()?;
        st.drop_session(session);
        Ok(())
    }

    /// Writes `instance` at its own key bound to `session`, with the keeper's
    /// [`RegistryStore::write`](crate::backend::RegistryStore::write) semantics.
    pub(crate) fn write(
        &self,
        session: SessionId,
        instance: &Instance,
        takeover: bool,
    ) -> Result<()> {
        let mut st = self.op()?;
        if !st.sessions.contains_key(&session) {
            return Err(Error::SessionExpired);
        }
        let key = own_key(instance);
        match st.entry(&instance.service, key) {
            Some(e) if e.session == Some(session) && e.instance == *instance => return Ok(()),
            Some(e) if e.session == Some(session) || (e.session.is_none() && takeover) => {}
            Some(_) => {
                return Err(Error::AlreadyExists {
                    what: format!(
                        "instance `{}` of service `{}` is registered by another party",
                        instance.id, instance.service
                    ),
                })
            }
            None => {}
        }
        st.put_entry(key, instance, Some(session));
        self.reply("writing an entry")
    }

    /// The answer to an applied write: `Ok`, unless a lost reply was injected.
    pub(super) fn reply(&self, operation: &'static str) -> Result<()> {
        use std::sync::atomic::Ordering;
        let lose = self
            .lose_replies
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            Err(Error::Timeout {
                operation,
                after: Duration::ZERO,
            })
        } else {
            Ok(())
        }
    }

    /// What the registry holds at `instance`'s own key, seen from `session`.
    pub(crate) fn inspect(&self, session: SessionId, instance: &Instance) -> Result<Presence> {
        let st = self.op()?;
        Ok(match st.entry(&instance.service, own_key(instance)) {
            None => Presence::Missing,
            Some(e) if e.session == Some(session) => Presence::Ours {
                current: e.instance == *instance,
            },
            Some(e) if e.session.is_none() => Presence::Unowned,
            Some(_) => Presence::Foreign,
        })
    }

    /// Removes `instance`'s entry if `session` holds it.
    pub(crate) fn delete(&self, session: SessionId, instance: &Instance) -> Result<()> {
        let mut st = self.op()?;
        let key = own_key(instance);
        let owned = st
            .entry(&instance.service, key)
            .is_some_and(|e| e.session == Some(session));
        if owned {
            st.remove_entry(&instance.service, key);
        }
        self.reply("deleting an entry")
    }

    /// Every entry of `service`, and (if asked) a subscription to every later change,
    /// atomically.
    pub(crate) fn list(
        &self,
        service: &ServiceName,
        subscribe: bool,
    ) -> Result<(Listing<Instance>, Option<Subscription>)> {
        let mut st = self.op()?;
        let listing = listing_of(&st, service);
        let rx = subscribe.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            st.subscribers.entry(service.clone()).or_default().push(tx);
            rx
        });
        Ok((listing, rx))
    }
}

fn listing_of(st: &State, service: &ServiceName) -> Listing<Instance> {
    let entries = st
        .services
        .get(service)
        .map(|m| {
            m.iter()
                .map(|(k, e)| Listed {
                    key: k.clone(),
                    item: e.instance.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Listing {
        entries,
        revision: st.revision,
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
                lose_replies: Default::default(),
                lose_heartbeat_replies: Default::default(),
                refuse_coordination: Mutex::new((0, 0)),
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

    /// How many watches (of instances and of configuration keys) are subscribed and still
    /// held by a consumer (for assertions).
    pub fn open_watches(&self) -> usize {
        let st = self.inner.lock();
        let instances: usize = st
            .subscribers
            .values()
            .map(|subs| subs.iter().filter(|s| !s.is_closed()).count())
            .sum();
        instances + st.kv.open_watches()
    }

    /// The current revision: the number of changes applied so far.
    pub fn revision(&self) -> Revision {
        self.inner.lock().revision
    }

    /// What the registry holds for `service`, ignoring reachability (for assertions).
    pub fn peek(&self, service: &ServiceName) -> Snapshot {
        snapshot_of(&self.inner.lock(), service)
    }

    /// Fault injection: the registry "restarts", keeping its data and sessions (as
    /// ZooKeeper and etcd do): every watch connection is dropped and must list again.
    pub fn restart(&self) {
        let mut st = self.inner.lock();
        st.subscribers.clear();
        st.kv.subscribers.clear();
    }

    /// Fault injection: the next `n` writes and deletes of clients are applied, but their
    /// replies are lost: the client gets [`Error::Timeout`] and cannot tell whether the
    /// operation happened.
    pub fn lose_replies(&self, n: usize) {
        self.inner
            .lose_replies
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// Fault injection: while `on`, every session heartbeat is applied (the session stays
    /// alive in the registry) but its reply is lost, so clients cannot confirm their
    /// sessions; every other request is answered.
    pub fn lose_heartbeat_replies(&self, on: bool) {
        self.inner
            .lose_heartbeat_replies
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Fault injection, as a foreign writer: writes `instance` at `key` (any string; a
    /// key other than the instance's id claims the id beside its owner), bound to no
    /// session, like a persistent node or a key without a lease.
    pub fn put_foreign(&self, key: &str, instance: &Instance) {
        self.inner.lock().put_entry(key, instance, None);
    }

    /// Fault injection, as a foreign writer: deletes whatever `service` holds at `key`
    /// (an instance's id is its owner's key). Returns whether there was an entry.
    pub fn delete_foreign(&self, service: &ServiceName, key: &str) -> bool {
        self.inner.lock().remove_entry(service, key)
    }
}
