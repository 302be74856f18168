//! The conformance suites every backend passes.
//!
//! Each suite is a plain `pub async fn` over a [`TestBackend`], which hands out fresh
//! clients (each its own session) of one registry. Suites panic with a message on
//! failure, like `assert!`. Every suite uses fresh random service names
//! ([`Namespace`]), so suites can share a registry and run concurrently.
//!
//! A backend runs them all with [`conformance_tests!`](crate::conformance_tests), which
//! generates one `#[tokio::test]` per suite.

mod basic;
mod coord;
mod faults;
mod heal;
mod hostile;
mod input;
mod kv;
mod kv_view;
mod partition;
mod scale;
mod util;

use std::time::Duration;

use async_trait::async_trait;
use waypost_core::{Discovery, Instance};

pub use basic::*;
pub use coord::*;
pub use faults::*;
pub use heal::*;
pub use hostile::*;
pub use input::*;
pub use kv::*;
pub use kv_view::{first_snapshot, wait_for_config, ConfigView};
pub use partition::*;
pub use scale::*;
pub use util::{
    assert_stale_before_resynced, next_event, wait_for_event, wait_for_set, Namespace, StatusLog,
};

/// How long a suite waits for things to happen on this backend.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The longest a change may take to reach a watcher, or a call to answer.
    pub timeout: Duration,
    /// The longest a crashed registrant's instance may stay listed (its session or TTL,
    /// plus a margin).
    pub liveness: Duration,
    /// How many registrations a scale suite runs at once (real servers want fewer).
    pub concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            liveness: Duration::from_secs(15),
            concurrency: 64,
        }
    }
}

/// A registry under test: hands out independent clients and, where it can, injects faults.
#[async_trait]
pub trait TestBackend: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;

    /// A new client with its own session (a separate "process").
    async fn connect(&self) -> Discovery;

    /// Timeouts for this backend.
    fn settings(&self) -> Settings {
        Settings::default()
    }

    /// Whether the registry refuses an id that another live session holds (`false` for
    /// registries whose registrations replace, like Consul's agent services).
    fn exclusive_ids(&self) -> bool {
        true
    }

    /// Fault injection, if the backend supports it; suites that need it fail loudly
    /// without it (a skip is never silent).
    fn faults(&self) -> Option<&dyn Faults> {
        None
    }

    /// Connects a client to `endpoint` (`host:port`) instead of the registry under test,
    /// with this connect timeout: for the suite that checks unreachable and hung
    /// endpoints fail in time.
    async fn connect_to(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> waypost_core::Result<Discovery> {
        panic!(
            "the {} test backend cannot connect to {endpoint} (timeout {connect_timeout:?}): this suite cannot run (never skipped silently)",
            self.name()
        )
    }
}

/// Fault injection on the registry under test.
#[async_trait]
pub trait Faults: Send + Sync {
    /// Every session / lease / TTL check the registry holds expires now: the registry drops
    /// every instance, and registrants must register them again by themselves.
    ///
    /// How each backend does it: memory expires its sessions; etcd revokes every lease;
    /// Consul restarts the `-dev` agent (which keeps no state); ZooKeeper stops the server
    /// until every client has seen its session expire. (The Curator/kazoo trick of closing
    /// a second connection on the same session is racy with clients that reconnect at
    /// once: the original client takes the session back.)
    async fn expire_sessions(&self);

    /// Clients can no longer reach the registry (a paused server, a partition).
    async fn make_unreachable(&self);

    /// Clients can reach the registry again.
    async fn make_reachable(&self);

    /// The client behind `discovery` dies without deregistering (its heartbeats stop).
    /// The default uses the client's [`TestHooks`](waypost_core::backend::TestHooks);
    /// without them it returns `false`, and the suite drops the client without
    /// deregistering instead.
    async fn crash(&self, discovery: &Discovery) -> bool {
        match &discovery.hooks {
            Some(hooks) => {
                hooks.crash();
                true
            }
            None => false,
        }
    }

    /// A foreign writer (the registry's own tool or raw client, not waypost) deletes the
    /// entry `instance` is registered at, behind its registrant's back.
    async fn foreign_delete(&self, instance: &Instance) {
        panic!("this backend offers no foreign writer: cannot delete {instance:?} behind its back (never skipped silently)")
    }

    /// A foreign writer adds an entry that claims `instance`'s id under another key
    /// (another node name, key, or Consul node) and decodes to exactly `instance`.
    /// Returns that entry's key, for [`Faults::foreign_remove`].
    async fn foreign_claim(&self, instance: &Instance) -> String {
        panic!("this backend offers no foreign writer: cannot claim {instance:?} (never skipped silently)")
    }

    /// Stops the registry's server and starts it again (same data, same address).
    async fn restart(&self) {
        panic!("this backend cannot restart its registry (never skipped silently)")
    }

    /// A foreign writer puts entries that are not instances into `service`'s path: bytes
    /// that are not JSON, JSON of another shape, a value too large to be an instance.
    async fn write_malformed(&self, service: &waypost_core::ServiceName) {
        panic!("this backend offers no foreign writer: cannot write malformed entries for {service} (never skipped silently)")
    }

    /// The registry's own tool (`zkCli.sh`, `consul kv`, `etcdctl`) writes the UTF-8
    /// `value` at configuration key `key`, where the backend under test stores it.
    async fn kv_foreign_put(&self, key: &waypost_core::kv::ConfigKey, value: &str) {
        panic!("this backend offers no foreign writer: cannot put {key} = {value:?} (never skipped silently)")
    }

    /// The registry's own tool reads configuration key `key` (`None`: absent).
    async fn kv_foreign_get(&self, key: &waypost_core::kv::ConfigKey) -> Option<String> {
        panic!("this backend offers no foreign reader: cannot get {key} (never skipped silently)")
    }

    /// The registry's own tool deletes configuration key `key`.
    async fn kv_foreign_delete(&self, key: &waypost_core::kv::ConfigKey) {
        panic!(
            "this backend offers no foreign writer: cannot delete {key} (never skipped silently)"
        )
    }

    /// A foreign writer puts entries below `prefix` whose keys are not configuration keys
    /// (a space or another character outside the rule, an empty segment), with some value.
    async fn kv_write_malformed(&self, prefix: &waypost_core::kv::ConfigKey) {
        panic!("this backend offers no foreign writer: cannot write malformed keys below {prefix} (never skipped silently)")
    }

    /// How many watches the registry serves now, counted on the registry's side (memory:
    /// subscriptions; ZooKeeper: `wchs`; etcd: its watcher gauge; Consul: connections to
    /// the agent, one per blocking query).
    async fn registry_watches(&self) -> usize {
        panic!("this backend cannot count the watches its registry serves (never skipped silently)")
    }

    /// The registry's client endpoint (`127.0.0.1:port`), for the suites that put a
    /// fault-injecting [`Proxy`](crate::proxy::Proxy) between a client and the registry
    /// (clients made with [`TestBackend::connect_to`] the proxy's address).
    fn registry_endpoint(&self) -> std::net::SocketAddr {
        panic!("this backend cannot name its registry's endpoint (never skipped silently)")
    }

    /// How many contenders the registry holds for lock `name` (waiting and holding),
    /// counted natively (ZooKeeper: `-lock-` children; etcd: keys under the lock's
    /// prefix; memory: its queue). For the suites that need to know a waiter queued.
    async fn coord_contenders(&self, name: &waypost_core::coord::Name) -> usize {
        panic!("this backend cannot count the contenders of lock {name} (never skipped silently)")
    }

    /// The foreign writer removes the entry [`Faults::foreign_claim`] added at `key`.
    async fn foreign_remove(&self, instance: &Instance, key: &str) {
        panic!("this backend offers no foreign writer: cannot remove {key} of {instance:?} (never skipped silently)")
    }
}

/// Generates one `#[tokio::test]` per configuration-key suite (`kv_*`), for a backend
/// that offers a [`ConfigStore`](waypost_core::kv::ConfigStore): the same forms as
/// [`conformance_tests!`](crate::conformance_tests) (`backend` or `named: backend`).
#[macro_export]
macro_rules! kv_conformance_tests {
    (named: $backend:path) => {
        $crate::kv_conformance_tests!(@each [named] $backend);
    };
    ($backend:path) => {
        $crate::kv_conformance_tests!(@each [plain] $backend);
    };
    (@each [$how:ident] $backend:path) => {
        $crate::conformance_tests!(@suites [$how] $backend;
            kv_get_put_cas_delete,
            kv_values_round_trip,
            kv_watch_key,
            kv_watch_prefix_thousand,
            kv_unreachable_then_resync,
            kv_server_restart,
            kv_foreign_writer,
            kv_live_config,
        );
    };
}

/// Generates one `#[tokio::test]` per coordination suite (`coord_*`), for a backend that
/// offers a [`Coordinator`](waypost_core::coord::Coordinator): the same forms as
/// [`conformance_tests!`](crate::conformance_tests) (`backend` or `named: backend`).
/// Add `; unqueued` for a registry whose locks do not queue their waiters (Consul, like
/// `consul lock`): the FIFO and semaphore suites are left out.
#[macro_export]
macro_rules! coord_conformance_tests {
    (named: $backend:path; unqueued) => {
        $crate::coord_conformance_tests!(@each [named] $backend);
    };
    ($backend:path; unqueued) => {
        $crate::coord_conformance_tests!(@each [plain] $backend);
    };
    (named: $backend:path) => {
        $crate::coord_conformance_tests!(@each [named] $backend);
        $crate::coord_conformance_tests!(@queued [named] $backend);
    };
    ($backend:path) => {
        $crate::coord_conformance_tests!(@each [plain] $backend);
        $crate::coord_conformance_tests!(@queued [plain] $backend);
    };
    (@queued [$how:ident] $backend:path) => {
        $crate::conformance_tests!(@suites [$how] $backend; coord_fifo, coord_semaphore);
    };
    (@each [$how:ident] $backend:path) => {
        $crate::conformance_tests!(@suites [$how] $backend;
            coord_mutual_exclusion,
            coord_try_lock_and_timeout,
            coord_holder_crash,
            coord_lost_before_next_holder,
            coord_release_after_expiry_spares_new_holder,
            coord_dropped_acquisition_cleans_up,
            coord_shutdown_releases_at_once,
            coord_election,
            coord_observe_resyncs,
        );
    };
}

/// Generates one `#[tokio::test]` per conformance suite.
///
/// `conformance_tests!(backend)`: `backend` is an async function returning
/// `Option<impl TestBackend>`; `None` means the registry is not installed, and the
/// harness has already said so loudly (only with `WAYPOST_SKIP_MISSING_SERVERS=1` outside
/// CI; otherwise it panicked).
///
/// `conformance_tests!(named: backend)`: the same, but `backend` takes the suite's name
/// (`&'static str`, e.g. `"thousand_instances"`), for backends that tune a suite (a longer
/// TTL for the scale suite, say).
///
/// Add `; network` (`conformance_tests!(backend; network)`) for a registry reached over
/// the network: the suites about endpoints that refuse or never answer, and about a client
/// partitioned from its registry (through a [`Proxy`](crate::proxy::Proxy)), run too.
#[macro_export]
macro_rules! conformance_tests {
    (named: $backend:path; network) => {
        $crate::conformance_tests!(@all [named] $backend);
        $crate::conformance_tests!(@suites [named] $backend; unreachable_and_hung_endpoints_fail_in_time, partition_shorter_than_bound, partition_longer_than_bound);
    };
    ($backend:path; network) => {
        $crate::conformance_tests!(@all [plain] $backend);
        $crate::conformance_tests!(@suites [plain] $backend; unreachable_and_hung_endpoints_fail_in_time, partition_shorter_than_bound, partition_longer_than_bound);
    };
    (named: $backend:path) => {
        $crate::conformance_tests!(@all [named] $backend);
    };
    ($backend:path) => {
        $crate::conformance_tests!(@all [plain] $backend);
    };
    (@all [$how:ident] $backend:path) => {
        $crate::conformance_tests!(@suites [$how] $backend;
            register_then_listed_and_watched,
            deregister_removes,
            dropped_guard_removes,
            initial_snapshot_empty_and_non_empty,
            changes_in_order_with_revisions,
            fields_round_trip,
            thousand_instances,
            concurrent_registrars,
            services_are_isolated,
            watch_of_unregistered_service,
            crashed_registrant_is_dropped,
            session_expiry_reregisters,
            unreachable_then_resync,
            invalid_input_writes_nothing,
            update_and_drain,
            outcome_unknown_create_is_removed,
            outcome_unknown_delete_completes,
            foreign_delete_is_healed,
            one_entry_per_id,
            server_restart_recovers,
            id_held_by_another_session,
            malformed_entries_are_skipped,
            dropped_watches_are_released,
            local_watchers_share_one_registry_watch,
            services_are_listed,
        );
    };
    (@call [plain] $backend:path, $suite:ident) => {
        $backend().await
    };
    (@call [named] $backend:path, $suite:ident) => {
        $backend(stringify!($suite)).await
    };
    (@suites [$how:ident] $backend:path; $($suite:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $suite() {
                if let Some(backend) = $crate::conformance_tests!(@call [$how] $backend, $suite) {
                    $crate::conformance::$suite(&backend).await;
                }
            }
        )*
    };
}
