//! The registration keeper: the table of a client's live registrations, bound to its
//! [`Session`], and the one loop that keeps them true to the registry.
//!
//! A backend supplies a [`RegistryStore`] (write, inspect and delete one entry); the
//! keeper owns everything else of the [`Registrar`] contract:
//!
//! - one registration per id per client; the registry's own conflicts are
//!   [`Error::AlreadyExists`];
//! - statuses: `Suspended` while the session is, `Reregistering` whenever the registry
//!   lost an entry (session expired, deleted or overwritten by someone else), `Registered`
//!   once it is back; re-registration retries with backoff and no cap;
//! - **writes whose outcome is unknown** (a timeout, a lost reply, a caller that gave up
//!   waiting): the entry is tracked as a *pending removal* until the registry confirms it
//!   does not hold it, so a caller who got an error never finds the instance registered
//!   afterwards. A registry that was paused or slow can still apply such a write after it
//!   answered that it holds nothing (the request waited in its socket), and the entry would
//!   then live as long as the session: the keeper keeps looking for it, every round, for
//!   [`UNCERTAIN_FOR`] session bounds after the failure (one applied later still, under
//!   a session that stayed alive all along, is not caught). A re-registration or update
//!   that fails so is remembered the same while the registration lives: deregistered
//!   within that window, the entry is looked for afterwards too. A failed deregistration
//!   is retried the same way (until confirmed absent: a delete applied late does no harm);
//! - drop-time deregistration in the background.

use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{watch, Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Instance, InstanceId, ServiceName};
use crate::registrar::{Registrar, Registration, RegistrationControl, RegistrationStatus};

use super::session::{Session, SessionDriver};
pub use super::store::{Presence, RegistryStore};

mod heal;

use heal::keep;

type Key = (ServiceName, InstanceId);

fn key_of(i: &Instance) -> Key {
    (i.service.clone(), i.id.clone())
}

struct Reg<H> {
    instance: Instance,
    status: watch::Sender<RegistrationStatus>,
    /// The session the entry was last written under.
    written: Option<H>,
}

struct Pending<H> {
    session: H,
    instance: Instance,
    /// An outcome-unknown write: looked for until then even when found absent, as it may
    /// still land. `None` (a failed delete): settled once found absent.
    watch_until: Option<Instant>,
}

/// How long, in session bounds ([`SessionDriver::bound`], or three keep-alive intervals
/// where the registry has none), the keeper looks for an outcome-unknown write that may
/// still land.
pub const UNCERTAIN_FOR: u32 = 3;

struct Table<H> {
    regs: HashMap<Key, Reg<H>>,
    /// Entries that must not stay in the registry: outcome-unknown creates, failed
    /// deletes. Dropped once the registry says it does not hold them (or their session
    /// ended).
    pending: Vec<Pending<H>>,
    /// Registrations whose last failed write (a re-registration, an update) had an
    /// unknown outcome: the session it was sent under and the end of its window. A
    /// deregistration within that window leaves a watched pending removal, as the write
    /// may land after the delete.
    unknown: HashMap<Key, (H, Instant)>,
    /// One lock per key: register, update, deregister and the keeper's round never
    /// interleave on one entry.
    locks: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

fn set_status(tx: &watch::Sender<RegistrationStatus>, s: RegistrationStatus) {
    tx.send_if_modified(|cur| {
        if *cur == s || *cur == RegistrationStatus::Deregistered {
            false
        } else {
            crate::metrics::registration_status(Some(*cur), s);
            *cur = s;
            true
        }
    });
}

/// The registration is over: `Deregistered`, final.
fn set_deregistered(tx: &watch::Sender<RegistrationStatus>) {
    let old = tx.send_replace(RegistrationStatus::Deregistered);
    crate::metrics::registration_status(Some(old), RegistrationStatus::Deregistered);
}

struct Inner<D: SessionDriver, S> {
    session: Session<D>,
    store: S,
    table: Mutex<Table<D::Handle>>,
    kick: Arc<Notify>,
    task_started: AtomicBool,
    /// Where the next round's read-back starts (see [`RegistryStore::inspect_per_round`]).
    cursor: std::sync::atomic::AtomicUsize,
    /// Rounds run so far (see [`RegistryStore::read_back_round`]).
    rounds: std::sync::atomic::AtomicU64,
    backend: &'static str,
}

/// A client's registrations, kept alive and true to the registry: implements
/// [`Registrar`] for any backend's [`RegistryStore`] over its [`Session`]. Cheap to
/// clone.
pub struct Keeper<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> {
    inner: Arc<Inner<D, S>>,
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Clone for Keeper<D, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Debug for Keeper<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.inner.lock();
        f.debug_struct("Keeper")
            .field("backend", &self.inner.backend)
            .field("session", &self.inner.session)
            .field("registrations", &t.regs.len())
            .field("pending_removals", &t.pending.len())
            .finish()
    }
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Keeper<D, S> {
    /// A keeper of registrations written through `store`, bound to `session`. `backend`
    /// names the backend in logs.
    pub fn new(backend: &'static str, session: Session<D>, store: S) -> Self {
        Self {
            inner: Arc::new(Inner {
                session,
                store,
                table: Mutex::new(Table {
                    regs: HashMap::new(),
                    pending: Vec::new(),
                    unknown: HashMap::new(),
                    locks: HashMap::new(),
                }),
                kick: Arc::new(Notify::new()),
                task_started: AtomicBool::new(false),
                cursor: Default::default(),
                rounds: Default::default(),
                backend,
            }),
        }
    }

    /// The session registrations are bound to.
    pub fn session(&self) -> &Session<D> {
        &self.inner.session
    }

    /// The backend's store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// How many registrations are held.
    pub fn len(&self) -> usize {
        self.inner.lock().regs.len()
    }

    /// Whether no registration is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many entries wait to be confirmed absent (outcome-unknown writes, failed
    /// deletes).
    pub fn pending_removals(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// How many rounds the keeper ran (read-back, healing and pending removals, once per
    /// keep-alive interval while it holds anything): for diagnostics and tests that must
    /// know a round went by.
    pub fn rounds(&self) -> u64 {
        self.inner.rounds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many per-id locks the keeper keeps (one per id registered or pending).
    #[cfg(test)]
    pub(crate) fn locked_ids(&self) -> usize {
        self.inner.lock().locks.len()
    }

    /// Shuts down: every registration is `Deregistered` and the session closed (the
    /// registry drops whatever it still holds for it at once). Later calls fail with
    /// [`Error::Closed`].
    pub async fn shutdown(&self) -> Result<()> {
        {
            let mut t = self.inner.lock();
            for (_, reg) in t.regs.drain() {
                set_deregistered(&reg.status);
            }
        }
        self.inner.kick.notify_one();
        self.inner.session.close().await
    }

    /// **Test hook.** The process "crashes": nothing more is written or deleted.
    pub fn crash(&self) {
        self.inner.session.crash();
        self.inner.kick.notify_one();
    }

    fn ensure_task(&self) {
        super::spawn_once(&self.inner.task_started, || {
            keep(
                Arc::downgrade(&self.inner),
                self.inner.kick.clone(),
                self.inner.session.state(),
            )
        });
    }
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Inner<D, S> {
    fn lock(&self) -> MutexGuard<'_, Table<D::Handle>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn lock_key(&self, key: &Key) -> OwnedMutexGuard<()> {
        let m = self.lock().locks.entry(key.clone()).or_default().clone();
        m.lock_owned().await
    }

    /// Forgets the key's lock when nobody else holds or waits for it.
    fn release_key(&self, key: &Key, guard: OwnedMutexGuard<()>) {
        drop(guard);
        let mut t = self.lock();
        if !t.regs.contains_key(key) && !t.pending.iter().any(|p| key_of(&p.instance) == *key) {
            if let Some(m) = t.locks.get(key) {
                if Arc::strong_count(m) == 1 {
                    t.locks.remove(key);
                }
            }
        }
    }

    /// A failed delete: the entry may still be there.
    fn add_pending(&self, session: D::Handle, instance: Instance) {
        self.push_pending(session, instance, None);
    }

    /// A write whose outcome is unknown: it may be there, or land later.
    fn add_unknown(&self, session: D::Handle, instance: Instance) {
        let until = self.uncertain_until();
        self.push_pending(session, instance, Some(until));
    }

    /// Until when a write whose outcome is unknown now may still land.
    fn uncertain_until(&self) -> Instant {
        let driver = self.session.driver();
        let bound = driver.bound().unwrap_or(driver.interval() * 3);
        Instant::now() + bound * UNCERTAIN_FOR
    }

    /// A write of a held registration failed with its outcome unknown (see
    /// [`Table::unknown`]); a refusal wrote nothing.
    pub(super) fn note_unknown(&self, key: &Key, session: &D::Handle, e: &Error) {
        if !is_refusal(e) && !matches!(e, Error::SessionExpired) {
            let until = self.uncertain_until();
            self.lock()
                .unknown
                .insert(key.clone(), (session.clone(), until));
        }
    }

    /// A registration leaves the table: if a write of it had an unknown outcome within
    /// its window, that write may still land, so it becomes a watched pending removal.
    fn forget(t: &mut Table<D::Handle>, key: &Key, instance: &Instance) {
        let now = Instant::now();
        t.unknown.retain(|_, (_, until)| *until > now);
        if let Some((session, until)) = t.unknown.remove(key) {
            t.pending.push(Pending {
                session,
                instance: instance.clone(),
                watch_until: Some(until),
            });
        }
    }

    fn push_pending(&self, session: D::Handle, instance: Instance, watch_until: Option<Instant>) {
        self.lock().pending.push(Pending {
            session,
            instance,
            watch_until,
        });
        self.kick.notify_one();
    }

    async fn register(
        self: &Arc<Self>,
        instance: Instance,
    ) -> Result<watch::Receiver<RegistrationStatus>> {
        let key = key_of(&instance);
        let guard = self.lock_key(&key).await;
        let result = self.register_locked(&key, &instance).await;
        self.release_key(&key, guard);
        result
    }

    async fn register_locked(
        self: &Arc<Self>,
        key: &Key,
        instance: &Instance,
    ) -> Result<watch::Receiver<RegistrationStatus>> {
        if self.lock().regs.contains_key(key) {
            return Err(Error::AlreadyExists {
                what: format!(
                    "instance `{}` of service `{}` is already registered by this client",
                    key.1, key.0
                ),
            });
        }
        let mut attempts = 0;
        loop {
            let session = self.session.current().await?;
            // Our own leftovers of this id (an earlier outcome-unknown write) are replaced
            // by this write, not removed after it.
            self.lock().pending.retain(|p| key_of(&p.instance) != *key);
            // If this future is dropped mid-write, the write's outcome is unknown.
            let mut unknown = Unknown::arm(self, &session, instance);
            match crate::metrics::timed("write", self.store.write(&session, instance, false)).await
            {
                Ok(()) => {
                    unknown.disarm();
                    let (tx, rx) = watch::channel(RegistrationStatus::Registered);
                    crate::metrics::registration_status(None, RegistrationStatus::Registered);
                    self.lock().regs.insert(
                        key.clone(),
                        Reg {
                            instance: instance.clone(),
                            status: tx,
                            written: Some(session),
                        },
                    );
                    return Ok(rx);
                }
                Err(Error::SessionExpired) if attempts == 0 => {
                    unknown.disarm();
                    attempts += 1;
                    self.session.expired(&session);
                }
                Err(e) if is_refusal(&e) => {
                    unknown.disarm();
                    return Err(e);
                }
                Err(e) => {
                    // The registry may have applied it: track it until it is known absent.
                    drop(unknown);
                    tracing::debug!(
                        backend = self.backend, service = %key.0, id = %key.1,
                        "registration failed with an unknown outcome; it will be removed if it landed: {e}"
                    );
                    return Err(e);
                }
            }
        }
    }

    async fn update(&self, instance: Instance) -> Result<()> {
        let key = key_of(&instance);
        let guard = self.lock_key(&key).await;
        let result = self.update_locked(&key, instance).await;
        self.release_key(&key, guard);
        result
    }

    async fn update_locked(&self, key: &Key, instance: Instance) -> Result<()> {
        self.session.check_open()?;
        if !self.lock().regs.contains_key(key) {
            return Err(Error::Closed {
                what: "registration",
            });
        }
        let session = self.session.current().await?;
        match crate::metrics::timed("write", self.store.write(&session, &instance, true)).await {
            Ok(()) => {
                if let Some(reg) = self.lock().regs.get_mut(key) {
                    reg.instance = instance;
                    reg.written = Some(session);
                }
                Ok(())
            }
            Err(Error::SessionExpired) => {
                // Re-registration writes the new instance.
                if let Some(reg) = self.lock().regs.get_mut(key) {
                    reg.instance = instance;
                }
                self.session.expired(&session);
                Ok(())
            }
            Err(e) => {
                // The registry may hold either version: the next round checks it and
                // writes back the one the guard holds.
                self.note_unknown(key, &session, &e);
                self.kick.notify_one();
                Err(e)
            }
        }
    }

    async fn deregister(&self, key: &Key) -> Result<()> {
        let guard = self.lock_key(key).await;
        let result = self.deregister_locked(key).await;
        self.release_key(key, guard);
        result
    }

    async fn deregister_locked(&self, key: &Key) -> Result<()> {
        let Some(reg) = self.lock().regs.remove(key) else {
            return Ok(());
        };
        set_deregistered(&reg.status);
        {
            let mut t = self.lock();
            Self::forget(&mut t, key, &reg.instance);
        }
        if self.session.is_closed() {
            return Ok(());
        }
        let Some(session) = reg.written else {
            return Ok(());
        };
        match crate::metrics::timed("delete", self.store.delete(&session, &reg.instance)).await {
            Ok(()) | Err(Error::SessionExpired) => Ok(()),
            Err(e) => {
                self.add_pending(session, reg.instance);
                Err(e)
            }
        }
    }

    /// Without a runtime (dropped at shutdown): hand the removal to the keeper's loop.
    fn deregister_later(&self, key: &Key) {
        let mut t = self.lock();
        if let Some(reg) = t.regs.remove(key) {
            set_deregistered(&reg.status);
            Self::forget(&mut t, key, &reg.instance);
            if let Some(session) = reg.written {
                t.pending.push(Pending {
                    session,
                    instance: reg.instance,
                    watch_until: None,
                });
            }
        }
        drop(t);
        self.kick.notify_one();
    }
}

/// A definite refusal: the registry answered and wrote nothing.
fn is_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::AlreadyExists { .. }
            | Error::InvalidInput { .. }
            | Error::InvalidConfig { .. }
            | Error::Unauthorized { .. }
            | Error::Unsupported { .. }
            | Error::Closed { .. }
    )
}

/// Tracks a write in flight: if the caller's future is dropped (or the write fails)
/// before the outcome is known, the entry becomes a pending removal.
struct Unknown<'a, D: SessionDriver, S: RegistryStore<Handle = D::Handle>> {
    inner: &'a Arc<Inner<D, S>>,
    armed: Option<(D::Handle, Instance)>,
}

impl<'a, D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Unknown<'a, D, S> {
    fn arm(inner: &'a Arc<Inner<D, S>>, session: &D::Handle, instance: &Instance) -> Self {
        Self {
            inner,
            armed: Some((session.clone(), instance.clone())),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Drop for Unknown<'_, D, S> {
    fn drop(&mut self) {
        if let Some((session, instance)) = self.armed.take() {
            self.inner.add_unknown(session, instance);
        }
    }
}

#[derive(Debug)]
struct Control<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> {
    keeper: Keeper<D, S>,
    key: Key,
}

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Debug for Inner<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeeperInner")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> RegistrationControl for Control<D, S> {
    async fn update(&self, instance: Instance) -> Result<()> {
        self.keeper.inner.update(instance).await
    }

    async fn deregister(&self) -> Result<()> {
        self.keeper.inner.deregister(&self.key).await
    }

    fn deregister_in_background(&self) {
        if self.keeper.inner.session.is_closed() {
            if let Some(reg) = self.keeper.inner.lock().regs.remove(&self.key) {
                set_deregistered(&reg.status);
            }
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.keeper.inner.clone();
                let key = self.key.clone();
                rt.spawn(async move {
                    if let Err(e) = inner.deregister(&key).await {
                        tracing::debug!(backend = inner.backend, service = %key.0, id = %key.1, "deregistration deferred: {e}");
                    }
                });
            }
            Err(_) => self.keeper.inner.deregister_later(&self.key),
        }
    }
}

#[async_trait]
impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Registrar for Keeper<D, S> {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        instance.validate()?;
        self.inner.session.check_open()?;
        self.ensure_task();
        let span = tracing::info_span!(
            "waypost.register",
            backend = self.inner.backend,
            service = %instance.service,
            id = %instance.id
        );
        let status =
            tracing::Instrument::instrument(self.inner.register(instance.clone()), span).await?;
        Ok(Registration::new(
            instance.clone(),
            status,
            Box::new(Control {
                keeper: self.clone(),
                key: key_of(&instance),
            }),
        ))
    }
}

#[cfg(test)]
mod tests;
