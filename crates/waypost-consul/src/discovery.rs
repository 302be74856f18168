//! [`ConsulDiscovery`]: one connection to a Consul agent, implementing
//! [`Registrar`](waypost_core::Registrar) and [`Watcher`](waypost_core::Watcher).

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use waypost_core::{Error, InstanceId, Result, ServiceName};

use crate::client::{AclState, Agent};
use crate::config::ConsulConfig;
use crate::error::ConsulError;

pub(crate) struct Inner {
    pub(crate) agent: Agent,
    pub(crate) config: ConsulConfig,
    /// (service, id) of the live registrations of this client.
    pub(crate) registered: Mutex<HashSet<(ServiceName, InstanceId)>>,
    /// Test hook: the "process" crashed; heartbeats stop, nothing is deregistered.
    pub(crate) crashed: AtomicBool,
    /// The ACL state found by the first check, cached.
    pub(crate) acl: Mutex<Option<AclState>>,
}

impl Inner {
    pub(crate) fn crashed(&self) -> bool {
        self.crashed.load(Ordering::Acquire)
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.crashed() {
            Err(Error::Closed {
                what: "consul client (crashed by a test hook)",
            })
        } else {
            Ok(())
        }
    }

    /// Makes sure reads are authorized before trusting an answer: with ACLs on, an
    /// unauthorized health query answers `200 []`, which must not pass for "no instances".
    /// `fresh` re-checks instead of using the cached result.
    pub(crate) async fn check_read_access(&self, fresh: bool) -> Result<AclState> {
        if !fresh {
            if let Some(s) = *self.acl.lock().unwrap_or_else(|p| p.into_inner()) {
                return Ok(s);
            }
        }
        match self.agent.acl_state().await {
            Ok(s) => {
                *self.acl.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                Ok(s)
            }
            Err(ConsulError::Status { status: 403, .. }) if self.config.token.is_none() => {
                Err(Error::Unauthorized {
                    message: "the consul agent has ACLs enabled and no `token` is configured: \
                              it would answer every health query with an empty list"
                        .into(),
                    source: None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A connection to one Consul agent: registers instances as agent services with a TTL
/// check it keeps passing, and watches services with blocking health queries.
///
/// Cheap to clone; clones share the HTTP connection pool and the registrations.
#[derive(Clone)]
pub struct ConsulDiscovery {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ConsulDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDiscovery")
            .field("config", &self.inner.config)
            .field(
                "registrations",
                &self
                    .inner
                    .registered
                    .lock()
                    .map(|r| r.len())
                    .unwrap_or_default(),
            )
            .finish()
    }
}

impl ConsulDiscovery {
    /// Connects: checks that the agent answers (within the configured timeouts) and knows
    /// the configured datacenter. Registrations and watches start later, per call.
    pub async fn connect(config: ConsulConfig) -> Result<Self> {
        let d = Self::new(config)?;
        let agent = &d.inner.agent;
        agent.ping().await?;
        if let Some(dc) = &d.inner.config.datacenter {
            let known = agent.datacenters().await?;
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
        Ok(Self {
            inner: Arc::new(Inner {
                agent: Agent::new(&config)?,
                config,
                registered: Mutex::new(HashSet::new()),
                crashed: AtomicBool::new(false),
                acl: Mutex::new(None),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsulConfig {
        &self.inner.config
    }

    /// **Test-only fault injection**: this client "crashes". Its heartbeats stop and
    /// nothing is deregistered, so Consul marks its instances critical after their TTL
    /// (they leave `passing` watches) and removes them after `deregister_critical_after`;
    /// every later call fails with [`Error::Closed`]. Not for production use.
    #[doc(hidden)]
    pub fn crash_for_tests(&self) {
        self.inner.crashed.store(true, Ordering::Release);
    }
}
