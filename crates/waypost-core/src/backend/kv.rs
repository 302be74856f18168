//! The configuration store: one implementation of the [`ConfigStore`] contract over a
//! backend's key/value primitives ([`KvDriver`]).
//!
//! Core owns what must be the same everywhere: key and size validation, reconciling
//! writes whose outcome is unknown, and the watch contract (through the watch machine).
//! A backend supplies single round trips: get, a (conditional) put, a (conditional)
//! delete, a listing, and a [`Feed`] of one key or one prefix.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::time::Instant;

use super::options::BackoffOptions;
use super::watch::{self, Feed, Listing, WatchHub};
use crate::error::{Error, Result};
use crate::kv::{
    ConfigEntry, ConfigEvent, ConfigKey, ConfigListing, ConfigStore, Expected, Version,
};

/// What one configuration watch covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One key.
    Key(ConfigKey),
    /// Every key strictly below a prefix.
    Prefix(ConfigKey),
}

impl Scope {
    /// Whether `key` is in the scope.
    pub fn covers(&self, key: &ConfigKey) -> bool {
        match self {
            Scope::Key(k) => k == key,
            Scope::Prefix(p) => key.is_below(p),
        }
    }

    fn describe(&self) -> String {
        match self {
            Scope::Key(k) => format!("config key {k}"),
            Scope::Prefix(p) => format!("config prefix {p}/"),
        }
    }
}

/// A registry's key/value primitives, each one round trip.
///
/// Values arrive validated (key rule, [`KvDriver::max_value_len`]). A conditional write
/// whose expectation fails returns [`Error::Conflict`] with the current version; a write
/// that may or may not have happened returns a temporary error (core reconciles it).
#[async_trait]
pub trait KvDriver: fmt::Debug + Send + Sync + 'static {
    /// The watch feed of one [`Scope`].
    type Feed: Feed<Item = ConfigEntry>;

    /// The largest value the registry stores, in bytes.
    fn max_value_len(&self) -> usize;

    /// The key's entry, `None` if absent.
    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>>;

    /// Writes `value` at `key`, if `expected` holds (`None`: unconditionally).
    async fn put(
        &self,
        key: &ConfigKey,
        value: &[u8],
        expected: Option<Expected>,
    ) -> Result<Version>;

    /// Deletes `key`, if it is at `expected` (`None`: unconditionally; then returns
    /// whether it existed). A conditional delete of a missing key is a conflict.
    async fn delete(&self, key: &ConfigKey, expected: Option<Version>) -> Result<bool>;

    /// Every key strictly below `prefix`, read at one revision. Entries whose key is not a
    /// [`ConfigKey`] are skipped and logged.
    async fn list(&self, prefix: &ConfigKey) -> Result<Listing<ConfigEntry>>;

    /// A feed of `scope`, not yet listed.
    fn feed(&self, scope: &Scope) -> Self::Feed;
}

/// How [`Kv`] retries writes whose outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvOptions {
    /// Backoff of the watches and of write retries.
    pub backoff: BackoffOptions,
    /// How long a write is retried while the registry does not answer before its
    /// temporary error is returned (outcome unknown). 10 s by default.
    pub retry_for: Duration,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            backoff: BackoffOptions::default(),
            retry_for: Duration::from_secs(10),
        }
    }
}

/// The [`ConfigStore`] over a backend's [`KvDriver`]. Cheap to clone; clones share
/// their watches (one registry watch per key or prefix, whatever the number of local
/// watchers).
pub struct Kv<D: KvDriver> {
    driver: Arc<D>,
    options: KvOptions,
    hub: WatchHub<Scope, ConfigEntry>,
}

impl<D: KvDriver> Clone for Kv<D> {
    fn clone(&self) -> Self {
        Self {
            driver: self.driver.clone(),
            options: self.options,
            hub: self.hub.clone(),
        }
    }
}

impl<D: KvDriver> fmt::Debug for Kv<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kv")
            .field("driver", &self.driver)
            .field("options", &self.options)
            .finish()
    }
}

/// One write, as the caller asked for it.
enum Write<'a> {
    Put(&'a [u8], Option<Expected>),
    Delete(Option<Version>),
}

/// What a write returned.
enum Done {
    Put(Version),
    Delete(bool),
}

impl<D: KvDriver> Kv<D> {
    /// The store over `driver`.
    pub fn new(driver: D, options: KvOptions) -> Self {
        Self {
            driver: Arc::new(driver),
            options,
            hub: WatchHub::new(),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.driver.max_value_len();
        if value.len() > max {
            return Err(Error::invalid_input(format!(
                "a configuration value of {} bytes is larger than this registry stores ({max} bytes)",
                value.len()
            )));
        }
        Ok(())
    }

    /// Runs one write until the registry answered it, reconciling lost replies.
    async fn write(&self, key: &ConfigKey, write: Write<'_>) -> Result<Done> {
        let deadline = Instant::now() + self.options.retry_for;
        let mut backoff = self.options.backoff.backoff();
        // Whether an earlier attempt may have been applied.
        let mut unknown = false;
        loop {
            let attempt = match &write {
                Write::Put(value, expected) => {
                    crate::metrics::timed("kv_put", self.driver.put(key, value, *expected))
                        .await
                        .map(Done::Put)
                }
                Write::Delete(expected) => {
                    crate::metrics::timed("kv_delete", self.driver.delete(key, *expected))
                        .await
                        .map(Done::Delete)
                }
            };
            match attempt {
                Ok(done) => return Ok(done),
                Err(Error::Conflict { what, current }) if unknown => {
                    // Our own earlier attempt may be what the expectation ran into.
                    if let Some(done) = self.landed(key, &write).await? {
                        tracing::debug!(%key, "a write whose reply was lost had been applied");
                        return Ok(done);
                    }
                    return Err(Error::Conflict { what, current });
                }
                Err(e) if e.is_temporary() => {
                    unknown = true;
                    let delay = backoff.next_delay();
                    if Instant::now() + delay > deadline {
                        tracing::warn!(%key, "configuration write: outcome unknown after {:?}: {e}", self.options.retry_for);
                        return Err(e);
                    }
                    tracing::debug!(%key, retry_in = ?delay, "configuration write failed, retrying: {e}");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a conflict that followed an unknown outcome: whether the registry holds what
    /// our write would have left (our value; or, for a delete, nothing).
    async fn landed(&self, key: &ConfigKey, write: &Write<'_>) -> Result<Option<Done>> {
        let now = self.driver.get(key).await?;
        Ok(match (write, now) {
            (Write::Put(value, _), Some(e)) if e.value == *value => Some(Done::Put(e.version)),
            (Write::Delete(_), None) => Some(Done::Delete(true)),
            _ => None,
        })
    }

    fn watch_scope(&self, scope: Scope) -> BoxStream<'static, Result<ConfigEvent>> {
        let what = scope.describe();
        let feed = self.driver.feed(&scope);
        let backoff = self.options.backoff;
        // The hub runs the machine in its own task, reading ahead of the consumers.
        self.hub
            .watch(scope, move || watch::watch(feed, &backoff, what))
    }
}

#[async_trait]
impl<D: KvDriver> ConfigStore for Kv<D> {
    fn max_value_len(&self) -> usize {
        self.driver.max_value_len()
    }

    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
        crate::metrics::timed("kv_get", self.driver.get(key)).await
    }

    async fn put(&self, key: &ConfigKey, value: Vec<u8>) -> Result<Version> {
        self.check_value(&value)?;
        match self.write(key, Write::Put(&value, None)).await? {
            Done::Put(v) => Ok(v),
            Done::Delete(_) => unreachable!("a put answers with a version"),
        }
    }

    async fn put_if(&self, key: &ConfigKey, value: Vec<u8>, expected: Expected) -> Result<Version> {
        self.check_value(&value)?;
        match self.write(key, Write::Put(&value, Some(expected))).await? {
            Done::Put(v) => Ok(v),
            Done::Delete(_) => unreachable!("a put answers with a version"),
        }
    }

    async fn delete(&self, key: &ConfigKey) -> Result<bool> {
        match self.write(key, Write::Delete(None)).await? {
            Done::Delete(existed) => Ok(existed),
            Done::Put(_) => unreachable!("a delete answers whether the key existed"),
        }
    }

    async fn delete_if(&self, key: &ConfigKey, version: Version) -> Result<()> {
        self.write(key, Write::Delete(Some(version))).await?;
        Ok(())
    }

    async fn list(&self, prefix: &ConfigKey) -> Result<ConfigListing> {
        let listing = crate::metrics::timed("kv_list", self.driver.list(prefix)).await?;
        Ok(ConfigListing::new(
            listing.entries.into_iter().map(|e| e.item).collect(),
            listing.revision,
        ))
    }

    fn watch(&self, key: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>> {
        self.watch_scope(Scope::Key(key.clone()))
    }

    fn watch_prefix(&self, prefix: &ConfigKey) -> BoxStream<'static, Result<ConfigEvent>> {
        self.watch_scope(Scope::Prefix(prefix.clone()))
    }
}
