//! Picking: the strategies over the published set, and the fallback order shared by all.
//!
//! Nothing here allocates or locks: the view is loaded through `ArcSwap`, everything the
//! strategies need was computed when the set was published, the random numbers come from
//! a thread-local generator, and the only writes are atomics (round-robin tickets,
//! requests in flight, clearing an expired ejection mark).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::Instance;
use crate::select;

use super::entry::{LazyNow, Picked};
use super::rng::next_u64;
use super::set::{Pool, SetData};
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

/// One strategy, run over one pool of the set.
trait Choose {
    /// A position in `slots` (the pool's indexes into the set), among the eligible ones.
    fn choose(
        &mut self,
        set: &SetData,
        pool: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize>;
}

/// The fallback order: serving instances that are not ejected, then draining ones that
/// are not ejected, then ejection is ignored (serving first).
const TIERS: [(Pool, bool); 4] = [
    (Pool::Serving, true),
    (Pool::Draining, true),
    (Pool::Serving, false),
    (Pool::Draining, false),
];

impl ServiceCache {
    fn pick_slot<R>(
        &self,
        mut algo: impl Choose,
        out: impl FnOnce(&SetData, usize) -> R,
    ) -> Option<R> {
        let view = self.shared.view.load();
        let set: &SetData = &view.set;
        let now = LazyNow::new(&self.shared.clock);
        for (pool, respect_ejection) in TIERS {
            let slots = set.pool(pool);
            if slots.is_empty() {
                continue;
            }
            let q = if respect_ejection {
                algo.choose(set, pool, slots, |q| {
                    !set.entries[slots[q] as usize].is_ejected(&now)
                })
            } else {
                algo.choose(set, pool, slots, |_| true)
            };
            if let Some(q) = q {
                return Some(out(set, slots[q] as usize));
            }
        }
        None
    }

    fn pick_instance(&self, algo: impl Choose) -> Option<Arc<Instance>> {
        self.pick_slot(algo, |set, i| Arc::clone(&set.instances[i]))
    }

    /// Each instance in turn (a shared counter; the order is by id).
    pub fn pick_round_robin(&self) -> Option<Arc<Instance>> {
        self.pick_instance(RoundRobin(&self.shared.ticket))
    }

    /// An instance drawn uniformly at random, weights ignored (except 0).
    pub fn pick_random(&self) -> Option<Arc<Instance>> {
        self.pick_instance(Random)
    }

    /// An instance drawn at random with probability proportional to its
    /// [`weight`](Instance::weight).
    pub fn pick_weighted(&self) -> Option<Arc<Instance>> {
        self.pick_instance(Weighted)
    }

    /// The power of two choices: draws two distinct instances uniformly and returns the
    /// one with fewer requests in flight per unit of weight (with equal weights: fewer
    /// requests in flight).
    ///
    /// The returned [`Picked`] is tracked: it counts as a request in flight on its
    /// instance until dropped. Keep it for the duration of the request.
    #[doc(alias = "least_loaded")]
    pub fn pick_p2c(&self) -> Option<Picked> {
        self.pick_slot(P2c, |set, i| {
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
    pub fn pick_sticky(&self, key: impl AsRef<[u8]>) -> Option<Arc<Instance>> {
        self.pick_instance(Sticky(select::key_hash(key.as_ref())))
    }

    /// Picks with `strategy`. `key` is used by [`Strategy::Sticky`] only; `Sticky`
    /// without a key picks at random. The result is tracked for
    /// [`Strategy::PowerOfTwoChoices`] only (see [`Picked`]).
    pub fn pick(&self, strategy: Strategy, key: Option<&[u8]>) -> Option<Picked> {
        match strategy {
            Strategy::RoundRobin => self.pick_round_robin().map(Picked::untracked),
            Strategy::Random => self.pick_random().map(Picked::untracked),
            Strategy::Weighted => self.pick_weighted().map(Picked::untracked),
            Strategy::PowerOfTwoChoices => self.pick_p2c(),
            Strategy::Sticky => match key {
                Some(k) => self.pick_sticky(k),
                None => self.pick_random(),
            }
            .map(Picked::untracked),
        }
    }
}

struct RoundRobin<'a>(&'a AtomicUsize);

impl Choose for RoundRobin<'_> {
    fn choose(
        &mut self,
        _: &SetData,
        _: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        select::round_robin(slots.len(), || self.0.fetch_add(1, Relaxed), eligible)
    }
}

struct Random;

impl Choose for Random {
    fn choose(
        &mut self,
        _: &SetData,
        _: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        select::uniform_eligible(slots.len(), next_u64, eligible)
    }
}

struct Weighted;

impl Choose for Weighted {
    fn choose(
        &mut self,
        set: &SetData,
        pool: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match pool {
            Pool::Serving => select::weighted_eligible(&set.cumulative, next_u64, eligible),
            // All weights are 0 here.
            Pool::Draining => select::uniform_eligible(slots.len(), next_u64, eligible),
        }
    }
}

struct P2c;

impl Choose for P2c {
    fn choose(
        &mut self,
        set: &SetData,
        _: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let load = |q: usize| {
            let i = slots[q] as usize;
            (set.entries[i].in_flight(), set.instances[i].weight)
        };
        select::p2c(slots.len(), next_u64, eligible, |a, b| {
            select::less_loaded(load(a), load(b))
        })
    }
}

struct Sticky(u64);

impl Choose for Sticky {
    fn choose(
        &mut self,
        set: &SetData,
        pool: Pool,
        slots: &[u32],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match pool {
            // The ring's members are positions in the serving pool.
            Pool::Serving => set.ring.lookup(self.0, eligible),
            Pool::Draining => select::rendezvous(
                self.0,
                slots.iter().map(|&i| set.id_hashes[i as usize]),
                eligible,
            ),
        }
    }
}
