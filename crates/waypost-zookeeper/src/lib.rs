//! The ZooKeeper backend of waypost: instances as ephemeral nodes in Apache Curator
//! x-discovery's layout and JSON, so Java services (Curator, Spring Cloud Zookeeper) and
//! Rust services find each other; watches that cost one read per change.
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
//!   recognised by its `ephemeralOwner` (or guid) and counts as registered.
//! - **Re-registration**: on disconnect registrations turn `Suspended`; after a session
//!   expiry the client is replaced by a new session and every live registration is
//!   created again (jittered backoff, no cap), `Reregistering` then `Registered`.
//! - **Watching**: one persistent recursive watch (`addWatch`, ZooKeeper ≥ 3.6) per
//!   watched service; each change reads only the node that changed, so the cost of a
//!   change does not grow with the size of the service. Disconnect → `Stale`; reconnect
//!   → the watch is added again (the client does not re-add persistent watches) and the
//!   service re-listed → `Resynced`. After a session expiry likewise on the new session.
//!   On servers older than 3.6 (`addWatch` answers `Unimplemented`) the watch falls back
//!   to a child watch on the service node plus a data watch per instance node: a change
//!   of the children costs one listing of the names and a read of each new node.
//! - **ACLs**: with digest credentials ([`ZkConfig::username`]/`password`, or
//!   `zk://user:password@host/root`), instance nodes are readable by everyone and
//!   writable/deletable only by those credentials; service nodes let everyone read and
//!   create children but only those credentials delete them (ZooKeeper checks `DELETE` on
//!   the parent), so all registrants of one service should share credentials.
//!
//! # Dependencies
//! The client is [`zookeeper-client`](https://crates.io/crates/zookeeper-client): a pure
//! async Rust client that speaks ZooKeeper 3.4–3.9 including persistent recursive
//! watches, multi, digest ACLs, SASL and TLS. It runs on tokio through its `tokio`
//! feature.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

pub mod codec;
mod config;
mod error;
mod nodes;
mod registrar;
mod session;
mod watcher;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use waypost_core::{Config, Connector, Discovery, Result};

pub use config::{NodeLayout, PayloadFormat, ZkConfig, DEFAULT_PORT, DEFAULT_ROOT};

use session::Inner;

/// The URL schemes (and backend names) of this backend.
pub const SCHEMES: &[&str] = &["zookeeper", "zk"];

/// A connection to ZooKeeper: implements [`Registrar`](waypost_core::Registrar) and
/// [`Watcher`](waypost_core::Watcher). Cheap to clone; clones share the session.
///
/// The session lives as long as this value, its registrations or its watch streams do;
/// when the last of them goes, the session is closed (its remaining ephemeral nodes go
/// at once).
#[derive(Clone)]
pub struct ZkDiscovery {
    inner: Arc<Inner>,
}

impl fmt::Debug for ZkDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let regs = self.inner.lock().regs.len();
        f.debug_struct("ZkDiscovery")
            .field("config", &self.inner.config)
            .field("session", &self.session_id().map(|s| format!("{s:#x}")))
            .field("registrations", &regs)
            .finish()
    }
}

impl ZkDiscovery {
    /// Connects as configured; fails within [`ZkConfig::connect_timeout`] when no server
    /// answers.
    pub async fn connect(config: ZkConfig) -> Result<Self> {
        let client = session::open_client(&config).await?;
        let inner = Inner::new(config, client);
        tokio::spawn(session::session_task(
            Arc::downgrade(&inner),
            inner.kick.clone(),
        ));
        Ok(Self { inner })
    }

    /// Connects to the registry a `zk://` URL names.
    pub async fn from_url(url: &str) -> Result<Self> {
        Self::connect(ZkConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZkConfig {
        &self.inner.config
    }

    /// The current ZooKeeper session id, if the client is not shut down.
    pub fn session_id(&self) -> Option<i64> {
        self.inner.current().ok().map(|c| c.session_id())
    }

    /// The negotiated session timeout of the current session.
    pub fn session_timeout(&self) -> Option<Duration> {
        self.inner
            .current()
            .ok()
            .map(|c| c.client.session_timeout())
    }

    /// **Test only.** The current session's id and password, to inject faults (another
    /// connection on the same session).
    #[doc(hidden)]
    pub fn session_info(&self) -> Option<zookeeper_client::SessionInfo> {
        self.inner
            .current()
            .ok()
            .map(|c| c.client.session().clone())
    }

    /// **Test only.** Simulates a crash of this process: the connection is dropped without
    /// closing the session or deleting anything, every background task stops, later calls
    /// fail with `Closed`. The server removes the instances when the session times out.
    #[doc(hidden)]
    pub fn simulate_crash(&self) {
        self.inner
            .crashed
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.conn.send_replace(None);
        self.inner.kick.notify_waiters();
        self.inner.kick.notify_one();
    }

    /// **Test only.** New watches use the fallback for servers older than 3.6 (child
    /// and data watches) even where persistent recursive watches exist.
    #[doc(hidden)]
    pub fn use_child_watches(&self) {
        self.inner
            .child_watches
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// **Test only.** How many times the session was replaced after an expiry (0 for
    /// the first session); `None` once shut down or crashed.
    #[doc(hidden)]
    pub fn session_generation(&self) -> Option<u64> {
        self.inner.current().ok().map(|c| c.generation)
    }

    /// **Test only.** Whether the current session is over (expired, closed or refused)
    /// and not yet replaced.
    #[doc(hidden)]
    pub fn session_lost(&self) -> bool {
        self.inner
            .current()
            .map_or(true, |c| c.client.state().is_terminated())
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
            let d = Arc::new(ZkDiscovery::connect(ZkConfig::from_config(config)?).await?);
            Ok(Discovery::new(d.clone(), d))
        })
    }
}
