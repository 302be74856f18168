//! Configuration keys in the memory registry: core's [`Kv`](crate::backend::Kv) over an
//! in-process map, with the registry's revisions as versions.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::registry::{MemoryRegistry, State};
use crate::backend::watch::{Change, Entry as Listed, Feed, Listing, Next};
use crate::backend::{KvDriver, Scope};
use crate::error::{Error, Result};
use crate::kv::{ConfigEntry, ConfigKey, Expected, Version};
use crate::model::Revision;

/// The largest value the memory registry stores: 1 MiB, like ZooKeeper's default.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The registry's keys and the watches on them.
#[derive(Default)]
pub(crate) struct KvState {
    entries: BTreeMap<ConfigKey, (Vec<u8>, Version)>,
    pub(super) subscribers: Vec<(Scope, mpsc::UnboundedSender<Change<ConfigEntry>>)>,
}

impl KvState {
    /// Watches whose consumer still holds them.
    pub(super) fn open_watches(&self) -> usize {
        self.subscribers
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .count()
    }
}

impl State {
    fn kv_notify(&mut self, key: &ConfigKey, change: Change<ConfigEntry>) {
        self.kv
            .subscribers
            .retain(|(scope, tx)| !scope.covers(key) || tx.send(change.clone()).is_ok());
    }

    fn kv_put(&mut self, key: &ConfigKey, value: &[u8]) -> Version {
        self.revision += 1;
        let version = self.revision;
        self.kv
            .entries
            .insert(key.clone(), (value.to_vec(), version));
        let item = ConfigEntry::new(key.clone(), value.to_vec(), version);
        self.kv_notify(
            key,
            Change::Put {
                key: key.to_string(),
                item: Some(item),
                revision: version,
            },
        );
        version
    }

    fn kv_delete(&mut self, key: &ConfigKey) -> bool {
        if self.kv.entries.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        let revision = self.revision;
        self.kv_notify(
            key,
            Change::Delete {
                key: key.to_string(),
                revision,
            },
        );
        true
    }

    fn kv_version(&self, key: &ConfigKey) -> Option<Version> {
        self.kv.entries.get(key).map(|(_, v)| *v)
    }

    fn kv_listing(&self, scope: &Scope) -> Listing<ConfigEntry> {
        let entries = self
            .kv
            .entries
            .iter()
            .filter(|(k, _)| scope.covers(k))
            .map(|(k, (value, version))| Listed {
                key: k.to_string(),
                item: ConfigEntry::new(k.clone(), value.clone(), *version),
            })
            .collect();
        Listing {
            entries,
            revision: self.revision,
        }
    }
}

fn check(key: &ConfigKey, expected: Option<Expected>, current: Option<Version>) -> Result<()> {
    expected.map_or(Ok(()), |e| e.check(key, current))
}

/// The memory backend's key/value primitives (core's [`Kv`](crate::backend::Kv) runs
/// the [`ConfigStore`](crate::kv::ConfigStore) contract over them).
#[derive(Clone)]
pub struct MemoryKv {
    pub(crate) registry: MemoryRegistry,
}

impl fmt::Debug for MemoryKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryKv")
            .field("registry", &self.registry.name())
            .finish()
    }
}

#[async_trait]
impl KvDriver for MemoryKv {
    type Feed = KvFeed;

    fn max_value_len(&self) -> usize {
        MAX_VALUE_LEN
    }

    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
        let st = self.registry.inner.op()?;
        Ok(st
            .kv
            .entries
            .get(key)
            .map(|(value, version)| ConfigEntry::new(key.clone(), value.clone(), *version)))
    }

    async fn put(
        &self,
        key: &ConfigKey,
        value: &[u8],
        expected: Option<Expected>,
    ) -> Result<Version> {
        let version = {
            let mut st = self.registry.inner.op()?;
            check(key, expected, st.kv_version(key))?;
            st.kv_put(key, value)
        };
        self.registry.inner.reply("writing a configuration key")?;
        Ok(version)
    }

    async fn delete(&self, key: &ConfigKey, expected: Option<Version>) -> Result<bool> {
        let existed = {
            let mut st = self.registry.inner.op()?;
            check(key, expected.map(Expected::Version), st.kv_version(key))?;
            st.kv_delete(key)
        };
        self.registry.inner.reply("deleting a configuration key")?;
        Ok(existed)
    }

    async fn list(&self, prefix: &ConfigKey) -> Result<Listing<ConfigEntry>> {
        let st = self.registry.inner.op()?;
        Ok(st.kv_listing(&Scope::Prefix(prefix.clone())))
    }

    fn feed(&self, scope: &Scope) -> KvFeed {
        KvFeed {
            registry: self.registry.clone(),
            scope: scope.clone(),
            reach: self.registry.inner.reachability(),
            sub: None,
        }
    }
}

/// A watch of one scope: a listing with a subscription to every later change.
#[derive(Debug)]
pub struct KvFeed {
    registry: MemoryRegistry,
    scope: Scope,
    reach: watch::Receiver<bool>,
    sub: Option<mpsc::UnboundedReceiver<Change<ConfigEntry>>>,
}

impl KvFeed {
    fn unreachable(&self) -> Error {
        Error::unavailable(format!(
            "memory registry `{}` is unreachable (fault injected)",
            self.registry.name()
        ))
    }
}

#[async_trait]
impl Feed for KvFeed {
    type Item = ConfigEntry;

    async fn list(&mut self) -> Result<Listing<ConfigEntry>> {
        self.sub = None;
        // Before the registry answers, wait quietly: that is no outage to report.
        let _ = self.reach.wait_for(|r| *r).await;
        let mut st = self.registry.inner.op()?;
        let listing = st.kv_listing(&self.scope);
        let (tx, rx) = mpsc::unbounded_channel();
        st.kv.subscribers.push((self.scope.clone(), tx));
        drop(st);
        self.sub = Some(rx);
        self.reach.borrow_and_update();
        Ok(listing)
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<ConfigEntry>> {
        let Some(rx) = self.sub.as_mut() else {
            return Err(self.unreachable());
        };
        tokio::select! {
            biased;
            changed = self.reach.changed() => {
                if changed.is_ok() && *self.reach.borrow_and_update() {
                    return Ok(Next::Changes(Vec::new()));
                }
                self.sub = None;
                Err(self.unreachable())
            }
            change = rx.recv() => match change {
                Some(first) => {
                    let mut changes = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        changes.push(more);
                    }
                    Ok(Next::Changes(changes))
                }
                None => {
                    self.sub = None;
                    Err(self.unreachable())
                }
            },
        }
    }
}

impl MemoryRegistry {
    /// Fault injection, as a foreign writer (the registry's own tool): writes `value` at
    /// `key`, ignoring reachability. Returns the new version.
    pub fn kv_put_foreign(&self, key: &ConfigKey, value: &[u8]) -> Version {
        self.inner.lock().kv_put(key, value)
    }

    /// Fault injection, as a foreign writer: deletes `key`. Returns whether it existed.
    pub fn kv_delete_foreign(&self, key: &ConfigKey) -> bool {
        self.inner.lock().kv_delete(key)
    }

    /// What the registry holds at `key`, ignoring reachability (for assertions).
    pub fn kv_peek(&self, key: &ConfigKey) -> Option<Vec<u8>> {
        self.inner
            .lock()
            .kv
            .entries
            .get(key)
            .map(|(v, _)| v.clone())
    }
}
