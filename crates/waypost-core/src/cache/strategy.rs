//! [`PickStrategy`]: how one instance is chosen from a pool of candidates, the built-in
//! strategies, and the hook for your own.
//!
//! The cache decides *which pool* a pick draws from (the caller's zone, then serving
//! instances, then draining ones, ejected instances last: see the
//! [module docs](super)); a strategy decides *which candidate* of that pool. Every
//! built-in [`Strategy`] is also a unit struct here implementing the
//! trait, so a strategy of your own can wrap one.
//!
//! ```
//! use waypost_core::cache::strategy::{Candidates, PickStrategy, RoundRobin};
//! use waypost_core::cache::{CacheOptions, ServiceCache};
//! use waypost_core::{Instance, ServiceName, Snapshot};
//!
//! /// Prefers instances tagged "canary" one pick in ten, round robin otherwise.
//! #[derive(Debug)]
//! struct Canary;
//!
//! impl PickStrategy for Canary {
//!     fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
//!         if c.random() % 10 == 0 {
//!             let canary = (0..c.len())
//!                 .find(|&q| c.is_eligible(q) && c.instance(q).tags.iter().any(|t| t == "canary"));
//!             if canary.is_some() {
//!                 return canary;
//!             }
//!         }
//!         RoundRobin.choose(c)
//!     }
//! }
//!
//! let service = ServiceName::new("greeter").unwrap();
//! let instances = vec![
//!     Instance::parse("greeter", "g-1", "10.0.0.1", 8080).unwrap(),
//!     Instance::parse("greeter", "g-2", "10.0.0.2", 8080).unwrap().with_tag("canary"),
//! ];
//! let cache = ServiceCache::from_snapshot(Snapshot::new(service, instances, 1), CacheOptions::default());
//! assert!(cache.pick_with(&Canary, None).is_some());
//! ```

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::model::Instance;
use crate::select;

use super::entry::LazyNow;
use super::pick::Strategy;
use super::rng::next_u64;
use super::set::{Pool, PoolData, SetData};

/// Chooses one candidate of a pool: the selection half of a
/// [`ServiceCache`](super::ServiceCache) pick, pluggable through
/// [`ServiceCache::pick_with`](super::ServiceCache::pick_with) (Curator's
/// `ProviderStrategy`, tower's balancers).
///
/// # Contract
///
/// - [`choose`](Self::choose) returns a position in `0..candidates.len()`, or `None` when
///   no candidate suits. It should return only an [eligible](Candidates::is_eligible)
///   position: the cache uses the position as it is. On `None` the cache offers the next
///   pool (see the [module docs](super)), so a strategy never has to implement the
///   fallbacks itself.
/// - It is called on the thread that picks, once per pool tried, usually once per pick.
///   It must not block; it may be called from many threads at once.
/// - Whatever it needs across calls (counters, per-instance scores) it keeps itself,
///   with atomics or locks of its own; [`Candidates::next_ticket`] and
///   [`Candidates::random`] provide the cache's shared counter and a per-thread
///   generator.
pub trait PickStrategy: Send + Sync {
    /// A position in `candidates`, among the eligible ones; `None` if none suits.
    fn choose(&self, candidates: &Candidates<'_>) -> Option<usize>;

    /// Whether the picks of this strategy are tracked: the returned
    /// [`Picked`](super::Picked) counts as a request in flight until dropped, which is
    /// what [`Candidates::in_flight`] reports. Default `false`.
    fn tracks_in_flight(&self) -> bool {
        false
    }
}

impl<S: PickStrategy + ?Sized> PickStrategy for &S {
    fn choose(&self, candidates: &Candidates<'_>) -> Option<usize> {
        (**self).choose(candidates)
    }

    fn tracks_in_flight(&self) -> bool {
        (**self).tracks_in_flight()
    }
}

impl<S: PickStrategy + ?Sized> PickStrategy for Box<S> {
    fn choose(&self, candidates: &Candidates<'_>) -> Option<usize> {
        (**self).choose(candidates)
    }

    fn tracks_in_flight(&self) -> bool {
        (**self).tracks_in_flight()
    }
}

impl<S: PickStrategy + ?Sized> PickStrategy for Arc<S> {
    fn choose(&self, candidates: &Candidates<'_>) -> Option<usize> {
        (**self).choose(candidates)
    }

    fn tracks_in_flight(&self) -> bool {
        (**self).tracks_in_flight()
    }
}

/// One pool of a cache's current set, as offered to a [`PickStrategy`]: positions
/// `0..len()`, in the order of the instances' ids.
pub struct Candidates<'a> {
    pub(crate) set: &'a SetData,
    pub(crate) pool: &'a PoolData,
    pub(crate) kind: Pool,
    /// Whether ejected candidates are ineligible: false in the last-resort pools, and
    /// when no instance is ejected (then nothing needs checking).
    pub(crate) check_ejection: bool,
    pub(crate) now: &'a LazyNow<'a>,
    pub(crate) ticket: &'a AtomicUsize,
    pub(crate) key: Option<&'a [u8]>,
}

impl<'a> Candidates<'a> {
    #[inline]
    fn index(&self, q: usize) -> usize {
        self.pool.slots[q] as usize
    }

    /// Number of candidates.
    #[inline]
    pub fn len(&self) -> usize {
        self.pool.slots.len()
    }

    /// Whether there is no candidate (a strategy is never offered an empty pool).
    pub fn is_empty(&self) -> bool {
        self.pool.slots.is_empty()
    }

    /// The candidate at position `q`.
    ///
    /// # Panics
    ///
    /// If `q >= len()`.
    #[inline]
    pub fn instance(&self, q: usize) -> &'a Arc<Instance> {
        &self.set.instances[self.index(q)]
    }

    /// The weight of the candidate at `q` (0 in the draining pool).
    #[inline]
    pub fn weight(&self, q: usize) -> u32 {
        // The pool keeps the weights in pool order: no pointer to chase.
        self.pool.weight(q)
    }

    /// Requests in flight on the candidate at `q`: tracked [`Picked`](super::Picked)s
    /// not yet dropped.
    #[inline]
    pub fn in_flight(&self, q: usize) -> usize {
        self.set.entries[self.index(q)].in_flight()
    }

    /// Whether the candidate at `q` may be returned: it is not ejected, or this pool is
    /// one of the last resorts where ejection is ignored.
    #[inline]
    pub fn is_eligible(&self, q: usize) -> bool {
        !self.check_ejection || !self.set.entries[self.index(q)].is_ejected(self.now)
    }

    /// The key the caller passed (used by [`Sticky`]).
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }

    /// Whether this is the draining pool (every weight is 0).
    pub fn is_draining(&self) -> bool {
        self.kind == Pool::Draining
    }

    /// Whether this pool holds only the instances of the caller's
    /// [`zone`](super::CacheOptions::zone).
    pub fn is_local_zone(&self) -> bool {
        self.kind == Pool::Local
    }

    /// A random `u64` from this thread's generator (fast, not cryptographic).
    #[inline]
    pub fn random(&self) -> u64 {
        next_u64()
    }

    /// The next ticket of the cache's round-robin counter, shared by all its clones.
    #[inline]
    pub fn next_ticket(&self) -> usize {
        self.ticket.fetch_add(1, Relaxed)
    }

    /// Calls `f` with the eligibility test, specialised when nothing needs checking.
    #[inline]
    fn with_eligible<R>(&self, f: impl FnOnce(&dyn Fn(usize) -> bool) -> R) -> R {
        if self.check_ejection {
            f(&|q| self.is_eligible(q))
        } else {
            f(&|_| true)
        }
    }
}

impl fmt::Debug for Candidates<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidates")
            .field("pool", &self.kind)
            .field("len", &self.len())
            .field("check_ejection", &self.check_ejection)
            .finish()
    }
}

/// Each candidate in turn, on the cache's shared counter. See [`Strategy::RoundRobin`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin;

impl PickStrategy for RoundRobin {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        if !c.check_ejection {
            // The pool's divisor, precomputed: a multiplication instead of a division.
            return (!c.is_empty()).then(|| c.pool.len_mod.reduce(c.next_ticket()));
        }
        select::round_robin(c.len(), || c.next_ticket(), |q| c.is_eligible(q))
    }
}

/// Uniformly at random. See [`Strategy::Random`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Random;

impl PickStrategy for Random {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        if !c.check_ejection {
            let n = c.len();
            return (n > 0).then(|| select::uniform_index(next_u64(), n));
        }
        select::uniform_eligible(c.len(), next_u64, |q| c.is_eligible(q))
    }
}

/// At random, proportionally to the weights (an alias table: constant time). See
/// [`Strategy::Weighted`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Weighted;

impl PickStrategy for Weighted {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        if c.is_draining() {
            // All weights are 0 here.
            return Random.choose(c);
        }
        if !c.check_ejection {
            return c.pool.alias().sample(next_u64());
        }
        c.pool
            .alias()
            .sample_eligible(next_u64, |q| c.is_eligible(q))
    }
}

/// The power of two choices; tracks requests in flight. See
/// [`Strategy::PowerOfTwoChoices`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PowerOfTwoChoices;

impl PickStrategy for PowerOfTwoChoices {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        let load = |q: usize| (c.in_flight(q), c.weight(q));
        c.with_eligible(|eligible| {
            select::p2c(c.len(), next_u64, eligible, |a, b| {
                select::less_loaded(load(a), load(b))
            })
        })
    }

    fn tracks_in_flight(&self) -> bool {
        true
    }
}

/// Consistent hashing of the caller's key; at random without a key. See
/// [`Strategy::Sticky`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Sticky;

impl PickStrategy for Sticky {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        let Some(key) = c.key() else {
            return Random.choose(c);
        };
        let hash = select::key_hash(key);
        match c.kind {
            // The ring's members are positions in the pool. Nothing to check (nothing
            // is ejected) is the common case: its own copy, without the test.
            Pool::Serving | Pool::Local if !c.check_ejection => {
                c.pool.ring(&c.set.instances).lookup(hash, |_| true)
            }
            Pool::Serving | Pool::Local => c
                .pool
                .ring(&c.set.instances)
                .lookup(hash, |q| c.is_eligible(q)),
            Pool::Draining => c.with_eligible(|eligible| {
                select::rendezvous(
                    hash,
                    c.pool.slots.iter().map(|&i| c.set.id_hashes[i as usize]),
                    eligible,
                )
            }),
        }
    }
}

impl PickStrategy for Strategy {
    #[inline]
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        match self {
            Strategy::RoundRobin => RoundRobin.choose(c),
            Strategy::Random => Random.choose(c),
            Strategy::Weighted => Weighted.choose(c),
            Strategy::PowerOfTwoChoices => PowerOfTwoChoices.choose(c),
            Strategy::Sticky => Sticky.choose(c),
        }
    }

    fn tracks_in_flight(&self) -> bool {
        matches!(self, Strategy::PowerOfTwoChoices)
    }
}
