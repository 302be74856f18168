//! The instance set with everything selection needs, precomputed when an update is
//! applied so that picking only reads.

use std::sync::Arc;

use crate::model::{Instance, InstanceId};
use crate::select::{cumulative_weights, key_hash, Ring};

use super::entry::Entry;

/// One instance and its carried-over state.
pub(crate) type Slot = (Arc<Instance>, Arc<Entry>);

/// The pools selection draws from, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    /// Weight above 0.
    Serving,
    /// Weight 0.
    Draining,
}

#[derive(Debug)]
pub(crate) struct SetData {
    /// Sorted by id, unique ids.
    pub(crate) instances: Arc<[Arc<Instance>]>,
    /// Parallel to `instances`.
    pub(crate) entries: Box<[Arc<Entry>]>,
    /// `key_hash` of each id, parallel to `instances` (rendezvous over the draining pool).
    pub(crate) id_hashes: Box<[u64]>,
    /// Indexes into `instances` with weight above 0, ascending.
    pub(crate) serving: Box<[u32]>,
    /// Indexes into `instances` with weight 0, ascending.
    pub(crate) draining: Box<[u32]>,
    /// Running sums of the weights of `serving`.
    pub(crate) cumulative: Box<[u64]>,
    /// Ring over `serving`: its members are positions in `serving`.
    pub(crate) ring: Arc<Ring>,
}

impl SetData {
    pub(crate) fn empty(vnodes: u32) -> Self {
        Self::build(Vec::new(), None, vnodes)
    }

    /// The set of `slots` (sorted by id, ids unique). The ring is derived from `prev`'s
    /// when there is one: shared as is if the serving members did not change, otherwise
    /// updated by merging rather than rebuilt.
    pub(crate) fn build(slots: Vec<Slot>, prev: Option<&SetData>, vnodes: u32) -> Self {
        debug_assert!(slots.windows(2).all(|w| w[0].0.id < w[1].0.id));
        let mut serving = Vec::new();
        let mut draining = Vec::new();
        for (i, (inst, _)) in slots.iter().enumerate() {
            if inst.weight > 0 {
                serving.push(i as u32);
            } else {
                draining.push(i as u32);
            }
        }
        let cumulative = cumulative_weights(serving.iter().map(|&i| slots[i as usize].0.weight));
        let id_hashes = slots
            .iter()
            .map(|(i, _)| key_hash(i.id.as_str().as_bytes()))
            .collect();

        let new_ids: Vec<&InstanceId> = serving.iter().map(|&i| &slots[i as usize].0.id).collect();
        let ring = match prev {
            Some(p) if p.ring.vnodes() == vnodes => {
                let old_ids: Vec<&InstanceId> = p.serving_ids().collect();
                if old_ids == new_ids {
                    Arc::clone(&p.ring)
                } else {
                    Arc::new(p.ring.update(&old_ids, &new_ids))
                }
            }
            _ => Arc::new(Ring::new(&new_ids, vnodes)),
        };

        let (instances, entries): (Vec<_>, Vec<_>) = slots.into_iter().unzip();
        Self {
            instances: instances.into(),
            entries: entries.into(),
            id_hashes,
            serving: serving.into(),
            draining: draining.into(),
            cumulative: cumulative.into(),
            ring,
        }
    }

    fn serving_ids(&self) -> impl Iterator<Item = &InstanceId> {
        self.serving.iter().map(|&i| &self.instances[i as usize].id)
    }

    pub(crate) fn pool(&self, pool: Pool) -> &[u32] {
        match pool {
            Pool::Serving => &self.serving,
            Pool::Draining => &self.draining,
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
        self.instances
            .iter()
            .cloned()
            .zip(self.entries.iter().cloned())
            .collect()
    }
}
