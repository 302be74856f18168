//! The state a cache's clones and its watch task share, and how events are applied.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::Error;
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, ServiceName};

use super::entry::{Clock, Entry};
use super::options::CacheOptions;
use super::set::{SetData, Slot};
use super::view::{CacheView, Staleness};

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) service: ServiceName,
    pub(crate) options: CacheOptions,
    pub(crate) clock: Clock,
    /// The published state: readers load it without locking.
    pub(crate) view: ArcSwap<CacheView>,
    /// Bumped after every publish; waiters subscribe to it.
    changed: watch::Sender<u64>,
    /// Round-robin tickets.
    pub(crate) ticket: AtomicUsize,
    /// Serializes writers (the watch task, `ServiceCache::apply`); readers never take it.
    writer: Mutex<Writer>,
}

/// What only writers touch.
#[derive(Debug, Default)]
struct Writer {
    /// Entries of instances that left while ejected, kept until the ejection runs out so
    /// that an instance that comes back in time is still ejected.
    retired: HashMap<InstanceId, Arc<Entry>>,
}

impl Writer {
    fn entry_for(&mut self, id: &InstanceId, now_ms: u64) -> Arc<Entry> {
        self.retired
            .remove(id)
            .filter(|e| e.is_ejected_at(now_ms))
            .unwrap_or_default()
    }

    fn retire(&mut self, id: InstanceId, entry: Arc<Entry>, now_ms: u64) {
        if entry.is_ejected_at(now_ms) {
            self.retired.insert(id, entry);
        }
    }

    /// The slots of `fresh` (any order, duplicates: last wins), keeping the entries of
    /// instances that stay and retiring those of instances that left.
    fn replace(&mut self, cur: &SetData, fresh: Vec<Instance>, now_ms: u64) -> Vec<Slot> {
        let mut fresh = fresh;
        fresh.sort_by(|a, b| a.id.cmp(&b.id));
        // Keep the last of equal ids: dedup keeps the first, so reverse around it.
        fresh.reverse();
        fresh.dedup_by(|a, b| a.id == b.id);
        fresh.reverse();
        for (i, e) in cur.instances.iter().zip(cur.entries.iter()) {
            if fresh.binary_search_by(|f| f.id.cmp(&i.id)).is_err() {
                self.retire(i.id.clone(), Arc::clone(e), now_ms);
            }
        }
        fresh
            .into_iter()
            .map(|inst| {
                let entry = match cur.position(inst.id.as_str()) {
                    Some(p) => Arc::clone(&cur.entries[p]),
                    None => self.entry_for(&inst.id, now_ms),
                };
                (Arc::new(inst), entry)
            })
            .collect()
    }
}

impl Shared {
    pub(crate) fn new(service: ServiceName, options: CacheOptions) -> Self {
        let set = Arc::new(SetData::empty(options.ring_vnodes.max(1)));
        let view = CacheView {
            service: service.clone(),
            set,
            revision: 0,
            ready: false,
            stale: None,
        };
        Self {
            service,
            options,
            clock: Clock::new(),
            view: ArcSwap::from_pointee(view),
            changed: watch::Sender::new(0),
            ticket: AtomicUsize::new(0),
            writer: Mutex::new(Writer::default()),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn vnodes(&self) -> u32 {
        self.options.ring_vnodes.max(1)
    }

    fn publish(&self, view: CacheView) {
        self.view.store(Arc::new(view));
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Applies one event and publishes the result. All the precomputation for picking
    /// happens here.
    pub(crate) fn apply(&self, event: WatchEvent) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.view.load_full();
        let now = self.clock.now_ms();
        w.retired.retain(|_, e| e.is_ejected_at(now));
        let vnodes = self.vnodes();
        let changed = |set: Arc<SetData>, revision| CacheView {
            service: self.service.clone(),
            set,
            revision,
            ready: cur.ready,
            stale: cur.stale.clone(),
        };
        let next = match event {
            WatchEvent::Snapshot(Snapshot {
                instances,
                revision,
                ..
            })
            | WatchEvent::Resynced(Snapshot {
                instances,
                revision,
                ..
            }) => {
                if cur.stale.is_some() {
                    debug!(service = %self.service, revision, "resynced: the cache is live again");
                }
                let slots = w.replace(&cur.set, instances, now);
                CacheView {
                    ready: true,
                    stale: None,
                    ..changed(build(slots, &cur.set, vnodes), revision)
                }
            }
            WatchEvent::Added { instance, revision }
            | WatchEvent::Updated { instance, revision } => {
                let mut slots = cur.set.slots();
                match slots.binary_search_by(|(i, _)| i.id.cmp(&instance.id)) {
                    Ok(p) => slots[p].0 = Arc::new(instance),
                    Err(p) => {
                        let entry = w.entry_for(&instance.id, now);
                        slots.insert(p, (Arc::new(instance), entry));
                    }
                }
                changed(build(slots, &cur.set, vnodes), revision)
            }
            WatchEvent::Removed { id, revision } => {
                let mut slots = cur.set.slots();
                match slots.binary_search_by(|(i, _)| i.id.cmp(&id)) {
                    Ok(p) => {
                        let (_, entry) = slots.remove(p);
                        w.retire(id, entry, now);
                        changed(build(slots, &cur.set, vnodes), revision)
                    }
                    Err(_) => changed(Arc::clone(&cur.set), revision),
                }
            }
            WatchEvent::Stale { reason } => {
                warn!(service = %self.service, error = %reason, "watch reports the registry lost: serving the last known set");
                stale_view(&cur, reason)
            }
        };
        debug!(
            service = %self.service,
            revision = next.revision,
            instances = next.len(),
            stale = next.is_stale(),
            "service cache updated"
        );
        self.publish(next);
    }

    /// Marks the cache stale (the watch ended or failed); the set stays.
    pub(crate) fn mark_stale(&self, reason: Arc<Error>) {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.view.load_full();
        warn!(service = %self.service, error = %reason, "service cache is stale: serving the last known set");
        self.publish(stale_view(&cur, reason));
    }
}

fn build(slots: Vec<Slot>, prev: &SetData, vnodes: u32) -> Arc<SetData> {
    Arc::new(SetData::build(slots, Some(prev), vnodes))
}

fn stale_view(cur: &CacheView, reason: Arc<Error>) -> CacheView {
    let since = cur.stale.as_ref().map_or_else(Instant::now, |s| s.since);
    CacheView {
        service: cur.service.clone(),
        set: Arc::clone(&cur.set),
        revision: cur.revision,
        ready: cur.ready,
        stale: Some(Staleness { since, reason }),
    }
}
