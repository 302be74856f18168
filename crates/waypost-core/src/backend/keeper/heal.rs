//! The keeper's loop: every keep-alive round, settle pending removals and make every
//! registration true to the registry; mark statuses while the session is not live.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::{watch, Notify};

use crate::error::{Error, Result};
use crate::model::Instance;
use crate::registrar::RegistrationStatus;

use super::super::session::{SessionDriver, SessionState};
use super::{key_of, set_status, Inner, Key, Presence, Reg, RegistryStore};

impl<D: SessionDriver, S: RegistryStore<Handle = D::Handle>> Inner<D, S> {
    fn set_all(&self, from: Option<RegistrationStatus>, to: RegistrationStatus) {
        for reg in self.lock().regs.values() {
            if from.is_none_or(|f| *reg.status.borrow() == f) {
                set_status(&reg.status, to);
            }
        }
    }

    /// One round under a live session: settle pending removals, then make every
    /// registration true to the registry.
    async fn round(&self, session: &D::Handle) -> Result<()> {
        self.settle_pending(session).await?;
        // One batched read of every entry written under this session; the others (written
        // under an earlier session, or never) are written again below.
        let mut written: Vec<(Key, Instance)> = Vec::new();
        let mut todo: Vec<Key> = Vec::new();
        for (key, reg) in &self.lock().regs {
            if reg.written.as_ref() == Some(session) {
                written.push((key.clone(), reg.instance.clone()));
            } else {
                todo.push(key.clone());
            }
        }
        // At most `inspect_per_round` of them, in rotation: every entry is read back within
        // ceil(n / budget) rounds, and the others count as held (their session is live);
        // none in a round the store does not read back.
        written.sort_by(|a, b| a.0.cmp(&b.0));
        let round = self.rounds.fetch_add(1, Ordering::Relaxed);
        let budget = if self.store.read_back_round(round) {
            self.store.inspect_per_round().max(1)
        } else {
            0
        };
        if written.len() > budget {
            let start = match budget {
                0 => 0,
                b => self.cursor.fetch_add(b, Ordering::Relaxed) % written.len(),
            };
            written.rotate_left(start);
            for (key, instance) in written.split_off(budget) {
                self.with_reg(&key, |reg| {
                    if reg.instance == instance
                        && *reg.status.borrow() == RegistrationStatus::Suspended
                    {
                        set_status(&reg.status, RegistrationStatus::Registered);
                    }
                });
            }
        }
        let instances: Vec<Instance> = written.iter().map(|(_, i)| i.clone()).collect();
        let presence = if instances.is_empty() {
            Ok(Vec::new())
        } else {
            crate::metrics::timed("inspect", self.store.inspect_many(session, &instances)).await
        };
        let presence = match presence {
            Ok(p) => p,
            Err(Error::SessionExpired) => {
                self.session.expired(session);
                return Err(Error::SessionExpired);
            }
            Err(e) => return Err(e),
        };
        for ((key, instance), p) in written.into_iter().zip(presence) {
            if p == (Presence::Ours { current: true }) {
                self.with_reg(&key, |reg| {
                    if reg.instance == instance {
                        set_status(&reg.status, RegistrationStatus::Registered);
                    }
                });
            } else {
                todo.push(key);
            }
        }
        let mut first_error = None;
        for key in todo {
            let guard = self.lock_key(&key).await;
            let r = self.heal(&key, session).await;
            self.release_key(&key, guard);
            match r {
                Ok(()) => {}
                Err(Error::SessionExpired) => {
                    self.session.expired(session);
                    return Err(Error::SessionExpired);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn settle_pending(&self, session: &D::Handle) -> Result<()> {
        let pending = std::mem::take(&mut self.lock().pending);
        let mut keep = Vec::new();
        let mut error = None;
        let outlive = self.store.entries_outlive_session();
        for p in pending {
            // Entries of an earlier session went with it, unless the registry keeps them.
            if p.session != *session && !outlive {
                continue;
            }
            if error.is_some() {
                keep.push(p);
                continue;
            }
            let key = key_of(&p.instance);
            // Under the id's lock: a `register` of the same id cannot write in between.
            let guard = self.lock_key(&key).await;
            let settled = self.settle_one(session, &key, &p.instance).await;
            self.release_key(&key, guard);
            // An outcome-unknown write found absent may still land: looked for until its
            // window closes (unless its id is registered again: that write owns it).
            let watched = p
                .watch_until
                .is_some_and(|until| tokio::time::Instant::now() < until)
                && !self.lock().regs.contains_key(&key);
            match settled {
                Ok(true) => keep.push(p),
                Ok(false) if watched => keep.push(p),
                Ok(false) => {}
                Err(e) if e.is_temporary() => {
                    error = Some(e);
                    keep.push(p);
                }
                Err(e) => tracing::warn!(
                    backend = self.backend, service = %key.0, id = %key.1,
                    "giving up on confirming an entry's removal: {e}"
                ),
            }
        }
        let mut t = self.lock();
        keep.append(&mut t.pending);
        t.pending = keep;
        error.map_or(Ok(()), Err)
    }

    /// One pending removal, under its id's lock: `Ok(true)` while it must be kept (ours was
    /// there and was just deleted: a later round confirms it gone), `Ok(false)` once the
    /// registry does not hold it, or a registration owns the id again.
    async fn settle_one(
        &self,
        session: &D::Handle,
        key: &Key,
        instance: &Instance,
    ) -> Result<bool> {
        if self.lock().regs.contains_key(key) {
            return Ok(false); // registered again meanwhile: the registration owns the entry
        }
        match crate::metrics::timed("inspect", self.store.inspect(session, instance)).await? {
            Presence::Ours { .. } => {
                crate::metrics::timed("delete", self.store.delete(session, instance)).await?;
                tracing::info!(
                    backend = self.backend, service = %key.0, id = %key.1,
                    "removed an entry whose write or delete had an unknown outcome"
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Makes one registration true to the registry under `session`.
    async fn heal(&self, key: &Key, session: &D::Handle) -> Result<()> {
        let (instance, written) = {
            let t = self.lock();
            let Some(reg) = t.regs.get(key) else {
                return Ok(());
            };
            (reg.instance.clone(), reg.written.clone())
        };
        let presence = if written.as_ref() == Some(session) {
            crate::metrics::timed("inspect", self.store.inspect(session, &instance)).await?
        } else {
            Presence::Missing
        };
        let why = match presence {
            Presence::Ours { current: true } => {
                self.with_reg(key, |reg| {
                    set_status(&reg.status, RegistrationStatus::Registered)
                });
                return Ok(());
            }
            Presence::Ours { current: false } => "its entry was overwritten",
            Presence::Unowned => "its entry was replaced by one bound to no session",
            Presence::Missing if written.as_ref() == Some(session) => {
                "its entry was deleted by someone else"
            }
            Presence::Missing => "its session ended",
            Presence::Foreign => "another live session holds its id",
        };
        self.with_reg(key, |reg| {
            set_status(&reg.status, RegistrationStatus::Reregistering)
        });
        match crate::metrics::timed("write", self.store.write(session, &instance, true)).await {
            Ok(()) => {
                crate::metrics::reregistration(self.backend);
                tracing::info!(
                    backend = self.backend, service = %key.0, id = %key.1,
                    "registered again ({why})"
                );
                self.with_reg(key, |reg| {
                    reg.written = Some(session.clone());
                    if reg.instance == instance {
                        set_status(&reg.status, RegistrationStatus::Registered);
                    }
                });
                Ok(())
            }
            Err(e @ Error::AlreadyExists { .. }) => {
                tracing::warn!(
                    backend = self.backend, service = %key.0, id = %key.1,
                    "cannot register again ({why}); retrying: {e}"
                );
                Err(e)
            }
            Err(e) => {
                self.note_unknown(key, session, &e);
                Err(e)
            }
        }
    }

    fn with_reg(&self, key: &Key, f: impl FnOnce(&mut Reg<D::Handle>)) {
        if let Some(reg) = self.lock().regs.get_mut(key) {
            f(reg);
        }
    }
}

/// The keeper's loop: holds the keeper weakly; runs a round whenever the session is live
/// (every keep-alive interval, and at once when kicked), marks statuses otherwise.
pub(super) async fn keep<D: SessionDriver, S: RegistryStore<Handle = D::Handle>>(
    weak: Weak<Inner<D, S>>,
    kick: Arc<Notify>,
    mut state: watch::Receiver<SessionState<D::Handle>>,
) {
    let mut backoff = match weak.upgrade() {
        Some(inner) => inner.session.backoff().backoff(),
        None => return,
    };
    loop {
        let delay = {
            let Some(inner) = weak.upgrade() else { return };
            let now = state.borrow_and_update().clone();
            if inner.session.is_closed() {
                return;
            }
            match now {
                SessionState::Live(session) => {
                    let idle = {
                        let t = inner.lock();
                        t.regs.is_empty() && t.pending.is_empty()
                    };
                    if idle {
                        Some(inner.session.driver().interval())
                    } else {
                        match inner.round(&session).await {
                            Ok(()) => {
                                backoff.reset();
                                Some(inner.session.driver().interval())
                            }
                            Err(e) => {
                                let d = backoff.next_delay();
                                tracing::debug!(backend = inner.backend, retry_in = ?d, "keeper round failed: {e}");
                                Some(d)
                            }
                        }
                    }
                }
                SessionState::Suspended(_) => {
                    inner.set_all(
                        Some(RegistrationStatus::Registered),
                        RegistrationStatus::Suspended,
                    );
                    None
                }
                SessionState::Expired => {
                    inner.set_all(None, RegistrationStatus::Reregistering);
                    None
                }
                SessionState::Idle | SessionState::Closed => None,
            }
        };
        let wait_state = async {
            if state.changed().await.is_err() {
                futures::future::pending::<()>().await;
            }
        };
        match delay {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = kick.notified() => {}
                    _ = wait_state => {}
                }
            }
            None => {
                tokio::select! {
                    _ = kick.notified() => {}
                    _ = wait_state => {}
                }
            }
        }
    }
}
