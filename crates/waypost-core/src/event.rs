//! What a watch yields: snapshots and changes, and the set they describe.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Error;
use crate::model::{Instance, InstanceId, Revision, ServiceName};

/// The authoritative set of a service's live instances at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The service.
    pub service: ServiceName,
    /// The live instances, sorted by id.
    pub instances: Vec<Instance>,
    /// The registry revision this set was read at.
    pub revision: Revision,
}

impl Snapshot {
    /// A snapshot; sorts the instances by id.
    pub fn new(service: ServiceName, mut instances: Vec<Instance>, revision: Revision) -> Self {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            service,
            instances,
            revision,
        }
    }

    /// The instance with this id, if listed.
    pub fn get(&self, id: &InstanceId) -> Option<&Instance> {
        self.instances
            .binary_search_by(|i| i.id.cmp(id))
            .ok()
            .map(|n| &self.instances[n])
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether no instance is listed.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

/// One item of a watch.
///
/// A watch yields a [`WatchEvent::Snapshot`] first, then changes. Applying them in order
/// with [`InstanceSet::apply`] gives exactly the set the registry holds.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WatchEvent {
    /// The first event of every watch: the authoritative set (possibly empty).
    Snapshot(Snapshot),
    /// An instance appeared.
    Added {
        /// The new instance.
        instance: Instance,
        /// The revision of the change.
        revision: Revision,
    },
    /// A listed instance changed (metadata, tags, weight, zone or endpoint).
    Updated {
        /// The instance as it is now.
        instance: Instance,
        /// The revision of the change.
        revision: Revision,
    },
    /// A listed instance is gone.
    Removed {
        /// The id of the instance that left.
        id: InstanceId,
        /// The revision of the change.
        revision: Revision,
    },
    /// The connection to the registry is lost: changes may be missed from here on. Keep the
    /// last known set; a [`WatchEvent::Resynced`] follows when the registry is back.
    Stale {
        /// Why.
        reason: Arc<Error>,
    },
    /// The registry is back: a fresh authoritative set that replaces the last one.
    Resynced(Snapshot),
}

impl WatchEvent {
    /// The revision this event carries, if any (`Stale` carries none).
    pub fn revision(&self) -> Option<Revision> {
        match self {
            WatchEvent::Snapshot(s) | WatchEvent::Resynced(s) => Some(s.revision),
            WatchEvent::Added { revision, .. }
            | WatchEvent::Updated { revision, .. }
            | WatchEvent::Removed { revision, .. } => Some(*revision),
            WatchEvent::Stale { .. } => None,
        }
    }
}

/// A service's instances keyed by id: what a consumer of a watch holds. Backends use it to
/// diff a fresh listing against what they last reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceSet {
    instances: BTreeMap<InstanceId, Instance>,
    revision: Revision,
}

impl InstanceSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set a snapshot describes.
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        Self {
            instances: snapshot
                .instances
                .iter()
                .map(|i| (i.id.clone(), i.clone()))
                .collect(),
            revision: snapshot.revision,
        }
    }

    /// Applies one event. `Stale` changes nothing: the last known set stays.
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Snapshot(s) | WatchEvent::Resynced(s) => *self = Self::from_snapshot(s),
            WatchEvent::Added { instance, revision }
            | WatchEvent::Updated { instance, revision } => {
                self.instances.insert(instance.id.clone(), instance.clone());
                self.revision = *revision;
            }
            WatchEvent::Removed { id, revision } => {
                self.instances.remove(id);
                self.revision = *revision;
            }
            WatchEvent::Stale { .. } => {}
        }
    }

    /// Replaces the set with `fresh` and returns the changes that lead from the old set to
    /// the new one, in id order, each tagged with `revision`. Unchanged instances yield
    /// nothing.
    pub fn diff_replace(&mut self, fresh: Vec<Instance>, revision: Revision) -> Vec<WatchEvent> {
        let mut next: BTreeMap<InstanceId, Instance> =
            fresh.into_iter().map(|i| (i.id.clone(), i)).collect();
        let mut events = Vec::new();
        for id in self.instances.keys() {
            if !next.contains_key(id) {
                events.push(WatchEvent::Removed {
                    id: id.clone(),
                    revision,
                });
            }
        }
        for (id, inst) in &next {
            match self.instances.get(id) {
                None => events.push(WatchEvent::Added {
                    instance: inst.clone(),
                    revision,
                }),
                Some(old) if old != inst => events.push(WatchEvent::Updated {
                    instance: inst.clone(),
                    revision,
                }),
                Some(_) => {}
            }
        }
        std::mem::swap(&mut self.instances, &mut next);
        self.revision = revision;
        events
    }

    /// The instance with this id.
    pub fn get(&self, id: &InstanceId) -> Option<&Instance> {
        self.instances.get(id)
    }

    /// Whether an instance with this id is listed.
    pub fn contains(&self, id: &InstanceId) -> bool {
        self.instances.contains_key(id)
    }

    /// The instances, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    /// The ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &InstanceId> {
        self.instances.keys()
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The revision of the last applied event.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The set as a snapshot of `service`.
    pub fn to_snapshot(&self, service: ServiceName) -> Snapshot {
        Snapshot {
            service,
            instances: self.instances.values().cloned().collect(),
            revision: self.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, port: u16) -> Instance {
        Instance::parse("s", id, "h", port).unwrap()
    }

    #[test]
    fn diff_yields_removed_added_updated_and_converges() {
        let mut set = InstanceSet::new();
        set.apply(&WatchEvent::Snapshot(Snapshot::new(
            ServiceName::new("s").unwrap(),
            vec![inst("a", 1), inst("b", 1), inst("c", 1)],
            5,
        )));
        let ev = set.diff_replace(vec![inst("b", 2), inst("c", 1), inst("d", 1)], 9);
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| match e {
                WatchEvent::Removed { id, .. } => format!("-{id}"),
                WatchEvent::Added { instance, .. } => format!("+{}", instance.id),
                WatchEvent::Updated { instance, .. } => format!("~{}", instance.id),
                _ => "?".into(),
            })
            .collect();
        assert_eq!(kinds, ["-a", "~b", "+d"]);
        assert!(ev.iter().all(|e| e.revision() == Some(9)));
        // Replaying the events on a copy of the old set yields the new set.
        let mut replay = InstanceSet::new();
        replay.apply(&WatchEvent::Snapshot(Snapshot::new(
            ServiceName::new("s").unwrap(),
            vec![inst("a", 1), inst("b", 1), inst("c", 1)],
            5,
        )));
        for e in &ev {
            replay.apply(e);
        }
        assert_eq!(replay, set);
        assert_eq!(
            set.get(&InstanceId::new("b").unwrap())
                .unwrap()
                .endpoint
                .port,
            2
        );
    }

    #[test]
    fn metadata_weight_and_tag_only_changes_are_updates() {
        let base = inst("a", 1);
        for changed in [
            base.clone().with_metadata("k", "v"),
            base.clone().with_weight(7),
            base.clone().with_tag("blue"),
            base.clone().with_zone("eu-1a"),
        ] {
            let mut set = InstanceSet::new();
            set.diff_replace(vec![base.clone()], 1);
            let ev = set.diff_replace(vec![changed.clone()], 2);
            assert!(
                matches!(ev.as_slice(), [WatchEvent::Updated { instance, revision: 2 }] if *instance == changed),
                "{ev:?}"
            );
            assert!(
                set.diff_replace(vec![changed.clone()], 3).is_empty(),
                "no change, no event"
            );
        }
    }

    #[test]
    fn accessors_report_the_set() {
        let svc = ServiceName::new("s").unwrap();
        let empty = Snapshot::new(svc.clone(), Vec::new(), 3);
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        let two = Snapshot::new(svc.clone(), vec![inst("b", 1), inst("a", 1)], 4);
        assert!(!two.is_empty());
        assert_eq!(two.len(), 2);

        let mut set = InstanceSet::new();
        assert!(set.is_empty());
        set.apply(&WatchEvent::Snapshot(two.clone()));
        assert_eq!(set.revision(), 4);
        assert_eq!((set.len(), set.is_empty()), (2, false));
        let ids: Vec<&str> = set.ids().map(|i| i.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        set.apply(&WatchEvent::Removed {
            id: InstanceId::new("a").unwrap(),
            revision: 9,
        });
        assert_eq!(set.revision(), 9);
        assert_eq!(set.to_snapshot(svc).instances, vec![inst("b", 1)]);
    }

    #[test]
    fn stale_keeps_the_set() {
        let mut set = InstanceSet::new();
        set.diff_replace(vec![inst("a", 1)], 1);
        set.apply(&WatchEvent::Stale {
            reason: Arc::new(Error::unavailable("down")),
        });
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn snapshot_get_uses_sorted_order() {
        let s = Snapshot::new(
            ServiceName::new("s").unwrap(),
            vec![inst("z", 1), inst("a", 2), inst("m", 3)],
            1,
        );
        assert_eq!(s.instances[0].id.as_str(), "a");
        assert_eq!(
            s.get(&InstanceId::new("m").unwrap()).unwrap().endpoint.port,
            3
        );
        assert!(s.get(&InstanceId::new("q").unwrap()).is_none());
    }
}
