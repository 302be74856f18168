//! Picking: the strategies over the published set, and the fallback order shared by all.
//!
//! Nothing here allocates or locks: the view comes from the thread's cached copy (or
//! `ArcSwap` after an update), what the strategies need was computed when the set was
//! published (but the alias table and the sticky ring, built on a set's first weighted
//! or sticky pick), the random numbers come from a thread-local generator, and the only
//! writes are atomics (round-robin tickets, requests in flight, clearing an expired
//! ejection mark).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::Instance;

use super::entry::{InFlight, LazyNow, Picked};
use super::set::{Pool, PoolData, SetData};
use super::strategy::{
    Candidates, PickStrategy, PowerOfTwoChoices, Random, RoundRobin, Sticky, Weighted,
};
use super::ServiceCache;

/// A selection strategy, for [`ServiceCache::pick`]. Each also has its own method.
///
/// | strategy | method | picks |
/// |---|---|---|
/// | `RoundRobin` | [`pick_round_robin`](ServiceCache::pick_round_robin) | each instance in turn |
/// | `Random` | [`pick_random`](ServiceCache::pick_random) | uniformly at random |
/// | `Weighted` | [`pick_weighted`](ServiceCache::pick_weighted) | at random, proportionally to `weight` |
/// | `PowerOfTwoChoices` | [`pick_p2c`](ServiceCache::pick_p2c) | the less loaded of two random instances |
/// | `Sticky` | [`pick_sticky`](ServiceCache::pick_sticky) | the instance a key hashes to |
///
/// Each is also a unit struct in [`strategy`](super::strategy) implementing
/// [`PickStrategy`], and so is this enum; [`ServiceCache::pick_with`] takes your own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Strategy {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// At random, proportionally to [`Instance::weight`].
    Weighted,
    /// The power of two choices: of two instances drawn at random, the one with fewer
    /// requests in flight relative to its weight.
    PowerOfTwoChoices,
    /// Consistent hashing of a caller's key.
    Sticky,
}

impl ServiceCache {
    /// The pick shared by every strategy: the pools in the fallback order (the caller's
    /// zone when it has enough available instances; serving, then draining instances
    /// that are not ejected; then ejection ignored, serving first), each offered to
    /// `strategy` until one yields a position. Written out rather than looped over a
    /// table, so the common case (the first pool answers) is straight-line code.
    #[inline]
    fn pick_slot<S: PickStrategy + ?Sized, R>(
        &self,
        strategy: &S,
        key: Option<&[u8]>,
        out: impl FnOnce(&SetData, usize) -> R,
    ) -> Option<R> {
        let shared = &*self.shared;
        shared.with_view(|view| {
            let set: &SetData = &view.set;
            let now = LazyNow::new(&shared.clock, &shared.marks);
            let any_marks = !shared.marks.none();
            let offer = |kind: Pool, pool: &PoolData, respect_ejection: bool| {
                if pool.slots.is_empty() {
                    return None;
                }
                let candidates = Candidates {
                    set,
                    pool,
                    kind,
                    check_ejection: respect_ejection && any_marks,
                    now: &now,
                    ticket: &shared.ticket.0,
                    key,
                };
                strategy.choose(&candidates).map(|q| pool.slots[q] as usize)
            };
            let local = set.local.as_ref().filter(|local| {
                enough_local(
                    set,
                    local,
                    any_marks,
                    &now,
                    shared.options.zone_min_available,
                )
            });
            let i = local
                .and_then(|local| offer(Pool::Local, local, true))
                .or_else(|| offer(Pool::Serving, &set.serving, true))
                .or_else(|| offer(Pool::Draining, &set.draining, true))
                .or_else(|| offer(Pool::Serving, &set.serving, false))
                .or_else(|| offer(Pool::Draining, &set.draining, false))?;
            shared.picks.increment(1);
            Some(out(set, i))
        })
    }

    #[inline]
    fn pick_instance<S: PickStrategy>(
        &self,
        strategy: S,
        key: Option<&[u8]>,
    ) -> Option<Arc<Instance>> {
        self.pick_slot(&strategy, key, |set, i| Arc::clone(&set.instances[i]))
    }

    /// Each instance in turn (a shared counter; the order is by id).
    pub fn pick_round_robin(&self) -> Option<Arc<Instance>> {
        self.pick_instance(RoundRobin, None)
    }

    /// An instance drawn uniformly at random, weights ignored (except 0).
    pub fn pick_random(&self) -> Option<Arc<Instance>> {
        self.pick_instance(Random, None)
    }

    /// An instance drawn at random with probability proportional to its
    /// [`weight`](Instance::weight).
    pub fn pick_weighted(&self) -> Option<Arc<Instance>> {
        self.pick_instance(Weighted, None)
    }

    /// The power of two choices: draws two distinct instances uniformly and returns the
    /// one with fewer requests in flight per unit of weight (with equal weights: fewer
    /// requests in flight).
    ///
    /// The returned [`Picked`] is tracked: it counts as a request in flight on its
    /// instance until dropped. Keep it for the duration of the request.
    #[doc(alias = "least_loaded")]
    pub fn pick_p2c(&self) -> Option<Picked> {
        self.pick_slot(&PowerOfTwoChoices, None, |set, i| {
            Picked::tracked(Arc::clone(&set.instances[i]), &set.entries[i])
        })
    }

    /// The instance `key` hashes to on the consistent-hash ring: the same key keeps
    /// mapping to the same instance while that instance stays, and when one of `n`
    /// instances leaves only its keys (about `1/n`) move. `"abc"` and `b"abc"` are the
    /// same key; to use a number, pass its bytes (`&id.to_le_bytes()`).
    ///
    /// The mapping depends only on the key, the ids of the serving instances and
    /// [`CacheOptions::ring_vnodes`](super::CacheOptions::ring_vnodes), so every client
    /// that sees the same set agrees on it. Weights do not change it (apart from 0).
    /// With a [`zone`](super::CacheOptions::zone), keys map onto the caller's zone while
    /// it is used, and onto all zones when picks fall back to them.
    ///
    /// The ring of a set is built on the first sticky pick after the set changed (by
    /// merging the previous ring: a fraction of a millisecond at 1,000 instances), so
    /// that updates stay cheap for caches that never pick sticky.
    pub fn pick_sticky(&self, key: impl AsRef<[u8]>) -> Option<Arc<Instance>> {
        self.pick_instance(Sticky, Some(key.as_ref()))
    }

    /// Picks with `strategy`. `key` is used by [`Strategy::Sticky`] only; `Sticky`
    /// without a key picks at random. The result is tracked for
    /// [`Strategy::PowerOfTwoChoices`] only (see [`Picked`]).
    pub fn pick(&self, strategy: Strategy, key: Option<&[u8]>) -> Option<Picked> {
        self.pick_with(&strategy, key)
    }

    /// Picks with a [`PickStrategy`] of your own (or a built-in one): the cache offers it
    /// the pools in order (the caller's zone, serving, draining, then ejected instances)
    /// until it chooses a candidate. `key` is passed on as [`Candidates::key`]. The
    /// result is tracked if [`PickStrategy::tracks_in_flight`] says so.
    pub fn pick_with<S: PickStrategy + ?Sized>(
        &self,
        strategy: &S,
        key: Option<&[u8]>,
    ) -> Option<Picked> {
        if strategy.tracks_in_flight() {
            self.pick_slot(strategy, key, |set, i| {
                Picked::tracked(Arc::clone(&set.instances[i]), &set.entries[i])
            })
        } else {
            self.pick_slot(strategy, key, |set, i| {
                Picked::untracked(Arc::clone(&set.instances[i]))
            })
        }
    }

    /// Picks with `strategy` and calls `f` with the instance, borrowed from the cache's
    /// current set: no reference count is taken or dropped, which makes this the
    /// cheapest pick (the methods that return an `Arc` cost two more atomic operations
    /// per pick; the `pick` bench in the crate README compares them). `None` if the set
    /// is empty.
    ///
    /// With a strategy that [tracks requests in flight](PickStrategy::tracks_in_flight)
    /// (`PowerOfTwoChoices`), the pick counts as in flight while `f` runs: use it when
    /// the request completes inside `f`, and [`pick_p2c`](Self::pick_p2c) when it
    /// outlives the call. `f` runs on the calling thread; it may pick again.
    ///
    /// ```
    /// # use waypost_core::cache::{CacheOptions, ServiceCache, Strategy};
    /// # use waypost_core::{Instance, ServiceName, Snapshot};
    /// # let s = ServiceName::new("greeter").unwrap();
    /// # let i = vec![Instance::parse("greeter", "g-1", "10.0.0.1", 8080).unwrap()];
    /// # let cache = ServiceCache::from_snapshot(Snapshot::new(s, i, 1), CacheOptions::default());
    /// let port = cache.with_pick(&Strategy::RoundRobin, None, |i| i.endpoint.port);
    /// assert_eq!(port, Some(8080));
    /// ```
    #[inline]
    pub fn with_pick<S: PickStrategy + ?Sized, R>(
        &self,
        strategy: &S,
        key: Option<&[u8]>,
        f: impl FnOnce(&Arc<Instance>) -> R,
    ) -> Option<R> {
        if strategy.tracks_in_flight() {
            self.pick_slot(strategy, key, |set, i| {
                let _request = InFlight::new(&set.entries[i]);
                f(&set.instances[i])
            })
        } else {
            self.pick_slot(strategy, key, |set, i| f(&set.instances[i]))
        }
    }
}

/// Whether the caller's zone has at least `min` available instances (not ejected; the
/// pool holds only instances with a weight above 0). Free while nothing is ejected;
/// otherwise counts, stopping at `min`.
#[inline]
fn enough_local(
    set: &SetData,
    pool: &PoolData,
    any_marks: bool,
    now: &LazyNow<'_>,
    min: usize,
) -> bool {
    let n = pool.slots.len();
    if n < min {
        return false;
    }
    if !any_marks {
        return true;
    }
    pool.slots
        .iter()
        .filter(|&&i| !set.entries[i as usize].is_ejected(now))
        .take(min)
        .count()
        >= min
}
