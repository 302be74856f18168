//! Jittered exponential backoff, shared by every backend's retry loops.

use std::time::Duration;

use rand::Rng;

/// Jittered exponential backoff with no cap on attempts: every delay is drawn uniformly
/// between half and all of `min(max, initial * 2^attempt)`, so that many clients that lost
/// the registry at once do not come back in lockstep.
///
/// Waypost never gives up on re-registering: callers loop on [`Backoff::next_delay`] for as
/// long as the registration is held, and [`Backoff::reset`] after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// Backoff from `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the ceiling, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos.max(1)))
    }

    /// After a success: the next delay starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_jitter_bounds_and_caps_at_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let bounds = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in bounds {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d} not in [{}, {ceiling}]",
                ceiling / 2
            );
        }
        // No cap on attempts: it keeps handing out delays.
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
