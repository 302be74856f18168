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
//! - **Watching** (`feed.rs`): a prefix `get` gives the snapshot and its revision; a
//!   prefix watch from the next revision gives each change (O(1) per change whatever the
//!   service's size). A stream etcd cancels is resumed from the last revision + 1 (no
//!   loss, no duplicate). If that revision was compacted, the stream's connection is lost,
//!   or etcd stays unreachable (an idle watch sends a progress request every
//!   `probe_interval` and expects an answer within `request_timeout`), the watch yields
//!   `Stale` and, once etcd answers, `Resynced` with a fresh snapshot. Values that are
//!   not instances are skipped with a warning.
//! - **Shutdown**: `deregister()` deletes the key (only if still bound to our lease);
//!   [`EtcdDiscovery::shutdown`], or dropping the last handle and every guard, revokes the
//!   lease.
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
mod error;
mod feed;
mod session;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use waypost_core::backend::{watch, BackoffOptions, Keeper, Session};
use waypost_core::{
    Config, Connector, Discovery, Instance, Registrar, Registration, Result, ServiceName, Snapshot,
    WatchEvent, Watcher,
};

use crate::client::Conn;
use crate::feed::WatchFeed;
use crate::session::LeaseDriver;
use crate::store::KeyStore;

pub use codec::{CLAIM_SEPARATOR, MAX_VALUE_LEN};
pub use config::{EtcdConfig, Layout, DEFAULT_PORT};

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
        Ok(Self {
            keeper: Keeper::new("etcd", session, KeyStore::new(conn.clone())),
            conn,
            watch_backoff,
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
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.keeper.session().check_open()?;
        let feed = self.feed(service);
        let listing = feed.read().await?;
        Ok(watch::snapshot(&feed, service, listing))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        watch::watch_instances(self.feed(service), &self.watch_backoff, service)
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
        self.drops.send_modify(|n| *n += 1);
    }
}

impl EtcdDiscovery {
    /// This client as a [`Discovery`] (with its test hooks under the `test-hooks`
    /// feature).
    pub fn into_discovery(self) -> Discovery {
        let d = Arc::new(self);
        let discovery = Discovery::new(d.clone(), d.clone());
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
