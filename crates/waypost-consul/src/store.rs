//! The registration primitives: one **agent service** per instance, with its checks.
//!
//! - `write`: `PUT /v1/agent/service/register` (the agent syncs it to the catalog before
//!   it answers). The agent replaces a service of the same ID, so there is no "foreign"
//!   entry on one agent: a second registrant of one id replaces the first. The instance's
//!   liveness is an alias check of the client's heartbeat service (`heartbeat.rs`). A
//!   first registration starts the agent-run checks (HTTP / TCP) *passing*; a write that
//!   heals or updates a registration (`takeover`) starts them *critical* — for a check
//!   the agent already runs, it keeps the current status either way.
//! - `inspect_many`: once per keep-alive round, **one** `GET /v1/agent/services` reads back
//!   every instance the client holds (the heartbeat is the session's keep-alive, not a
//!   request per instance): an instance the agent lost (restarted, or deregistered behind
//!   our back) is [`Presence::Missing`], and the keeper registers it again.
//!   `inspect` (one instance) is `GET /v1/agent/service/{id}`.
//! - `delete`: `PUT /v1/agent/service/deregister/{id}`; an unknown service is success.

use std::fmt;

use async_trait::async_trait;
use waypost_core::backend::{Presence, RegistryStore};
use waypost_core::{Error, Instance, Result};

use crate::client::Agent;
use crate::codec::{self, AgentCheckStart, AgentService, HEARTBEAT_SERVICE};
use crate::config::ConsulConfig;
use crate::heartbeat::Heartbeat;
use crate::session::{AgentEpoch, Written};

/// The registration primitives over one agent.
pub(crate) struct AgentStore {
    pub(crate) agent: Agent,
    pub(crate) config: ConsulConfig,
    pub(crate) written: Written,
    pub(crate) heartbeat: Heartbeat,
}

impl fmt::Debug for AgentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulStore")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What the agent holds under an instance's service ID, compared with the instance.
fn presence(held: Option<AgentService>, instance: &Instance) -> Presence {
    match held {
        None => Presence::Missing,
        Some(held) => Presence::Ours {
            current: codec::decode_agent_service(held, &instance.service).as_ref() == Ok(instance),
        },
    }
}

#[async_trait]
impl RegistryStore for AgentStore {
    type Handle = AgentEpoch;

    async fn write(&self, _epoch: &AgentEpoch, instance: &Instance, takeover: bool) -> Result<()> {
        if instance.service.as_str() == HEARTBEAT_SERVICE {
            return Err(Error::invalid_input(format!(
                "service name `{HEARTBEAT_SERVICE}` is reserved for waypost's heartbeat services on Consul"
            )));
        }
        let start = if takeover {
            // An instance Consul removed after its health check failed for
            // `deregister_critical_after` must not come back into watches before that
            // check passes again.
            AgentCheckStart::Critical
        } else {
            // `register` returning means watchers list it.
            AgentCheckStart::Passing
        };
        // The alias check must find the heartbeat (an alias of a service the agent does
        // not hold is critical).
        self.heartbeat.ensure().await?;
        let reg = codec::encode(instance, &self.config, start, self.heartbeat.service_id());
        // Recorded first: a write whose outcome is unknown is released at close too.
        self.written.insert(&reg.id);
        Ok(self.agent.register(&reg).await?)
    }

    async fn inspect(&self, _epoch: &AgentEpoch, instance: &Instance) -> Result<Presence> {
        let service_id = codec::service_id(&instance.service, &instance.id);
        Ok(presence(self.agent.service(&service_id).await?, instance))
    }

    /// Agent services are not bound to the client's epoch: should one end (the driver
    /// reports no expiry today, so an epoch lasts the client's life), core's keeper
    /// carries its pending removals into the next.
    fn entries_outlive_session(&self) -> bool {
        true
    }

    /// Every `read_back_every`th round, and the next one after the heartbeat was noted
    /// gone (the agent restarted or lost it behind our back: so may the instances).
    fn read_back_round(&self, round: u64) -> bool {
        let due = round.is_multiple_of(u64::from(self.config.read_back_every.max(1)));
        // Taken even when due, so a request is not served twice.
        self.heartbeat.take_read_back_request() || due
    }

    async fn inspect_many(
        &self,
        _epoch: &AgentEpoch,
        instances: &[Instance],
    ) -> Result<Vec<Presence>> {
        if instances.is_empty() {
            return Ok(Vec::new());
        }
        let started = self.heartbeat.read_started();
        let mut held = self.agent.local_services().await?;
        if !held.contains_key(self.heartbeat.service_id()) {
            // The agent restarted (or the heartbeat was deregistered behind our back): the
            // instances healed next must find their heartbeat when their alias check starts.
            self.heartbeat.absent_from_read(started);
        }
        Ok(instances
            .iter()
            .map(|i| presence(held.remove(&codec::service_id(&i.service, &i.id)), i))
            .collect())
    }

    async fn delete(&self, _epoch: &AgentEpoch, instance: &Instance) -> Result<()> {
        let service_id = codec::service_id(&instance.service, &instance.id);
        self.agent.deregister(&service_id).await?;
        self.written.remove(&service_id);
        Ok(())
    }
}
