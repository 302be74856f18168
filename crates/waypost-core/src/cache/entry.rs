//! Per-instance client-side state (ejection, requests in flight) and the picked handle.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{Instance, InstanceId};

/// Milliseconds since the cache was made, read from Tokio's clock (so paused time in
/// tests moves it).
#[derive(Debug)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

/// How many entries carry an ejection mark (running or expired but not yet cleared).
///
/// Every change of a mark from 0 to a time and back goes through [`Entry`]'s methods,
/// which keep this count, so "nothing is ejected" is one load. It may dip below 0 for a
/// moment when a clear races with the set that it clears; read it as "above 0 or not".
#[derive(Debug, Default)]
pub(crate) struct Marks(AtomicIsize);

impl Marks {
    /// Whether no entry carries a mark: no ejection to check, no clock to read.
    #[inline]
    pub(crate) fn none(&self) -> bool {
        self.0.load(Relaxed) <= 0
    }
}

/// The clock, read at most once per pick and only if some candidate carries an ejection
/// mark: the common path never reads the time.
pub(crate) struct LazyNow<'a> {
    clock: &'a Clock,
    pub(crate) marks: &'a Marks,
    now: Cell<Option<u64>>,
}

impl<'a> LazyNow<'a> {
    pub(crate) fn new(clock: &'a Clock, marks: &'a Marks) -> Self {
        Self {
            clock,
            marks,
            now: Cell::new(None),
        }
    }

    fn get(&self) -> u64 {
        match self.now.get() {
            Some(n) => n,
            None => {
                let n = self.clock.now_ms();
                self.now.set(Some(n));
                n
            }
        }
    }
}

/// The state of one instance that the cache keeps across updates of the set, by id.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    /// Ejected until this many [`Clock`] milliseconds; 0 = not ejected.
    ejected_until: AtomicU64,
    /// Requests in flight through a tracked [`Picked`].
    in_flight: AtomicUsize,
}

impl Entry {
    pub(crate) fn eject(&self, clock: &Clock, marks: &Marks, for_: Duration) {
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX);
        let until = clock.now_ms().saturating_add(ms).max(1);
        if self.ejected_until.fetch_max(until, Relaxed) == 0 {
            marks.0.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn readmit(&self, marks: &Marks) {
        if self.ejected_until.swap(0, Relaxed) != 0 {
            marks.0.fetch_sub(1, Relaxed);
        }
    }

    /// Clears the mark if it has run out (an entry leaving the cache's books).
    pub(crate) fn clear_expired(&self, now_ms: u64, marks: &Marks) {
        let until = self.ejected_until.load(Relaxed);
        if until != 0
            && now_ms >= until
            && self
                .ejected_until
                .compare_exchange(until, 0, Relaxed, Relaxed)
                .is_ok()
        {
            marks.0.fetch_sub(1, Relaxed);
        }
    }

    /// Whether the ejection mark is still running. An expired mark is cleared, so later
    /// picks skip the clock again.
    #[inline]
    pub(crate) fn is_ejected(&self, now: &LazyNow<'_>) -> bool {
        let until = self.ejected_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        if now.get() < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Relaxed, Relaxed)
            .is_ok()
        {
            now.marks.0.fetch_sub(1, Relaxed);
        }
        false
    }

    pub(crate) fn is_ejected_at(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    pub(crate) fn track(self: &Arc<Self>) -> Arc<Self> {
        self.in_flight.fetch_add(1, Relaxed);
        Arc::clone(self)
    }
}

/// One request in flight on an entry for as long as it lives: the tracking of
/// [`ServiceCache::with_pick`](super::ServiceCache::with_pick), which borrows the entry
/// instead of keeping it alive.
pub(crate) struct InFlight<'a>(&'a Entry);

impl<'a> InFlight<'a> {
    #[inline]
    pub(crate) fn new(entry: &'a Entry) -> Self {
        entry.in_flight.fetch_add(1, Relaxed);
        Self(entry)
    }
}

impl Drop for InFlight<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// An instance returned by [`ServiceCache::pick`](super::ServiceCache::pick) and
/// [`ServiceCache::pick_p2c`](super::ServiceCache::pick_p2c).
///
/// Dereferences to the [`Instance`]. When it comes from the power-of-two-choices strategy
/// it is *tracked*: it counts as one request in flight on its instance until it is
/// dropped, and that count is what the strategy balances on. Hold it for as long as the
/// request runs, and drop it when the response is in.
pub struct Picked {
    instance: Arc<Instance>,
    tracked: Option<Arc<Entry>>,
}

impl Picked {
    pub(crate) fn untracked(instance: Arc<Instance>) -> Self {
        Self {
            instance,
            tracked: None,
        }
    }

    pub(crate) fn tracked(instance: Arc<Instance>, entry: &Arc<Entry>) -> Self {
        Self {
            instance,
            tracked: Some(entry.track()),
        }
    }

    /// The instance.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// The instance's id.
    pub fn id(&self) -> &InstanceId {
        &self.instance.id
    }

    /// Whether this pick counts as a request in flight until dropped.
    pub fn is_tracked(&self) -> bool {
        self.tracked.is_some()
    }

    /// Ends the request (if tracked) and keeps the instance.
    pub fn into_instance(self) -> Arc<Instance> {
        Arc::clone(&self.instance)
    }
}

impl Deref for Picked {
    type Target = Instance;

    fn deref(&self) -> &Instance {
        &self.instance
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if let Some(e) = &self.tracked {
            e.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

impl fmt::Debug for Picked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picked")
            .field("id", &self.instance.id)
            .field("endpoint", &self.instance.endpoint)
            .field("tracked", &self.tracked.is_some())
            .finish()
    }
}
