//! The session primitives: Consul has no session that agent services bind to, so a
//! client's session is **its agent**, as the client reaches it.
//!
//! - `open`: the agent answers (`GET /v1/status/leader`, which needs no ACL). The handle
//!   is an epoch, one per opened session.
//! - `keep_alive`: passes the client's heartbeat TTL check (`heartbeat.rs`; registered
//!   with the first instance, and again if the agent lost it), or pings the agent while
//!   the client has registered nothing; an error makes the session `Suspended` (and every
//!   registration with it). The agent never "expires" a session: when it loses services
//!   (a restarted agent keeps none of a `-dev` agent's, or Consul removed one whose check
//!   stayed critical), the store's read-back (`GET /v1/agent/services`, once per round)
//!   finds them missing and core's keeper registers them again.
//! - `close`: deregisters every agent service this client wrote and still holds, as the
//!   end of a session releases its entries on the other registries, then the heartbeat.
//!
//! Registrations stay alive by the client's one **TTL check** (the heartbeat's; each
//! instance has an alias check of it), passed once per keep-alive round: the interval is a
//! third of the TTL.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::backend::SessionDriver;
use waypost_core::{Error, Result};

use crate::client::Agent;
use crate::error::ConsulError;
use crate::heartbeat::Heartbeat;

/// One session of a client with its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AgentEpoch(u64);

/// The agent services (IDs) a client wrote and has not deleted: what closing its session
/// deregisters. Shared by the driver and the store. (Writes whose outcome is unknown are
/// core's keeper's: the store says agent services outlive the client's epochs, so its
/// pending removals carry from one epoch to the next.)
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
    pub(crate) heartbeat: Heartbeat,
    epochs: Arc<AtomicU64>,
}

impl fmt::Debug for AgentDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDriver")
            .field("agent", &self.agent)
            .field("ttl", &self.ttl)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

impl AgentDriver {
    pub(crate) fn new(agent: Agent, ttl: Duration, written: Written, heartbeat: Heartbeat) -> Self {
        Self {
            agent,
            ttl,
            written,
            heartbeat,
            epochs: Arc::new(AtomicU64::new(0)),
        }
    }
}

#[async_trait]
impl SessionDriver for AgentDriver {
    type Handle = AgentEpoch;

    async fn open(&self) -> Result<AgentEpoch> {
        self.agent.ping().await?;
        // A new epoch follows a keep-alive that failed: the agent may have restarted and
        // lost the heartbeat. The instances the keeper writes again register it first (an
        // alias check of a service the agent does not hold starts critical).
        self.heartbeat.lost();
        Ok(AgentEpoch(self.epochs.fetch_add(1, Ordering::Relaxed) + 1))
    }

    async fn keep_alive(&self, _epoch: &AgentEpoch) -> Result<()> {
        Ok(self.heartbeat.pass().await?)
    }

    async fn close(&self, _epoch: &AgentEpoch) -> Result<()> {
        let mut first_error: Option<Error> = None;
        for service_id in self.written.take() {
            if let Err(e) = self.agent.deregister(&service_id).await {
                tracing::warn!(%service_id, "consul: not deregistered at close; it leaves watches when its TTL runs out: {e}");
                first_error.get_or_insert(e.into());
            }
        }
        // Only once no instance is left: an instance left behind keeps its heartbeat,
        // which runs out a TTL later and takes it out of the passing set (and is reaped
        // after it).
        if first_error.is_some() {
            tracing::warn!("consul: the heartbeat service is left to run out, with the instances that were not deregistered");
        } else if let Err(e) = self.heartbeat.deregister().await {
            tracing::warn!("consul: the heartbeat service was not deregistered at close; Consul removes it after its check stays critical: {e}");
            first_error.get_or_insert(e.into());
        }
        first_error.map_or(Ok(()), Err)
    }

    fn interval(&self) -> Duration {
        self.ttl / 3
    }
}

/// Consul's shortest session TTL: the agent refuses shorter ones.
pub(crate) const MIN_SESSION_TTL: Duration = Duration::from_secs(10);

/// One Consul session (its ID), the handle of the coordination session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockSession(pub(crate) Arc<str>);

/// The session locks and leaderships are bound to: a real Consul session
/// (`/v1/session/...`), apart from the agent epoch registrations live by.
///
/// - `open`: `PUT /v1/session/create` with `TTL` (the client's `ttl`, at least Consul's
///   minimum of 10 s), `LockDelay`, `Behavior = release`, and **no health checks**
///   (`Checks = []`): only the TTL (or a destroy) ends it, so the holder's local deadline
///   ([`SessionDriver::bound`]) is the whole story. With the default `serfHealth` check a
///   node marked failed by the servers would lose its locks at once, before its holders
///   could know (what `api.Lock` warns about).
/// - `keep_alive`: `PUT /v1/session/renew/{id}`, a round trip to the servers' leader;
///   `404` is [`Error::SessionExpired`].
/// - `close`: `PUT /v1/session/destroy/{id}` (it releases every lock of the session).
#[derive(Clone)]
pub(crate) struct LockSessionDriver {
    pub(crate) agent: Agent,
    pub(crate) ttl: Duration,
    pub(crate) lock_delay: Duration,
}

impl fmt::Debug for LockSessionDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulLockSession")
            .field("ttl", &self.ttl)
            .field("lock_delay", &self.lock_delay)
            .finish_non_exhaustive()
    }
}

impl LockSessionDriver {
    pub(crate) fn new(agent: Agent, ttl: Duration, lock_delay: Duration) -> Self {
        Self {
            agent,
            ttl: ttl.max(MIN_SESSION_TTL),
            lock_delay,
        }
    }
}

/// Go's duration syntax in whole milliseconds, as Consul parses it.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[async_trait]
impl SessionDriver for LockSessionDriver {
    type Handle = LockSession;

    async fn open(&self) -> Result<LockSession> {
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let op = "create a session";
        let body = serde_json::json!({
            "Name": "waypost coordination",
            "TTL": go_duration(self.ttl),
            "LockDelay": go_duration(self.lock_delay),
            "Behavior": "release",
            "Checks": [],
        });
        let reply = self
            .agent
            .request_limited(
                op,
                reqwest::Method::PUT,
                "/v1/session/create",
                &[],
                Some(body.to_string().into_bytes()),
            )
            .await?;
        if reply.status != 200 {
            return Err(ConsulError::status(op, reply.status, &reply.body).into());
        }
        let created: Created = serde_json::from_slice(&reply.body)
            .map_err(|source| ConsulError::Decode { op, source })?;
        Ok(LockSession(created.id.into()))
    }

    async fn keep_alive(&self, session: &LockSession) -> Result<()> {
        let op = "renew the session";
        let reply = self
            .agent
            .request_limited(
                op,
                reqwest::Method::PUT,
                &format!("/v1/session/renew/{}", session.0),
                &[],
                None,
            )
            .await?;
        match reply.status {
            200 => Ok(()),
            404 => Err(Error::SessionExpired),
            s => Err(ConsulError::status(op, s, &reply.body).into()),
        }
    }

    async fn close(&self, session: &LockSession) -> Result<()> {
        let op = "destroy the session";
        let reply = self
            .agent
            .request_limited(
                op,
                reqwest::Method::PUT,
                &format!("/v1/session/destroy/{}", session.0),
                &[],
                None,
            )
            .await?;
        match reply.status {
            200 | 404 => Ok(()),
            s => Err(ConsulError::status(op, s, &reply.body).into()),
        }
    }

    fn interval(&self) -> Duration {
        self.ttl / 3
    }

    /// The session's TTL. Consul invalidates a session no earlier than its TTL after the
    /// last renewal it received (in practice up to twice the TTL: its timer is
    /// generous), so the TTL is the safe lower bound.
    fn bound(&self) -> Option<Duration> {
        Some(self.ttl)
    }
}
