//! How a [`ServiceCache`](super::ServiceCache) behaves.

use std::time::Duration;

use crate::backoff::Backoff;

/// The default for [`CacheOptions::ejection`]: 10 seconds.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(10);

/// The default for [`CacheOptions::ring_vnodes`].
pub const DEFAULT_RING_VNODES: u32 = 100;

/// The default for [`CacheOptions::zone_min_available`]: 1, so the caller's zone is used
/// while it has any instance to offer (Spring Cloud's zone preference).
pub const DEFAULT_ZONE_MIN_AVAILABLE: usize = 1;

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
    /// The caller's zone (compared with [`Instance::zone`](crate::Instance::zone)). When
    /// set, every strategy first picks among the instances of this zone, and falls back
    /// to all zones when this zone has fewer than
    /// [`zone_min_available`](Self::zone_min_available) available instances. Default:
    /// none, every zone alike.
    pub zone: Option<String>,
    /// How many available instances (weight above 0, not ejected) the caller's
    /// [`zone`](Self::zone) must have for picks to stay in it; below that, picks use all
    /// zones. Default [`DEFAULT_ZONE_MIN_AVAILABLE`]. A higher value spills over to the
    /// other zones before the local ones are overloaded (Envoy's panic threshold plays
    /// the same role).
    pub zone_min_available: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ejection: DEFAULT_EJECTION,
            backoff: Backoff::default(),
            ring_vnodes: DEFAULT_RING_VNODES,
            zone: None,
            zone_min_available: DEFAULT_ZONE_MIN_AVAILABLE,
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

    /// Sets [`zone`](Self::zone): prefer the instances of this zone.
    ///
    /// ```
    /// use waypost_core::cache::CacheOptions;
    ///
    /// // Stay in eu-1a while it has at least 3 available instances.
    /// let options = CacheOptions::default().with_zone("eu-1a").with_zone_min_available(3);
    /// assert_eq!(options.zone.as_deref(), Some("eu-1a"));
    /// ```
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets [`zone_min_available`](Self::zone_min_available) (at least 1).
    pub fn with_zone_min_available(mut self, min: usize) -> Self {
        self.zone_min_available = min.max(1);
        self
    }
}
