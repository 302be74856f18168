#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

mod budget;
mod client;
mod codec;
#[cfg(test)]
mod codec_prop;
mod config;
mod coord;
mod error;
mod feed;
mod heartbeat;
mod kv;
mod mux;
mod session;
mod store;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use waypost_core::backend::watch::WatchHub;
use waypost_core::backend::{watch, Coord, CoordOptions, Keeper, Kv, KvOptions, Listing, Session};
use waypost_core::coord::Coordinator;
use waypost_core::{
    Config, Connector, Discovery, Error, Instance, Registrar, Registration, Result, ServiceName,
    Snapshot, WatchEvent, Watcher,
};

use client::{Agent, Lane};
use coord::ConsulCoord;
use session::{AgentDriver, LockSessionDriver, Written};
use store::AgentStore;

pub use budget::ConnectionBudget;
pub use config::{ConsulConfig, DEFAULT_PORT, MAX_WAIT, MIN_DEREGISTER_CRITICAL_AFTER, SCHEMES};
pub use coord::{DEFAULT_COORD_PREFIX, LOCK_FLAG_VALUE, LOCK_RETRY};
pub use kv::{ConsulKv, KvFeed, DEFAULT_CONFIG_PREFIX, MAX_CONFIG_VALUE_LEN};

/// The backend's canonical name, as `backend = "consul"` in configs.
pub const NAME: &str = "consul";

/// A connection to one Consul agent: registers instances as agent services with a TTL
/// check it keeps passing, and watches services with blocking health queries.
///
/// Cheap to clone; clones share the HTTP connection pool and the registrations.
#[derive(Clone)]
pub struct ConsulDiscovery {
    agent: Agent,
    config: Arc<ConsulConfig>,
    keeper: Keeper<AgentDriver, AgentStore>,
    kv: Kv<ConsulKv>,
    /// Locks and elections, bound to a Consul session of their own.
    coord: Coord<ConsulCoord, LockSessionDriver>,
    /// One blocking query per service, whatever the number of local watchers.
    hub: WatchHub<ServiceName, Instance>,
    /// The change signal of the watches beyond the per-service budget.
    mux: mux::Mux,
}

impl fmt::Debug for ConsulDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDiscovery")
            .field("config", &self.config)
            .field("registrations", &self.keeper.len())
            .field("pending_removals", &self.keeper.pending_removals())
            .finish()
    }
}

impl ConsulDiscovery {
    /// Connects: checks that the agent answers (within the configured timeouts) and knows
    /// the configured datacenter. Registrations and watches start later, per call.
    pub async fn connect(config: ConsulConfig) -> Result<Self> {
        let d = Self::new(config)?;
        d.agent.ping().await?;
        // The node name, and the agent's per-client connection limit (the budget).
        d.agent.node_name().await;
        // Whether reads are authorized (cached for every watch; a refusal is not cached
        // and is reported by the first watch or listing, so it does not fail `connect`).
        let _ = d.agent.check_read_access(false).await;
        if let Some(dc) = &d.config.datacenter {
            let known = d.agent.datacenters().await?;
            if !known.iter().any(|k| k == dc) {
                return Err(Error::NotFound {
                    what: format!(
                        "consul datacenter `{dc}` (the agent knows: {})",
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(d)
    }

    /// A client as configured, without contacting the agent.
    pub fn new(config: ConsulConfig) -> Result<Self> {
        config.validate()?;
        let agent = Agent::new(&config)?;
        let written = Written::default();
        let heartbeat = heartbeat::Heartbeat::new(&agent, &config);
        // Retries (keep-alives, re-registrations, watches) back off within
        // `backoff_initial..backoff_max` (by default 100 ms up to a third of the TTL, at
        // most 5 s).
        let session = Session::new(
            AgentDriver::new(
                agent.clone(),
                config.ttl,
                written.clone(),
                heartbeat.clone(),
            ),
            config.backoff(),
        );
        let store = AgentStore {
            agent: agent.clone(),
            config: config.clone(),
            written,
            heartbeat,
        };
        let kv = Kv::new(
            ConsulKv::new(
                agent.clone(),
                session.clone(),
                &config.config_prefix,
                config.wait,
            ),
            KvOptions {
                backoff: config.backoff(),
                ..KvOptions::default()
            },
        );
        // Locks and elections: a real Consul session (its TTL is the holders' bound),
        // opened on the first acquisition.
        let coord = Coord::new(
            ConsulCoord::new(agent.clone(), &config.coord_prefix, config.wait),
            Session::new(
                LockSessionDriver::new(agent.clone(), config.ttl, config.lock_delay),
                config.backoff(),
            ),
            CoordOptions {
                backoff: config.backoff(),
                ..CoordOptions::default()
            },
        );
        Ok(Self {
            keeper: Keeper::new(NAME, session, store),
            kv,
            coord,
            hub: WatchHub::new(),
            mux: mux::Mux::new(&agent, config.wait, config.backoff()),
            agent,
            config: Arc::new(config),
        })
    }

    /// The configuration store: keys in Consul's KV store under `config_prefix` (see
    /// "Configuration keys" in the crate docs). Also reached as
    /// [`Discovery::kv`](waypost_core::Discovery::kv).
    pub fn kv(&self) -> &Kv<ConsulKv> {
        &self.kv
    }

    /// Locks and elections: `api.Lock`'s keys under `coord_prefix` (see "Locks and
    /// elections" in the crate docs). Also reached as
    /// [`Discovery::coordinator`](waypost_core::Discovery::coordinator).
    pub fn coordinator(&self) -> &dyn Coordinator {
        &self.coord
    }

    /// **Test hook.** Whether the lock key of `name` has a holder now.
    #[cfg(feature = "test-hooks")]
    pub async fn lock_is_held(&self, name: &waypost_core::coord::Name) -> Result<bool> {
        self.coord.driver().is_held(name).await
    }

    /// **Test hook.** This client's contenders (holding or waiting) per lock key, with
    /// their Consul session: Consul keeps no queue of waiters (a waiter is a blocking
    /// read), so tests count contenders on the clients' side.
    #[cfg(feature = "test-hooks")]
    pub fn coord_contenders(&self) -> ContenderProbe {
        ContenderProbe(self.coord.driver().contenders())
    }

    /// **Test hook.** While `hold`, the keep-alive does not pass (or re-register) the
    /// heartbeat and reports success: what the keeper's read-back notices is left to the
    /// keeper alone. Keep it shorter than the TTL, or the instances' checks go critical.
    #[cfg(feature = "test-hooks")]
    pub fn hold_heartbeat_passes(&self, hold: bool) {
        self.keeper
            .store()
            .heartbeat
            .passes_held
            .store(hold, std::sync::atomic::Ordering::Release);
    }

    /// The configuration.
    pub fn config(&self) -> &ConsulConfig {
        &self.config
    }

    /// How many registrations wait to be confirmed gone from the agent: writes whose outcome
    /// is unknown (a timeout, a lost reply) and deletes that failed; the client retries them
    /// every keep-alive round.
    pub fn pending_removals(&self) -> usize {
        self.keeper.pending_removals()
    }

    /// How many times this client registered its heartbeat service with the agent: once
    /// before its first instance, and once more each time the agent lost it (a restart, a
    /// deregistration behind the client's back). Zero for a client that registered nothing.
    pub fn heartbeat_registrations(&self) -> u64 {
        self.keeper.store().heartbeat.registrations()
    }

    /// How this client's connections to its agent are split between registrations and
    /// watches (sized at [`connect`](Self::connect) from the agent's
    /// `http_max_conns_per_client`); see "Many watched services" in the crate docs.
    pub fn connection_budget(&self) -> ConnectionBudget {
        self.agent.budget()
    }

    /// How many of this client's service watches share its change signal now (beyond
    /// [`ConnectionBudget::dedicated_watches`]), rather than holding a blocking query each.
    pub fn shared_watches(&self) -> usize {
        self.agent
            .lanes()
            .shared_watches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shuts down: every registration is deregistered from the agent and reads
    /// `Deregistered`; later calls fail with [`Error::Closed`].
    pub async fn shutdown(&self) -> Result<()> {
        // Destroying the session releases every lock and leadership at once.
        let coord = self.coord.session().close().await;
        self.keeper.shutdown().await?;
        coord
    }

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

#[async_trait]
impl Registrar for ConsulDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        self.keeper.register(instance).await
    }
}

#[async_trait]
impl Watcher for ConsulDiscovery {
    /// `GET /v1/catalog/services`: every service of the datacenter's catalog with a valid
    /// name, `consul` (the servers' own service) included; see "Listing services" in the
    /// crate docs.
    async fn services(&self) -> Result<Vec<ServiceName>> {
        self.keeper.session().check_open()?;
        // With ACLs on and default deny, an unauthorized listing is `200 {}`.
        self.agent.check_read_access(false).await?;
        Ok(self.agent.services().await?)
    }

    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.keeper.session().check_open()?;
        self.agent.check_read_access(false).await?;
        let listing = self.agent.health(service, None, Lane::Control).await?;
        let mut feed = feed::HealthFeed::for_listing(&self.agent, service).await;
        let entries = feed.decode_all(&listing.body)?;
        Ok(watch::snapshot(
            &feed,
            service,
            Listing {
                entries,
                revision: listing.index,
            },
        ))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        feed::watch(
            &self.hub,
            &self.agent,
            &self.mux,
            self.keeper.session(),
            service,
            self.config.wait,
        )
    }
}

/// **Test hook.** The contenders of one client (see
/// [`ConsulDiscovery::coord_contenders`]); holds nothing of the client alive.
#[cfg(feature = "test-hooks")]
#[derive(Clone, Debug)]
pub struct ContenderProbe(coord::Contenders);

#[cfg(feature = "test-hooks")]
impl ContenderProbe {
    /// The Consul sessions of the client's contenders for lock `name` (its key under
    /// `prefix`), one per contender.
    pub fn sessions(&self, prefix: &str, name: &waypost_core::coord::Name) -> Vec<String> {
        let key = format!("{prefix}/{name}/.lock");
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|ids| ids.values().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }
}

#[cfg(feature = "test-hooks")]
impl waypost_core::backend::TestHooks for ConsulDiscovery {
    fn crash(&self) {
        self.keeper.crash();
        self.coord.session().crash();
    }

    fn drop_connections(&self) {
        self.agent.drop_connections();
    }
}

/// The Consul backend's [`Connector`]: `consul://` and `consuls://` URLs, or
/// `backend = "consul"` configs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsulConnector;

impl Connector for ConsulConnector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schemes(&self) -> &'static [&'static str] {
        SCHEMES
    }

    fn connect<'a>(&'a self, config: &'a Config) -> BoxFuture<'a, Result<Discovery>> {
        Box::pin(async move {
            Ok(ConsulDiscovery::connect(ConsulConfig::from_config(config)?)
                .await?
                .into_discovery())
        })
    }
}
