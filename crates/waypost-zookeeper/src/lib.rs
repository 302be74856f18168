#![doc = include_str!("../README.md")]
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
            .is_none_or(|c| c.state().is_terminated())
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
