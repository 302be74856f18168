//! The client's heartbeat: **one** TTL check per client, whatever the number of instances
//! it registers.
//!
//! Each client registers a hidden agent service, `waypost-heartbeat` with the ID
//! `waypost-heartbeat:{random}`, whose one TTL check (`{id}:ttl`) the session's keep-alive
//! passes every third of the TTL. Every instance carries an **alias check** of it
//! (`AliasService`), which the agent keeps in the heartbeat check's state: when the client
//! stops passing it (a crash), its TTL runs out and every instance of the client leaves
//! the passing set at once. The agent does its per-check-update work once per keep-alive
//! round, not once per instance.
//!
//! - `ensure`: before the client's first instance is written, `PUT
//!   /v1/agent/service/register` with the TTL check passing (once; concurrent first
//!   registrations wait for the one request). A client that registers nothing (a watcher,
//!   the CLI) has no heartbeat service.
//! - `pass`: `PUT /v1/agent/check/pass/{id}:ttl` once the heartbeat exists (else a ping);
//!   an unknown check (agent restarted, or the service deregistered behind our back)
//!   registers the service again.
//! - `lost`: the keeper's read-back of the agent's services did not find the heartbeat, or
//!   the session opens a new epoch after a failed keep-alive (agent restarted): the
//!   instances it re-registers next register the heartbeat first.
//!   An alias check of a service the agent does not hold is *critical* ("could not be
//!   found on node"), so an instance written before its heartbeat would leave the passing
//!   set until the keep-alive's next `pass` put the heartbeat back.
//! - `deregister`: at the session's close, after the instances.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::client::Agent;
use crate::codec::{self, HEARTBEAT_SERVICE};
use crate::config::ConsulConfig;
use crate::error::ConsulError;

/// One client's heartbeat service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Heartbeat {
    agent: Agent,
    config: Arc<ConsulConfig>,
    service_id: Arc<str>,
    /// Whether the heartbeat was registered (and not deregistered at close since).
    registered: Arc<AtomicBool>,
    /// Whether the agent may not hold it (noted gone since it was last registered).
    missing: Arc<AtomicBool>,
    /// How many times it was noted gone: a registration clears `missing` only if no loss
    /// was noted while its request ran.
    losses: Arc<AtomicU64>,
    /// How many registrations were sent, and how many the agent accepted.
    attempts: Arc<AtomicU64>,
    registrations: Arc<AtomicU64>,
    /// Held while it is being registered: an instance write waits for a registration in
    /// flight, so it never reaches the agent before its heartbeat.
    registering: Arc<tokio::sync::Mutex<()>>,
    /// Set when the heartbeat is noted gone: the keeper's next round reads the instances
    /// back whatever its cadence (`read_back_every`), since the agent may have lost them too.
    read_back: Arc<AtomicBool>,
    /// **Test hook.** While set, the keep-alive's `pass` sends nothing (see
    /// `ConsulDiscovery::hold_heartbeat_passes`).
    #[cfg(feature = "test-hooks")]
    pub(crate) passes_held: Arc<AtomicBool>,
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("service_id", &self.service_id)
            .finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// A heartbeat with a fresh random ID (nothing is sent yet).
    pub(crate) fn new(agent: &Agent, config: &ConsulConfig) -> Self {
        Self {
            agent: agent.clone(),
            config: Arc::new(config.clone()),
            service_id: format!("{HEARTBEAT_SERVICE}:{:016x}", rand::random::<u64>()).into(),
            registered: Arc::new(AtomicBool::new(false)),
            missing: Arc::new(AtomicBool::new(false)),
            losses: Arc::new(AtomicU64::new(0)),
            attempts: Arc::new(AtomicU64::new(0)),
            registrations: Arc::new(AtomicU64::new(0)),
            registering: Arc::new(tokio::sync::Mutex::new(())),
            read_back: Arc::new(AtomicBool::new(false)),
            #[cfg(feature = "test-hooks")]
            passes_held: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The heartbeat service's ID (what the instances' alias checks name).
    pub(crate) fn service_id(&self) -> &str {
        &self.service_id
    }

    /// Registers the heartbeat service, its TTL check passing. Called with `registering`
    /// held.
    async fn register_locked(&self) -> Result<(), ConsulError> {
        let reg = codec::heartbeat_registration(&self.service_id, &self.config);
        let losses = self.losses.load(Ordering::Acquire);
        self.attempts.fetch_add(1, Ordering::AcqRel);
        self.agent.register(&reg).await?;
        self.registrations.fetch_add(1, Ordering::AcqRel);
        self.registered.store(true, Ordering::Release);
        if self.losses.load(Ordering::Acquire) == losses {
            self.missing.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// How many times the agent accepted the heartbeat's registration.
    pub(crate) fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Acquire)
    }

    /// Marks the heartbeat as possibly gone from the agent; `true` if it was not marked.
    fn note_missing(&self) -> bool {
        self.losses.fetch_add(1, Ordering::AcqRel);
        self.read_back.store(true, Ordering::Release);
        !self.missing.swap(true, Ordering::AcqRel)
    }

    /// Whether the heartbeat was noted gone since the last call: the instances should be
    /// read back now.
    pub(crate) fn take_read_back_request(&self) -> bool {
        self.read_back.swap(false, Ordering::AcqRel)
    }

    /// Whether the agent holds the heartbeat, as far as this client knows.
    fn held(&self) -> bool {
        self.registered.load(Ordering::Acquire) && !self.missing.load(Ordering::Acquire)
    }

    /// Registers the heartbeat service unless the agent holds it already (before an
    /// instance's write).
    pub(crate) async fn ensure(&self) -> Result<(), ConsulError> {
        if self.held() {
            return Ok(());
        }
        let _one = self.registering.lock().await;
        if self.held() {
            return Ok(());
        }
        self.register_locked().await
    }

    /// Passes the TTL check, or only pings the agent while the client has no heartbeat;
    /// registers the service again when the agent does not know it.
    pub(crate) async fn pass(&self) -> Result<(), ConsulError> {
        #[cfg(feature = "test-hooks")]
        if self.passes_held.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.registered.load(Ordering::Acquire) {
            return self.agent.ping().await;
        }
        if self.missing.load(Ordering::Acquire) {
            return self.ensure().await;
        }
        match self
            .agent
            .pass(&codec::heartbeat_check_id(&self.service_id))
            .await
        {
            Err(e) if e.is_unknown_check() => {
                if self.note_missing() {
                    tracing::info!(service_id = %self.service_id, "consul: the agent lost this client's heartbeat service; registering it again");
                }
                self.ensure().await
            }
            other => other,
        }
    }

    /// Notes that the agent may no longer hold the heartbeat service (a read-back of its
    /// services did not find it, or a new epoch follows a failed keep-alive): the next
    /// instance write or keep-alive registers it again first, so an instance's alias check
    /// finds it from the start.
    pub(crate) fn lost(&self) {
        if self.registered.load(Ordering::Acquire) && self.note_missing() {
            tracing::info!(service_id = %self.service_id, "consul: the agent may have lost this client's heartbeat service; it is registered again before the instances");
        }
    }

    /// Where a read-back of the agent's services starts: pass it to
    /// [`Heartbeat::absent_from_read`] if the answer does not list the heartbeat.
    pub(crate) fn read_started(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// A read-back that started at `started` did not list the heartbeat: it is lost,
    /// unless a registration was in flight or sent since (the read may predate it).
    pub(crate) fn absent_from_read(&self, started: u64) {
        let in_flight = self.registering.try_lock().is_err();
        if !in_flight && self.attempts.load(Ordering::Acquire) == started {
            self.lost();
        }
    }

    /// Deregisters the heartbeat service (an unknown one is fine), if it was registered.
    pub(crate) async fn deregister(&self) -> Result<(), ConsulError> {
        if self.registered.swap(false, Ordering::AcqRel) {
            self.agent.deregister(&self.service_id).await?;
        }
        Ok(())
    }
}
