//! [`ServiceCache`]: the live set of one service's instances, kept up to date by a
//! [`Watcher`], and the selection strategies that pick from it.
//!
//! ```
//! use std::time::Duration;
//! use waypost_core::cache::{CacheOptions, ServiceCache, Strategy};
//! use waypost_core::{Instance, ServiceName, Snapshot};
//!
//! let service = ServiceName::new("greeter").unwrap();
//! let instances = vec![
//!     Instance::parse("greeter", "g-1", "10.0.0.1", 8080).unwrap(),
//!     Instance::parse("greeter", "g-2", "10.0.0.2", 8080).unwrap().with_weight(300),
//!     Instance::parse("greeter", "g-3", "10.0.0.3", 8080).unwrap().with_weight(0),
//! ];
//! // In a program: `ServiceCache::watch(watcher, service, CacheOptions::default())`.
//! let cache = ServiceCache::from_snapshot(Snapshot::new(service, instances, 1), CacheOptions::default());
//!
//! let next = cache.pick_round_robin().unwrap(); // g-1, g-2, g-1, ... (g-3 is draining)
//! let heavy = cache.pick_weighted().unwrap(); // g-2 three times out of four
//! let user = cache.pick_sticky("user-42").unwrap(); // the same instance every time
//! assert_eq!(cache.pick_sticky("user-42").unwrap().id, user.id);
//! {
//!     let call = cache.pick_p2c().unwrap(); // counts as in flight until dropped
//!     assert_eq!(cache.in_flight(call.id()), Some(1));
//! }
//!
//! // A request to g-1 failed: keep it out of every strategy for `CacheOptions::ejection`.
//! cache.report_failure("g-1");
//! assert!((0..100).all(|_| cache.pick(Strategy::RoundRobin, None).unwrap().id.as_str() == "g-2"));
//! # let _ = (next, heavy);
//! ```
//!
//! # Feeding
//!
//! [`ServiceCache::watch`] spawns a task that consumes [`Watcher::watch`] and applies every
//! event. When the watch ends or yields an error, the cache is marked stale, and the task
//! waits (with [`CacheOptions::backoff`]) and watches again; the new watch's snapshot
//! replaces the set. This goes on until the last clone of the cache is dropped, which
//! stops the task and drops the watch.
//!
//! While stale (the watch reported [`WatchEvent::Stale`], or it ended), the last known set
//! keeps being served; [`is_stale`](ServiceCache::is_stale) and
//! [`age`](ServiceCache::age) tell how out of date it may be. A `Resynced` or a new
//! watch's `Snapshot` makes it live again.
//!
//! # Reading and waiting
//!
//! Reads never lock: the state is published through `ArcSwap` as an immutable
//! [`CacheView`]. [`view`](ServiceCache::view) returns the current one.
//! [`wait_for`](ServiceCache::wait_for) waits, without polling, until a condition on the
//! view holds: every update wakes the waiters.
//!
//! # Strategies
//!
//! See [`Strategy`]; plug in your own with [`PickStrategy`] and
//! [`pick_with`](ServiceCache::pick_with); [`with_pick`](ServiceCache::with_pick) lends
//! the picked instance to a closure instead of returning an `Arc` (the cheapest pick).
//! They all draw from the same pools, in this order, moving on only when a pool has
//! nothing to offer:
//!
//! 0. with [`CacheOptions::zone`] set, and while that zone has at least
//!    [`CacheOptions::zone_min_available`] available instances (weight above 0, not
//!    ejected): the instances of that zone with a weight above 0 that are not ejected;
//! 1. instances with a weight above 0 that are not ejected;
//! 2. draining instances (weight 0) that are not ejected: a working instance that is being
//!    drained beats one that is failing;
//! 3. if every instance is ejected, ejection is ignored: instances with a weight above 0,
//!    then draining ones. A pick returns `None` only when the set is empty.
//!
//! Picking does not allocate and does not lock, by construction: what a strategy needs
//! (the pools and their weights) is computed by the task when an update is applied; a
//! pick reads it, draws from a thread-local generator, and writes only atomics (the
//! first weighted pick of a set builds its alias table, once). Each thread keeps the view it last picked from (for up to 4 caches), so a
//! pick does not even load the shared pointer until the next update, and while no
//! instance is ejected it reads no clock. The cost of an update is linear in the set;
//! the sticky strategy's hash ring (`ring_vnodes` points per instance) is derived from
//! the previous one on the first sticky pick after a change, so caches that do not pick
//! sticky never pay for it. The `pick` bench measures both.
//!
//! # Ejection
//!
//! The registry learns of a crashed instance only when its session or TTL expires.
//! [`report_failure`](ServiceCache::report_failure) ejects an instance on the client
//! side for [`CacheOptions::ejection`]: every strategy skips it until the time has
//! passed or [`report_success`](ServiceCache::report_success) is called. Sticky keys of
//! an ejected instance go to the next instance on the ring and come back when it is
//! readmitted.
//!
//! Ejection belongs to the instance id, not to one version of the set: it survives
//! updates of the instance, and an instance that leaves the set and comes back *while
//! its ejection still runs* is still ejected (a registration that flaps is not trusted
//! more for it). Once the time has passed it comes back fresh.

mod entry;
mod options;
mod pick;
mod rng;
mod set;
mod state;
pub mod strategy;
mod task;
mod view;

#[cfg(test)]
pub(crate) mod script;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_select;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, Revision, ServiceName};
use crate::watcher::Watcher;

pub use entry::Picked;
pub use options::{
    CacheOptions, DEFAULT_EJECTION, DEFAULT_RING_VNODES, DEFAULT_ZONE_MIN_AVAILABLE,
};
pub use pick::Strategy;
pub use strategy::{Candidates, PickStrategy};
pub use view::CacheView;

use state::Shared;
use task::TaskGuard;

/// The live set of one service's instances, and selection over it. See the
/// [module docs](self) for the guarantees.
///
/// Cheap to clone: clones share the state and the watch task. Dropping the last clone
/// stops the task.
#[derive(Clone)]
pub struct ServiceCache {
    shared: Arc<Shared>,
    _task: Option<Arc<TaskGuard>>,
}

impl ServiceCache {
    /// A cache of `service` fed by `watcher`: spawns the task that watches (and re-watches)
    /// it. The cache is empty and not [ready](Self::is_ready) until the first snapshot;
    /// use [`wait_ready`](Self::wait_ready) to wait for it.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn watch(watcher: Arc<dyn Watcher>, service: ServiceName, options: CacheOptions) -> Self {
        let shared = Arc::new(Shared::new(service, options));
        let handle = tokio::spawn(task::run(Arc::clone(&shared), watcher));
        Self {
            shared,
            _task: Some(Arc::new(TaskGuard(handle.abort_handle()))),
        }
    }

    /// A cache holding `snapshot` and nothing feeds it (but [`apply`](Self::apply)): for
    /// tests, benches and examples. Ready from the start; needs no runtime.
    pub fn from_snapshot(snapshot: Snapshot, options: CacheOptions) -> Self {
        let shared = Arc::new(Shared::new(snapshot.service.clone(), options));
        shared.apply(WatchEvent::Snapshot(snapshot));
        Self {
            shared,
            _task: None,
        }
    }

    /// Applies one event by hand, the way the watch task applies the watch's events
    /// (including the precomputation for picking). For caches made with
    /// [`from_snapshot`](Self::from_snapshot), or fed from something that is not a
    /// [`Watcher`]; on a watched cache, the watch's next snapshot overrides it.
    pub fn apply(&self, event: WatchEvent) {
        self.shared.apply(event);
    }

    /// The service.
    pub fn service(&self) -> &ServiceName {
        &self.shared.service
    }

    /// The options.
    pub fn options(&self) -> &CacheOptions {
        &self.shared.options
    }

    /// The current state: instances, revision, readiness, staleness. A reference count;
    /// the view does not change while you hold it.
    pub fn view(&self) -> Arc<CacheView> {
        self.shared.view.load_full()
    }

    /// The current instances, sorted by id (draining and ejected ones included), as a
    /// shared list: a reference count, no copy.
    pub fn instances(&self) -> Arc<[Arc<Instance>]> {
        self.shared.view.load().instances_arc()
    }

    /// The instance with this id (an [`InstanceId`](crate::InstanceId) or a `&str`).
    pub fn get(&self, id: impl AsRef<str>) -> Option<Arc<Instance>> {
        self.shared.view.load().get(id).cloned()
    }

    /// Whether an instance with this id is listed.
    pub fn contains(&self, id: impl AsRef<str>) -> bool {
        self.shared.view.load().contains(id)
    }

    /// Number of instances, draining and ejected ones included.
    pub fn len(&self) -> usize {
        self.shared.view.load().len()
    }

    /// Whether no instance is listed.
    pub fn is_empty(&self) -> bool {
        self.shared.view.load().is_empty()
    }

    /// The revision of the last applied event. See [`CacheView::revision`].
    pub fn revision(&self) -> Revision {
        self.shared.view.load().revision()
    }

    /// Whether the first snapshot has been applied.
    pub fn is_ready(&self) -> bool {
        self.shared.view.load().is_ready()
    }

    /// Whether the registry is lost and the last known set is being served.
    pub fn is_stale(&self) -> bool {
        self.shared.view.load().is_stale()
    }

    /// Since when the cache is stale, if it is.
    pub fn stale_since(&self) -> Option<Instant> {
        self.shared.view.load().stale_since()
    }

    /// How long the set may have been out of date: zero while live. See
    /// [`CacheView::age`].
    pub fn age(&self) -> Duration {
        self.shared.view.load().age()
    }

    /// Waits until the first snapshot has been applied; [`Error::Timeout`] after
    /// `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_inner(
            timeout,
            "waiting for the service cache's first snapshot",
            |v| v.is_ready(),
        )
        .await
        .map(drop)
    }

    /// Waits until `pred` holds for the current view and returns that view;
    /// [`Error::Timeout`] after `timeout`. `pred` is called now and after every update,
    /// never on a timer.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use waypost_core::cache::{CacheOptions, ServiceCache};
    /// # use waypost_core::{Instance, ServiceName, Snapshot, WatchEvent};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> waypost_core::Result<()> {
    /// # let s = ServiceName::new("greeter")?;
    /// # let cache = ServiceCache::from_snapshot(Snapshot::new(s, vec![], 1), CacheOptions::default());
    /// # cache.apply(WatchEvent::Added { instance: Instance::parse("greeter", "g-7", "h", 1)?, revision: 2 });
    /// let view = cache.wait_for(Duration::from_secs(5), |v| v.contains("g-7")).await?;
    /// assert_eq!(view.get("g-7").unwrap().endpoint.port, 1);
    /// cache.wait_for(Duration::from_secs(5), |v| v.len() == 1 && !v.is_stale()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&CacheView) -> bool,
    ) -> Result<Arc<CacheView>> {
        self.wait_inner(
            timeout,
            "waiting for a condition on the service cache",
            pred,
        )
        .await
    }

    async fn wait_inner(
        &self,
        timeout: Duration,
        operation: &'static str,
        mut pred: impl FnMut(&CacheView) -> bool,
    ) -> Result<Arc<CacheView>> {
        // Subscribe before the first check, so an update between the check and the wait
        // is not missed.
        let mut changed = self.shared.subscribe();
        let wait = async {
            loop {
                let view = self.view();
                if pred(&view) {
                    return view;
                }
                if changed.changed().await.is_err() {
                    // The sender lives in `shared`, which `self` keeps alive.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                operation,
                after: timeout,
            })
    }

    /// Ejects the instance with this id for [`CacheOptions::ejection`]: every strategy
    /// skips it (unless every instance is ejected) until the time has passed or
    /// [`report_success`](Self::report_success) is called. Reporting again extends the
    /// ejection. Returns whether the id is listed; an unlisted id is ignored.
    pub fn report_failure(&self, id: impl AsRef<str>) -> bool {
        let view = self.shared.view.load();
        match view.set.position(id.as_ref()) {
            Some(i) => {
                self.shared.ejections.increment(1);
                view.set.entries[i].eject(
                    &self.shared.clock,
                    &self.shared.marks,
                    self.shared.options.ejection,
                );
                true
            }
            None => false,
        }
    }

    /// Readmits the instance with this id now if it was ejected. Returns whether the id
    /// is listed.
    pub fn report_success(&self, id: impl AsRef<str>) -> bool {
        let view = self.shared.view.load();
        match view.set.position(id.as_ref()) {
            Some(i) => {
                view.set.entries[i].readmit(&self.shared.marks);
                true
            }
            None => false,
        }
    }

    /// Whether the instance with this id is listed and ejected.
    pub fn is_ejected(&self, id: impl AsRef<str>) -> bool {
        let view = self.shared.view.load();
        view.set
            .position(id.as_ref())
            .is_some_and(|i| view.set.entries[i].is_ejected_at(self.shared.clock.now_ms()))
    }

    /// Requests in flight on the instance with this id (tracked [`Picked`]s not yet
    /// dropped), if it is listed.
    pub fn in_flight(&self, id: impl AsRef<str>) -> Option<usize> {
        let view = self.shared.view.load();
        view.set
            .position(id.as_ref())
            .map(|i| view.set.entries[i].in_flight())
    }
}

impl fmt::Debug for ServiceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCache")
            .field("watched", &self._task.is_some())
            .field("view", &*self.shared.view.load())
            .finish()
    }
}
