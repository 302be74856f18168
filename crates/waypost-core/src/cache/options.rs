//! How a [`ServiceCache`](super::ServiceCache) behaves.

use std::time::Duration;

use crate::backoff::Backoff;

/// The default for [`CacheOptions::ejection`]: 10 seconds.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(10);

/// The default for [`CacheOptions::ring_vnodes`].
pub const DEFAULT_RING_VNODES: u32 = 100;

/// Options of a [`ServiceCache`](super::ServiceCache): start from `CacheOptions::default()`
/// and change what you need with the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use waypost_core::cache::CacheOptions;
///
/// let options = CacheOptions::default().with_ejection(Duration::from_secs(30));
/// assert_eq!(options.ejection, Duration::from_secs(30));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheOptions {
    /// How long [`report_failure`](super::ServiceCache::report_failure) keeps an instance
    /// out of selection. Default 10 s: long enough to cover the registry's own detection
    /// of a crash (a session or TTL expiring) in most setups.
    pub ejection: Duration,
    /// The delays between watches when a watch ends or fails. Default: 100 ms doubling up
    /// to 10 s, jittered.
    pub backoff: Backoff,
    /// Points per instance on the sticky strategy's hash ring. More points spread keys
    /// more evenly (±10% at 100) at the cost of memory (12 bytes a point) and update time.
    /// Clients that should agree on the mapping of keys must use the same value.
    pub ring_vnodes: u32,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ejection: DEFAULT_EJECTION,
            backoff: Backoff::default(),
            ring_vnodes: DEFAULT_RING_VNODES,
        }
    }
}

impl CacheOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ejection`](Self::ejection).
    pub fn with_ejection(mut self, ejection: Duration) -> Self {
        self.ejection = ejection;
        self
    }

    /// Sets [`backoff`](Self::backoff).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets [`ring_vnodes`](Self::ring_vnodes) (at least 1).
    pub fn with_ring_vnodes(mut self, vnodes: u32) -> Self {
        self.ring_vnodes = vnodes.max(1);
        self
    }
}
