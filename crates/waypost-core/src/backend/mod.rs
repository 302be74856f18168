//! The backend layer: what a registry backend implements, and the machinery core runs
//! on top of it. **For implementers of backends**; users need none of it (the way
//! opendal keeps its `raw` module apart).
//!
//! Each capability's semantics live here once; a backend supplies only its registry's
//! primitives:
//!
//! | core runs | the backend supplies |
//! | --- | --- |
//! | [`Session`]: opened on first use, kept alive, reopened after expiry, observable [`SessionState`] | [`SessionDriver`]: `open`, `keep_alive`, `close`, `interval` |
//! | [`Keeper`]: the [`Registrar`](crate::Registrar) contract — statuses, re-registration, outcome-unknown writes, retried deletes, healing foreign deletes and overwrites | [`RegistryStore`]: `write`, `inspect`, `delete` one entry |
//! | [`Kv`]: the [`ConfigStore`](crate::kv::ConfigStore) contract — validation, reconciled writes, watches of a key or a prefix | [`KvDriver`]: `get`, conditional `put` and `delete`, `list`, a [`Feed`] per key or prefix |
//! | [`Coord`]: the [`Coordinator`](crate::coord::Coordinator) contract — locks, semaphores, elections: queueing again after an expiry, deadlines, cleanup of abandoned contenders, lost signals, releases until confirmed | [`CoordDriver`]: `enqueue`, `position`, `wait`, `watch_held`, `dequeue`, `proclaim`, a leader [`Feed`] |
//! | [`watch()`](watch::watch) / [`watch_instances`]: the [`Watcher`](crate::Watcher) contract — snapshot first, changes, `Stale` once, `Resynced`, de-duplication, one entry per id, backoff, one rule for fatal errors | [`Feed`]: `list` at a revision, `next` changes after one (or a fresh listing) |
//!
//! The memory backend ([`crate::memory`]) is the worked example: `memory/backend.rs`
//! implements the three traits over the in-process registry in about 200 lines.
//! `docs/architecture.md` at the repository root names the layers.

pub mod coord;
pub mod hooks;
pub mod keeper;
pub mod kv;
pub mod options;
pub mod session;
pub mod store;
pub mod watch;

pub use coord::{Contender, Coord, CoordDriver, CoordOptions, Kind, Position};
pub use hooks::TestHooks;
pub use keeper::{Keeper, UNCERTAIN_FOR};
pub use kv::{Kv, KvDriver, KvOptions, Scope};
pub use options::BackoffOptions;
pub use session::{Session, SessionDriver, SessionState};
pub use store::{Presence, RegistryStore};
pub use watch::{ends_watch, watch_instances, Change, Entry, Event, Feed, Item, Listing, Next};

/// Spawns the background task `task()` builds, once per `started` flag, on the current
/// runtime. Without a runtime nothing is spawned and the next call tries again.
pub(crate) fn spawn_once<F>(started: &std::sync::atomic::AtomicBool, task: impl FnOnce() -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    if started.swap(true, Ordering::AcqRel) {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(task());
        }
        Err(_) => started.store(false, Ordering::Release),
    }
}
