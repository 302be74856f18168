//! The state a cache's clones and its watch task share, and how events are applied.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::Error;
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, ServiceName};
use crate::select::key_hash;

use super::entry::{Clock, Entry, Marks};
use super::options::CacheOptions;
use super::set::{SetData, Slot};
use super::view::{CacheView, Staleness};

/// Caches per thread whose current view the thread keeps (see [`Shared::with_view`]).
const VIEW_SLOTS: usize = 4;

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// The view of one cache as a thread last loaded it.
struct CachedView {
    cache: u64,
    generation: u64,
    view: Arc<CacheView>,
}

thread_local! {
    /// Direct-mapped by cache id: a pick that finds its cache's current view here reads
    /// no shared pointer and touches no reference count.
    static VIEWS: RefCell<[Option<CachedView>; VIEW_SLOTS]> =
        const { RefCell::new([const { None }; VIEW_SLOTS]) };
}

/// A value alone on its cache line (128 bytes: adjacent-line prefetchers pair lines).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) service: ServiceName,
    pub(crate) options: CacheOptions,
    pub(crate) clock: Clock,
    /// Entries with an ejection mark: while 0, picks skip ejection checks and the clock.
    pub(crate) marks: Marks,
    /// Unique among the caches of this process: the key of the per-thread view slots.
    id: u64,
    /// Bumped after every publish, after the store: a thread whose cached view has the
    /// current generation holds the current view.
    generation: AtomicU64,
    /// The published state: readers load it without locking.
    pub(crate) view: ArcSwap<CacheView>,
    /// Bumped after every publish; waiters subscribe to it.
    changed: watch::Sender<u64>,
    /// Round-robin tickets, on a cache line of their own: every round-robin pick writes
    /// them, and the fields that every pick reads must not share that line.
    pub(crate) ticket: Padded<AtomicUsize>,
    /// `waypost_cache_picks_total` of this service (a no-op without a recorder).
    pub(crate) picks: metrics::Counter,
    /// `waypost_cache_ejections_total` of this service.
    pub(crate) ejections: metrics::Counter,
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
    /// Drops the retired entries whose ejection has run out.
    fn expire(&mut self, now_ms: u64, marks: &Marks) {
        self.retired.retain(|_, e| {
            let keep = e.is_ejected_at(now_ms);
            if !keep {
                e.clear_expired(now_ms, marks);
            }
            keep
        });
    }

    fn entry_for(&mut self, id: &InstanceId, now_ms: u64, marks: &Marks) -> Arc<Entry> {
        match self.retired.remove(id) {
            Some(e) if e.is_ejected_at(now_ms) => e,
            Some(e) => {
                e.clear_expired(now_ms, marks);
                Arc::default()
            }
            None => Arc::default(),
        }
    }

    fn retire(&mut self, id: InstanceId, entry: Arc<Entry>, now_ms: u64, marks: &Marks) {
        if entry.is_ejected_at(now_ms) {
            self.retired.insert(id, entry);
        } else {
            entry.clear_expired(now_ms, marks);
        }
    }

    /// The slots of `fresh` (any order, duplicates: last wins), keeping the entries of
    /// instances that stay and retiring those of instances that left.
    fn replace(
        &mut self,
        cur: &SetData,
        fresh: Vec<Instance>,
        now_ms: u64,
        marks: &Marks,
    ) -> Vec<Slot> {
        let mut fresh = fresh;
        fresh.sort_by(|a, b| a.id.cmp(&b.id));
        // Keep the last of equal ids: dedup keeps the first, so reverse around it.
        fresh.reverse();
        fresh.dedup_by(|a, b| a.id == b.id);
        fresh.reverse();
        for (i, e) in cur.instances.iter().zip(cur.entries.iter()) {
            if fresh.binary_search_by(|f| f.id.cmp(&i.id)).is_err() {
                self.retire(i.id.clone(), Arc::clone(e), now_ms, marks);
            }
        }
        fresh
            .into_iter()
            .map(|inst| {
                let (entry, hash) = match cur.position(inst.id.as_str()) {
                    Some(p) => (Arc::clone(&cur.entries[p]), cur.id_hashes[p]),
                    None => (
                        self.entry_for(&inst.id, now_ms, marks),
                        key_hash(inst.id.as_str().as_bytes()),
                    ),
                };
                Slot {
                    instance: Arc::new(inst),
                    entry,
                    hash,
                }
            })
            .collect()
    }
}

impl Shared {
    pub(crate) fn new(service: ServiceName, options: CacheOptions) -> Self {
        let set = Arc::new(SetData::empty(
            options.ring_vnodes.max(1),
            options.zone.as_deref(),
        ));
        let view = CacheView {
            service: service.clone(),
            set,
            revision: 0,
            ready: false,
            stale: None,
        };
        let picks =
            metrics::counter!("waypost_cache_picks_total", "service" => service.to_string());
        let ejections =
            metrics::counter!("waypost_cache_ejections_total", "service" => service.to_string());
        Self {
            service,
            options,
            clock: Clock::new(),
            marks: Marks::default(),
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            view: ArcSwap::from_pointee(view),
            changed: watch::Sender::new(0),
            ticket: Padded(AtomicUsize::new(0)),
            picks,
            ejections,
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
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs `f` on the current view, as this thread last loaded it if nothing was
    /// published since: then it costs a thread-local lookup and one load of the
    /// generation, no `ArcSwap` load and no reference count. Each thread keeps the view
    /// of up to [`VIEW_SLOTS`] caches (the last it picked from), which keeps that view
    /// alive until the thread picks from that cache or one sharing its slot again, or
    /// exits. Re-entrant calls (a strategy picking from a cache) load the view directly.
    #[inline]
    pub(crate) fn with_view<R>(&self, f: impl FnOnce(&CacheView) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        let mut f = Some(f);
        let done = VIEWS.try_with(|cell| {
            let mut slots = cell.try_borrow_mut().ok()?;
            let slot = &mut slots[(self.id % VIEW_SLOTS as u64) as usize];
            let fresh = matches!(slot, Some(c) if c.cache == self.id && c.generation == generation);
            if !fresh {
                *slot = Some(CachedView {
                    cache: self.id,
                    generation,
                    view: self.view.load_full(),
                });
            }
            let view = &slot.as_ref()?.view;
            f.take().map(|f| f(view))
        });
        match (done, f) {
            (Ok(Some(r)), _) => r,
            (_, Some(f)) => f(&self.view.load()),
            (_, None) => unreachable!("`f` ran but returned nothing"),
        }
    }

    /// Applies one event and publishes the result. All the precomputation for picking
    /// happens here.
    pub(crate) fn apply(&self, event: WatchEvent) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.view.load_full();
        let now = self.clock.now_ms();
        w.expire(now, &self.marks);
        let vnodes = self.vnodes();
        let zone = self.options.zone.as_deref();
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
                let slots = w.replace(&cur.set, instances, now, &self.marks);
                CacheView {
                    ready: true,
                    stale: None,
                    ..changed(build(slots, &cur.set, vnodes, zone), revision)
                }
            }
            WatchEvent::Added { instance, revision }
            | WatchEvent::Updated { instance, revision } => {
                let mut slots = cur.set.slots();
                match slots.binary_search_by(|s| s.instance.id.cmp(&instance.id)) {
                    Ok(p) => slots[p].instance = Arc::new(instance),
                    Err(p) => {
                        let entry = w.entry_for(&instance.id, now, &self.marks);
                        let hash = key_hash(instance.id.as_str().as_bytes());
                        let instance = Arc::new(instance);
                        slots.insert(
                            p,
                            Slot {
                                instance,
                                entry,
                                hash,
                            },
                        );
                    }
                }
                changed(build(slots, &cur.set, vnodes, zone), revision)
            }
            WatchEvent::Removed { id, revision } => {
                let mut slots = cur.set.slots();
                match slots.binary_search_by(|s| s.instance.id.cmp(&id)) {
                    Ok(p) => {
                        let slot = slots.remove(p);
                        w.retire(id, slot.entry, now, &self.marks);
                        changed(build(slots, &cur.set, vnodes, zone), revision)
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

fn build(slots: Vec<Slot>, prev: &SetData, vnodes: u32, zone: Option<&str>) -> Arc<SetData> {
    Arc::new(SetData::build(slots, Some(prev), vnodes, zone))
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
