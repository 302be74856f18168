//! The instance set with what selection needs: the pools and their weights, computed
//! when an update is applied, and their alias tables and sticky rings, built when first
//! asked for.

use std::sync::{Arc, Mutex, OnceLock};

use crate::model::Instance;
use crate::select::{AliasTable, FastMod, Ring};

use super::entry::Entry;

/// One instance, its carried-over state and the hash of its id.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub(crate) instance: Arc<Instance>,
    pub(crate) entry: Arc<Entry>,
    pub(crate) hash: u64,
}

/// The pools selection draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    /// Weight above 0, in the caller's zone (only with [`CacheOptions::zone`]).
    ///
    /// [`CacheOptions::zone`]: super::CacheOptions::zone
    Local,
    /// Weight above 0.
    Serving,
    /// Weight 0.
    Draining,
}

/// A ring and the members it was built over, in ring order.
#[derive(Debug)]
struct BuiltRing {
    ring: Arc<Ring>,
    members: Box<[Arc<Instance>]>,
}

/// One pool: its members (indexes into the set) and what strategies precompute over it.
#[derive(Debug)]
pub(crate) struct PoolData {
    /// Indexes into the set's instances, ascending.
    pub(crate) slots: Box<[u32]>,
    /// `x % slots.len()` without a division (round robin).
    pub(crate) len_mod: FastMod,
    /// The members' weights, in pool order (empty for the draining pool, whose weights
    /// are all 0).
    weights: Box<[u32]>,
    /// Over `weights`, built on the first weighted pick of this set: an update costs
    /// a third less for caches that do not pick weighted.
    alias: OnceLock<AliasTable>,
    vnodes: u32,
    /// The consistent-hash ring over the members (positions in `slots`), built on the
    /// first sticky pick of this set.
    ring: OnceLock<Arc<BuiltRing>>,
    /// The ring of an earlier set, to derive `ring` from by merging rather than building
    /// from scratch; taken when `ring` is built.
    base: Mutex<Option<Arc<BuiltRing>>>,
}

impl PoolData {
    fn new(
        slots: Vec<u32>,
        all: &[Slot],
        weighted: bool,
        vnodes: u32,
        prev: Option<&PoolData>,
    ) -> Self {
        let weights = if weighted {
            slots
                .iter()
                .map(|&i| all[i as usize].instance.weight)
                .collect()
        } else {
            Box::default()
        };
        PoolData {
            len_mod: FastMod::new(slots.len()),
            slots: slots.into(),
            weights,
            alias: OnceLock::new(),
            vnodes,
            ring: OnceLock::new(),
            base: Mutex::new(prev.and_then(PoolData::latest_ring)),
        }
    }

    /// The weight of the member at pool position `q` (0 in the draining pool).
    #[inline]
    pub(crate) fn weight(&self, q: usize) -> u32 {
        self.weights.get(q).copied().unwrap_or(0)
    }

    /// The alias table of the members' weights; built now if this is the set's first
    /// weighted pick.
    #[inline]
    pub(crate) fn alias(&self) -> &AliasTable {
        self.alias
            .get_or_init(|| AliasTable::new(self.weights.iter().copied()))
    }

    /// The newest ring this pool has or derives from.
    fn latest_ring(&self) -> Option<Arc<BuiltRing>> {
        self.ring
            .get()
            .cloned()
            .or_else(|| self.base.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The ring over this pool's members; built now if this is the set's first sticky
    /// pick (concurrent first picks wait for the one that builds it).
    pub(crate) fn ring(&self, instances: &[Arc<Instance>]) -> &Ring {
        &self
            .ring
            .get_or_init(|| {
                let members: Box<[Arc<Instance>]> = self
                    .slots
                    .iter()
                    .map(|&i| Arc::clone(&instances[i as usize]))
                    .collect();
                let new: Vec<&str> = members.iter().map(|i| i.id.as_str()).collect();
                let base = self.base.lock().unwrap_or_else(|p| p.into_inner()).take();
                let ring = match base {
                    Some(b) if b.ring.vnodes() == self.vnodes => {
                        let old: Vec<&str> = b.members.iter().map(|i| i.id.as_str()).collect();
                        if old == new {
                            Arc::clone(&b.ring)
                        } else {
                            Arc::new(b.ring.update(&old, &new))
                        }
                    }
                    _ => Arc::new(Ring::new(&new, self.vnodes)),
                };
                drop(new);
                Arc::new(BuiltRing { ring, members })
            })
            .ring
    }

    /// Whether the ring of this set has been built.
    #[cfg(test)]
    pub(crate) fn has_ring(&self) -> bool {
        self.ring.get().is_some()
    }
}

#[derive(Debug)]
pub(crate) struct SetData {
    /// Sorted by id, unique ids.
    pub(crate) instances: Arc<[Arc<Instance>]>,
    /// Parallel to `instances`.
    pub(crate) entries: Box<[Arc<Entry>]>,
    /// `key_hash` of each id, parallel to `instances` (rendezvous over the draining pool).
    pub(crate) id_hashes: Box<[u64]>,
    pub(crate) serving: PoolData,
    pub(crate) draining: PoolData,
    /// The serving instances in the caller's zone, when a zone is set.
    pub(crate) local: Option<PoolData>,
}

impl SetData {
    pub(crate) fn empty(vnodes: u32, zone: Option<&str>) -> Self {
        Self::build(Vec::new(), None, vnodes, zone)
    }

    /// The set of `slots` (sorted by id, ids unique). Costs O(n) and no ring work: a
    /// pool's ring is derived from `prev`'s newest ring on the first sticky pick.
    pub(crate) fn build(
        slots: Vec<Slot>,
        prev: Option<&SetData>,
        vnodes: u32,
        zone: Option<&str>,
    ) -> Self {
        debug_assert!(slots
            .windows(2)
            .all(|w| w[0].instance.id < w[1].instance.id));
        let mut serving = Vec::new();
        let mut draining = Vec::new();
        let mut local = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            if s.instance.weight > 0 {
                serving.push(i as u32);
                if zone.is_some() && s.instance.zone.as_deref() == zone {
                    local.push(i as u32);
                }
            } else {
                draining.push(i as u32);
            }
        }
        let serving = PoolData::new(serving, &slots, true, vnodes, prev.map(|p| &p.serving));
        let draining = PoolData::new(draining, &slots, false, vnodes, None);
        let local = zone.map(|_| {
            PoolData::new(
                local,
                &slots,
                true,
                vnodes,
                prev.and_then(|p| p.local.as_ref()),
            )
        });
        let n = slots.len();
        let mut instances = Vec::with_capacity(n);
        let mut entries = Vec::with_capacity(n);
        let mut id_hashes = Vec::with_capacity(n);
        for s in slots {
            instances.push(s.instance);
            entries.push(s.entry);
            id_hashes.push(s.hash);
        }
        Self {
            instances: instances.into(),
            entries: entries.into(),
            id_hashes: id_hashes.into(),
            serving,
            draining,
            local,
        }
    }

    /// The index of `id` in `instances`.
    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.instances
            .binary_search_by(|i| i.id.as_str().cmp(id))
            .ok()
    }

    /// The instances with their state, for building the next set.
    pub(crate) fn slots(&self) -> Vec<Slot> {
        (0..self.instances.len())
            .map(|i| Slot {
                instance: Arc::clone(&self.instances[i]),
                entry: Arc::clone(&self.entries[i]),
                hash: self.id_hashes[i],
            })
            .collect()
    }
}
