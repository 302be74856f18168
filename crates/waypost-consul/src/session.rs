//! The session primitives: Consul has no session that agent services bind to, so a
//! client's session is **its agent**, as the client reaches it.
//!
//! - `open`: the agent answers (`GET /v1/status/leader`, which needs no ACL). The handle
//!   is an epoch, one per opened session.
//! - `keep_alive`: the agent still answers; an error makes the session `Suspended` (and
//!   every registration with it). The agent never "expires" a session: when it loses
//!   services (a restarted agent keeps none of a `-dev` agent's, or Consul removed one
//!   whose check stayed critical), the store's per-registration heartbeat finds them
//!   missing and core's keeper registers them again.
//! - `close`: deregisters every agent service this client wrote and still holds, as the
//!   end of a session releases its entries on the other registries.
//!
//! Each registration stays alive by its own **TTL check**, passed by
//! [`RegistryStore::inspect`](waypost_core::backend::RegistryStore::inspect) once per
//! keep-alive round: the interval is a third of the TTL.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::backend::SessionDriver;
use waypost_core::{Error, Result};

use crate::client::Agent;

/// One session of a client with its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AgentEpoch(u64);

/// The agent services (IDs) a client wrote and has not deleted: what closing its session
/// deregisters. Shared by the driver and the store.
#[derive(Clone, Debug, Default)]
pub(crate) struct Written(Arc<Mutex<HashSet<String>>>);

impl Written {
    pub(crate) fn insert(&self, service_id: &str) {
        self.lock().insert(service_id.to_string());
    }

    pub(crate) fn remove(&self, service_id: &str) {
        self.lock().remove(service_id);
    }

    fn take(&self) -> Vec<String> {
        self.lock().drain().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The session driver over one agent.
#[derive(Clone)]
pub(crate) struct AgentDriver {
    pub(crate) agent: Agent,
    pub(crate) ttl: Duration,
    pub(crate) written: Written,
    epochs: Arc<AtomicU64>,
}

impl fmt::Debug for AgentDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDriver")
            .field("agent", &self.agent)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl AgentDriver {
    pub(crate) fn new(agent: Agent, ttl: Duration, written: Written) -> Self {
        Self {
            agent,
            ttl,
            written,
            epochs: Arc::new(AtomicU64::new(0)),
        }
    }
}

#[async_trait]
impl SessionDriver for AgentDriver {
    type Handle = AgentEpoch;

    async fn open(&self) -> Result<AgentEpoch> {
        self.agent.ping().await?;
        Ok(AgentEpoch(self.epochs.fetch_add(1, Ordering::Relaxed) + 1))
    }

    async fn keep_alive(&self, _epoch: &AgentEpoch) -> Result<()> {
        Ok(self.agent.ping().await?)
    }

    async fn close(&self, _epoch: &AgentEpoch) -> Result<()> {
        let mut first_error: Option<Error> = None;
        for service_id in self.written.take() {
            if let Err(e) = self.agent.deregister(&service_id).await {
                tracing::warn!(%service_id, "consul: not deregistered at close; it leaves watches when its TTL runs out: {e}");
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn interval(&self) -> Duration {
        self.ttl / 3
    }
}
