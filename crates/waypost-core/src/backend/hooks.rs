//! One way to inject client-side faults in every backend's tests.

use std::fmt::Debug;

/// **Test hooks, not for production.** What every backend's client offers its tests, so
/// the shared suites can crash a client or cut its connections the same way everywhere.
/// A backend hands it out through [`Discovery::hooks`](crate::Discovery::hooks).
pub trait TestHooks: Debug + Send + Sync {
    /// The process "crashes": keep-alives stop, nothing is deregistered or closed, every
    /// later call fails with [`Error::Closed`](crate::Error::Closed). The registry drops
    /// the client's entries when its session runs out, as for a killed process.
    fn crash(&self);

    /// Drops the client's connections (watch streams, sessions' transports) as a network
    /// fault would; the client reconnects by itself.
    fn drop_connections(&self);
}
