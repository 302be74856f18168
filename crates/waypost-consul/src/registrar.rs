//! Registration: an agent service with a TTL check registered passing, a heartbeat task
//! per registration, and re-registration when the agent forgot it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::{watch, Mutex as AsyncMutex, Notify};
use waypost_core::{
    Backoff, Error, Instance, InstanceId, Registrar, Registration, RegistrationControl,
    RegistrationStatus, Result, ServiceName,
};

use crate::codec::{self, AgentCheckStart};
use crate::discovery::{ConsulDiscovery, Inner};
use crate::error::ConsulError;

/// What a registration's writers (the caller's `update`/`deregister`, the heartbeat
/// task's re-registration) share; the lock serialises their writes to the agent.
struct RegState {
    instance: Instance,
    done: bool,
}

struct Shared {
    client: Arc<Inner>,
    key: (ServiceName, InstanceId),
    service_id: String,
    check_id: String,
    state: AsyncMutex<RegState>,
    status: watch::Sender<RegistrationStatus>,
    stop: Notify,
}

impl Shared {
    fn set_status(&self, s: RegistrationStatus) {
        self.status.send_if_modified(|cur| {
            if *cur == s || *cur == RegistrationStatus::Deregistered {
                false
            } else {
                *cur = s;
                true
            }
        });
    }

    /// Writes the registration. `start` is the status of agent-run checks (HTTP / TCP)
    /// the agent does not have yet: the agent keeps the current status of a check it
    /// already runs (Consul 1.8 preserves it when a service is registered again), so an
    /// `update` neither lists an instance whose health check fails nor hides a healthy one.
    async fn write(&self, instance: &Instance, start: AgentCheckStart) -> Result<(), ConsulError> {
        let reg = codec::encode(instance, &self.client.config, start);
        self.client.agent.register(&reg).await
    }

    /// Removes the instance; final. Idempotent.
    async fn remove(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        if st.done {
            return Ok(());
        }
        st.done = true;
        self.stop.notify_one();
        self.status.send_replace(RegistrationStatus::Deregistered);
        self.client
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        if self.client.crashed() {
            return Ok(());
        }
        self.client
            .agent
            .deregister(&self.service_id)
            .await
            .map_err(|e| {
                tracing::warn!(service_id = %self.service_id, "consul: deregistration failed; the instance leaves watches when its TTL runs out: {e}");
                Error::from(e)
            })
    }

    /// One heartbeat round: pass the check, re-register if the agent forgot it.
    async fn beat(&self) -> Result<(), ConsulError> {
        match self.client.agent.pass(&self.check_id).await {
            Ok(()) => {
                self.set_status(RegistrationStatus::Registered);
                Ok(())
            }
            Err(e) if e.is_unknown_check() => {
                let st = self.state.lock().await;
                if st.done {
                    return Ok(());
                }
                tracing::info!(service_id = %self.service_id, "consul: the agent lost the registration, registering again");
                self.set_status(RegistrationStatus::Reregistering);
                // Agent-run checks start critical here: an instance Consul removed after
                // its health check failed for `deregister_critical_after` must not come
                // back into watches before that check passes again.
                self.write(&st.instance, AgentCheckStart::Critical).await?;
                self.set_status(RegistrationStatus::Registered);
                Ok(())
            }
            Err(e) => {
                if !e.is_transport() {
                    // Refused (a revoked token, an agent error): the check is not being
                    // kept up either.
                    tracing::warn!(service_id = %self.service_id, "consul: heartbeat refused: {e}");
                }
                if *self.status.borrow() == RegistrationStatus::Registered {
                    self.set_status(RegistrationStatus::Suspended);
                }
                Err(e)
            }
        }
    }
}

/// The heartbeat task: passes the check every third of the TTL (first beat at a random
/// phase, so many registrations spread out), backs off on errors without ever giving up.
async fn keep_alive(shared: Arc<Shared>) {
    let ttl = shared.client.config.ttl;
    let period = ttl / 3;
    let mut backoff = Backoff::new(Duration::from_millis(100), period);
    let mut delay = period.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.notified() => return,
        }
        if shared.client.crashed() || shared.state.lock().await.done {
            return;
        }
        delay = match shared.beat().await {
            Ok(()) => {
                backoff.reset();
                period
            }
            Err(e) => {
                tracing::debug!(service_id = %shared.service_id, error = ?e, "consul: heartbeat failed");
                backoff.next_delay().min(period)
            }
        };
    }
}

struct Control(Arc<Shared>);

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistration")
            .field("service_id", &self.0.service_id)
            .finish()
    }
}

#[async_trait]
impl RegistrationControl for Control {
    async fn update(&self, instance: Instance) -> Result<()> {
        self.0.client.check_alive()?;
        let mut st = self.0.state.lock().await;
        if st.done {
            return Err(Error::Closed {
                what: "registration",
            });
        }
        // Re-registering with the same ID replaces the service; the agent keeps the
        // current status of its checks.
        self.0.write(&instance, AgentCheckStart::Passing).await?;
        st.instance = instance;
        Ok(())
    }

    async fn deregister(&self) -> Result<()> {
        self.0.remove().await
    }

    fn deregister_in_background(&self) {
        let shared = self.0.clone();
        shared.stop.notify_one();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = shared.remove().await;
                });
            }
            Err(_) => tracing::warn!(
                service_id = %shared.service_id,
                "consul: registration dropped outside a tokio runtime; it leaves watches when its TTL runs out"
            ),
        }
    }
}

#[async_trait]
impl Registrar for ConsulDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        instance.validate()?;
        let client = &self.inner;
        client.check_alive()?;
        let key = (instance.service.clone(), instance.id.clone());
        if !client
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return Err(Error::AlreadyExists {
                what: format!(
                    "instance `{}` of service `{}` is already registered by this client",
                    key.1, key.0
                ),
            });
        }
        let (tx, rx) = watch::channel(RegistrationStatus::Registered);
        let shared = Arc::new(Shared {
            client: client.clone(),
            service_id: codec::service_id(&key.0, &key.1),
            check_id: codec::check_id(&key.0, &key.1),
            key: key.clone(),
            state: AsyncMutex::new(RegState {
                instance: instance.clone(),
                done: false,
            }),
            status: tx,
            stop: Notify::new(),
        });
        if let Err(e) = shared.write(&instance, AgentCheckStart::Passing).await {
            client
                .registered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            return Err(e.into());
        }
        tokio::spawn(keep_alive(shared.clone()));
        Ok(Registration::new(instance, rx, Box::new(Control(shared))))
    }
}
