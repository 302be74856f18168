//! The etcd backend of waypost: instances are keys bound to a lease, watches are
//! revisioned prefix watches.
//!
//! Connect with a URL (`etcd://host:port[,host:port...]/prefix`, default prefix
//! `/services`) or an [`EtcdConfig`], register instances and watch services through
//! waypost's [`Registrar`] and [`Watcher`]:
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use futures::StreamExt;
//! use waypost_core::{Instance, Registrar, Watcher};
//! use waypost_etcd::EtcdDiscovery;
//!
//! let etcd = EtcdDiscovery::from_url("etcd://127.0.0.1:2379/services?lease_ttl=10s").await?;
//! let reg = etcd
//!     .register(Instance::parse("greeter", "g-1", "10.0.0.5", 8001)?)
//!     .await?;
//! let mut watch = etcd.watch(&"greeter".parse()?);
//! let first = watch.next().await; // a Snapshot listing g-1, then changes
//! reg.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! # How it maps onto etcd
//!
//! The registry primitives live here; core's backend layer
//! ([`waypost_core::backend`]) runs the session, the registrations and the watches over
//! them.
//!
//! - **Keys**: `{prefix}/{service}/{id}`, value the instance as JSON. With
//!   `layout = "grpc"` the layout of gRPC-Go's etcd naming resolver instead:
//!   `{prefix}/{service}/{host:port}` → `{"Op":0,"Addr":"host:port","Metadata":{...}}`.
//!   Another writer may claim an id under `{prefix}/{service}/{id}@{label}`; watchers
//!   list an id once (the instance's own key wins, else the smallest key).
//! - **Session**: one lease per [`EtcdDiscovery`] (asked TTL `lease_ttl`, 10 s by
//!   default; etcd may round it up, see [`EtcdDiscovery::granted_ttl`]), kept alive at a
//!   third of its TTL on one keep-alive stream (`session.rs`). When etcd reports the lease
//!   gone (keep-alive TTL 0, lease not found) a new one is granted; while keep-alives go
//!   unanswered registrations are `Suspended`.
//! - **Registrations** (`store.rs`): a key is created with a transaction that requires
//!   it not to exist (`create_revision == 0`), so two registrants cannot overwrite one
//!   id: the second gets [`Error::AlreadyExists`](waypost_core::Error::AlreadyExists). A
//!   process restarted within its old lease's TTL gets the same until that lease runs
//!   out. Every keep-alive round checks each key: deleted by someone else, overwritten,
//!   or detached from the lease (a foreign `etcdctl put`), it is written again
//!   (`Reregistering` → `Registered`); after a lost lease, every key is. A write whose
//!   outcome is unknown (a timeout) is removed once etcd answers again.
//! - **Watching** (`feed.rs`, the stream handling in `stream.rs`): a prefix `get` gives the snapshot and its revision; a
//!   prefix watch from the next revision gives each change (O(1) per change whatever the
//!   service's size). A stream etcd cancels is resumed from the last revision + 1 (no
//!   loss, no duplicate). If that revision was compacted, the stream's connection is lost,
//!   or etcd stays unreachable (an idle watch sends a progress request every
//!   `probe_interval` and expects an answer within `request_timeout`), the watch yields
//!   `Stale` and, once etcd answers, `Resynced` with a fresh snapshot. Values that are
//!   not instances are skipped with a warning.
//! - **Listing services**: [`Watcher::services`] is one keys-only prefix read of
//!   `{prefix}/`, the first segment of each key once, sorted; segments that are not
//!   service names are skipped with a warning, and with the root as `prefix` the keys
//!   under `config_prefix` and `coord_prefix` are left out.
//! - **Shutdown**: `deregister()` deletes the key (only if still bound to our lease);
//!   [`EtcdDiscovery::shutdown`], or dropping the last handle and every guard, revokes the
//!   lease.
//!
//! # Configuration keys
//!
//! [`EtcdDiscovery::kv`] (or [`Discovery::kv`](waypost_core::Discovery::kv) through the
//! facade) is waypost's [`ConfigStore`] on etcd: plain keys that `etcdctl` reads and
//! writes as they are.
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_core::kv::{ConfigKey, Expected};
//!
//! let etcd = waypost_etcd::EtcdDiscovery::from_url("etcd://127.0.0.1:2379").await?;
//! let kv = etcd.kv();
//! let key: ConfigKey = "my_app/db".parse()?;
//! let v = kv.put(&key, b"postgres://db:5432".to_vec()).await?; // etcd key /config/my_app/db
//! kv.put_if(&key, b"postgres://db2:5432".to_vec(), Expected::Version(v)).await?;
//! # Ok(()) }
//! ```
//!
//! - **Keys**: configuration key `a/b` is the etcd key `{config_prefix}/a/b`,
//!   `/config/a/b` by default (option `config_prefix`, URL `?config_prefix=/my/config`;
//!   empty puts keys at the root). It must start with `/`, be at most 1 KiB, and differ
//!   from the service `prefix` with neither inside the other, so instances and
//!   configuration never share keys. The value is stored as is (any bytes):
//!   `etcdctl get /config/a/b` prints what waypost wrote, and `etcdctl put` is seen by
//!   waypost watchers.
//! - **Versions**: a key's version is its `mod_revision`, etcd's cluster-wide revision
//!   of its last write, so it rises across a delete and a re-creation.
//! - **Writes**: `put` is a plain put (its response's header revision is the new
//!   version); `put_if` is a transaction comparing `mod_revision == v` (and
//!   `create_revision > 0`, since etcd compares a missing key as zeros), or
//!   `create_revision == 0` for [`Expected::Absent`](waypost_core::kv::Expected::Absent);
//!   `delete_if` the same compare around a delete. A failed compare reads the key in the
//!   same transaction and answers [`Error::Conflict`](waypost_core::Error::Conflict) with
//!   its version. A write whose reply is lost is reconciled by core (retried, or found
//!   already applied).
//! - **Values**: at most [`MAX_CONFIG_VALUE_LEN`] bytes (1.5 MiB − 8 KiB: etcd's default
//!   `--max-request-bytes` less room for the key and the transaction, measured); larger is
//!   [`Error::InvalidInput`](waypost_core::Error::InvalidInput), nothing is sent.
//! - **Listing and watching**: `list(p)` is a prefix get of `{config_prefix}/p/` (so it
//!   covers keys strictly below `p`, never `p` itself nor `pq`), at the response's header
//!   revision. A watch reads its key (or prefix) at a revision, then watches from the next
//!   revision with the same stream handling as service watches (`stream.rs`: resumed
//!   after a cancelled stream, progress probes, `Stale` on a lost connection). If the
//!   revision to resume from was compacted, the watch reports `Stale`, reads again and
//!   reports `Resynced` with what etcd holds: no change is lost, none is reported twice.
//! - **Foreign keys**: a key below the prefix that is not a
//!   [`ConfigKey`](waypost_core::kv::ConfigKey) (a space, an empty segment, a trailing
//!   `/`, a non-ASCII character, not UTF-8) is skipped with a warning in listings and
//!   watches; its value never reaches a consumer.
//!
//! # Locks and elections
//!
//! [`EtcdDiscovery::coordinator`] (or
//! [`Discovery::coordinator`](waypost_core::Discovery::coordinator) through the facade) is
//! waypost's [`Coordinator`] on etcd, bound to the same
//! lease as the registrations, and laid out as Go's `concurrency.Mutex` and
//! `concurrency.Election` lay it out, so `etcdctl lock` and `etcdctl elect` interoperate:
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! let etcd = waypost_etcd::EtcdDiscovery::from_url("etcd://127.0.0.1:2379").await?;
//! let coord = etcd.coordinator();
//! // The same lock as `etcdctl lock /coord/jobs/nightly`.
//! let guard = coord.lock(&"jobs/nightly".parse()?).await?;
//! let token = guard.token(); // the key's create revision: pass it to the resource
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! - **Keys** (`coord/`): lock or election `a/b` is the prefix `{coord_prefix}/a/b/`
//!   (`/coord` by default, option `coord_prefix`; the name to give `etcdctl lock` or
//!   `etcdctl elect` is `/coord/a/b`). A contender is the key `{prefix}{lease id as
//!   lowercase hex}`, bound to the lease, created by a transaction comparing
//!   `create_revision == 0` (else it reads the key: a key this client already has is
//!   taken over, as Go's `Mutex` does). The value is empty for a lock, the candidate's
//!   value for an election. One key per lease and name: a lock and an election of the
//!   same name are one queue (as for `etcdctl`), and one client cannot contend for both
//!   at once ([`Error::Busy`](waypost_core::Error::Busy)).
//! - **Order and waiting**: the holder (the leader) is the key with the smallest create
//!   revision. The creating transaction also reads the first-created key under the
//!   prefix, so an uncontended lock is one round trip (as Go's `Mutex.tryAcquire`). A
//!   waiter reads, in one transaction that also checks its own key, the
//!   keys created before its own, and watches the deletion of the last of them (its
//!   predecessor) only, as Go's `waitDeletes` does; it asks again after a change, after
//!   30 s, or after an error. Keys under the prefix that are no contenders (a nested
//!   name's `a/b/c/...`, foreign keys) are skipped, the foreign ones with a warning.
//! - **Tokens**: a holder's fencing token is its key's create revision, which rises
//!   strictly from one holder of a name to the next.
//! - **Holding**: the key is watched; deleted, re-created or detached from the lease, the
//!   guard reports it lost. Locally, a guard reports
//!   [`Lost::Unconfirmed`](waypost_core::coord::Lost::Unconfirmed) once 90% of the
//!   granted lease TTL passed since the last keep-alive etcd answered (a keep-alive counts
//!   only when its answer came back with a TTL above 0).
//! - **Release, resign, proclaim**: a delete, or a put under the lease, guarded by
//!   `create_revision == ours`: a key re-created since (a newer contender's) is never
//!   touched. (Go's `Mutex.Unlock` deletes unguarded.)
//! - **Semaphores** (`permits > 1`): one key per contender, `{prefix}{lease hex}-{id}`;
//!   the first `permits` by create revision hold. A waiter watches the whole prefix for
//!   deletions (not herd-free). No etcd tool knows this layout: do not mix it with
//!   `etcdctl lock` on one name.
//! - **Leaders**: [`leader`](waypost_core::coord::Coordinator::leader) reads the prefix
//!   (the smallest create revision leads, as `etcdctl elect -l` shows it);
//!   [`observe`](waypost_core::coord::Coordinator::observe) watches the prefix from the
//!   revision of that read, with the service watches' stream handling.
//!
//! # Dependencies
//!
//! `etcd-client` (tonic/gRPC) is the maintained Rust client of etcd's v3 API; it needs
//! `protoc` at build time. It answers `Unimplemented` for calls newer than the server
//! (none are used here; etcd 3.4 is enough).
#![forbid(unsafe_code)]

mod client;
mod codec;
mod config;
mod coord;
mod error;
mod feed;
mod kv;
mod session;
mod store;
mod stream;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use waypost_core::backend::watch::WatchHub;
use waypost_core::backend::{
    watch, BackoffOptions, Coord, CoordOptions, Keeper, Kv, KvOptions, Session,
};
use waypost_core::coord::Coordinator;
use waypost_core::kv::ConfigStore;
use waypost_core::{
    Config, Connector, Discovery, Instance, Registrar, Registration, Result, ServiceName, Snapshot,
    WatchEvent, Watcher,
};

use crate::client::Conn;
use crate::coord::EtcdCoord;
use crate::feed::WatchFeed;
use crate::kv::EtcdKv;
use crate::session::LeaseDriver;
use crate::store::KeyStore;

pub use codec::{CLAIM_SEPARATOR, MAX_VALUE_LEN};
pub use config::{EtcdConfig, Layout, DEFAULT_PORT};
pub use kv::MAX_CONFIG_VALUE_LEN;

/// The URL schemes (and `backend` names) of this backend.
pub const SCHEMES: &[&str] = &["etcd"];

/// A connection to etcd: implements [`Registrar`] and [`Watcher`].
///
/// Every registration of one `EtcdDiscovery` is bound to one lease, kept alive in the
/// background at a third of its TTL. When etcd loses the lease (process paused past its
/// TTL, partition, server restarted without it), a new lease is granted and every live
/// registration written again, with jittered backoff and no retry cap. Dropping the last
/// clone (and every registration guard) revokes the lease, which removes whatever is
/// left at once. Cheap to clone; clones share the lease.
#[derive(Clone)]
pub struct EtcdDiscovery {
    conn: Conn,
    keeper: Keeper<LeaseDriver, KeyStore>,
    watch_backoff: BackoffOptions,
    kv: Kv<EtcdKv>,
    /// Locks and elections, bound to the registrations' lease.
    coord: Coord<EtcdCoord, LeaseDriver>,
    /// One etcd watcher per service, whatever the number of local watchers.
    hub: WatchHub<ServiceName, Instance>,
    /// Bumped by the `drop_connections` test hook.
    drops: Arc<tokio::sync::watch::Sender<u64>>,
}

impl fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("endpoints", &self.conn.config.endpoints)
            .field("prefix", &self.conn.config.prefix)
            .field("lease", &self.lease_id())
            .field("registrations", &self.keeper.len())
            .finish()
    }
}

impl EtcdDiscovery {
    /// Connects and checks that etcd answers (a status call) within
    /// `config.connect_timeout`: a wrong endpoint is an error here, not later. Wrong
    /// credentials are [`Error::Unauthorized`](waypost_core::Error::Unauthorized).
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let conn = Conn::connect(config).await?;
        let drops = Arc::new(tokio::sync::watch::Sender::new(0));
        let session = Session::new(
            LeaseDriver::new(conn.clone(), drops.subscribe()),
            conn.config.backoff(),
        );
        let watch_backoff = conn.config.watch_backoff();
        let kv = Kv::new(
            EtcdKv::new(conn.clone(), drops.subscribe()),
            KvOptions {
                backoff: watch_backoff,
                ..KvOptions::default()
            },
        );
        let coord = Coord::new(
            EtcdCoord::new(conn.clone(), drops.subscribe()),
            session.clone(),
            CoordOptions {
                backoff: watch_backoff,
                ..CoordOptions::default()
            },
        );
        Ok(Self {
            keeper: Keeper::new("etcd", session, KeyStore::new(conn.clone())),
            coord,
            conn,
            watch_backoff,
            kv,
            hub: WatchHub::new(),
            drops,
        })
    }

    /// [`EtcdDiscovery::connect`] with a config parsed from `etcd://...`.
    pub async fn from_url(url: &str) -> Result<Self> {
        Self::connect(EtcdConfig::from_url(url)?).await
    }

    /// The configuration this client runs with.
    pub fn config(&self) -> &EtcdConfig {
        &self.conn.config
    }

    /// The id of the lease the registrations are bound to, if one is granted.
    pub fn lease_id(&self) -> Option<i64> {
        self.keeper.session().current_state().handle()
    }

    /// The TTL etcd granted the lease (it may round the asked TTL up), once granted.
    pub fn granted_ttl(&self) -> Option<Duration> {
        self.keeper.session().driver().granted_ttl()
    }

    /// The underlying `etcd-client` client, for anything waypost does not cover.
    pub fn etcd_client(&self) -> etcd_client::Client {
        self.conn.client.clone()
    }

    /// The configuration store: keys under `config_prefix` (see the crate docs,
    /// "Configuration keys"). Shares this client's connection; cheap to clone.
    pub fn kv(&self) -> Arc<dyn ConfigStore> {
        Arc::new(self.kv.clone())
    }

    /// Locks, semaphores and elections (see the crate docs, "Locks and elections"),
    /// bound to the same lease as the registrations. Cheap to clone.
    pub fn coordinator(&self) -> Arc<dyn Coordinator> {
        Arc::new(self.coord.clone())
    }

    /// Shuts down: revokes the lease (etcd deletes every key bound to it at once), marks
    /// every registration `Deregistered` and stops keeping anything alive. Later
    /// registrations fail with [`Error::Closed`](waypost_core::Error::Closed).
    pub async fn shutdown(&self) -> Result<()> {
        self.keeper.shutdown().await
    }

    fn feed(&self, service: &ServiceName) -> WatchFeed {
        WatchFeed::new(&self.conn, service, self.drops.subscribe())
    }
}

#[async_trait]
impl Registrar for EtcdDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        self.keeper.register(instance).await
    }
}

#[async_trait]
impl Watcher for EtcdDiscovery {
    /// One keys-only prefix read of `{prefix}/`; the first segment of each key, once.
    async fn services(&self) -> Result<Vec<ServiceName>> {
        self.keeper.session().check_open()?;
        let config = &self.conn.config;
        // Keys only: the values (instances, up to `MAX_VALUE_LEN` each) are not needed to
        // name their services. One read of the whole prefix rather than a range per
        // service: the names are what we are looking for, and skipping from one service
        // to the next (`{prefix}/{service}0`) would cost a round trip per service, each at
        // its own revision, where this is one round trip at one revision. Its size is the
        // number of keys (about 50 bytes each), well within the 4 MiB a gRPC response may
        // carry for registries of tens of thousands of instances.
        let range = format!("{}/", config.key_prefix());
        let resp = self
            .conn
            .call("listing services", || {
                let mut kv = self.conn.client.kv_client();
                let range = range.clone();
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only();
                async move { kv.get(range, Some(opts)).await }
            })
            .await?;
        // With the root as service prefix, configuration and coordination keys lie in the
        // range too: they name no service.
        let elsewhere: Vec<String> = [config.config_key_prefix(), config.coord_key_prefix()]
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| format!("{p}/"))
            .collect();
        let (mut names, mut skipped) = (BTreeSet::new(), BTreeSet::new());
        for kv in resp.kvs() {
            let key = kv.key();
            if elsewhere.iter().any(|p| key.starts_with(p.as_bytes())) {
                continue;
            }
            let Some(segment) = codec::service_segment(config.key_prefix(), key) else {
                tracing::debug!(
                    key = %String::from_utf8_lossy(key),
                    "etcd: a key directly under the service prefix names no service"
                );
                continue;
            };
            match std::str::from_utf8(segment).map(ServiceName::new) {
                Ok(Ok(name)) => {
                    names.insert(name);
                }
                _ => {
                    skipped.insert(segment.to_vec());
                }
            }
        }
        for segment in skipped {
            tracing::warn!(
                segment = ?String::from_utf8_lossy(&segment),
                prefix = %config.prefix,
                "etcd: skipping keys whose service segment is not a valid service name"
            );
        }
        Ok(names.into_iter().collect())
    }

    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.keeper.session().check_open()?;
        let feed = self.feed(service);
        let listing = feed.read().await?;
        Ok(watch::snapshot(&feed, service, listing))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let feed = self.feed(service);
        let (backoff, what) = (self.watch_backoff, service.to_string());
        watch::shared_instances(&self.hub, service, move || {
            watch::watch(feed, &backoff, what)
        })
    }
}

/// **Test hooks, not for production** (the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
impl waypost_core::backend::TestHooks for EtcdDiscovery {
    /// The process "crashes": keep-alives stop, nothing is revoked or deleted, guards
    /// dropped later do nothing, and every later call fails with `Error::Closed`. etcd
    /// removes the instances when the lease's TTL runs out, as for a killed process.
    fn crash(&self) {
        self.keeper.crash();
    }

    /// Drops every watch stream and the lease's keep-alive stream of this client (not
    /// the connection under them): each watch resumes from its last revision (or resyncs
    /// if that revision was compacted meanwhile), the keep-alive stream is reopened.
    fn drop_connections(&self) {
        self.drops
            .send_modify(|n| *n = (*n & stream::STALL) | ((*n & !stream::STALL) + 1));
    }
}

#[cfg(feature = "test-hooks")]
impl EtcdDiscovery {
    /// **Test hook.** Stops (`true`) or resumes (`false`) reading every watch stream of
    /// this client, as a connection that stalls would: etcd keeps the events, the client
    /// does not see them. With [`drop_connections`](waypost_core::backend::TestHooks::drop_connections)
    /// afterwards, a watch must resume from its last revision, which a compaction meanwhile
    /// may have removed.
    #[doc(hidden)]
    pub fn stall_watches(&self, stalled: bool) {
        self.drops.send_modify(|n| {
            if stalled {
                *n |= stream::STALL
            } else {
                *n &= !stream::STALL
            }
        });
    }
}

impl EtcdDiscovery {
    /// This client as a [`Discovery`] (with its test hooks under the `test-hooks`
    /// feature).
    pub fn into_discovery(self) -> Discovery {
        let d = Arc::new(self);
        let discovery = Discovery::new(d.clone(), d.clone())
            .with_config_store(Arc::new(d.kv.clone()))
            .with_coordinator(Arc::new(d.coord.clone()));
        let closer = d.clone();
        let discovery = discovery.with_shutdown(move || {
            let c = closer.clone();
            Box::pin(async move { c.shutdown().await })
        });
        #[cfg(feature = "test-hooks")]
        let discovery = discovery.with_hooks(d);
        discovery
    }
}

/// The etcd backend's [`Connector`], for the `waypost` facade.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdConnector;

impl Connector for EtcdConnector {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn schemes(&self) -> &'static [&'static str] {
        SCHEMES
    }

    fn connect<'a>(&'a self, config: &'a Config) -> BoxFuture<'a, Result<Discovery>> {
        Box::pin(async move {
            Ok(EtcdDiscovery::connect(EtcdConfig::from_config(config)?)
                .await?
                .into_discovery())
        })
    }
}
