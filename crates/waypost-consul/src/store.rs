//! The registration primitives: one **agent service** per instance, with its checks.
//!
//! - `write`: `PUT /v1/agent/service/register` (the agent syncs it to the catalog before
//!   it answers). The agent replaces a service of the same ID, so there is no "foreign"
//!   entry on one agent: a second registrant of one id replaces the first. A first
//!   registration starts the agent-run checks (HTTP / TCP) *passing*; a write that heals
//!   or updates a registration (`takeover`) starts them *critical* — for a check the agent
//!   already runs, it keeps the current status either way.
//! - `inspect`: the TTL heartbeat, `PUT /v1/agent/check/pass/{check}`. An unknown check
//!   means the agent lost the service (restarted, or deregistered behind our back):
//!   [`Presence::Missing`], and the keeper registers it again. Then
//!   `GET /v1/agent/service/{id}` checks that the agent holds exactly our instance.
//! - `delete`: `PUT /v1/agent/service/deregister/{id}`; an unknown service is success.

use std::fmt;

use async_trait::async_trait;
use waypost_core::backend::{Presence, RegistryStore};
use waypost_core::{Instance, Result};

use crate::client::Agent;
use crate::codec::{self, AgentCheckStart};
use crate::config::ConsulConfig;
use crate::session::{AgentEpoch, Written};

/// The registration primitives over one agent.
pub(crate) struct AgentStore {
    pub(crate) agent: Agent,
    pub(crate) config: ConsulConfig,
    pub(crate) written: Written,
}

impl fmt::Debug for AgentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulStore")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RegistryStore for AgentStore {
    type Handle = AgentEpoch;

    async fn write(&self, _epoch: &AgentEpoch, instance: &Instance, takeover: bool) -> Result<()> {
        let start = if takeover {
            // An instance Consul removed after its health check failed for
            // `deregister_critical_after` must not come back into watches before that
            // check passes again.
            AgentCheckStart::Critical
        } else {
            // `register` returning means watchers list it.
            AgentCheckStart::Passing
        };
        let reg = codec::encode(instance, &self.config, start);
        // Recorded first: a write whose outcome is unknown is released at close too.
        self.written.insert(&reg.id);
        Ok(self.agent.register(&reg).await?)
    }

    async fn inspect(&self, _epoch: &AgentEpoch, instance: &Instance) -> Result<Presence> {
        let check = codec::check_id(&instance.service, &instance.id);
        match self.agent.pass(&check).await {
            Ok(()) => {}
            Err(e) if e.is_unknown_check() => return Ok(Presence::Missing),
            Err(e) => return Err(e.into()),
        }
        let service_id = codec::service_id(&instance.service, &instance.id);
        Ok(match self.agent.service(&service_id).await? {
            None => Presence::Missing,
            Some(held) => Presence::Ours {
                current: codec::decode_agent_service(held, &instance.service).as_ref()
                    == Ok(instance),
            },
        })
    }

    async fn delete(&self, _epoch: &AgentEpoch, instance: &Instance) -> Result<()> {
        let service_id = codec::service_id(&instance.service, &instance.id);
        self.agent.deregister(&service_id).await?;
        self.written.remove(&service_id);
        Ok(())
    }
}
