//! Registration: keys bound to the client's lease, kept alive and written again when the
//! lease is lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use waypost_core::{
    Error, Instance, Registrar, Registration, RegistrationControl, RegistrationStatus, Result,
};

use crate::client::{EtcdDiscovery, Inner};
use crate::codec;
use crate::error::{retried, EtcdError};

/// One live registration, as the client keeps it.
pub(crate) struct Reg {
    pub(crate) value: Vec<u8>,
    /// The lease the key is written under; `None` while it needs (re)writing.
    pub(crate) written: Option<i64>,
    /// The lease it was last written under, to recognise our own leftover key.
    pub(crate) prev: Option<i64>,
    pub(crate) status: watch::Sender<RegistrationStatus>,
}

/// The client's lease and registrations.
#[derive(Default)]
pub(crate) struct Session {
    pub(crate) lease: Option<i64>,
    pub(crate) regs: HashMap<String, Reg>,
    /// Keys being registered right now (so one client cannot register an id twice).
    pub(crate) registering: HashSet<String>,
    /// Deregistrations etcd has not confirmed yet: (key, lease it was written under).
    pub(crate) pending_deletes: Vec<(String, i64)>,
}

pub(crate) fn set_status(reg: &Reg, s: RegistrationStatus) {
    reg.status.send_if_modified(|cur| {
        if *cur == s || *cur == RegistrationStatus::Deregistered {
            false
        } else {
            *cur = s;
            true
        }
    });
}

enum Created {
    Yes,
    Existing { lease: i64, mod_revision: i64 },
}

impl Inner {
    pub(crate) fn rt(&self) -> Duration {
        self.config.request_timeout
    }

    /// How often a call that never reached a server is sent again.
    pub(crate) fn attempts(&self) -> usize {
        2 * self.config.endpoints.len() + 1
    }

    async fn txn(&self, operation: &'static str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        retried(self.rt(), self.attempts(), operation, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// The current lease, granting one if there is none.
    pub(crate) async fn lease(&self) -> Result<i64> {
        if let Some(l) = self.lock().lease {
            return Ok(l);
        }
        let _g = self.grant_lock.lock().await;
        if let Some(l) = self.lock().lease {
            return Ok(l);
        }
        self.check_alive()?;
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let resp = retried(self.rt(), self.attempts(), "granting a lease", || {
            let mut lc = self.client.lease_client();
            async move { lc.grant(ttl, None).await }
        })
        .await?;
        if !resp.error().is_empty() {
            return Err(EtcdError::Protocol {
                operation: "lease grant",
                message: resp.error().to_string(),
            }
            .into());
        }
        self.granted_ttl.store(resp.ttl(), Ordering::Release);
        tracing::info!(
            lease = format_args!("{:x}", resp.id()),
            asked_ttl = ttl,
            granted_ttl = resp.ttl(),
            "etcd: lease granted"
        );
        self.lock().lease = Some(resp.id());
        Ok(resp.id())
    }

    /// etcd no longer knows `lease`: everything written under it must be written again.
    pub(crate) fn lease_lost(&self, lease: i64) {
        let mut s = self.lock();
        if s.lease == Some(lease) {
            tracing::warn!(
                lease = format_args!("{lease:x}"),
                registrations = s.regs.len(),
                "etcd: lease lost, registering again"
            );
            s.lease = None;
        }
        for reg in s.regs.values_mut() {
            if reg.written == Some(lease) {
                reg.prev = Some(lease);
                reg.written = None;
            }
            if reg.written.is_none() {
                set_status(reg, RegistrationStatus::Reregistering);
            }
        }
        s.pending_deletes.retain(|(_, l)| *l != lease);
        drop(s);
        self.wake.notify_one();
    }

    pub(crate) fn suspend_all(&self) {
        for reg in self.lock().regs.values() {
            if *reg.status.borrow() == RegistrationStatus::Registered {
                set_status(reg, RegistrationStatus::Suspended);
            }
        }
    }

    /// Creates `key` under `lease` if it does not exist; else says who holds it.
    async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<Created> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("creating a registration", txn).await?;
        if resp.succeeded() {
            return Ok(Created::Yes);
        }
        let existing = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.lease(), kv.mod_revision())),
            _ => None,
        });
        match existing {
            Some((lease, mod_revision)) => Ok(Created::Existing {
                lease,
                mod_revision,
            }),
            None => Err(EtcdError::Protocol {
                operation: "creating a registration",
                message: "the key changed during the transaction; retrying".into(),
            }
            .into()),
        }
    }

    /// Writes `value` under `lease` if the key is still at `mod_revision`.
    async fn overwrite(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        mod_revision: i64,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.txn("replacing a registration", txn).await?;
        Ok(resp.succeeded())
    }

    /// Deletes `key` if it is still bound to `lease` (never another party's key).
    pub(crate) async fn delete_if_ours(&self, key: &str, lease: i64) -> Result<()> {
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn("deleting a registration", txn).await?;
        Ok(())
    }

    /// Writes every registration that is not written under `lease`.
    pub(crate) async fn write_pending(&self, lease: i64) -> Result<()> {
        let todo: Vec<(String, Vec<u8>, Option<i64>)> = self
            .lock()
            .regs
            .iter()
            .filter(|(_, r)| r.written != Some(lease))
            .map(|(k, r)| (k.clone(), r.value.clone(), r.prev))
            .collect();
        let mut conflict = None;
        for (key, value, prev) in todo {
            let written = match self.create(&key, &value, lease).await? {
                Created::Yes => true,
                Created::Existing {
                    lease: held,
                    mod_revision,
                } if held == lease || Some(held) == prev => {
                    self.overwrite(&key, &value, lease, mod_revision).await?
                }
                Created::Existing { lease: held, .. } => {
                    tracing::warn!(
                        key = %key,
                        holder = format_args!("{held:x}"),
                        "etcd: cannot register again: another live registration holds this id"
                    );
                    conflict = Some(Error::AlreadyExists {
                        what: format!("etcd key `{key}` is held by another lease"),
                    });
                    false
                }
            };
            if !written {
                continue;
            }
            let mut s = self.lock();
            match s.regs.get_mut(&key) {
                Some(reg) if reg.value == value => {
                    reg.written = Some(lease);
                    reg.prev = Some(lease);
                    set_status(reg, RegistrationStatus::Registered);
                    tracing::info!(key = %key, "etcd: registered again");
                }
                Some(_) => {} // updated meanwhile: the next round writes the new value
                None => s.pending_deletes.push((key, lease)), // deregistered meanwhile
            }
        }
        conflict.map_or(Ok(()), Err)
    }

    async fn update(&self, key: &str, instance: &Instance) -> Result<()> {
        self.check_alive()?;
        let value = codec::encode(self.config.layout, instance);
        let written = {
            let s = self.lock();
            let reg = s.regs.get(key).ok_or(Error::Closed {
                what: "registration",
            })?;
            reg.written.filter(|l| s.lease == Some(*l))
        };
        let Some(lease) = written else {
            // Being registered again: that writes the new value.
            if let Some(reg) = self.lock().regs.get_mut(key) {
                reg.value = value;
            }
            self.wake.notify_one();
            return Ok(());
        };
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key,
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        match self.txn("updating a registration", txn).await {
            Ok(r) => {
                let mut s = self.lock();
                if let Some(reg) = s.regs.get_mut(key) {
                    reg.value = value;
                    if !r.succeeded() {
                        // The key is gone (lease lost): write it again.
                        reg.prev = reg.written.take();
                        set_status(reg, RegistrationStatus::Reregistering);
                    }
                }
                drop(s);
                if !r.succeeded() {
                    self.wake.notify_one();
                }
                Ok(())
            }
            Err(Error::SessionExpired) => {
                if let Some(reg) = self.lock().regs.get_mut(key) {
                    reg.value = value;
                }
                self.lease_lost(lease);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn deregister(&self, key: &str) -> Result<()> {
        let Some(reg) = self.lock().regs.remove(key) else {
            return Ok(());
        };
        reg.status.send_replace(RegistrationStatus::Deregistered);
        if self.is_dead() {
            return Ok(());
        }
        let Some(lease) = reg.written.or(reg.prev) else {
            return Ok(());
        };
        match self.delete_if_ours(key, lease).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.lock().pending_deletes.push((key.to_string(), lease));
                self.wake.notify_one();
                Err(e)
            }
        }
    }
}

#[derive(Debug)]
struct Control {
    inner: Arc<Inner>,
    key: String,
}

#[async_trait]
impl RegistrationControl for Control {
    async fn update(&self, instance: Instance) -> Result<()> {
        self.inner.update(&self.key, &instance).await
    }

    async fn deregister(&self) -> Result<()> {
        self.inner.deregister(&self.key).await
    }

    fn deregister_in_background(&self) {
        if self.inner.crashed.load(Ordering::Acquire) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                let inner = self.inner.clone();
                let key = self.key.clone();
                h.spawn(async move {
                    if let Err(e) = inner.deregister(&key).await {
                        tracing::debug!(key = %key, "etcd: deregistration deferred: {e}");
                    }
                });
            }
            Err(_) => {
                // No runtime: hand it to the keep-alive task.
                let mut s = self.inner.lock();
                if let Some(reg) = s.regs.remove(&self.key) {
                    reg.status.send_replace(RegistrationStatus::Deregistered);
                    if let Some(l) = reg.written.or(reg.prev) {
                        s.pending_deletes.push((self.key.clone(), l));
                    }
                }
                drop(s);
                self.inner.wake.notify_one();
            }
        }
    }
}

#[async_trait]
impl Registrar for EtcdDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        instance.validate()?;
        let inner = &self.inner;
        inner.check_alive()?;
        let key = codec::key(inner.config.layout, inner.config.key_prefix(), &instance);
        let value = codec::encode(inner.config.layout, &instance);
        {
            let mut s = inner.lock();
            if s.regs.contains_key(&key) || !s.registering.insert(key.clone()) {
                return Err(Error::AlreadyExists {
                    what: format!(
                        "instance `{}` of service `{}` is already registered by this client",
                        instance.id, instance.service
                    ),
                });
            }
        }
        // Frees the id again however this call ends (even if its future is dropped).
        struct Registering<'a>(&'a Inner, &'a str, bool);
        impl Drop for Registering<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.lock().registering.remove(self.1);
                }
            }
        }
        let mut registering = Registering(inner, &key, true);
        inner.ensure_task();
        let lease = self.create_registration(&key, &value).await?;
        let mut s = inner.lock();
        // Listed in `regs` before the id is freed, under one lock.
        s.registering.remove(&key);
        registering.2 = false;
        drop(registering);
        let (tx, rx) = watch::channel(RegistrationStatus::Registered);
        let current = s.lease == Some(lease);
        s.pending_deletes.retain(|(k, _)| *k != key);
        s.regs.insert(
            key.clone(),
            Reg {
                value,
                written: current.then_some(lease),
                prev: Some(lease),
                status: tx,
            },
        );
        drop(s);
        if !current {
            inner.wake.notify_one();
        }
        Ok(Registration::new(
            instance,
            rx,
            Box::new(Control {
                inner: inner.clone(),
                key,
            }),
        ))
    }
}

impl EtcdDiscovery {
    async fn create_registration(&self, key: &str, value: &[u8]) -> Result<i64> {
        let inner = &self.inner;
        let mut retried = false;
        loop {
            let lease = inner.lease().await?;
            match inner.create(key, value, lease).await {
                Ok(Created::Yes) => return Ok(lease),
                Ok(Created::Existing {
                    lease: held,
                    mod_revision,
                }) if held == lease => {
                    // Our own leftover (a deregistration not confirmed yet): take it over.
                    if inner.overwrite(key, value, lease, mod_revision).await? {
                        return Ok(lease);
                    }
                }
                Ok(Created::Existing { .. }) => {
                    return Err(Error::AlreadyExists {
                        what: format!("etcd key `{key}` is held by another live registration"),
                    })
                }
                Err(Error::SessionExpired) if !retried => {
                    inner.lease_lost(lease);
                }
                Err(e) => return Err(e),
            }
            if retried {
                return Err(Error::unavailable(format!(
                    "etcd key `{key}` kept changing while registering"
                )));
            }
            retried = true;
        }
    }
}
