//! The memory backend's registry primitives: the worked example of the backend layer.
//! Each trait is a few lines over [`MemoryRegistry`]; core's session, keeper and watch
//! machine do the rest.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::registry::{own_key, MemoryRegistry, SessionId};
use crate::backend::{Change, Feed, Listing, Next, Presence, RegistryStore, SessionDriver};
use crate::error::{Error, Result};
use crate::model::{Instance, Revision, ServiceName};

/// The session primitives: a session with a TTL, heartbeated every quarter of it.
#[derive(Clone)]
pub(crate) struct Driver {
    pub(crate) registry: MemoryRegistry,
    pub(crate) ttl: Duration,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDriver")
            .field("registry", &self.registry.name())
            .field("ttl", &self.ttl)
            .finish()
    }
}

#[async_trait]
impl SessionDriver for Driver {
    type Handle = SessionId;

    async fn open(&self) -> Result<SessionId> {
        self.registry.inner.open_session(self.ttl)
    }

    async fn keep_alive(&self, session: &SessionId) -> Result<()> {
        self.registry.inner.heartbeat(*session)
    }

    async fn close(&self, session: &SessionId) -> Result<()> {
        self.registry.inner.close_session(*session)
    }

    fn interval(&self) -> Duration {
        (self.ttl / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    fn bound(&self) -> Option<Duration> {
        Some(self.ttl)
    }
}

/// The registration primitives: one entry per instance at the key named by its id.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) registry: MemoryRegistry,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("registry", &self.registry.name())
            .finish()
    }
}

#[async_trait]
impl RegistryStore for Store {
    type Handle = SessionId;

    async fn write(&self, session: &SessionId, instance: &Instance, takeover: bool) -> Result<()> {
        self.registry.inner.write(*session, instance, takeover)
    }

    async fn inspect(&self, session: &SessionId, instance: &Instance) -> Result<Presence> {
        self.registry.inner.inspect(*session, instance)
    }

    async fn delete(&self, session: &SessionId, instance: &Instance) -> Result<()> {
        self.registry.inner.delete(*session, instance)
    }
}

/// The watch primitives: a listing with a subscription to every later change. The feed
/// also expires overdue sessions on time, so a watch alone sees a crashed client go.
pub(crate) struct WatchFeed {
    pub(crate) registry: MemoryRegistry,
    pub(crate) service: ServiceName,
    pub(crate) reach: watch::Receiver<bool>,
    pub(crate) sub: Option<mpsc::UnboundedReceiver<Change<Instance>>>,
}

impl WatchFeed {
    pub(crate) fn new(registry: &MemoryRegistry, service: &ServiceName) -> Self {
        Self {
            registry: registry.clone(),
            service: service.clone(),
            reach: registry.inner.reachability(),
            sub: None,
        }
    }

    fn unreachable(&self) -> Error {
        Error::unavailable(format!(
            "memory registry `{}` is unreachable (fault injected)",
            self.registry.name()
        ))
    }
}

#[async_trait]
impl Feed for WatchFeed {
    type Item = Instance;

    async fn list(&mut self) -> Result<Listing<Instance>> {
        self.sub = None;
        // Before the registry answers, wait quietly: that is no outage to report.
        let _ = self.reach.wait_for(|r| *r).await;
        let (listing, rx) = self.registry.inner.list(&self.service, true)?;
        self.sub = rx;
        self.reach.borrow_and_update();
        Ok(listing)
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<Instance>> {
        loop {
            let Some(rx) = self.sub.as_mut() else {
                return Err(self.unreachable());
            };
            let reap_at = self.registry.inner.next_deadline();
            tokio::select! {
                biased;
                changed = self.reach.changed() => {
                    if changed.is_err() || !*self.reach.borrow_and_update() {
                        self.sub = None;
                        return Err(self.unreachable());
                    }
                }
                change = rx.recv() => match change {
                    Some(first) => {
                        let mut changes = vec![first];
                        while let Ok(more) = rx.try_recv() {
                            changes.push(more);
                        }
                        return Ok(Next::Changes(changes));
                    }
                    None => return Err(self.unreachable()),
                },
                _ = sleep_until(reap_at) => self.registry.inner.reap(),
            }
        }
    }

    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        key == own_key(item)
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}
