//! The in-memory backend (`memory://`): the embedded default.
//!
//! Full waypost semantics in one process: sessions with TTL-based liveness, revisions,
//! snapshot-then-changes watches, re-registration after session expiry, `Stale` and
//! resync when the registry is unreachable. Fault injection on [`MemoryRegistry`]
//! (`expire_session`, `set_reachable`) and [`MemoryClient::kill`] exercise those paths
//! without a server.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> waypost_core::Result<()> {
//! use waypost_core::{Instance, Registrar, Watcher};
//! use waypost_core::memory::MemoryRegistry;
//!
//! let registry = MemoryRegistry::new("doc");
//! let client = registry.client(std::time::Duration::from_secs(10));
//! let reg = client.register(Instance::parse("greeter", "g-1", "127.0.0.1", 8001)?).await?;
//! let snap = client.instances(&"greeter".parse()?).await?;
//! assert_eq!(snap.len(), 1);
//! reg.deregister().await?;
//! assert!(client.instances(&"greeter".parse()?).await?.is_empty());
//! # Ok(()) }
//! ```

pub(crate) mod backend;
mod client;
mod coord;
#[cfg(test)]
mod coord_tests;
mod kv;
mod registry;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use client::MemoryClient;
pub use coord::{LeaderFeed as MemoryLeaderFeed, MemoryCoord, Ticket as MemoryTicket};
pub use kv::{KvFeed as MemoryKvFeed, MemoryKv, MAX_VALUE_LEN};
pub use registry::{MemoryRegistry, SessionId};

use crate::config::{self, Config, Connector, Discovery, RegistryUrl};
use crate::error::{Error, Result};

/// The URL scheme of the memory backend.
pub const SCHEME: &str = "memory";

/// Configuration of a memory client: `memory://[NAME][?ttl=10s]`, or in serde form
/// `backend = "memory"`, `name = "..."`, `ttl = "10s"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Which process-wide registry to join; `default` unless named.
    pub name: String,
    /// How long a registration lives without a heartbeat (the client heartbeats every
    /// quarter of it). 10 s by default.
    #[serde(with = "crate::config::duration")]
    pub ttl: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            ttl: Duration::from_secs(10),
        }
    }
}

impl MemoryConfig {
    /// Parses `memory://[NAME][?ttl=...]`.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&Config::from_url(url))
    }

    /// Builds from a [`Config`] (URL and/or options).
    pub fn from_config(config: &Config) -> Result<Self> {
        let url = config.url.as_deref().map(RegistryUrl::parse).transpose()?;
        if let Some(u) = &url {
            if u.scheme != SCHEME {
                return Err(Error::invalid_config(format!(
                    "memory config got a `{}` URL",
                    u.scheme
                )));
            }
            if u.hosts.len() > 1 || u.hosts.iter().any(|(_, p)| p.is_some()) || !u.path.is_empty() {
                return Err(Error::invalid_config(
                    "memory URL takes only a registry name: memory://[NAME][?ttl=10s]",
                ));
            }
        }
        let mut options = config::merged_options(url.as_ref(), config)?;
        if let Some((host, _)) = url.as_ref().and_then(|u| u.hosts.first()) {
            options
                .entry("name")
                .or_insert_with(|| serde_json::Value::String(host.clone()));
        }
        let c: Self = config::options_into(SCHEME, options)?;
        if c.name.is_empty() {
            return Err(Error::invalid_config(
                "memory option `name` may not be empty",
            ));
        }
        Ok(c)
    }

    /// Sets the registry name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// A client of the named process-wide registry.
    pub fn client(&self) -> MemoryClient {
        registry(&self.name).client(self.ttl)
    }
}

/// The process-wide registry called `name`, created on first use. `memory://` is
/// `registry("default")`.
pub fn registry(name: &str) -> MemoryRegistry {
    static REGISTRIES: OnceLock<Mutex<HashMap<String, MemoryRegistry>>> = OnceLock::new();
    let map = REGISTRIES.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(name.to_string())
        .or_insert_with(|| MemoryRegistry::new(name))
        .clone()
}

/// The memory backend's [`Connector`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryConnector;

impl Connector for MemoryConnector {
    fn name(&self) -> &'static str {
        SCHEME
    }

    fn schemes(&self) -> &'static [&'static str] {
        &[SCHEME]
    }

    fn connect<'a>(&'a self, config: &'a Config) -> BoxFuture<'a, Result<Discovery>> {
        Box::pin(async move { Ok(MemoryConfig::from_config(config)?.client().into_discovery()) })
    }
}

#[cfg(test)]
mod tests;
