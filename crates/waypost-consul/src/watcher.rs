//! Watching: blocking queries on `/v1/health/service/{name}?passing=true`, diffed into
//! waypost events.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use waypost_core::{
    Backoff, Error, InstanceSet, Result, ServiceName, Snapshot, WatchEvent, Watcher,
};

use crate::client::{AclState, Agent};
use crate::discovery::{ConsulDiscovery, Inner};

#[async_trait]
impl Watcher for ConsulDiscovery {
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.inner.check_alive()?;
        self.inner.check_read_access(false).await?;
        let listing = self.inner.agent.health(service, None).await?;
        let instances = Agent::decode(service, listing.entries);
        Ok(Snapshot::new(service.clone(), instances, listing.index))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let state = WatchState {
            client: self.inner.clone(),
            service: service.clone(),
            set: InstanceSet::new(),
            index: 0,
            relist: true,
            failing_since: None,
            first: true,
            stale: false,
            acl: None,
            pending: VecDeque::new(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            sleep_next: None,
            ended: false,
        };
        // The loop runs in its own task, so it notices a restarted or paused agent while
        // the consumer is not polling (a lazy stream would find out only on its next
        // blocking query, which a restarted agent with lower indexes holds for the whole
        // wait). It ends when the stream is dropped.
        futures::stream::once(async move {
            let (tx, rx) = mpsc::channel(EVENT_BUFFER);
            tokio::spawn(run(state, tx));
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
        })
        .flatten()
        .boxed()
    }
}

/// Events buffered between the watch task and a slow consumer.
const EVENT_BUFFER: usize = 256;

async fn run(mut state: WatchState, tx: mpsc::Sender<Result<WatchEvent>>) {
    loop {
        let item = tokio::select! {
            item = state.next() => item,
            _ = tx.closed() => return,
        };
        match item {
            Some(item) => {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            None => return,
        }
    }
}

struct WatchState {
    client: Arc<Inner>,
    service: ServiceName,
    /// What the consumer holds, as far as we told it.
    set: InstanceSet,
    /// The last `X-Consul-Index` (0 before the first listing).
    index: u64,
    /// List without blocking next (first, or after an error).
    relist: bool,
    /// When the current run of failures began.
    failing_since: Option<tokio::time::Instant>,
    first: bool,
    stale: bool,
    acl: Option<AclState>,
    pending: VecDeque<WatchEvent>,
    backoff: Backoff,
    sleep_next: Option<Duration>,
    ended: bool,
}

/// Resolves when the agent stops answering: a paused agent accepts connections and never
/// answers, so a blocking query alone would only notice after its whole wait.
async fn dead_agent(agent: &Agent, every: Duration) -> Error {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = agent.ping().await {
            return e.into();
        }
    }
}

impl WatchState {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.ended || self.client.crashed() {
                return None;
            }
            if let Some(d) = self.sleep_next.take() {
                tokio::time::sleep(d).await;
            }
            match self.round().await {
                Ok(()) => self.failing_since = None,
                Err(e) if !e.is_temporary() => {
                    tracing::warn!(service = %self.service, "consul: watch ends: {e}");
                    self.ended = true;
                    return Some(Err(e));
                }
                Err(e) => {
                    // List afresh next time: a restarted agent starts its indexes over.
                    self.relist = true;
                    self.sleep_next = Some(self.backoff.next_delay());
                    // A refused connection (agent restarting) gets `timeout` to come back
                    // before the watch calls itself stale; a request that timed out
                    // already waited that long.
                    let now = tokio::time::Instant::now();
                    let since = *self.failing_since.get_or_insert(now);
                    let gave_up = matches!(e, Error::Timeout { .. })
                        || now.duration_since(since) >= self.client.config.timeout;
                    if !self.first && !self.stale && gave_up {
                        tracing::info!(service = %self.service, "consul: watch is stale: {e}");
                        self.stale = true;
                        self.pending.push_back(WatchEvent::Stale {
                            reason: Arc::new(e),
                        });
                    } else {
                        tracing::debug!(service = %self.service, "consul: watch retrying: {e}");
                    }
                }
            }
        }
    }

    /// One query; pushes what it learned onto `pending`.
    async fn round(&mut self) -> Result<()> {
        let client = self.client.clone();
        if self.acl.is_none() {
            self.acl = Some(client.check_read_access(false).await?);
        }
        let agent = &client.agent;
        let cfg = &client.config;
        let listing = if self.relist {
            agent.health(&self.service, None).await?
        } else {
            let wait = cfg.wait.mul_f64(rand::thread_rng().gen_range(0.9..=1.0));
            let every = cfg.timeout.max(Duration::from_millis(500));
            tokio::select! {
                r = agent.health(&self.service, Some((self.index, wait))) => r?,
                e = dead_agent(agent, every) => return Err(e),
            }
        };
        self.backoff.reset();
        tracing::trace!(service = %self.service, index = listing.index, entries = listing.entries.len(), "consul: health listing");
        let instances = Agent::decode(&self.service, listing.entries);
        let index = listing.index;
        if self.first || self.stale || index < self.index {
            if index < self.index {
                // A restarted agent: its indexes start over, so this list is a new
                // authoritative set rather than changes at comparable revisions.
                tracing::info!(service = %self.service, "consul: the index went backwards (agent restarted?); resyncing");
            }
            self.set = InstanceSet::new();
            self.set.diff_replace(instances, index);
            let snap = self.set.to_snapshot(self.service.clone());
            self.pending.push_back(if self.first {
                WatchEvent::Snapshot(snap)
            } else {
                WatchEvent::Resynced(snap)
            });
            self.first = false;
            self.stale = false;
        } else if index != self.index {
            if instances.is_empty() && !self.set.is_empty() && self.acl == Some(AclState::Valid) {
                // With ACLs, losing read access looks exactly like "everyone left".
                client.check_read_access(true).await?;
            }
            let events = self.set.diff_replace(instances, index);
            self.pending.extend(events);
        }
        // Consul: an index below 1 must be reset to 1 (0 would not block).
        self.index = index.max(1);
        self.relist = false;
        Ok(())
    }
}
