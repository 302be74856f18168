//! A client of a [`MemoryRegistry`]: a session, the registrations bound to it, and watches.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::registry::{Inner as RegistryInner, MemoryRegistry, SessionId};
use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, ServiceName};
use crate::registrar::{Registrar, Registration, RegistrationControl, RegistrationStatus};
use crate::watcher::Watcher;

type Key = (ServiceName, InstanceId);

struct Reg {
    instance: Instance,
    status: watch::Sender<RegistrationStatus>,
}

#[derive(Default)]
struct ClientState {
    session: Option<SessionId>,
    regs: HashMap<Key, Reg>,
    /// Deregistrations the registry has not confirmed yet (it was unreachable).
    pending_deletes: Vec<(SessionId, Key)>,
}

struct ClientInner {
    registry: MemoryRegistry,
    ttl: Duration,
    state: Mutex<ClientState>,
    killed: AtomicBool,
    task_started: AtomicBool,
}

/// A client of a [`MemoryRegistry`]: implements [`Registrar`] and [`Watcher`].
///
/// Like a ZooKeeper client it holds one session with the registry; every registration is
/// bound to it. A background task heartbeats the session every quarter TTL and, when the
/// registry lost the session or an instance, registers everything again with jittered
/// backoff. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct MemoryClient {
    inner: Arc<ClientInner>,
}

impl fmt::Debug for MemoryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("MemoryClient")
            .field("registry", &self.inner.registry.name())
            .field("ttl", &self.inner.ttl)
            .field("session", &st.session)
            .field("registrations", &st.regs.len())
            .finish()
    }
}

fn set_status(reg: &Reg, s: RegistrationStatus) {
    reg.status.send_if_modified(|cur| {
        if *cur == s || *cur == RegistrationStatus::Deregistered {
            false
        } else {
            *cur = s;
            true
        }
    });
}

impl ClientInner {
    fn lock(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reg(&self) -> &RegistryInner {
        &self.registry.inner
    }

    fn check_alive(&self) -> Result<()> {
        if self.killed.load(Ordering::Acquire) {
            Err(Error::Closed {
                what: "memory client (killed)",
            })
        } else {
            Ok(())
        }
    }

    /// The live session, opening one if there is none.
    fn session(&self, st: &mut ClientState) -> Result<SessionId> {
        if let Some(s) = st.session {
            return Ok(s);
        }
        let s = self.reg().open_session(self.ttl)?;
        st.session = Some(s);
        Ok(s)
    }

    /// One round of keeping registrations alive: heartbeat, finish pending deletes, and
    /// put back whatever the registry lost.
    fn maintain(&self) -> Result<()> {
        let mut st = self.lock();
        if st.regs.is_empty() && st.pending_deletes.is_empty() && st.session.is_none() {
            return Ok(());
        }
        if let Some(s) = st.session {
            match self.reg().heartbeat(s) {
                Ok(()) => {}
                Err(Error::SessionExpired) => {
                    tracing::info!(session = s, "memory: session expired, registering again");
                    st.session = None;
                    st.pending_deletes.retain(|(ps, _)| *ps != s);
                    st.regs
                        .values()
                        .for_each(|r| set_status(r, RegistrationStatus::Reregistering));
                }
                Err(e) => {
                    st.regs.values().for_each(|r| {
                        if *r.status.borrow() == RegistrationStatus::Registered {
                            set_status(r, RegistrationStatus::Suspended)
                        }
                    });
                    return Err(e);
                }
            }
        }
        let session = self.session(&mut st)?;
        let pending = std::mem::take(&mut st.pending_deletes);
        for (s, (service, id)) in pending {
            if let Err(e) = self.reg().delete(s, &service, &id) {
                st.pending_deletes.push((s, (service, id)));
                return Err(e);
            }
        }
        let mut conflict = None;
        for reg in st.regs.values() {
            let i = &reg.instance;
            if self.reg().holds(session, &i.service, &i.id)? {
                set_status(reg, RegistrationStatus::Registered);
                continue;
            }
            set_status(reg, RegistrationStatus::Reregistering);
            match self.reg().put(session, i, true) {
                Ok(()) => set_status(reg, RegistrationStatus::Registered),
                Err(e @ Error::AlreadyExists { .. }) => {
                    tracing::warn!(service = %i.service, id = %i.id, "memory: cannot register again: {e}");
                    conflict = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        conflict.map_or(Ok(()), Err)
    }

    fn remove(&self, key: &Key) -> Result<()> {
        let mut st = self.lock();
        let Some(reg) = st.regs.remove(key) else {
            return Ok(());
        };
        reg.status.send_replace(RegistrationStatus::Deregistered);
        if self.killed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(session) = st.session else {
            return Ok(());
        };
        match self.reg().delete(session, &key.0, &key.1) {
            Ok(()) => Ok(()),
            Err(Error::SessionExpired) => Ok(()),
            Err(e) => {
                st.pending_deletes.push((session, key.clone()));
                Err(e)
            }
        }
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // A clean shutdown closes the session, which removes whatever is left at once.
        if !self.killed.load(Ordering::Acquire) {
            let session = self.lock().session;
            if let Some(s) = session {
                let _ = self.reg().close_session(s);
            }
        }
    }
}

impl MemoryClient {
    /// A client of `registry` whose session lives `ttl` without a heartbeat.
    pub fn new(registry: &MemoryRegistry, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                registry: registry.clone(),
                ttl: ttl.max(Duration::from_millis(10)),
                state: Mutex::new(ClientState::default()),
                killed: AtomicBool::new(false),
                task_started: AtomicBool::new(false),
            }),
        }
    }

    /// The registry this client talks to.
    pub fn registry(&self) -> &MemoryRegistry {
        &self.inner.registry
    }

    /// The session the registrations are bound to, if one is open.
    pub fn session(&self) -> Option<SessionId> {
        self.inner.lock().session
    }

    /// Fault injection: the process "crashes". Heartbeats stop, nothing is deregistered,
    /// every later call fails with [`Error::Closed`]; the registry drops the instances
    /// when the session's TTL runs out, exactly as for a killed process.
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::Release);
    }

    fn ensure_task(&self) {
        if self.inner.task_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<ClientInner> = Arc::downgrade(&self.inner);
        let tick = (self.inner.ttl / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut backoff = Backoff::new(tick / 2, tick * 4);
            let mut delay = tick;
            loop {
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.killed.load(Ordering::Acquire) {
                    return;
                }
                inner.reg().reap();
                delay = match inner.maintain() {
                    Ok(()) => {
                        backoff.reset();
                        tick
                    }
                    Err(e) => {
                        tracing::debug!("memory: keep-alive round failed: {e}");
                        backoff.next_delay()
                    }
                };
            }
        });
    }
}

#[derive(Debug)]
struct Control {
    client: Arc<ClientInner>,
    key: Key,
}

impl fmt::Debug for ClientInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientInner")
            .field("registry", &self.registry.name())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RegistrationControl for Control {
    async fn update(&self, instance: Instance) -> Result<()> {
        let c = &self.client;
        c.check_alive()?;
        let mut st = c.lock();
        let session = c.session(&mut st)?;
        let result = c.reg().put(session, &instance, true);
        let reg = st.regs.get_mut(&self.key).ok_or(Error::Closed {
            what: "registration",
        })?;
        match result {
            Ok(()) => {
                reg.instance = instance;
                Ok(())
            }
            Err(Error::SessionExpired) => {
                // Re-registration will write the new instance.
                reg.instance = instance;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn deregister(&self) -> Result<()> {
        self.client.remove(&self.key)
    }

    fn deregister_in_background(&self) {
        if let Err(e) = self.client.remove(&self.key) {
            tracing::debug!(service = %self.key.0, id = %self.key.1, "memory: deregistration deferred: {e}");
        }
    }
}

#[async_trait]
impl Registrar for MemoryClient {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        instance.validate()?;
        self.inner.check_alive()?;
        self.ensure_task();
        let key = (instance.service.clone(), instance.id.clone());
        let c = &self.inner;
        let mut st = c.lock();
        if st.regs.contains_key(&key) {
            return Err(Error::AlreadyExists {
                what: format!(
                    "instance `{}` of service `{}` is already registered by this client",
                    key.1, key.0
                ),
            });
        }
        let session = c.session(&mut st)?;
        match c.reg().put(session, &instance, false) {
            Err(Error::SessionExpired) => {
                // The session ran out before the keep-alive task noticed: open a new one
                // and let the task put back the others.
                st.session = None;
                st.regs
                    .values()
                    .for_each(|r| set_status(r, RegistrationStatus::Reregistering));
                let session = c.session(&mut st)?;
                c.reg().put(session, &instance, false)?;
            }
            other => other?,
        }
        let (tx, rx) = watch::channel(RegistrationStatus::Registered);
        st.regs.insert(
            key.clone(),
            Reg {
                instance: instance.clone(),
                status: tx,
            },
        );
        drop(st);
        Ok(Registration::new(
            instance,
            rx,
            Box::new(Control {
                client: self.inner.clone(),
                key,
            }),
        ))
    }
}

#[async_trait]
impl Watcher for MemoryClient {
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.inner.check_alive()?;
        self.inner.reg().snapshot(service)
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let st = WatchState {
            registry: self.inner.registry.clone(),
            reach: self.inner.reg().reachability(),
            service: service.clone(),
            sub: None,
            first: true,
            stale_sent: false,
        };
        futures::stream::unfold(st, |mut st| async move {
            let ev = st.next().await?;
            Some((Ok(ev), st))
        })
        .boxed()
    }
}

struct WatchState {
    registry: MemoryRegistry,
    reach: watch::Receiver<bool>,
    service: ServiceName,
    sub: Option<mpsc::UnboundedReceiver<WatchEvent>>,
    first: bool,
    stale_sent: bool,
}

impl WatchState {
    async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            let Some(rx) = self.sub.as_mut() else {
                if !*self.reach.borrow_and_update() {
                    // The first event is always a snapshot: before it, wait quietly.
                    if !self.first && !self.stale_sent {
                        self.stale_sent = true;
                        return Some(stale(&self.registry));
                    }
                    self.reach.wait_for(|r| *r).await.ok()?;
                    continue;
                }
                let Ok((snap, rx)) = self.registry.inner.subscribe(&self.service) else {
                    continue;
                };
                self.sub = Some(rx);
                self.stale_sent = false;
                let first = std::mem::replace(&mut self.first, false);
                return Some(if first {
                    WatchEvent::Snapshot(snap)
                } else {
                    WatchEvent::Resynced(snap)
                });
            };
            let reap_at = self.registry.inner.next_deadline();
            tokio::select! {
                biased;
                changed = self.reach.changed() => {
                    changed.ok()?;
                    if !*self.reach.borrow_and_update() {
                        self.sub = None;
                    }
                }
                ev = rx.recv() => return ev,
                _ = sleep_until(reap_at) => self.registry.inner.reap(),
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

fn stale(registry: &MemoryRegistry) -> WatchEvent {
    WatchEvent::Stale {
        reason: Arc::new(Error::unavailable(format!(
            "memory registry `{}` is unreachable (fault injected)",
            registry.name()
        ))),
    }
}
