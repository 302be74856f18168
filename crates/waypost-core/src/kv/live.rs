//! [`LiveConfig`]: a typed configuration value kept current by a watch.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ConfigEntry, ConfigEvent, ConfigKey, ConfigStore, Version};
use crate::backend::watch::Event;
use crate::error::{Error, Result};

type Decoder<T> = Arc<dyn Fn(&[u8]) -> std::result::Result<T, String> + Send + Sync>;
type Validator<T> = Arc<dyn Fn(&T) -> std::result::Result<(), String> + Send + Sync>;

/// How a [`LiveConfig`]'s value is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// JSON (`serde_json`).
    Json,
    /// TOML (`toml`), which must be UTF-8.
    Toml,
    /// The bytes as they are, or a decoder of the caller's.
    Custom,
}

/// How a [`LiveConfig`] decodes and checks its value.
pub struct LiveOptions<T> {
    format: Format,
    decode: Decoder<T>,
    validate: Option<Validator<T>>,
    default: Option<Arc<T>>,
}

impl<T> Clone for LiveOptions<T> {
    fn clone(&self) -> Self {
        Self {
            format: self.format,
            decode: self.decode.clone(),
            validate: self.validate.clone(),
            default: self.default.clone(),
        }
    }
}

impl<T> fmt::Debug for LiveOptions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveOptions")
            .field("format", &self.format)
            .field("validate", &self.validate.is_some())
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl<T: DeserializeOwned> LiveOptions<T> {
    /// The value is JSON.
    pub fn json() -> Self {
        Self::decoder(Format::Json, |bytes| {
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON for this type: {e}"))
        })
    }

    /// The value is TOML.
    pub fn toml() -> Self {
        Self::decoder(Format::Toml, |bytes| {
            let text =
                std::str::from_utf8(bytes).map_err(|e| format!("TOML must be UTF-8: {e}"))?;
            toml::from_str(text).map_err(|e| format!("not valid TOML for this type: {e}"))
        })
    }
}

impl LiveOptions<Vec<u8>> {
    /// The value is kept as bytes.
    pub fn raw() -> Self {
        Self::decoder(Format::Custom, |bytes| Ok(bytes.to_vec()))
    }
}

impl<T> LiveOptions<T> {
    /// The value is decoded by `decode`; an `Err` (a message) rejects it.
    pub fn decoder(
        format: Format,
        decode: impl Fn(&[u8]) -> std::result::Result<T, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            format,
            decode: Arc::new(decode),
            validate: None,
            default: None,
        }
    }

    /// A check every decoded value must pass before it replaces the current one; an `Err`
    /// (a message) rejects it and the last good value stays.
    pub fn validate(
        mut self,
        check: impl Fn(&T) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validate = Some(Arc::new(check));
        self
    }

    /// The value served while the key does not exist (never written, or deleted).
    pub fn default_value(mut self, value: T) -> Self {
        self.default = Some(Arc::new(value));
        self
    }
}

/// A value that failed to decode or to validate, and was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The version of the rejected value.
    pub version: Version,
    /// Why it was rejected.
    pub reason: String,
}

/// Where a [`LiveConfig`] stands: its value and how current it is.
#[derive(Debug)]
#[non_exhaustive]
pub struct LiveState<T> {
    /// The value in use: the last good value of the key, or the default while the key
    /// does not exist; `None` without either.
    pub value: Option<Arc<T>>,
    /// The version of the value in use; `None` for the default or no value.
    pub version: Option<Version>,
    /// Whether the registry answered at least once (the first snapshot arrived).
    pub ready: bool,
    /// Whether the key does not exist in the registry (as last seen).
    pub deleted: bool,
    /// When the value in use was applied.
    pub updated: Instant,
    /// Since when the registry is unreachable, if it is: the value is served from memory.
    pub stale_since: Option<Instant>,
    /// The last value that was rejected (bad encoding or failed validation), if the key's
    /// current value is one; cleared when a good value arrives.
    pub rejected: Option<Rejected>,
    /// The error that ended the watch, if one did (an error retrying cannot fix).
    pub failed: Option<Arc<Error>>,
}

impl<T> LiveState<T> {
    /// How long ago the value in use was applied.
    pub fn age(&self) -> Duration {
        self.updated.elapsed()
    }

    /// How long the registry has been unreachable, if it is.
    pub fn stale_for(&self) -> Option<Duration> {
        self.stale_since.map(|t| t.elapsed())
    }
}

impl<T> Clone for LiveState<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            version: self.version,
            ready: self.ready,
            deleted: self.deleted,
            updated: self.updated,
            stale_since: self.stale_since,
            rejected: self.rejected.clone(),
            failed: self.failed.clone(),
        }
    }
}

struct Shared<T> {
    state: ArcSwap<LiveState<T>>,
    notify: watch::Sender<Arc<LiveState<T>>>,
    task: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// A configuration value kept current by a watch on one key: the
/// [`ServiceCache`](crate::ServiceCache) of configuration.
///
/// - [`LiveConfig::get`] reads the current value without a lock or a registry round trip.
/// - A new value is decoded ([`LiveOptions::json`], [`LiveOptions::toml`], raw or your
///   decoder) and validated (your check) before it replaces the current one; one that
///   fails **is not applied**: the last good value stays and the failure is reported in
///   [`LiveState::rejected`] (and logged).
/// - While the registry is unreachable the last value is served, and
///   [`LiveState::stale_since`] says since when.
/// - A deleted (or never written) key is [`LiveState::deleted`], and the value is the
///   default if one was given, else none.
/// - [`LiveConfig::changes`] notifies every change of state.
///
/// Clones share one watch; it ends when the last clone is dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> waypost_core::Result<()> {
/// use std::time::Duration;
/// use waypost_core::kv::{LiveConfig, LiveOptions};
///
/// #[derive(serde::Deserialize)]
/// struct Pool { size: u32 }
///
/// let d = waypost_core::memory::MemoryRegistry::new("live-doc")
///     .client(Duration::from_secs(10))
///     .into_discovery();
/// let kv = d.kv()?;
/// let key = "my_app/pool".parse()?;
/// kv.put(&key, br#"{"size": 8}"#.to_vec()).await?;
///
/// let options = LiveOptions::<Pool>::json().validate(|p| {
///     if p.size > 0 { Ok(()) } else { Err("size must be positive".into()) }
/// });
/// let pool = LiveConfig::new(kv.clone(), key.clone(), options);
/// pool.wait_ready(Duration::from_secs(5)).await?;
/// assert_eq!(pool.get().unwrap().size, 8);
///
/// kv.put(&key, br#"{"size": 0}"#.to_vec()).await?; // fails validation: not applied
/// # Ok(()) }
/// ```
pub struct LiveConfig<T> {
    shared: Arc<Shared<T>>,
    key: ConfigKey,
}

impl<T> Clone for LiveConfig<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            key: self.key.clone(),
        }
    }
}

impl<T> fmt::Debug for LiveConfig<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.state.load();
        f.debug_struct("LiveConfig")
            .field("key", &self.key)
            .field("version", &st.version)
            .field("ready", &st.ready)
            .field("deleted", &st.deleted)
            .field("stale", &st.stale_since.is_some())
            .finish()
    }
}

impl<T: Send + Sync + 'static> LiveConfig<T> {
    /// Starts watching `key` of `store`. Must be called within a tokio runtime (it spawns
    /// the watch, like `tokio::spawn`).
    pub fn new(store: Arc<dyn ConfigStore>, key: ConfigKey, options: LiveOptions<T>) -> Self {
        let initial = Arc::new(LiveState {
            value: options.default.clone(),
            version: None,
            ready: false,
            deleted: true,
            updated: Instant::now(),
            stale_since: None,
            rejected: None,
            failed: None,
        });
        let (notify, _) = watch::channel(initial.clone());
        let shared = Arc::new(Shared {
            state: ArcSwap::new(initial),
            notify,
            task: std::sync::OnceLock::new(),
        });
        let mut events = store.watch(&key);
        // The task holds the state weakly: it ends when the last handle is dropped.
        let weak = Arc::downgrade(&shared);
        let watched = key.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                let Some(shared) = weak.upgrade() else { return };
                shared.apply(&watched, &options, ev);
            }
        });
        let _ = shared.task.set(task.abort_handle());
        Self { shared, key }
    }

    /// The current value (see [`LiveState::value`]): one atomic load, no lock.
    pub fn get(&self) -> Option<Arc<T>> {
        self.shared.state.load().value.clone()
    }

    /// The whole state: value, version, staleness, the last rejection.
    pub fn state(&self) -> Arc<LiveState<T>> {
        self.shared.state.load_full()
    }

    /// The key watched.
    pub fn key(&self) -> &ConfigKey {
        &self.key
    }

    /// A receiver that is notified of every change of state.
    pub fn changes(&self) -> watch::Receiver<Arc<LiveState<T>>> {
        self.shared.notify.subscribe()
    }

    /// Waits until the registry answered once (the value, or that the key is absent).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_for(timeout, |s| s.ready).await.map(|_| ())
    }

    /// Waits until `f` holds for the state; [`Error::Timeout`] after `timeout`, or the
    /// error that ended the watch.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&LiveState<T>) -> bool,
    ) -> Result<Arc<LiveState<T>>> {
        let mut rx = self.changes();
        let wait = async {
            loop {
                let st = rx.borrow_and_update().clone();
                if f(&st) {
                    return Ok(st);
                }
                if let Some(e) = &st.failed {
                    return Err(Error::unavailable(format!(
                        "the watch of configuration key `{}` ended: {e}",
                        self.key
                    )));
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Closed {
                        what: "live configuration",
                    });
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                operation: "waiting for a live configuration value",
                after: timeout,
            })?
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    fn publish(&self, next: LiveState<T>) {
        let next = Arc::new(next);
        self.state.store(next.clone());
        self.notify.send_replace(next);
    }

    fn apply(&self, key: &ConfigKey, options: &LiveOptions<T>, ev: Result<ConfigEvent>) {
        let mut st = LiveState::clone(&self.state.load());
        match ev {
            Ok(Event::Snapshot(entries, _) | Event::Resynced(entries, _)) => {
                st.ready = true;
                st.stale_since = None;
                match entries.into_iter().find(|e| e.key == *key) {
                    Some(entry) => Self::accept(&mut st, key, options, entry),
                    None => Self::absent(&mut st, options),
                }
            }
            Ok(Event::Added(entry, _) | Event::Updated(entry, _)) => {
                Self::accept(&mut st, key, options, entry)
            }
            Ok(Event::Removed(..)) => Self::absent(&mut st, options),
            Ok(Event::Stale(reason)) => {
                tracing::info!(%key, "live configuration is stale, serving the last value: {reason}");
                st.stale_since = Some(Instant::now());
            }
            Err(e) => {
                tracing::error!(%key, "live configuration watch ended: {e}");
                st.failed = Some(Arc::new(e));
            }
        }
        self.publish(st);
    }

    fn accept(
        st: &mut LiveState<T>,
        key: &ConfigKey,
        options: &LiveOptions<T>,
        entry: ConfigEntry,
    ) {
        let known = st.version == Some(entry.version)
            || st
                .rejected
                .as_ref()
                .is_some_and(|r| r.version == entry.version);
        if known && !st.deleted {
            return;
        }
        let decoded = (options.decode)(&entry.value).and_then(|v| match &options.validate {
            Some(check) => check(&v).map(|()| v),
            None => Ok(v),
        });
        match decoded {
            Ok(value) => {
                st.value = Some(Arc::new(value));
                st.version = Some(entry.version);
                st.deleted = false;
                st.updated = Instant::now();
                st.rejected = None;
            }
            Err(reason) => {
                tracing::warn!(%key, version = entry.version, "configuration value rejected, keeping the last good one: {reason}");
                st.deleted = false;
                st.rejected = Some(Rejected {
                    version: entry.version,
                    reason,
                });
            }
        }
    }

    fn absent(st: &mut LiveState<T>, options: &LiveOptions<T>) {
        st.deleted = true;
        st.value = options.default.clone();
        st.version = None;
        st.rejected = None;
        st.updated = Instant::now();
    }
}

#[cfg(test)]
#[path = "live_tests.rs"]
mod tests;
