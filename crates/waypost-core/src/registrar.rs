//! The `Registrar` trait and the `Registration` guard it hands out.

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::model::Instance;

/// Announces instances to a registry.
///
/// Object-safe: libraries take an `Arc<dyn Registrar>`; only binaries choose the backend.
///
/// # Contract
///
/// - [`register`](Registrar::register) validates the instance ([`Instance::validate`]):
///   invalid input is [`Error::InvalidInput`] and nothing is written. It returns once the
///   registry holds the instance, so a watcher that starts afterwards lists it.
/// - Registering an id that a live registration of another party holds is
///   [`Error::AlreadyExists`]; registries that cannot tell (Consul's agent services)
///   document that they replace it.
/// - The returned [`Registration`] is a live guard. While it is held, the backend keeps
///   the instance alive (session, lease or TTL heartbeat) in the background, and whenever
///   the registry loses it (session expired, lease lost, agent restarted) it registers it
///   again by itself, with jittered exponential backoff, for as long as the guard lives:
///   there is no retry cap after which the instance silently disappears. Every step is
///   visible on [`Registration::status`].
/// - [`Registration::deregister`] removes the instance and returns once the registry
///   confirmed it. Dropping the guard deregisters in the background, best effort; if the
///   process dies instead, the registry drops the instance when its session, lease or TTL
///   runs out.
#[async_trait]
pub trait Registrar: Debug + Send + Sync {
    /// Registers `instance` and keeps it registered until the guard is dropped.
    async fn register(&self, instance: Instance) -> Result<Registration>;
}

#[async_trait]
impl<T: Registrar + ?Sized> Registrar for Arc<T> {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        (**self).register(instance).await
    }
}

#[async_trait]
impl<T: Registrar + ?Sized> Registrar for Box<T> {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        (**self).register(instance).await
    }
}

/// Where a registration stands, as seen by the process that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistrationStatus {
    /// The registry holds the instance and its liveness is being kept up.
    Registered,
    /// The connection to the registry is lost; the registry may still hold the instance
    /// (its session or lease has not run out yet).
    Suspended,
    /// The registry lost the instance (session expired, lease lost, agent restarted) and
    /// it is being registered again.
    Reregistering,
    /// Deregistered, by [`Registration::deregister`] or by dropping the guard. Final.
    Deregistered,
}

/// What a backend implements behind a [`Registration`]: the registration's own background
/// task lives in the backend; this is how the guard talks to it.
#[async_trait]
pub trait RegistrationControl: Debug + Send + Sync {
    /// Replaces the registered instance (same service and id; already validated).
    async fn update(&self, instance: Instance) -> Result<()>;

    /// Removes the instance from the registry and stops keeping it alive; returns when the
    /// registry confirmed the removal.
    async fn deregister(&self) -> Result<()>;

    /// Called when the guard is dropped without [`Registration::deregister`]: start the
    /// removal in the background and return at once. Must not panic outside a runtime.
    fn deregister_in_background(&self);
}

/// A live registration; see [`Registrar`]'s contract. Dropping it deregisters.
pub struct Registration {
    instance: Instance,
    status: watch::Receiver<RegistrationStatus>,
    control: Option<Box<dyn RegistrationControl>>,
}

impl Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("service", &self.instance.service)
            .field("id", &self.instance.id)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Registration {
    /// For backends: a guard over a registration that `control` keeps alive and whose
    /// status is published on `status`.
    pub fn new(
        instance: Instance,
        status: watch::Receiver<RegistrationStatus>,
        control: Box<dyn RegistrationControl>,
    ) -> Self {
        Self {
            instance,
            status,
            control: Some(control),
        }
    }

    /// The registered instance, as last written by this guard.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The status, as a `tokio::sync::watch` receiver: `borrow()` for the current value,
    /// `changed()` / `wait_for()` to follow it.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// The current status.
    pub fn current_status(&self) -> RegistrationStatus {
        *self.status.borrow()
    }

    /// Waits until the status satisfies `pred`, at most `timeout`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        pred: impl FnMut(&RegistrationStatus) -> bool,
    ) -> Result<RegistrationStatus> {
        let mut rx = self.status.clone();
        let waited =
            tokio::time::timeout(timeout, async { rx.wait_for(pred).await.map(|s| *s) }).await;
        match waited {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(Error::Closed {
                what: "registration",
            }),
            Err(_) => Err(Error::Timeout {
                operation: "waiting for a registration status",
                after: timeout,
            }),
        }
    }

    /// Replaces the registered instance: new endpoint, metadata, tags, weight or zone.
    /// The service and id cannot change; that is a new registration.
    pub async fn update(&mut self, instance: Instance) -> Result<()> {
        if instance.service != self.instance.service || instance.id != self.instance.id {
            return Err(Error::invalid_input(format!(
                "update must keep service `{}` and id `{}`; register a new instance instead",
                self.instance.service, self.instance.id
            )));
        }
        instance.validate()?;
        self.control_ref()?.update(instance.clone()).await?;
        self.instance = instance;
        Ok(())
    }

    /// Drains, then deregisters: sets the weight to 0 (weighted selection stops picking
    /// it), waits `grace` so clients move away, then deregisters.
    pub async fn drain(mut self, grace: Duration) -> Result<()> {
        let drained = self.instance.clone().with_weight(0);
        self.update(drained).await?;
        tokio::time::sleep(grace).await;
        self.deregister().await
    }

    /// Removes the instance and waits for the registry to confirm.
    pub async fn deregister(mut self) -> Result<()> {
        let control = self.control.take().ok_or(Error::Closed {
            what: "registration",
        })?;
        control.deregister().await
    }

    fn control_ref(&self) -> Result<&dyn RegistrationControl> {
        self.control.as_deref().ok_or(Error::Closed {
            what: "registration",
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            control.deregister_in_background();
        }
    }
}
