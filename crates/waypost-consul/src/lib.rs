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
//! - **Registration** is `PUT /v1/agent/service/register` with the service ID
//!   `{service}:{id}` (Consul's IDs are unique per agent, waypost's per service), the
//!   check `service:{service}:{id}` registered *passing* (visible at once), and
//!   `DeregisterCriticalServiceAfter` (Consul's floor is 1 minute). The agent syncs the
//!   registration to the catalog before it answers, so `register` returning means a watcher
//!   lists the instance. A heartbeat task passes the check every third of the TTL. When
//!   the agent answers that the check is unknown (agent restarted — a `-dev` agent keeps no
//!   state — or the service was deregistered behind our back), it registers again by itself
//!   (status `Reregistering`, then `Registered`); when the agent is unreachable the status is
//!   `Suspended`. `update` re-registers with the same ID (the agent keeps its checks'
//!   current status). `deregister` is
//!   `PUT /v1/agent/service/deregister/{id}`.
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
//!   `AlreadyExists`.
//! - **Weight and zone**: the weight is `Weights.Passing`; Consul needs at least 1, so weight
//!   0 (draining) is also written as `Meta["waypost-weight"] = "0"`, the zone as
//!   `Meta["waypost-zone"]` (waypost reserves the `waypost-` and `consul-` prefixes). When
//!   the user's 64 metadata entries leave no room (Consul allows 64), these two go into
//!   tags `waypost-weight=0` / `waypost-zone=...` instead. Both are read back.
//! - **Watches** list with a blocking query (`index`, a `wait` jittered down by up to 10 %),
//!   reset the index when it goes backwards, back off on errors, and diff each list against
//!   the last one into `Added` / `Updated` / `Removed`, with `X-Consul-Index` as the
//!   revision. The watch runs in its own task, so it notices a lost agent even while the
//!   consumer is not polling. While a query blocks, the agent is pinged every `timeout`: a
//!   paused agent (which accepts connections and never answers) makes the watch `Stale`
//!   after at most two `timeout`s; refused connections (an agent restarting) get `timeout`
//!   to come back before the watch says `Stale`. When the agent answers again the watch
//!   yields `Resynced`; a list whose index went backwards (a restarted agent) is also
//!   delivered as `Resynced`, never as changes with falling revisions.
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
//!
//! # Dependencies
//!
//! A small client on `reqwest` (rustls with `ring`, OS trust store, HTTP/1.1, no system
//! proxy: the agent is local) and `serde`. The crates.io `consul` crate uses blocking
//! `reqwest` and panics inside a tokio runtime; `rs-consul` registers catalog entities
//! rather than agent services, has no TTL checks and times blocking queries out at 5 s.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

mod client;
mod codec;
mod config;
mod discovery;
mod error;
mod registrar;
mod watcher;

use std::sync::Arc;

use futures::future::BoxFuture;
use waypost_core::{Config, Connector, Discovery, Result};

pub use config::{ConsulConfig, DEFAULT_PORT, MAX_WAIT, MIN_DEREGISTER_CRITICAL_AFTER, SCHEMES};
pub use discovery::ConsulDiscovery;

/// The backend's canonical name, as `backend = "consul"` in configs.
pub const NAME: &str = "consul";

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
            let d = Arc::new(ConsulDiscovery::connect(ConsulConfig::from_config(config)?).await?);
            Ok(Discovery::new(d.clone(), d))
        })
    }
}
