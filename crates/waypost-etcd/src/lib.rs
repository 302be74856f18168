//! The etcd backend of waypost: instances are keys bound to a lease, watches are
//! revisioned prefix watches.
//!
//! Connect with a URL (`etcd://host:port[,host:port...]/prefix`, default prefix
//! `/services`) or an [`EtcdConfig`], register instances and watch services through
//! waypost's [`Registrar`](waypost_core::Registrar) and
//! [`Watcher`](waypost_core::Watcher):
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
//! - **Keys**: `{prefix}/{service}/{id}`, value the instance as JSON. With
//!   `layout = "grpc"` the layout of gRPC-Go's etcd naming resolver instead:
//!   `{prefix}/{service}/{host:port}` → `{"Op":0,"Addr":"host:port","Metadata":{...}}`.
//! - **Liveness**: one lease per [`EtcdDiscovery`] (asked TTL `lease_ttl`, 10 s by
//!   default; etcd may round it up, see [`EtcdDiscovery::granted_ttl`]), kept alive at a
//!   third of its TTL. A key is created with a transaction that requires it not to exist
//!   (`create_revision == 0`), so two registrants cannot overwrite one id: the second gets
//!   [`Error::AlreadyExists`](waypost_core::Error::AlreadyExists). A process restarted
//!   within its old lease's TTL gets the same until that lease runs out.
//! - **Healing**: when etcd reports the lease gone (keep-alive TTL 0, lease not found) a
//!   new lease is granted and every live registration written again, with jittered
//!   backoff and no retry cap; the status goes `Reregistering` → `Registered`. While
//!   keep-alives go unanswered the status is `Suspended`.
//! - **Watching**: a prefix `get` gives the snapshot and its revision; a prefix watch from
//!   the next revision gives each change as one event (O(1) per change whatever the
//!   service's size). A dropped stream is resumed from the last revision + 1 (no loss, no
//!   duplicate). If that revision was compacted, or etcd stays unreachable (an idle watch
//!   sends a progress request every `probe_interval` and expects an answer within
//!   `request_timeout`), the watch yields `Stale` and, once etcd answers, `Resynced` with
//!   a fresh snapshot. Values that are not instances are skipped with a warning.
//! - **Shutdown**: `deregister()` deletes the key (only if still bound to our lease);
//!   [`EtcdDiscovery::shutdown`], or dropping the last handle, revokes the lease.
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
mod registrar;
mod session;
mod watcher;

use std::sync::Arc;

use futures::future::BoxFuture;
use waypost_core::{Config, Connector, Discovery, Result};

pub use client::EtcdDiscovery;
pub use codec::MAX_VALUE_LEN;
pub use config::{EtcdConfig, Layout, DEFAULT_PORT};

/// The URL schemes (and `backend` names) of this backend.
pub const SCHEMES: &[&str] = &["etcd"];

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
            let d = Arc::new(EtcdDiscovery::connect(EtcdConfig::from_config(config)?).await?);
            Ok(Discovery::new(d.clone(), d))
        })
    }
}
