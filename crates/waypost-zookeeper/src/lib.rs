//! The ZooKeeper backend of waypost: instances as ephemeral nodes in Apache Curator
//! x-discovery's layout and JSON, so Java services (Curator, Spring Cloud Zookeeper) and
//! Rust services find each other; watches that cost one read per change; configuration
//! keys as persistent nodes below `/config`; locks and elections as Curator's recipes
//! write them, below `/coord`.
//!
//! A binary picks the registry by URL, e.g. through the `waypost` facade with the
//! `zookeeper` feature, or directly:
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_core::{Instance, Registrar, Watcher};
//! use waypost_zookeeper::ZkDiscovery;
//!
//! let zk = ZkDiscovery::from_url("zk://127.0.0.1:2181/services?session_timeout=10s").await?;
//! let registration = zk
//!     .register(Instance::parse("greeter", "g-1", "10.0.0.5", 8001)?.with_zone("eu-1a"))
//!     .await?;
//! let listed = zk.instances(&"greeter".parse()?).await?;
//! assert_eq!(listed.len(), 1);
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! # How it maps onto ZooKeeper
//!
//! - **Layout**: one node per instance at `{root}/{service}/{id}` (root `/services` by
//!   default), `EPHEMERAL`, holding Curator's JSON (see [`codec`]); service nodes are
//!   container nodes, created as needed. Optionally ([`NodeLayout::ProtectedSequential`])
//!   protected ephemeral sequential nodes `_c_{guid}-{id}NNNNNNNNNN`.
//! - **Liveness**: registrations are bound to the client's session. A crashed process's
//!   instances vanish when its session times out ([`ZkConfig::session_timeout`]); a
//!   clean deregistration deletes the node at once. A create whose reply was lost is
//!   recognised by its `ephemeralOwner` and counts as registered.
//! - **Re-registration** (core's keeper over this crate's store): on disconnect
//!   registrations turn `Suspended`; after a session expiry a new session is opened and
//!   every live registration is created again (jittered backoff, no cap), `Reregistering`
//!   then `Registered`. A node deleted or overwritten by someone else is written again
//!   within a keep-alive interval. A write that timed out ([`ZkConfig::request_timeout`],
//!   e.g. against a paused server) fails, and if it lands later it is removed again.
//! - **Watching** (core's watch machine over this crate's feed): one persistent recursive
//!   watch (`addWatch`, ZooKeeper ≥ 3.6) per watched service; each change reads only the
//!   node that changed, so the cost of a change does not grow with the size of the
//!   service. Disconnect → `Stale`; reconnect → the watch is added again and the service
//!   re-listed → `Resynced`. After a session expiry likewise on the new session. When a
//!   foreign node claims the id of one of ours, ours (the node at our own name) is listed.
//!   On servers older than 3.6 (`addWatch` answers `Unimplemented`) the watch falls back
//!   to a child watch on the service node plus a data watch per instance node: a change
//!   of the children costs one listing of the names and a read of each new node.
//! - **Listing services** ([`Watcher::services`]): the root's children, one `getChildren`.
//!   Names that are not [`ServiceName`]s are skipped and logged, and so is the node that
//!   holds `config_prefix` or `coord_prefix` if one is configured below the root. A
//!   service node outlives its last instance until the server reaps the container
//!   node, and is listed (with no instances) meanwhile.
//! - **ACLs**: with digest credentials ([`ZkConfig::username`]/`password`, or
//!   `zk://user:password@host/root`), instance nodes are readable by everyone and
//!   writable/deletable only by those credentials; service nodes let everyone read and
//!   create children but only those credentials delete them (ZooKeeper checks `DELETE` on
//!   the parent), so all registrants of one service should share credentials.
//!
//! # Configuration keys
//!
//! [`ZkDiscovery::kv`] (or [`Discovery::kv`] through the facade) is a
//! [`ConfigStore`](waypost_core::kv::ConfigStore): core's `Kv` over this crate's
//! [`ZkKv`], bound to the same session as the registrations (a new one after an expiry).
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_core::kv::{ConfigStore, Expected};
//! use waypost_zookeeper::ZkDiscovery;
//!
//! let zk = ZkDiscovery::from_url("zk://127.0.0.1:2181/services?config_prefix=/config").await?;
//! let key = "my_app/config".parse()?;
//! let v = zk.kv().put(&key, br#"{"pool": 8}"#.to_vec()).await?; // node /config/my_app/config
//! zk.kv().put_if(&key, br#"{"pool": 16}"#.to_vec(), Expected::Version(v)).await?;
//! # Ok(()) }
//! ```
//!
//! - **Layout**: key `a/b` is the persistent node `{config_prefix}/a/b` (option
//!   `config_prefix`, default `/config`), holding the value's bytes as they are, so
//!   `zkCli.sh get /config/a/b` prints what waypost wrote and `zkCli.sh set` is seen by
//!   waypost's watchers. Missing parents are created in the same transaction (`multi`) as
//!   the key, so no parent is ever seen without its child; only a value too large to
//!   share one request with many new parents (a very deep key) has its parents created
//!   first. With digest credentials, keys are readable by everyone and writable only by
//!   those credentials, like instance nodes.
//! - **Which nodes are keys** (the directory rule): a node is a key unless it is a
//!   *directory*, a node with **empty data that has, or once had, children**
//!   (`numChildren > 0` or `cversion > 0`). So the parents of `a/b/c` (`a`, `a/b`, whether
//!   waypost or `zkCli.sh create` made them) are not keys, nor do they turn into keys once
//!   their keys are deleted; a node with data is a key even with keys below it (`a` = `1`
//!   beside `a/b` = `2`); an empty value is a key as long as nothing was ever below it.
//!   Consequences: deleting a key that has keys below it empties its node (ZooKeeper
//!   cannot delete a node with children), which makes it a directory; deleting a key
//!   also removes the directories above it that were left without children (each at
//!   the version read, best effort); an empty value cannot be written where keys lie
//!   below (`InvalidInput`: it would read as a directory), and written on a directory
//!   without children it replaces the node (delete + create in one `multi`); an empty
//!   value that gets a key below it becomes a directory, and watchers see it removed.
//!   Nodes whose name is not a [`ConfigKey`](waypost_core::kv::ConfigKey) (a space, a
//!   colon, a segment over 128 bytes) are skipped and logged.
//! - **Versions** are the node's `mzxid`, a registry-wide zxid, so they rise across a
//!   delete and a re-creation. A conditional write reads the node, compares its `mzxid`,
//!   and writes with the node's own `version` as precondition; if the node changed
//!   between the two, it reads again.
//! - **Size**: values up to [`MAX_VALUE_LEN`] (1,000,000 bytes). The server refuses a
//!   request larger than `jute.maxbuffer` (1 MiB − 1 byte by default) by closing the
//!   connection; measured on 3.8, a `setData` fits up to 1,048,553 bytes at a 2-byte
//!   path and 1,048,035 at a 520-byte path. 1,000,000 leaves 48 KiB for the longest key,
//!   digest ACLs and new parents.
//! - **Watching**: one persistent watch (`addWatch`, ZooKeeper ≥ 3.6; older servers end
//!   the watch with `Unsupported`) added before the listing: `PERSISTENT` on a key's node
//!   (its data and children), `PERSISTENT_RECURSIVE` on a prefix's node; either may be
//!   added before the node exists. A listing walks the subtree level by level (each
//!   level's reads pipelined; 1,000 keys in a few round trips); each event costs one read
//!   of the node that changed. Revisions are `mzxid`s, a deletion's the last plus one,
//!   always rising. Disconnect → `Stale`; reconnect (or a new session) → listed again →
//!   `Resynced`.
//!
//! # Locks and elections
//!
//! [`ZkDiscovery::coordinator`] (or [`Discovery::coordinator`] through the facade) is a
//! [`Coordinator`](waypost_core::coord::Coordinator): core's `Coord` over Curator 5.x's
//! recipe nodes, bound to the same session as the registrations, so that a Java service
//! holding an `InterProcessMutex` or a `LeaderLatch` on the same path and a waypost
//! client exclude each other.
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_zookeeper::ZkDiscovery;
//!
//! let zk = ZkDiscovery::from_url("zk://127.0.0.1:2181/services?coord_prefix=/coord").await?;
//! let name = "jobs/nightly".parse()?; // Curator: new InterProcessMutex(client, "/coord/jobs/nightly")
//! let guard = zk.coordinator().lock(&name).await?;
//! println!("fencing token {}", guard.token()); // the node's czxid
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! - **Layout**: name `jobs/x` is the node `{coord_prefix}/jobs/x` (option
//!   `coord_prefix`, default `/coord`), created with its parents as **container** nodes
//!   (the server removes them once their last contender is gone), as Curator's
//!   `creatingParentContainersIfNeeded` does. Contenders are **ephemeral sequential**
//!   nodes with Curator's protected prefix: a lock `_c_{uuid}-lock-{%010d}` (exactly
//!   `InterProcessMutex`'s), an election candidate `_c_{uuid}-latch-{%010d}` holding the
//!   candidate's value (exactly `LeaderLatch`'s, whose value is the participant id). A
//!   counting semaphore's contender is `_c_{uuid}-semaphore-{%010d}`: waypost's own
//!   marker, **not** Curator's `InterProcessSemaphoreV2` layout (Curator's recipes do not
//!   see these nodes). Locks and semaphores of one name share one queue (a contender
//!   asking for `permits` holds while fewer than `permits` are ahead of it); elections
//!   queue apart.
//! - **Order and waiting**: the queue is ordered by the sequence suffix; the first
//!   contender holds (the first `permits` of a semaphore). A waiting lock or candidate
//!   sets a data watch on its predecessor only (herd-free, as Curator); a semaphore
//!   waiter watches the name's children (any holder ahead may leave). Every wait looks
//!   at the queue again after 30 s regardless. Children whose names are no contender
//!   (no marker and sequence) are skipped and logged.
//! - **Fencing tokens** are the contender node's `czxid`, a registry-wide zxid: it rises
//!   from one holder to the next even after the container node was reaped and its
//!   sequence numbers restarted.
//! - **Lost**: the node deleted (by an operator, a foreign client) reports
//!   [`Lost::Deleted`](waypost_core::coord::Lost::Deleted); the session expiring,
//!   `SessionExpired`. The session's bound is the **negotiated** session timeout, and the
//!   keep-alive is a real round trip (`exists /`, bounded by the request timeout): a
//!   guard reports `Unconfirmed` 90% of the session timeout after the last keep-alive
//!   the server answered, before the server can expire the session and hand the lock on.
//! - **Retries**: an enqueue whose reply was lost is found again by its `_c_{uuid}`
//!   prefix (Curator's protected mode); an abandoned one is deleted the same way.
//!   Release deletes exactly our node (a newer holder's node is never touched); a node
//!   already gone is success. `proclaim` sets the candidate node's data.
//! - **Observing** an election: one-shot watches on the election node's children and on
//!   the leader's node; each firing lists again (the leader is the first `latch-` child).
//!
//! # Dependencies
//! The client is [`zookeeper-client`](https://crates.io/crates/zookeeper-client): a pure
//! async Rust client that speaks ZooKeeper 3.4–3.9 including persistent recursive
//! watches, multi, digest ACLs, SASL and TLS. It runs on tokio through its `tokio`
//! feature.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

mod client;
pub mod codec;
mod config;
mod coord;
mod coord_feed;
mod coord_nodes;
mod error;
mod feed;
mod kv;
mod kv_feed;
mod kv_nodes;
mod services;
mod session;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use waypost_core::backend::watch::WatchHub;
use waypost_core::backend::{watch, Coord, CoordOptions, Keeper, Kv, KvOptions, Session};
use waypost_core::{
    Config, Connector, Discovery, Instance, Registrar, Registration, Result, ServiceName, Snapshot,
    WatchEvent, Watcher,
};

pub use config::{
    NodeLayout, PayloadFormat, ZkConfig, DEFAULT_CONFIG_PREFIX, DEFAULT_COORD_PREFIX, DEFAULT_PORT,
    DEFAULT_ROOT,
};

pub use kv::{ZkKv, MAX_VALUE_LEN};
pub use kv_feed::ZkKvFeed;

use client::Ctx;
use coord::ZkCoord;
use feed::ZkFeed;
use session::Driver;
use store::Store;

/// The URL schemes (and backend names) of this backend.
pub const SCHEMES: &[&str] = &["zookeeper", "zk"];

/// A connection to ZooKeeper: implements [`Registrar`] and [`Watcher`]. Cheap to clone;
/// clones share the session.
///
/// The session lives as long as this value, its registrations or its watch streams do;
/// when the last of them goes, the session is closed (its remaining ephemeral nodes go
/// at once).
#[derive(Clone)]
pub struct ZkDiscovery {
    keeper: Keeper<Driver, Store>,
    kv: Kv<ZkKv>,
    coord: Coord<ZkCoord, Driver>,
    /// One ZooKeeper watch per service, whatever the number of local watchers.
    hub: WatchHub<ServiceName, Instance>,
    ctx: Arc<Ctx>,
}

impl fmt::Debug for ZkDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkDiscovery")
            .field("config", &self.ctx.config)
            .field("session", &self.session_id().map(|s| format!("{s:#x}")))
            .field("registrations", &self.keeper.len())
            .finish()
    }
}

impl ZkDiscovery {
    /// Connects as configured (opens the session); fails within
    /// [`ZkConfig::connect_timeout`] when no server answers.
    pub async fn connect(config: ZkConfig) -> Result<Self> {
        let backoff = config.backoff();
        let ctx = Arc::new(Ctx::new(config));
        let session = Session::new(Driver::new(ctx.clone()), backoff);
        session.current().await?;
        let kv = Kv::new(
            ZkKv::new(session.clone(), ctx.clone()),
            KvOptions {
                backoff,
                ..KvOptions::default()
            },
        );
        let coord = Coord::new(
            ZkCoord::new(session.clone(), ctx.clone()),
            session.clone(),
            CoordOptions {
                backoff,
                ..CoordOptions::default()
            },
        );
        Ok(Self {
            keeper: Keeper::new("zookeeper", session, Store::new(ctx.clone())),
            kv,
            coord,
            hub: WatchHub::new(),
            ctx,
        })
    }

    /// Connects to the registry a `zk://` URL names.
    pub async fn from_url(url: &str) -> Result<Self> {
        Self::connect(ZkConfig::from_url(url)?).await
    }

    /// The configuration store: keys below [`ZkConfig::config_prefix`], bound to this
    /// client's session (see "Configuration keys" in the crate docs).
    pub fn kv(&self) -> &Kv<ZkKv> {
        &self.kv
    }

    /// Locks, semaphores and elections below [`ZkConfig::coord_prefix`], bound to this
    /// client's session (see "Locks and elections" in the crate docs).
    pub fn coordinator(&self) -> &dyn waypost_core::coord::Coordinator {
        &self.coord
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZkConfig {
        &self.ctx.config
    }

    fn session(&self) -> &Session<Driver> {
        self.keeper.session()
    }

    fn current(&self) -> Option<session::ZkSession> {
        if self.session().is_closed() {
            return None;
        }
        self.session().current_state().handle()
    }

    /// The current ZooKeeper session id, if one is open (not shut down, not expired and
    /// waiting for the next).
    pub fn session_id(&self) -> Option<i64> {
        self.current().map(|s| s.id())
    }

    /// The negotiated session timeout of the current session.
    pub fn session_timeout(&self) -> Option<Duration> {
        self.current()?.client().ok().map(|c| c.session_timeout())
    }

    /// Shuts down: every registration is `Deregistered` and the session closed (ZooKeeper
    /// deletes its nodes at once). Later calls fail with `Closed`.
    pub async fn shutdown(&self) -> Result<()> {
        self.keeper.shutdown().await
    }

    /// This client as a [`Discovery`] (with its test hooks under the `test-hooks` feature).
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

#[cfg(feature = "test-hooks")]
impl ZkDiscovery {
    /// **Test only.** The current session's id and password, to inject faults (another
    /// connection on the same session).
    #[doc(hidden)]
    pub fn session_info(&self) -> Option<zookeeper_client::SessionInfo> {
        Some(self.current()?.client().ok()?.session().clone())
    }

    /// **Test only.** New watches use the fallback for servers older than 3.6 (child
    /// and data watches) even where persistent recursive watches exist.
    #[doc(hidden)]
    pub fn use_child_watches(&self) {
        self.ctx
            .child_watches
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// **Test only.** How many sessions were opened before the current one (0 for the
    /// first); `None` once shut down or crashed, or while a new session is being opened.
    #[doc(hidden)]
    pub fn session_generation(&self) -> Option<u64> {
        self.current().map(|s| s.generation())
    }

    /// **Test only.** Whether the current session is over (expired, closed or refused)
    /// and not yet replaced.
    #[doc(hidden)]
    pub fn session_lost(&self) -> bool {
        self.current()
            .and_then(|s| s.client().ok())
            .map_or(true, |c| c.state().is_terminated())
    }
}

#[cfg(feature = "test-hooks")]
impl waypost_core::backend::TestHooks for ZkDiscovery {
    /// The connection is dropped without closing the session or deleting anything, every
    /// background task stops, later calls fail with `Closed`. The server removes the
    /// instances when the session times out.
    fn crash(&self) {
        self.keeper.crash();
    }

    /// Another connection takes the session over for a moment: the server drops ours,
    /// and the client reconnects by itself.
    fn drop_connections(&self) {
        let Some(client) = self.current().and_then(|s| s.client().ok()) else {
            return;
        };
        let ctx = self.ctx.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { client::steal_connection(&ctx.config, &client).await });
        }
    }
}

#[async_trait]
impl Registrar for ZkDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        self.keeper.register(instance).await
    }
}

#[async_trait]
impl Watcher for ZkDiscovery {
    /// The root's children that are service names (one `getChildren`, bounded by the
    /// request timeout), sorted. Foreign nodes with other names, and the node holding
    /// `config_prefix` or `coord_prefix` when one is configured below the root, are
    /// skipped. A service node outlives its last instance until the server reaps the
    /// container, and is listed meanwhile.
    async fn services(&self) -> Result<Vec<ServiceName>> {
        let session = self.session().current().await?;
        let client = session.client()?;
        services::list(&self.ctx, &client, self.ctx.deadline())
            .await
            .map_err(|f| coord::lost(self.session(), &session, self.ctx.error(f)))
    }

    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        let session = self.session().current().await?;
        let client = session.client()?;
        let feed = ZkFeed::new(self.session().clone(), self.ctx.clone(), service);
        let path = self.ctx.service_path(service);
        let listing = feed::read_service(&self.ctx, &client, service, &path, self.ctx.deadline())
            .await
            .map_err(|f| {
                let e = self.ctx.error(f);
                if matches!(e, waypost_core::Error::SessionExpired) {
                    self.session().expired(&session);
                }
                e
            })?;
        Ok(watch::snapshot(&feed, service, listing))
    }

    /// Core's watch machine, driven by a task of its own from the first poll on: a
    /// change is read from ZooKeeper as soon as its event arrives, not only when the
    /// consumer asks for the next event (up to 1,024 events are buffered).
    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let feed = ZkFeed::new(self.session().clone(), self.ctx.clone(), service);
        let (backoff, what) = (self.ctx.config.backoff(), service.to_string());
        // The hub runs the machine in its own task: a change is read while the consumers
        // (or `register`) are busy.
        watch::shared_instances(&self.hub, service, move || {
            watch::watch(feed, &backoff, what)
        })
    }
}

/// The ZooKeeper backend's [`Connector`], for the `waypost` facade.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZkConnector;

impl Connector for ZkConnector {
    fn name(&self) -> &'static str {
        SCHEMES[0]
    }

    fn schemes(&self) -> &'static [&'static str] {
        SCHEMES
    }

    fn connect<'a>(&'a self, config: &'a Config) -> BoxFuture<'a, Result<Discovery>> {
        Box::pin(async move {
            Ok(ZkDiscovery::connect(ZkConfig::from_config(config)?)
                .await?
                .into_discovery())
        })
    }
}

/// **Test only.** The raw ZooKeeper client this backend is built on, for tests that write
/// to the registry as a foreign client would.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use zookeeper_client;
