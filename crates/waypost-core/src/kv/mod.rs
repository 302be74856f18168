//! Watched configuration: keys and values stored once in the registry, changed at run
//! time, seen by every process without a restart.
//!
//! [`ConfigStore`] is the contract (get, put, compare-and-set, delete, list, watch), the
//! same on every registry; [`LiveConfig`] is the typed, live value built on a watch — the
//! [`ServiceCache`](crate::ServiceCache) of configuration.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> waypost_core::Result<()> {
//! use waypost_core::kv::{ConfigKey, ConfigStore, Expected};
//!
//! let d = waypost_core::memory::MemoryRegistry::new("kv-doc")
//!     .client(std::time::Duration::from_secs(10))
//!     .into_discovery();
//! let kv = d.kv()?;
//! let key: ConfigKey = "my_app/config".parse()?;
//! let v1 = kv.put(&key, b"{\"pool\": 8}".to_vec()).await?;
//! // Compare-and-set: only if nobody changed it since v1.
//! let v2 = kv.put_if(&key, b"{\"pool\": 16}".to_vec(), Expected::Version(v1)).await?;
//! assert!(v2 > v1);
//! assert_eq!(kv.get(&key).await?.unwrap().value, b"{\"pool\": 16}");
//! // A stale expectation writes nothing.
//! let e = kv.put_if(&key, b"{}".to_vec(), Expected::Version(v1)).await.unwrap_err();
//! assert!(matches!(e, waypost_core::Error::Conflict { current: Some(v), .. } if v == v2));
//! # Ok(()) }
//! ```
//!
//! # Where the keys live
//!
//! Each backend stores a key natively, under a configurable prefix (`config` by default),
//! so that the registry's own tools see the same bytes: a persistent znode
//! `/config/my_app/config` on ZooKeeper, the KV key `config/my_app/config` on Consul, the
//! key `/config/my_app/config` on etcd. See each backend's docs.

mod key;
mod live;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::backend::watch::{Event, Item};
use crate::error::Result;
use crate::model::Revision;

pub use key::{ConfigKey, MAX_KEY_LEN, MAX_SEGMENT_LEN};
pub use live::{Format, LiveConfig, LiveOptions, LiveState, Rejected};

/// A key's version: rises with every write of the key, also across a delete and a
/// re-creation (on every backend it is a registry-wide revision: ZooKeeper's `mzxid`,
/// etcd's `mod_revision`, Consul's `ModifyIndex`). Compare versions of one key only.
pub type Version = u64;

/// One key and its value, as the registry holds it.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigEntry {
    /// The key.
    pub key: ConfigKey,
    /// The value, as stored (any bytes).
    pub value: Vec<u8>,
    /// The version of this value.
    pub version: Version,
}

impl ConfigEntry {
    /// An entry.
    pub fn new(key: ConfigKey, value: Vec<u8>, version: Version) -> Self {
        Self {
            key,
            value,
            version,
        }
    }

    /// The value as UTF-8, if it is.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

impl Debug for ConfigEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values can be large and can hold secrets: show their size only.
        f.debug_struct("ConfigEntry")
            .field("key", &self.key)
            .field("value_len", &self.value.len())
            .field("version", &self.version)
            .finish()
    }
}

impl Item for ConfigEntry {
    const KIND: &'static str = "config";
    type Id = ConfigKey;
    fn id(&self) -> &ConfigKey {
        &self.key
    }
}

/// What a conditional write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expected {
    /// The key does not exist (create only).
    Absent,
    /// The key exists at exactly this version (no one wrote it since).
    Version(Version),
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Absent => f.write_str("absent"),
            Expected::Version(v) => write!(f, "at version {v}"),
        }
    }
}

impl Expected {
    /// Whether a key at `current` (`None`: absent) meets this expectation; if not, the
    /// [`Error::Conflict`](crate::Error::Conflict) a write of `key` returns.
    pub fn check(self, key: &ConfigKey, current: Option<Version>) -> Result<()> {
        match (self, current) {
            (Expected::Absent, None) => Ok(()),
            (Expected::Version(v), Some(c)) if v == c => Ok(()),
            _ => Err(self.conflict(key, current)),
        }
    }

    /// The [`Error::Conflict`](crate::Error::Conflict) of a write of `key` that expected
    /// `self` and found the key at `current` (`None`: absent).
    pub fn conflict(self, key: &ConfigKey, current: Option<Version>) -> crate::Error {
        crate::Error::Conflict {
            what: format!("configuration key `{key}` was expected {self}"),
            current,
        }
    }
}

/// Every key under a prefix, read at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigListing {
    /// The entries, sorted by key.
    pub entries: Vec<ConfigEntry>,
    /// The registry revision the listing was read at.
    pub revision: Revision,
}

impl ConfigListing {
    /// A listing; sorts the entries by key.
    pub fn new(mut entries: Vec<ConfigEntry>, revision: Revision) -> Self {
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Self { entries, revision }
    }
}

/// What a configuration watch yields: `Snapshot` first (the keys that exist, possibly
/// none), then `Added` / `Updated` / `Removed` with revisions, `Stale` while the registry
/// is unreachable, `Resynced` with the authoritative set when it is back.
pub type ConfigEvent = Event<ConfigEntry>;

/// Configuration in a registry: get, put, compare-and-set, delete, list and watch keys.
///
/// Object-safe: libraries take an `Arc<dyn ConfigStore>`; reach one from
/// [`Discovery::kv`](crate::Discovery::kv).
///
/// # Contract
///
/// - Keys are [`ConfigKey`]s; a value larger than the registry stores
///   ([`ConfigStore::max_value_len`]) is [`Error::InvalidInput`](crate::Error::InvalidInput)
///   and nothing is written.
/// - Every write returns the key's new [`Version`]. A conditional write whose expectation
///   does not hold is [`Error::Conflict`](crate::Error::Conflict) with the current
///   version, and writes nothing.
/// - **No write is left behind.** A write whose reply is lost (a timeout, a dropped
///   connection) is reconciled before the call returns: retried while the registry is
///   unreachable (within the backend's retry budget), and a conditional write that finds
///   its own value already in place reports success with that version rather than a
///   conflict with itself. An error means the write did not happen — except a temporary
///   error after the budget ran out, which says the outcome is unknown.
/// - Watches keep the [`Watcher`](crate::Watcher) contract: a `Snapshot` first, read at a
///   revision, then every change after that revision (never "from now"); rapid writes of
///   one key may coalesce, the last one is never lost; a deletion is `Removed`; `Stale`
///   once per outage, then `Resynced` with the authoritative set (also after a compaction
///   or a registry restart); an `Err` only for errors that retrying cannot fix, and the
///   stream ends after it. Entries a foreign writer left under a prefix whose key is not
///   a [`ConfigKey`] are skipped and logged.
#[async_trait]
pub trait ConfigStore: Debug + Send + Sync {
    /// The largest value this registry stores, in bytes.
    fn max_value_len(&self) -> usize;

    /// The key's entry, `None` if it does not exist.
    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>>;

    /// Writes `value` at `key` (created if absent); returns its new version.
    async fn put(&self, key: &ConfigKey, value: Vec<u8>) -> Result<Version>;

    /// Writes `value` at `key` only if the key is as `expected`; returns its new version,
    /// or [`Error::Conflict`](crate::Error::Conflict).
    async fn put_if(&self, key: &ConfigKey, value: Vec<u8>, expected: Expected) -> Result<Version>;

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &ConfigKey) -> Result<bool>;

    /// Deletes `key` only if it is at `version`, else
    /// [`Error::Conflict`](crate::Error::Conflict).
    async fn delete_if(&self, key: &ConfigKey, version: Version) -> Result<()>;

    /// Every key below `prefix`, at one revision.
    async fn list(&self, prefix: &ConfigKey) -> Result<ConfigListing>;

    /// Watches one key: a `Snapshot` with the entry (or none), then its changes.
    fn watch(&self, key: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>>;

    /// Watches every key below `prefix`.
    fn watch_prefix(&self, prefix: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>>;
}

macro_rules! forward_config_store {
    ($ty:ty) => {
        #[async_trait]
        impl<T: ConfigStore + ?Sized> ConfigStore for $ty {
            fn max_value_len(&self) -> usize {
                (**self).max_value_len()
            }
            async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
                (**self).get(key).await
            }
            async fn put(&self, key: &ConfigKey, value: Vec<u8>) -> Result<Version> {
                (**self).put(key, value).await
            }
            async fn put_if(
                &self,
                key: &ConfigKey,
                value: Vec<u8>,
                expected: Expected,
            ) -> Result<Version> {
                (**self).put_if(key, value, expected).await
            }
            async fn delete(&self, key: &ConfigKey) -> Result<bool> {
                (**self).delete(key).await
            }
            async fn delete_if(&self, key: &ConfigKey, version: Version) -> Result<()> {
                (**self).delete_if(key, version).await
            }
            async fn list(&self, prefix: &ConfigKey) -> Result<ConfigListing> {
                (**self).list(prefix).await
            }
            fn watch(&self, key: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>> {
                (**self).watch(key)
            }
            fn watch_prefix(&self, prefix: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>> {
                (**self).watch_prefix(prefix)
            }
        }
    };
}

forward_config_store!(Arc<T>);
forward_config_store!(Box<T>);
