//! [`CacheView`]: one published state of a cache.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::event::Snapshot;
use crate::model::{Instance, Revision, ServiceName};

use super::set::SetData;

/// Why and since when a cache is stale.
#[derive(Clone, Debug)]
pub(crate) struct Staleness {
    pub(crate) since: Instant,
    pub(crate) reason: Arc<Error>,
}

/// The state of a [`ServiceCache`](super::ServiceCache) at one moment: the instances and
/// whether they are authoritative. Immutable; the cache publishes a new view on every
/// update, and a view you hold stays as it was.
///
/// Get one with [`ServiceCache::view`](super::ServiceCache::view); predicates of
/// [`ServiceCache::wait_for`](super::ServiceCache::wait_for) receive one.
pub struct CacheView {
    pub(crate) service: ServiceName,
    pub(crate) set: Arc<SetData>,
    pub(crate) revision: Revision,
    pub(crate) ready: bool,
    pub(crate) stale: Option<Staleness>,
}

impl CacheView {
    /// The service.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The instances, sorted by id, draining and ejected ones included.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.set.instances
    }

    /// The instances as a shared list (a reference count, no copy).
    pub fn instances_arc(&self) -> Arc<[Arc<Instance>]> {
        Arc::clone(&self.set.instances)
    }

    /// Iterates over the instances, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.set.instances.iter()
    }

    /// The instance with this id (an [`InstanceId`](crate::InstanceId) or a `&str`).
    pub fn get(&self, id: impl AsRef<str>) -> Option<&Arc<Instance>> {
        self.set
            .position(id.as_ref())
            .map(|i| &self.set.instances[i])
    }

    /// Whether an instance with this id is listed.
    pub fn contains(&self, id: impl AsRef<str>) -> bool {
        self.set.position(id.as_ref()).is_some()
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.set.instances.len()
    }

    /// Whether no instance is listed.
    pub fn is_empty(&self) -> bool {
        self.set.instances.is_empty()
    }

    /// The registry revision of the last applied event (0 before the first snapshot).
    /// Revisions are only comparable within one watch; after a re-watch they may jump.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Whether a snapshot has been applied: before that the set is empty because nothing
    /// is known yet, not because the service has no instances.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether the watch lost the registry: the set is the last one known and changes
    /// may be missing. Cleared by the next snapshot.
    pub fn is_stale(&self) -> bool {
        self.stale.is_some()
    }

    /// When the cache became stale, if it is.
    pub fn stale_since(&self) -> Option<Instant> {
        self.stale.as_ref().map(|s| s.since)
    }

    /// Why the cache is stale, if it is: the watch's `Stale` reason or the error that
    /// ended the watch.
    pub fn stale_reason(&self) -> Option<&Arc<Error>> {
        self.stale.as_ref().map(|s| &s.reason)
    }

    /// How long the set may have been out of date: zero while the watch is live, the
    /// time since the registry was lost while stale.
    pub fn age(&self) -> Duration {
        self.stale
            .as_ref()
            .map_or(Duration::ZERO, |s| s.since.elapsed())
    }

    /// A copy of the set as a [`Snapshot`].
    pub fn to_snapshot(&self) -> Snapshot {
        Snapshot {
            service: self.service.clone(),
            instances: self.iter().map(|i| Instance::clone(i)).collect(),
            revision: self.revision,
        }
    }
}

impl fmt::Debug for CacheView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Ids<'a>(&'a CacheView);
        impl fmt::Debug for Ids<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|i| &i.id))
                    .finish()
            }
        }
        f.debug_struct("CacheView")
            .field("service", &self.service)
            .field("revision", &self.revision)
            .field("ready", &self.ready)
            .field("stale", &self.stale)
            .field("instances", &Ids(self))
            .finish()
    }
}
