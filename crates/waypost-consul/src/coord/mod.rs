//! Locks and elections: core's [`Coord`](waypost_core::backend::Coord) over
//! [`ConsulCoord`], the primitives of Consul's own `api.Lock` (what `consul lock` runs).
//!
//! - **Key**: name `a/b` is the KV key `{coord_prefix}/a/b/.lock`; `consul lock
//!   {coord_prefix}/a/b CMD` takes the same lock. An election is the same lock, its
//!   value the leader's (Consul's leader-election recipe): a lock and an election of one
//!   name are one thing on Consul.
//! - **Session**: a real Consul session (`session.rs`, [`LockSessionDriver`]), not the
//!   agent epoch registrations use.
//! - **Acquire** (as `api.Lock`): a consistent read of the key; if another session holds
//!   it, wait; otherwise a one-operation transaction `lock` (key, session, value,
//!   `Flags = 0x2ddccbc058a50c18`, Consul's lock flag value). The transaction answers with
//!   the entry, so its `ModifyIndex` — the **fencing token** — comes in the same round
//!   trip. A key whose flags are not the lock flag (another tool's key, `consul lock -n`'s
//!   semaphore) is a [`Error::Conflict`], as `api.Lock`'s `ErrLockConflict`.
//! - **Waiting** is a consistent blocking read of the key past the index at which it was
//!   seen held, then another attempt. **Not FIFO**: Consul's locks queue nobody (neither
//!   do `api.Lock` and `consul lock`); whoever tries first after a release wins.
//! - **Lock-delay**: an acquire refused with no holder (Consul keeps a lock-delay after a
//!   session was invalidated) is retried after [`LOCK_RETRY`], never in a hot loop.
//! - **Re-acquire**: after our own release of a key, its `ModifyIndex` is remembered and
//!   the next acquisition is one transaction `check-index` + `lock` (no read); someone
//!   else's write in between fails the check, and the usual read + `lock` follows.
//! - **Held**: a blocking read past the acquisition's index, from
//!   [`HELD_WATCH_DELAY`] after it, until the key's `Session` is no longer ours.
//! - **Release**: transaction `unlock` (only releases if our session holds the key; a
//!   newer holder is never touched). **Proclaim**: `check-session` + `lock` with the new
//!   value.
//! - **Leader**: the key's holder, its value, and its `ModifyIndex` as the token.
//! - One Consul session serves every lock of a client; Consul cannot tell two contenders
//!   of one session apart, so the client keeps a local claim per key (a lock and an
//!   election of the same name exclude each other inside one client too).
//! - Semaphores (`permits > 1`) are [`Error::Unsupported`].

mod claims;
mod driver;
mod feed;
mod ops;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use waypost_core::backend::{Contender, CoordDriver, Kind, Position};
use waypost_core::coord::{FencingToken, Leader, Name};
use waypost_core::kv::ConfigKey;
use waypost_core::{Error, Result};

use crate::client::{Agent, ReadMode};
use crate::error::ConsulError;
use crate::mux::Mux;
use crate::session::LockSession;
use claims::Claims;
pub(crate) use feed::LeaderFeed;

/// The default `coord_prefix`: locks live under the KV key `coord/`.
pub const DEFAULT_COORD_PREFIX: &str = "coord";
/// The `Flags` value of a lock key: `api.LockFlagValue` of Consul's Go client.
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;
/// How long a waiter waits after an acquire refused with no holder (lock-delay), before
/// it tries again. (`api.Lock` waits 5 s.)
pub const LOCK_RETRY: Duration = Duration::from_secs(1);
/// The default `lock_delay` of the coordination session.
pub(crate) const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(1);
/// Consul's largest lock-delay.
pub(crate) const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// How long a holder waits before its first blocking read of its key (see
/// [`CoordDriver::watch_held`]): a lock held for less costs no watch request.
pub(crate) const HELD_WATCH_DELAY: Duration = Duration::from_millis(100);
/// At most this many keys' release indexes are remembered (see [`ConsulCoord::released`]).
const MAX_RELEASED: usize = 1024;

/// [`DEFAULT_COORD_PREFIX`] as a key.
pub(crate) fn default_coord_prefix() -> ConfigKey {
    ConfigKey::new(DEFAULT_COORD_PREFIX).expect("the default prefix is a valid key")
}

/// A lock key as the agent returns it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockPair {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
    modify_index: u64,
}

impl LockPair {
    fn holder(&self) -> Option<&str> {
        self.session.as_deref().filter(|s| !s.is_empty())
    }

    fn value(&self) -> Vec<u8> {
        use base64::Engine as _;
        self.value.as_deref().map_or_else(Vec::new, |v| {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .unwrap_or_default()
        })
    }
}

/// One contender: its key, session and value.
#[derive(Clone, Debug)]
pub(crate) struct Ticket {
    key: String,
    session: LockSession,
    id: String,
    value: Vec<u8>,
}

/// What a waiting contender waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// Another session holds the key: a blocking read past this index.
    Held(u64),
    /// The key is free but Consul refused the lock (its lock-delay): [`LOCK_RETRY`].
    Delay,
    /// Another contender of this client holds the key under the same session.
    Local,
}

/// How a lock transaction ended.
enum Locked {
    Yes(LockPair),
    Held,
    Delay,
}

/// Consul's coordination primitives (core's `Coord` runs the
/// [`Coordinator`](waypost_core::coord::Coordinator) contract over them).
#[derive(Clone)]
pub(crate) struct ConsulCoord {
    agent: Agent,
    /// Wakes the blocking reads below the prefix that hold no per-key permit.
    signal: Mux,
    /// The prefix with its `/`: `coord/`.
    root: String,
    wait: Duration,
    claims: Claims,
    contenders: Contenders,
    /// Per key, the `ModifyIndex` our own `unlock` left it at (free, with the lock flags):
    /// while the key still has that index, the next acquisition skips the read (see
    /// [`ConsulCoord::relock`]).
    released: Arc<Mutex<HashMap<String, u64>>>,
    /// Per contender id, the `ModifyIndex` its acquisition wrote: where
    /// [`CoordDriver::watch_held`] starts blocking, without a first read.
    held: Arc<Mutex<HashMap<String, u64>>>,
}

/// The contenders of this client between `enqueue` and `dequeue`, per key: Consul keeps
/// no trace of a waiter (it is a blocking read), so tests count them here.
pub(crate) type Contenders = Arc<Mutex<HashMap<String, HashMap<String, Arc<str>>>>>;

impl fmt::Debug for ConsulCoord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulCoord")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ConsulCoord {
    pub(crate) fn new(agent: Agent, prefix: &ConfigKey, wait: Duration) -> Self {
        let root = format!("{prefix}/");
        Self {
            signal: Mux::kv(&agent, &root, wait),
            agent,
            root,
            wait,
            claims: Claims::default(),
            contenders: Contenders::default(),
            released: Arc::default(),
            held: Arc::default(),
        }
    }

    fn released(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This client's contenders (see [`Contenders`]).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(crate) fn contenders(&self) -> Contenders {
        self.contenders.clone()
    }

    fn left(&self, key: &str, id: &str) {
        let mut map = self.contenders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ids) = map.get_mut(key) {
            ids.remove(id);
            if ids.is_empty() {
                map.remove(key);
            }
        }
    }

    /// The lock key of `name`: `{prefix}/{name}/.lock`.
    pub(crate) fn key(&self, name: &Name) -> String {
        format!("{}{name}/.lock", self.root)
    }
}
