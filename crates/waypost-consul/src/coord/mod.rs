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
mod feed;

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

    /// A consistent read of `key` (blocking past `index` for `wait` when `block` is set):
    /// the entry, if any, and the `X-Consul-Index`.
    async fn read(&self, key: &str, mode: ReadMode) -> Result<(Option<LockPair>, u64)> {
        let op = "read a lock";
        let path = format!("/v1/kv/{key}");
        let query = vec![("consistent", String::new())];
        let reply = self
            .agent
            .get_blocking(op, &path, query, mode, &self.signal)
            .await?;
        let pair = match reply.status {
            404 => None,
            200 => {
                let mut pairs: Vec<LockPair> = serde_json::from_slice(&reply.body)
                    .map_err(|source| ConsulError::Decode { op, source })?;
                pairs.pop()
            }
            s => return Err(ConsulError::status(op, s, &reply.body).into()),
        };
        let index = reply.index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        Ok((pair, index.max(1)))
    }

    /// Runs one transaction: the entries of its results, or the errors' text (`409`).
    async fn txn(
        &self,
        op: &'static str,
        ops: serde_json::Value,
    ) -> Result<std::result::Result<Vec<LockPair>, String>> {
        self.agent
            .txn(op, ops.to_string().into_bytes(), "a lock")
            .await
    }

    /// `lock` of `key` by `session` with `value` (after `check-session` when `checked`).
    async fn lock(
        &self,
        key: &str,
        session: &LockSession,
        value: &[u8],
        checked: bool,
    ) -> Result<Locked> {
        use base64::Engine as _;
        let op = "acquire a lock";
        let lock = serde_json::json!({"KV": {
            "Verb": "lock",
            "Key": key,
            "Value": base64::engine::general_purpose::STANDARD.encode(value),
            "Flags": LOCK_FLAG_VALUE,
            "Session": &*session.0,
        }});
        let ops = if checked {
            let check = serde_json::json!({"KV": {"Verb": "check-session", "Key": key, "Session": &*session.0}});
            serde_json::json!([check, lock])
        } else {
            serde_json::json!([lock])
        };
        match self.txn(op, ops).await? {
            Ok(mut pairs) => pairs.pop().map(Locked::Yes).ok_or_else(|| {
                ConsulError::Protocol {
                    op,
                    what: "the transaction answered without the locked entry".into(),
                }
                .into()
            }),
            Err(why) if why.contains("lock delay") => Ok(Locked::Delay),
            Err(why) if why.contains("invalid session") => Err(Error::SessionExpired),
            Err(why) if why.contains("already held") || why.contains("session check") => {
                Ok(Locked::Held)
            }
            Err(why) => Err(ConsulError::Protocol {
                op,
                what: format!("the lock was refused: {why}"),
            }
            .into()),
        }
    }

    /// `unlock` of `key` by `session`: a key not held by it is left alone.
    async fn unlock(&self, key: &str, session: &LockSession) -> Result<()> {
        let ops = serde_json::json!([{"KV": {
            "Verb": "unlock",
            "Key": key,
            "Flags": LOCK_FLAG_VALUE,
            "Session": &*session.0,
        }}]);
        match self.txn("release a lock", ops).await? {
            Ok(mut pairs) => {
                if let Some(p) = pairs.pop().filter(|p| p.holder().is_none()) {
                    let mut released = self.released();
                    if released.len() >= MAX_RELEASED {
                        released.clear();
                    }
                    released.insert(key.to_string(), p.modify_index);
                }
                Ok(())
            }
            Err(why) => {
                tracing::debug!(%key, "consul: nothing to release: {why}");
                Ok(())
            }
        }
    }

    /// The uncontended fast path, one round trip: when our own `unlock` left `t`'s key
    /// free at `index`, a transaction `check-index` + `lock`. The index check proves the
    /// key is still what we left (free, the lock flags), so the read that checks the flags
    /// and the holder can be skipped. `None`: someone wrote the key since (or Consul
    /// refused for any other reason): the caller reads and tries as usual.
    async fn relock(&self, t: &Ticket, index: u64) -> Result<Option<FencingToken>> {
        use base64::Engine as _;
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-index", "Key": &t.key, "Index": index}},
            {"KV": {
                "Verb": "lock",
                "Key": &t.key,
                "Value": base64::engine::general_purpose::STANDARD.encode(&t.value),
                "Flags": LOCK_FLAG_VALUE,
                "Session": &*t.session.0,
            }},
        ]);
        match self.txn("acquire a lock", ops).await? {
            Ok(mut pairs) => Ok(pairs
                .pop()
                .filter(|p| p.holder() == Some(&*t.session.0))
                .map(|p| FencingToken(p.modify_index))),
            Err(why) => {
                tracing::debug!(key = %t.key, "consul: the key changed since our release: {why}");
                Ok(None)
            }
        }
    }

    /// One attempt to hold `t`'s key, under its local claim.
    async fn attempt(&self, t: &Ticket, tried: bool) -> Result<Position<Blocked>> {
        let known = self.released().remove(&t.key);
        if let Some(index) = known {
            // The lock may land even if its answer is lost.
            self.claims.mark_tried(&t.key, &t.id);
            if let Some(token) = self.relock(t, index).await? {
                return Ok(Position::Held(token));
            }
        }
        let (pair, index) = self.read(&t.key, ReadMode::Plain).await?;
        if let Some(p) = &pair {
            if p.flags != LOCK_FLAG_VALUE {
                return Err(not_a_lock(&t.key, p));
            }
            match p.holder() {
                Some(s) if s != &*t.session.0 => {
                    return Ok(Position::Waiting(Blocked::Held(index)))
                }
                // Ours, left by a contender of this client whose release did not land:
                // release it, so that this acquisition is a new write with a new token.
                Some(_) if !tried => self.unlock(&t.key, &t.session).await?,
                _ => {}
            }
        }
        self.claims.mark_tried(&t.key, &t.id);
        match self.lock(&t.key, &t.session, &t.value, false).await? {
            Locked::Yes(p) => Ok(Position::Held(FencingToken(p.modify_index))),
            Locked::Held => Ok(Position::Waiting(Blocked::Held(index))),
            Locked::Delay => {
                tracing::debug!(key = %t.key, "consul: lock refused during its lock-delay");
                Ok(Position::Waiting(Blocked::Delay))
            }
        }
    }

    /// The leader of the lock key `key`, from a read.
    fn leader_of(&self, election: &Name, key: &str, pair: Option<&LockPair>) -> Option<Leader> {
        let p = pair?;
        p.holder()?;
        if p.flags != LOCK_FLAG_VALUE {
            tracing::warn!(%key, flags = p.flags, "consul: skipping a key that is not a lock");
            return None;
        }
        Some(Leader::new(
            election.clone(),
            p.value(),
            FencingToken(p.modify_index),
        ))
    }

    /// Whether `key` is held by any session now (tests: Consul has no queue to count).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(crate) async fn is_held(&self, name: &Name) -> Result<bool> {
        let (pair, _) = self.read(&self.key(name), ReadMode::Plain).await?;
        Ok(pair.as_ref().and_then(LockPair::holder).is_some())
    }
}

fn not_a_lock(key: &str, p: &LockPair) -> Error {
    Error::Conflict {
        what: format!(
            "consul key `{key}` exists with flags {:#x}, not a lock's ({LOCK_FLAG_VALUE:#x}): another tool uses it",
            p.flags
        ),
        current: Some(p.modify_index),
    }
}

#[async_trait]
impl CoordDriver for ConsulCoord {
    type Handle = LockSession;
    type Ticket = Ticket;
    type Wait = Blocked;
    type Feed = LeaderFeed;

    fn max_value_len(&self) -> usize {
        crate::kv::MAX_CONFIG_VALUE_LEN
    }

    /// Consul has no queue: entering it writes nothing; [`CoordDriver::position`] tries.
    async fn enqueue(&self, session: &LockSession, c: &Contender, _retry: bool) -> Result<Ticket> {
        if let Kind::Lock { permits } = c.kind {
            if permits > 1 {
                return Err(Error::unsupported(format!(
                    "semaphores ({permits} permits) on consul (locks and elections only)"
                )));
            }
        }
        let key = self.key(&c.name);
        self.contenders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .insert(c.id.clone(), session.0.clone());
        Ok(Ticket {
            key,
            session: session.clone(),
            id: c.id.clone(),
            value: c.value.clone(),
        })
    }

    async fn position(&self, t: &Ticket) -> Result<Position<Blocked>> {
        let Some(tried) = self.claims.claim(&t.key, &t.session, &t.id) else {
            return Ok(Position::Waiting(Blocked::Local));
        };
        let r = self.attempt(t, tried).await;
        match &r {
            Ok(Position::Held(token)) => {
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(t.id.clone(), token.0);
            }
            // A lock whose answer was lost: the key may be ours; keep the claim.
            Err(_) if self.claims.tried(&t.key, &t.id) => {}
            _ => self.claims.release(&t.key, &t.id),
        }
        r
    }

    async fn wait(&self, t: &Ticket, w: &Blocked) -> Result<()> {
        match *w {
            Blocked::Held(index) => {
                tokio::select! {
                    r = self.read(&t.key, ReadMode::Past(index, self.wait)) => r.map(|_| ()),
                    e = self.agent.lost() => Err(e),
                }
            }
            Blocked::Delay => {
                tokio::time::sleep(LOCK_RETRY).await;
                Ok(())
            }
            Blocked::Local => {
                let mut rx = self.claims.changed.subscribe();
                let _ = tokio::time::timeout(self.wait, rx.changed()).await;
                Ok(())
            }
        }
    }

    async fn watch_held(&self, t: &Ticket) -> Result<()> {
        // The key's index is the token its acquisition wrote: block past it (a retried
        // watch reads first). A change made meanwhile is above that index, so starting
        // late loses nothing: it only delays noticing a key deleted behind our back by
        // `HELD_WATCH_DELAY`, and a short critical section sends no watch at all (the
        // agent would answer it when we release: measured, ~20 % of an uncontended
        // lock + release). The session's bound does not depend on this watch.
        let mut index = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.id)
            .unwrap_or(0);
        if index > 0 {
            tokio::time::sleep(HELD_WATCH_DELAY).await;
        }
        loop {
            let mode = match index {
                0 => ReadMode::Listing,
                _ => ReadMode::Past(index, self.wait),
            };
            let (pair, now) = self.read(&t.key, mode).await?;
            if pair.as_ref().and_then(LockPair::holder) != Some(&*t.session.0) {
                return Ok(());
            }
            // An index that went backwards (a restarted agent) must not block for long.
            index = if now < index { 0 } else { now };
        }
    }

    async fn dequeue(&self, t: &Ticket) -> Result<()> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.id);
        // Another contender of this client holds the key now: it is not ours to release.
        if self.claims.claim(&t.key, &t.session, &t.id).is_none() {
            self.left(&t.key, &t.id);
            return Ok(());
        }
        self.claims.mark_tried(&t.key, &t.id);
        let r = self.unlock(&t.key, &t.session).await;
        self.claims.release(&t.key, &t.id);
        if r.is_ok() {
            self.left(&t.key, &t.id);
        }
        r
    }

    async fn forget(&self, session: &LockSession, c: &Contender) -> Result<()> {
        let key = self.key(&c.name);
        if !self.claims.tried(&key, &c.id) {
            self.claims.release(&key, &c.id);
            self.left(&key, &c.id);
            return Ok(());
        }
        let t = self.enqueue(session, c, true).await?;
        self.dequeue(&t).await
    }

    async fn proclaim(&self, t: &Ticket, value: &[u8]) -> Result<()> {
        match self.lock(&t.key, &t.session, value, true).await? {
            Locked::Yes(_) => Ok(()),
            Locked::Held | Locked::Delay => Err(Error::Closed {
                what: "leadership (its key is no longer held by this session)",
            }),
        }
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        let key = self.key(election);
        let (pair, _) = self.read(&key, ReadMode::Plain).await?;
        Ok(self.leader_of(election, &key, pair.as_ref()))
    }

    fn leader_feed(&self, election: &Name) -> LeaderFeed {
        LeaderFeed::new(self.clone(), election.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coord_prefix_and_lock_delay_options() {
        use crate::ConsulConfig;
        use waypost_core::config::Config;
        let c = ConsulConfig::from_url("consul://h:1").unwrap();
        assert_eq!(c.coord_prefix.as_str(), DEFAULT_COORD_PREFIX);
        assert_eq!(c.lock_delay, DEFAULT_LOCK_DELAY);
        let c =
            ConsulConfig::from_url("consul://h:1?coord_prefix=apps%2Flocks&lock_delay=0s").unwrap();
        assert_eq!(
            (c.coord_prefix.as_str(), c.lock_delay),
            ("apps/locks", Duration::ZERO)
        );
        let c: Config = serde_json::from_str(
            r#"{"backend":"consul","coord_prefix":"team/coord","lock_delay":"15s"}"#,
        )
        .unwrap();
        let c = ConsulConfig::from_config(&c).unwrap();
        assert_eq!(c.coord_prefix.as_str(), "team/coord");
        let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let coord = ConsulCoord::new(
            crate::client::Agent::new(&c).unwrap(),
            &c.coord_prefix,
            c.wait,
        );
        assert_eq!(
            coord.key(&"jobs/x".parse().unwrap()),
            "team/coord/jobs/x/.lock"
        );
        for (url, part) in [
            ("consul://h:1?coord_prefix=/coord", "`coord_prefix`"),
            ("consul://h:1?coord_prefix=a//b", "`coord_prefix`"),
            ("consul://h:1?coord_prefix=", "`coord_prefix`"),
            ("consul://h:1?lock_delay=61s", "`lock_delay`"),
            ("consul://h:1?lock_delay=soon", "lock_delay"),
        ] {
            let e = ConsulConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
            assert!(e.to_string().contains(part), "{url}: {e}");
        }
    }

    #[test]
    fn lock_flag_is_consuls() {
        assert_eq!(LOCK_FLAG_VALUE, 3_304_740_253_564_472_344);
        let p: LockPair = serde_json::from_str(
            r#"{"LockIndex":1,"Key":"coord/a/.lock","Flags":3304740253564472344,"Value":"aGVsbG8=","Session":"s1","CreateIndex":14,"ModifyIndex":15}"#,
        )
        .unwrap();
        assert_eq!(
            (p.holder(), p.value(), p.modify_index),
            (Some("s1"), b"hello".to_vec(), 15)
        );
        let free: LockPair =
            serde_json::from_str(r#"{"Key":"k","Flags":0,"Value":null,"ModifyIndex":3}"#).unwrap();
        assert_eq!((free.holder(), free.value()), (None, Vec::new()));
    }
}
