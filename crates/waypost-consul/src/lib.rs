//! The Consul backend of waypost: `consul://HOST:PORT` (or `consuls://` for HTTPS).
//!
//! Point it at your local Consul agent. Each registered instance becomes an **agent
//! service** with a **TTL check** that a background task keeps passing; a watch is a
//! **blocking query** on `/v1/health/service/{name}?passing=true`, so an instance whose
//! process died leaves every watch within one TTL. Everything you register is an ordinary
//! Consul service: `consul catalog services`, the DNS interface
//! (`NAME.service.consul` SRV) and every other Consul tool see it.
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_consul::{ConsulConfig, ConsulDiscovery};
//! use waypost_core::{Instance, Registrar, Watcher};
//!
//! let consul = ConsulDiscovery::connect(
//!     ConsulConfig::from_url("consul://127.0.0.1:8500?ttl=10s")?.with_token("my-acl-token"),
//! )
//! .await?;
//! let registration = consul
//!     .register(Instance::parse("greeter", "g-1", "10.0.0.5", 8001)?.with_zone("eu-1a"))
//!     .await?;
//! let listed = consul.instances(&"greeter".parse()?).await?;
//! assert_eq!(listed.len(), 1);
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! Usually you do not name this crate: enable the `consul` feature of `waypost` and call
//! `waypost::connect("consul://127.0.0.1:8500")`.
//!
//! # How waypost maps onto Consul
//!
//! The crate supplies Consul's primitives to waypost's backend layer
//! ([`waypost_core::backend`]): core's session loop, registration keeper and watch
//! machine do the rest, the same on every registry.
//!
//! - **Session**: Consul has no session that agent services bind to; a client's session
//!   is *its agent* as the client reaches it (`session.rs`). It is kept alive by pinging
//!   the agent every third of the TTL: when the agent does not answer, the session and
//!   every registration are `Suspended`. Closing it ([`ConsulDiscovery::shutdown`], or
//!   dropping the last handle and guard) deregisters every service the client still
//!   holds.
//! - **Registration** (`store.rs`) is `PUT /v1/agent/service/register` with the service
//!   ID `{service}:{id}` (Consul's IDs are unique per agent, waypost's per service), the
//!   TTL check `service:{service}:{id}` registered *passing* (visible at once), and
//!   `DeregisterCriticalServiceAfter` (Consul's floor is 1 minute). The agent syncs the
//!   registration to the catalog before it answers, so `register` returning means a
//!   watcher lists the instance. Once per keep-alive round (every third of the TTL) the
//!   keeper passes each registration's TTL check and reads the service back: when the
//!   agent answers that the check is unknown (agent restarted — a `-dev` agent keeps no
//!   state — or the service was deregistered behind our back), or holds something else
//!   under the ID, it registers it again by itself (status `Reregistering`, then
//!   `Registered`). `update` re-registers with the same ID (the agent keeps its checks'
//!   current status). `deregister` is `PUT /v1/agent/service/deregister/{id}`; a
//!   deregistration or registration whose outcome is unknown (a timeout) is settled by
//!   the keeper once the agent answers again.
//! - **Agent-run checks** (`http_check`, `tcp_check`, optional): *beside* the TTL check
//!   (which stays: it is what removes a crashed process even when another process took its
//!   port, and how the heartbeat notices a lost registration), the registration's `Checks`
//!   get an HTTP check `service:{service}:{id}:http` (`http_check=/health` requests
//!   `http://{host}:{port}/health` of the instance; a full `http(s)://` URL may use
//!   `{host}` and `{port}`) and/or a TCP check `service:{service}:{id}:tcp` on
//!   `{host}:{port}`, run by the agent every `check_interval` (10s) with `check_timeout`
//!   (5s), with the same `DeregisterCriticalServiceAfter`. The instance is listed only
//!   while *all* its checks pass, so one whose `/health` fails leaves watches and comes
//!   back when it passes again.
//!
//!   *Starting status, the trade-off.* On `register` the agent-run checks start
//!   **passing**: `register` returning still means a watcher lists the instance (the
//!   `Registrar` contract), and Consul would otherwise wait a random part of one
//!   `check_interval` before the first run. The price: an instance whose `/health` fails
//!   from the start gets traffic until the first run, at most `check_interval` +
//!   `check_timeout` — register once the service is ready to serve. When the heartbeat
//!   registers an instance *again* (agent restarted, service removed behind our back, or
//!   removed by Consul after failing its check for `deregister_critical_after`), they start
//!   **critical**: no contract asks for it to be visible at once, and an instance whose
//!   health check keeps failing must not flap back into watches every minute. `update`
//!   does not reset them: for a check it already runs, the agent keeps the current status.
//! - **Two registrants of one id on one agent**: Consul cannot tell them apart; the second
//!   registration *replaces* the first (the `Registrar` contract allows this for agent
//!   services). Within one [`ConsulDiscovery`], registering a live id again is
//!   `AlreadyExists`. **The same id on two nodes** (another agent, or a catalog entry
//!   written by another tool): a watch and `instances()` list the id once — the entry
//!   of the watcher's own agent node that waypost writes (`{service}:{id}`) wins,
//!   otherwise the smallest `{node}/{service id}`; removing one re-exposes the other.
//!   (Finding the agent's node name needs `agent:read`; a token without it prefers any
//!   node's `{service}:{id}` entry.)
//! - **Weight and zone**: the weight is `Weights.Passing`; Consul needs at least 1, so weight
//!   0 (draining) is also written as `Meta["waypost-weight"] = "0"`, the zone as
//!   `Meta["waypost-zone"]` (waypost reserves the `waypost-` and `consul-` prefixes). When
//!   the user's 64 metadata entries leave no room (Consul allows 64), these two go into
//!   tags `waypost-weight=0` / `waypost-zone=...` instead. Both are read back.
//! - **Watches** (`feed.rs`) are blocking queries (`index`, a `wait` jittered down by
//!   up to 10 %); each answer is compared with the last one and its differences become
//!   `Added` / `Updated` / `Removed`, each at its own revision within the answer's
//!   `X-Consul-Index` range (so revisions rise strictly). The watch runs in its own task, so
//!   it notices a lost agent even while the consumer is not polling. While a query
//!   blocks, the agent is pinged every `request_timeout`: a paused agent (which
//!   accepts connections and never answers) makes the watch `Stale` after at most two
//!   `request_timeout`s; a refused connection (an agent restarting) makes it `Stale` at
//!   once.
//!   After a `Stale`, the agent's next answer is `Resynced`. A restarted agent starts its
//!   indexes over: the watch follows them, and its revisions keep growing all the same.
//!   An answer that retrying cannot fix (a datacenter the agent does not know, a server
//!   that does not speak Consul's JSON) ends the watch with that error.
//! - **ACLs**: the token goes in the `X-Consul-Token` header, never in URLs, logs, `Debug`
//!   or errors. With ACLs on and default deny, Consul answers an unauthorized health query
//!   with `200 []`; so before trusting a listing, a watcher checks its token
//!   (`/v1/acl/token/self`): no token, or an unknown one, is `Error::Unauthorized`. A
//!   watch whose set suddenly becomes empty checks again, and ends with `Unauthorized` if
//!   the token was revoked. (Consul 1.8 cannot say whether a *valid* token lacks
//!   `service:read` on one service; such a watch sees an empty service.)
//! - **Foreign entries** (registered by other tools) are listed when their service ID is
//!   a valid waypost instance id; entries that are not valid instances are skipped with a
//!   warning, never failing the watch.
//! - **Listing services** ([`Watcher::services`], `waypost services`) is
//!   `GET /v1/catalog/services` of the configured datacenter, with the token, read like the
//!   health queries (Consul's default consistency) within `request_timeout`. It lists every
//!   service of the catalog, whoever registered it: **Consul's own `consul` service** (its
//!   servers) is listed too, as `consul catalog services` lists it, because it is a valid
//!   name that can be watched like any other. A service is listed as long as the catalog
//!   holds an entry, passing or not, so a listed service may have no live instance. Names
//!   that are not valid [`ServiceName`]s (Consul accepts spaces, `:`, long names) are
//!   skipped with a debug log line. With ACLs on, the token is checked first, as for
//!   `instances` (an unauthorized listing would be an empty `200`); a token without
//!   `service:read` on some services does not see them.
//!
//! # Many watched services
//!
//! A Consul agent serves at most `http_max_conns_per_client` connections per client
//! address (200 by default) and closes the others at once, so one blocking query per
//! watched service cannot scale to a gateway watching hundreds of services, and must never
//! starve the client's own registrations. A client therefore splits its connections
//! ([`ConsulDiscovery::connection_budget`], sized at connect from the agent's
//! `DebugConfig.HTTPMaxConnsPerClient`, 200 when the token cannot read it):
//!
//! - registrations, heartbeats, deregistrations and every other request have their own
//!   HTTP pool and limit (half of what watches leave, at most 32): they never wait
//!   behind watches;
//! - watches use `watch_share_percent` of the limit (50 %): the liveness ping, the shared
//!   change signal (two queries), reads, and one blocking query per service for as many
//!   services as fit (65 by default);
//! - the other watches are **shared**: a blocking query on `/v1/catalog/services` (its
//!   index moves on every service registration, update, deregistration) and one on
//!   `/v1/health/state/any` (every check change, with its service) wake them, and each
//!   woken watch reads its service once, reporting a change only if the service's index
//!   moved. Check changes wake only their service's watches; catalog changes every shared
//!   watch. Chosen by measurement on Consul 1.8.7: either index alone misses changes (a
//!   foreign entry without checks moves only the catalog's, a check flip only the
//!   checks'); a node's address change moves neither, so shared watches also read once
//!   per `wait`. HTTP/2 multiplexing was not an option: the agent serves HTTP/1.1 unless it
//!   has TLS. Measured (README, `many_watches` bench): with 300 watched services, every
//!   snapshot within 64 ms, change p50 12.6 ms / max 46 ms; 0.4 ms p50 with 10.
//!
//! A watch never waits for a connection the agent would refuse, so an agent at its limit
//! causes no `Stale`/`Resynced` storm: an outage is one `Stale` per watch.
//!
//! # Configuration keys
//!
//! [`ConsulDiscovery::kv`] (or [`Discovery::kv`]) is a
//! [`ConfigStore`](waypost_core::kv::ConfigStore) over Consul's KV store, so `consul kv`
//! and every other Consul tool see the same bytes (`kv.rs`).
//!
//! - **Keys**: key `a/b` is the KV key `{config_prefix}/a/b`; the option `config_prefix`
//!   (URL `?config_prefix=...` or serde, default `config`) is itself a configuration key,
//!   written without a leading or trailing `/`. `consul kv get config/a/b` reads what
//!   `put("a/b")` wrote; `consul kv put config/a/b v` reaches every watcher of `a/b`.
//!   A prefix `a` covers the KV keys below `config/a/`.
//! - **Versions** are the entries' `ModifyIndex`: Raft indexes, registry-wide, so a key
//!   deleted and created again comes back at a higher version. (A `-dev` agent keeps no
//!   state: after its restart the keys are gone and the indexes start over.)
//! - **Reads**: `GET /v1/kv/{key}` (a missing key is `404` with its `X-Consul-Index`),
//!   `GET /v1/kv/{prefix}/?recurse` for `list`, with `X-Consul-Index` as the revision.
//! - **Writes** are one-operation transactions, `PUT /v1/txn`, because a plain
//!   `PUT /v1/kv/{key}` answers only `true`/`false` and `put` must return the version its
//!   own write created: `set`; `cas` with the expected `ModifyIndex` (`0` for "create
//!   only"); `check-index` + `delete` for `delete_if` (a bare `delete-cas` of a missing
//!   key succeeds in Consul); `get` + `delete` for `delete`, to say whether the key
//!   existed. A refused expectation (`409`) is `Error::Conflict` with the version read
//!   right after; a write whose answer was lost is retried and reconciled by core.
//!   Each write sets the entry's `Flags` to its time in nanoseconds since the Unix
//!   epoch: Consul keeps the `ModifyIndex` of a write that changes nothing (same value,
//!   flags and session), and every write must be a new version, as on the other
//!   registries. (A `Flags` another tool set is overwritten, as any `consul kv put`
//!   without `-flags` would.)
//! - **Value size**: at most [`MAX_CONFIG_VALUE_LEN`] (380 KiB), a typed `InvalidInput`
//!   before anything is sent. Consul's `kv_max_value_size` is 512 KiB, but a transaction
//!   request is capped at 512 KiB (`txn_max_req_len`) with the value in base64; larger
//!   values written by other tools are read as usual.
//! - **Watches** (`kv/feed.rs`) are blocking queries on the key or the prefix (`index`
//!   past the revision of the feed's own listing, never "from now"; `wait` jittered).
//!   Each answer is a complete read, compared with the last one: a written key is
//!   reported at its `ModifyIndex`, a deleted one at a free index of the answer's range
//!   (Consul does not say when a key was deleted), so revisions keep rising strictly.
//!   **An index that goes backwards** is never a stuck watch: an answer whose
//!   `X-Consul-Index` (or a changed key's `ModifyIndex`) is not above the last one either
//!   holds exactly the same entries (Consul reaped tombstones: the watch blocks from the
//!   new index, reporting nothing) or not (a restarted agent or a restored snapshot: the
//!   index is reset, the watch reports `Stale` and lists again, `Resynced`). Outages are noticed as for instance
//!   watches (refused connection at once; a paused agent within two `request_timeout`s).
//! - **Foreign entries** below a prefix whose key is not a configuration key (a space, an
//!   empty segment, a folder key ending in `/`) are skipped and logged, in `list` and in
//!   watches.
//!
//! ```no_run
//! # async fn run() -> waypost_core::Result<()> {
//! use waypost_consul::{ConsulConfig, ConsulDiscovery};
//! use waypost_core::kv::{ConfigStore, Expected};
//!
//! let consul = ConsulDiscovery::connect(ConsulConfig::from_url(
//!     "consul://127.0.0.1:8500?config_prefix=my_app",
//! )?)
//! .await?;
//! let key = "db/url".parse()?; // the KV key `my_app/db/url`
//! let v = consul.kv().put(&key, b"postgres://db:5432".to_vec()).await?;
//! consul.kv().put_if(&key, b"postgres://db2:5432".to_vec(), Expected::Version(v)).await?;
//! # Ok(()) }
//! ```
//!
//! # Locks and elections
//!
//! [`ConsulDiscovery::coordinator`] (or [`Discovery::coordinator`]) is a
//! [`Coordinator`] on Consul's own lock recipe,
//! `api.Lock`, which `consul lock` runs (`coord/`):
//!
//! - **Keys**: name `a/b` is the KV key `{coord_prefix}/a/b/.lock` (option `coord_prefix`,
//!   default `coord`, validated like `config_prefix`), so `consul lock coord/a/b CMD`
//!   takes the same lock, both ways. Its `Flags` are Consul's lock flag value
//!   ([`LOCK_FLAG_VALUE`]); a key with other flags (another tool's, `consul lock -n`'s
//!   semaphore) is `Error::Conflict`, as `api.Lock` refuses it, and is never overwritten.
//!   An **election is the same lock** with the leader's value in the key (Consul's
//!   leader-election recipe): `consul lock` on the name is a candidate too, and a lock and
//!   an election of one name are one thing.
//! - **Session**: locks bind to a real Consul session of their own (registrations keep
//!   using agent TTL checks), opened on the first acquisition: `TTL` = the `ttl` option
//!   (at least Consul's minimum, 10 s), `LockDelay` = the `lock_delay` option (1 s by
//!   default), `Behavior = release`, and **no health checks**, so that only its TTL ends
//!   it. It is renewed every third of its TTL; a renewal that does not reach the servers
//!   is not a confirmation. The holders' bound is the TTL: a guard reports
//!   `Lost::Unconfirmed` at 90 % of it after the last confirmed renewal, before Consul may
//!   invalidate the session (it waits at least the TTL, in practice up to twice it). So a
//!   **crashed holder is replaced after up to 2 × TTL + `lock_delay`**.
//! - **Acquire**: a consistent read, then a `lock` transaction (`PUT /v1/txn`) whose answer
//!   carries the entry: the **fencing token** is its `ModifyIndex`, in one round trip.
//!   Once this client released a key, it remembers the `ModifyIndex` its release left;
//!   the next acquisition of that key is a single `check-index` + `lock` transaction
//!   (the index proves the key is still free with the lock flags), and reads first only
//!   when someone else wrote the key since. A holder watches its key (a consistent
//!   blocking read past its token) from 100 ms after the acquisition: a change made
//!   meanwhile is still seen, and a short critical section sends no watch.
//!   **Waiting** is a consistent blocking read of the key until it is free, then another
//!   attempt; an acquire refused on a free key (Consul's lock-delay after an invalidated
//!   session) is retried after [`LOCK_RETRY`] (1 s), never in a hot loop. **Waiters are
//!   not queued** (Consul's own locks are not FIFO): whoever tries first after a release
//!   wins.
//! - **Release** (and resign): an `unlock` transaction, applied only if our session still
//!   holds the key: a newer holder is never released. **Proclaim**: `check-session` +
//!   `lock` with the new value. `leader()` and `observe` read the holder, its value and the
//!   key's `ModifyIndex`: the leadership's token until the leader proclaims, a larger
//!   index after (every write is a new index).
//! - **Semaphores** (`permits > 1`) are `Error::Unsupported`.
//!
//! # Dependencies
//!
//! A small client on `reqwest` (rustls with `ring`, OS trust store, HTTP/1.1, no system
//! proxy: the agent is local) and `serde`. The crates.io `consul` crate uses blocking
//! `reqwest` and panics inside a tokio runtime; `rs-consul` registers catalog entities
//! rather than agent services, has no TTL checks and times blocking queries out at 5 s.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

mod budget;
mod client;
mod codec;
mod config;
mod coord;
mod error;
mod feed;
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
        // Retries (keep-alives, re-registrations, watches) back off within
        // `backoff_initial..backoff_max` (by default 100 ms up to a third of the TTL, at
        // most 5 s).
        let session = Session::new(
            AgentDriver::new(agent.clone(), config.ttl, written.clone()),
            config.backoff(),
        );
        let store = AgentStore {
            agent: agent.clone(),
            config: config.clone(),
            written,
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

    /// The configuration.
    pub fn config(&self) -> &ConsulConfig {
        &self.config
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
        let entries = Agent::decode(service, listing.entries);
        let feed = feed::HealthFeed::for_listing(&self.agent, service).await;
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
