//! How many connections one client opens to its agent, and for what.
//!
//! A Consul agent serves at most `http_max_conns_per_client` connections per client
//! address (200 by default; beyond it, it closes new connections at once). A client's
//! connections are split in two budgets that never wait on each other:
//!
//! - **control**: registrations, heartbeats, deregistrations, session pings, KV and lock
//!   requests, `instances()`: at most half of what the watches leave (at most 32) in
//!   flight, so that other clients on the same address (the limit is per address: the
//!   `consul` CLI, other processes of the host) still get connections;
//! - **watches**: `watch_share_percent` of the limit (50 % by default), itself split into
//!   one connection for the liveness ping, two for the change signal of the shared service
//!   watches and one per KV prefix for the change signals of blocking KV reads (see
//!   `mux.rs`), a few for the watches' non-blocking reads (and as many idle connections
//!   kept), and the rest for blocking queries of their own: one per watched service while
//!   they last, or one per blocking KV read (configuration watches, leader feeds, lock
//!   waits) for that query.
//!
//! The semaphores bound requests in flight; the pools' idle connections and reqwest's
//! connect race add to the sockets the agent counts (see the crate docs, "Many watched
//! services").
//!
//! The limit is read from `/v1/agent/self` at connect (`DebugConfig.HTTPMaxConnsPerClient`,
//! which needs `agent:read`); when the agent does not say, or says 0 (no limit), 200.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Consul's default `http_max_conns_per_client`, assumed when the agent does not say.
pub(crate) const DEFAULT_AGENT_LIMIT: usize = 200;
/// At most this many control requests are in flight.
const MAX_CONTROL: usize = 32;
/// The watch share's connections that are not per-key blocking queries or reads: the
/// liveness ping, the two change-signal queries of shared service watches, and the
/// change signals of the configuration and the coordination KV prefixes.
const RESERVED: usize = 5;

/// How one client's connections to its agent are split (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionBudget {
    /// The agent's `http_max_conns_per_client` as read at connect (or the default, 200).
    pub agent_limit: usize,
    /// Connections watches may use: `watch_share_percent` of `agent_limit`.
    pub watch_connections: usize,
    /// Of those, blocking queries of their own (per watched service, or per blocking KV
    /// read): watches beyond this many share a change signal (see the crate docs, "Many
    /// watched services").
    pub dedicated_watches: usize,
    /// Of those, non-blocking reads on behalf of watches (listings, targeted re-reads),
    /// and as many idle connections kept for them.
    pub watch_reads: usize,
    /// Requests that keep registrations alive (and every other non-watch request).
    pub control_connections: usize,
}

impl ConnectionBudget {
    /// The split of `agent_limit` (0: no limit, treated as the default) with
    /// `share_percent` for watches.
    pub(crate) fn new(agent_limit: usize, share_percent: u8) -> Self {
        let limit = if agent_limit == 0 {
            DEFAULT_AGENT_LIMIT
        } else {
            agent_limit
        };
        let watch = (limit * usize::from(share_percent) / 100).max(RESERVED + 1);
        // Reads, and as many idle connections kept for them (`RESERVED + 2 * reads` at most).
        let reads = ((watch - RESERVED) / 4).clamp(1, 16);
        Self {
            agent_limit: limit,
            watch_connections: watch,
            dedicated_watches: watch.saturating_sub(RESERVED + 2 * reads),
            watch_reads: reads,
            control_connections: (limit.saturating_sub(watch) / 2).clamp(1, MAX_CONTROL),
        }
    }
}

/// The semaphores of one client's budget, resized once the agent's limit is known.
#[derive(Debug)]
pub(crate) struct Lanes {
    pub(crate) control: Arc<Semaphore>,
    pub(crate) dedicated: Arc<Semaphore>,
    pub(crate) reads: Arc<Semaphore>,
    budget: std::sync::Mutex<ConnectionBudget>,
    share: u8,
    /// Watches whose blocking query shares the change signal now (for tests and logs).
    pub(crate) shared_watches: AtomicUsize,
}

impl Lanes {
    pub(crate) fn new(share: u8) -> Self {
        let b = ConnectionBudget::new(DEFAULT_AGENT_LIMIT, share);
        Self {
            control: Arc::new(Semaphore::new(b.control_connections)),
            dedicated: Arc::new(Semaphore::new(b.dedicated_watches)),
            reads: Arc::new(Semaphore::new(b.watch_reads)),
            budget: std::sync::Mutex::new(b),
            share,
            shared_watches: AtomicUsize::new(0),
        }
    }

    pub(crate) fn budget(&self) -> ConnectionBudget {
        *self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resizes every lane for the agent's limit `agent_limit`.
    pub(crate) fn resize(&self, agent_limit: usize) {
        let new = ConnectionBudget::new(agent_limit, self.share);
        let mut cur = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let resize = |s: &Semaphore, from: usize, to: usize| {
            if to > from {
                s.add_permits(to - from);
            } else {
                // Sized at connect, before anything is in flight: every permit is free.
                let left = from - to - s.forget_permits(from - to);
                if left > 0 {
                    tracing::debug!(left, "consul: permits in use stay until they return");
                }
            }
        };
        resize(
            &self.control,
            cur.control_connections,
            new.control_connections,
        );
        resize(
            &self.dedicated,
            cur.dedicated_watches,
            new.dedicated_watches,
        );
        resize(&self.reads, cur.watch_reads, new.watch_reads);
        *cur = new;
        tracing::debug!(budget = ?new, "consul: connection budget");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_agent_limit() {
        let b = ConnectionBudget::new(200, 50);
        assert_eq!(b.watch_connections, 100);
        assert_eq!(b.watch_reads, 16);
        assert_eq!(b.dedicated_watches, 100 - 5 - 32);
        assert_eq!(b.control_connections, 32);
        let b = ConnectionBudget::new(50, 50);
        assert_eq!(b.watch_connections, 25);
        assert_eq!(b.watch_reads, 5);
        assert_eq!(b.dedicated_watches, 10);
        assert_eq!(b.control_connections, 12);
        assert!(b.watch_connections + b.control_connections < 50);
        // No limit: the default; a tiny limit still leaves room for every lane.
        assert_eq!(ConnectionBudget::new(0, 50), ConnectionBudget::new(200, 50));
        let b = ConnectionBudget::new(4, 10);
        // (The reserved connections are a floor: they run only while used.)
        assert_eq!((b.watch_connections, b.dedicated_watches), (6, 0));
        assert_eq!(b.control_connections, 1);
    }
}
