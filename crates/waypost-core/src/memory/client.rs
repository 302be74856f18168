//! A client of a [`MemoryRegistry`]: a session, the registrations bound to it, and
//! watches — core's backend layer over [`super::backend`]'s primitives.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::backend::{Driver, Store, WatchFeed};
use super::coord::MemoryCoord;
use super::kv::MemoryKv;
use super::registry::{MemoryRegistry, SessionId};
use crate::backend::watch::WatchHub;
use crate::backend::{
    watch, BackoffOptions, Coord, CoordOptions, Keeper, Kv, KvOptions, Session, TestHooks,
};
use crate::error::Result;
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, ServiceName};
use crate::registrar::{Registrar, Registration};
use crate::watcher::Watcher;

/// A client of a [`MemoryRegistry`]: implements [`Registrar`] and [`Watcher`].
///
/// Like a ZooKeeper client it holds one session with the registry; every registration is
/// bound to it. Core's session driver heartbeats it every quarter TTL and, when the
/// registry lost the session or an instance, the keeper registers everything again with
/// jittered backoff. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct MemoryClient {
    registry: MemoryRegistry,
    keeper: Keeper<Driver, Store>,
    kv: Kv<MemoryKv>,
    coord: Coord<MemoryCoord, Driver>,
    hub: WatchHub<ServiceName, Instance>,
    backoff: BackoffOptions,
}

impl fmt::Debug for MemoryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryClient")
            .field("registry", &self.registry.name())
            .field("keeper", &self.keeper)
            .finish()
    }
}

impl MemoryClient {
    /// A client of `registry` whose session lives `ttl` without a heartbeat.
    pub fn new(registry: &MemoryRegistry, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_millis(10));
        let tick = (ttl / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let backoff = BackoffOptions::new(tick / 2, tick * 4);
        let session = Session::new(
            Driver {
                registry: registry.clone(),
                ttl,
            },
            backoff,
        );
        let store = Store {
            registry: registry.clone(),
        };
        let coord = Coord::new(
            MemoryCoord {
                registry: registry.clone(),
            },
            session.clone(),
            CoordOptions {
                backoff,
                ..CoordOptions::default()
            },
        );
        Self {
            registry: registry.clone(),
            keeper: Keeper::new("memory", session, store),
            coord,
            kv: Kv::new(
                MemoryKv {
                    registry: registry.clone(),
                },
                KvOptions {
                    backoff,
                    ..KvOptions::default()
                },
            ),
            hub: WatchHub::new(),
            backoff,
        }
    }

    /// The client's configuration store.
    pub fn kv(&self) -> &Kv<MemoryKv> {
        &self.kv
    }

    /// The client's locks and elections.
    pub fn coordinator(&self) -> &dyn crate::coord::Coordinator {
        &self.coord
    }

    /// The registry this client talks to.
    pub fn registry(&self) -> &MemoryRegistry {
        &self.registry
    }

    /// The session the registrations are bound to, if one is open.
    pub fn session(&self) -> Option<SessionId> {
        self.keeper.session().current_state().handle()
    }

    /// How many entries this client still has to confirm absent (writes or deletes whose
    /// outcome was unknown).
    pub fn keeper_pending_removals(&self) -> usize {
        self.keeper.pending_removals()
    }

    /// Fault injection: the process "crashes". Heartbeats stop, nothing is deregistered,
    /// every later call fails with [`Error::Closed`](crate::Error::Closed); the registry
    /// drops the instances when the session's TTL runs out, exactly as for a killed
    /// process.
    pub fn kill(&self) {
        self.keeper.crash();
    }
}

impl TestHooks for MemoryClient {
    fn crash(&self) {
        self.kill();
    }

    fn drop_connections(&self) {
        // In process there is no connection to drop: a watch resubscribes only after an
        // outage, which `MemoryRegistry::set_reachable` injects.
    }
}

#[async_trait]
impl Registrar for MemoryClient {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        self.keeper.register(instance).await
    }
}

#[async_trait]
impl Watcher for MemoryClient {
    async fn services(&self) -> Result<Vec<ServiceName>> {
        self.keeper.session().check_open()?;
        self.registry.inner.services()
    }

    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.keeper.session().check_open()?;
        let feed = WatchFeed::new(&self.registry, service);
        let (listing, _) = self.registry.inner.list(service, false)?;
        Ok(watch::snapshot(&feed, service, listing))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let feed = WatchFeed::new(&self.registry, service);
        let (backoff, what) = (self.backoff, service.to_string());
        watch::shared_instances(&self.hub, service, move || {
            watch::watch(feed, &backoff, what)
        })
    }
}

impl MemoryClient {
    /// This client as a [`Discovery`](crate::Discovery), with its test hooks.
    pub fn into_discovery(self) -> crate::Discovery {
        let c = Arc::new(self);
        crate::Discovery::new(c.clone(), c.clone())
            .with_config_store(Arc::new(c.kv.clone()))
            .with_coordinator(Arc::new(c.coord.clone()))
            .with_shutdown({
                let c = c.clone();
                move || {
                    let c = c.clone();
                    Box::pin(async move { c.keeper.shutdown().await })
                }
            })
            .with_hooks(c)
    }
}
