#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod client;
mod codec;
#[cfg(test)]
mod codec_prop;
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
    /// **Test hook.** How many rounds the registration keeper ran: a test waits for two
    /// more to know one ran whole after a given moment.
    #[doc(hidden)]
    pub fn keeper_rounds(&self) -> u64 {
        self.keeper.rounds()
    }

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
