//! Options every backend shares, with the same names on every registry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;

/// The bounds of the jittered exponential backoff of every retry loop of a client: the
/// session's keep-alive, re-registration, retried deletes and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffOptions {
    /// The first delay after a failure (100 ms by default).
    #[serde(with = "crate::config::duration")]
    pub backoff_initial: Duration,
    /// The longest delay between two attempts (10 s by default). There is no cap on the
    /// number of attempts.
    #[serde(with = "crate::config::duration")]
    pub backoff_max: Duration,
}

impl Default for BackoffOptions {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

impl BackoffOptions {
    /// Bounds from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            backoff_initial: initial,
            backoff_max: max.max(initial),
        }
    }

    /// A fresh [`Backoff`] with these bounds.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_initial, self.backoff_max)
    }
}
