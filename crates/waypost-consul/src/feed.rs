//! The watch primitives: blocking queries on `/v1/health/service/{name}?passing=true`.
//! Each answer is a fresh listing that core's watch machine diffs; `X-Consul-Index` is the
//! revision.
//!
//! - A refused or cut connection (an agent restarting) fails the feed at once: the machine
//!   reports `Stale`, then `Resynced` when the agent answers again.
//! - An index that goes backwards (a restarted agent starts its indexes over) never stalls
//!   the watch: its blocking queries follow the agent's new index, and the watch's
//!   revisions keep growing (offset past the last one), so revisions of one watch stay
//!   comparable.
//! - While a query blocks, the agent is pinged every `request_timeout`: a paused agent
//!   (which accepts connections and never answers) fails the query after at most two
//!   `request_timeout`s.
//! - ACLs: before trusting a listing the token is checked once (`/v1/acl/token/self`);
//!   a set that suddenly becomes empty checks it again, since a revoked token makes
//!   Consul answer `200 []`.
//! - Entries are keyed `{node}/{service id}`; ours ([`Feed::is_canonical`]) is the
//!   service waypost writes for the id (`{service}:{id}`) on this client's agent node.
//! - Connections: a watch takes one of the client's per-service blocking-query permits
//!   (`budget.rs`) when one is free, for its whole life; otherwise it is a **shared**
//!   watch that waits on the client's change signal (`mux.rs`) and reads its service when
//!   woken. A shared watch becomes a per-service one as soon as a permit is free (its
//!   blocking query starts from the index it holds, so nothing is missed).

mod entries;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use rand::Rng;
use tokio::sync::{watch, OwnedSemaphorePermit};
use waypost_core::backend::watch::{shared_instances, WatchHub};
use waypost_core::backend::{Change, Entry, Feed, Listing, Next, Session};
use waypost_core::{Error, Instance, Result, Revision, ServiceName, WatchEvent};

use crate::client::{AclState, Agent, Lane};
use crate::error::ConsulError;
use crate::mux::{Mux, Ticket};
use crate::session::AgentDriver;

/// How a watch reaches the agent.
enum Way {
    /// Its own blocking query (a permit of the per-service budget, held for its life).
    Dedicated(#[allow(dead_code)] OwnedSemaphorePermit),
    /// The client's change signal, then a targeted read.
    Shared(Ticket),
}

/// One watch's feed.
pub(crate) struct HealthFeed {
    agent: Agent,
    service: ServiceName,
    wait: Duration,
    /// The agent's node name, once known: where our own entries are.
    node: Option<Arc<str>>,
    acl: Option<AclState>,
    /// The agent's index of the last answer (blocking queries wait past it).
    index: u64,
    /// The last revision handed to the machine, and what is added to the agent's index
    /// since it last went backwards.
    revision: Revision,
    offset: u64,
    /// Whether the last listing held anything (for the revoked-token check).
    non_empty: bool,
    /// The last answer's entries: only what changed since is decoded.
    known: entries::Known,
    generation: watch::Receiver<u64>,
    /// The client's session, to stop once it is closed.
    session: Option<Session<AgentDriver>>,
    /// The client's change signal (`None`: a one-off listing).
    mux: Option<Mux>,
    way: Option<Way>,
}

impl HealthFeed {
    /// A feed for `instances()`: only its claimant rule is used.
    pub(crate) async fn for_listing(agent: &Agent, service: &ServiceName) -> Self {
        let mut feed = Self::new(agent, service, Duration::from_secs(1), None, None);
        feed.node = agent.node_name().await;
        feed
    }

    /// Every valid instance of a health answer (for `instances()`).
    pub(crate) fn decode_all(&mut self, body: &[u8]) -> Result<Vec<Entry<Instance>>> {
        self.take(body, 0)?;
        Ok(self.known.listing())
    }

    fn new(
        agent: &Agent,
        service: &ServiceName,
        wait: Duration,
        session: Option<Session<AgentDriver>>,
        mux: Option<Mux>,
    ) -> Self {
        Self {
            agent: agent.clone(),
            service: service.clone(),
            wait,
            node: None,
            acl: None,
            index: 0,
            revision: 0,
            offset: 0,
            non_empty: false,
            known: entries::Known::new(service),
            generation: agent.generation(),
            session,
            mux,
            way: None,
        }
    }

    /// Chooses how this watch reaches the agent, once (before its first listing: a
    /// shared watch's ticket must come before its read).
    fn choose_way(&mut self) {
        if self.way.is_some() {
            return;
        }
        let Some(mux) = &self.mux else { return };
        let dedicated = self.agent.lanes().dedicated.clone();
        self.way = Some(match dedicated.try_acquire_owned() {
            Ok(permit) => Way::Dedicated(permit),
            Err(_) => {
                tracing::debug!(service = %self.service, "consul: the per-service watch budget is used up; this watch shares the client's change signal");
                Way::Shared(mux.ticket(&self.service))
            }
        });
    }

    /// The lane of this watch's non-blocking reads.
    fn read_lane(&self) -> Lane {
        match self.way {
            Some(Way::Dedicated(_)) => Lane::Held,
            _ => Lane::Watch,
        }
    }

    /// A client that was shut down (or crashed) watches nothing more.
    fn check_open(&self) -> Result<()> {
        match &self.session {
            Some(s) => s.check_open(),
            None => Ok(()),
        }
    }

    async fn list_once(&mut self) -> Result<Listing<Instance>> {
        self.check_open()?;
        if self.acl.is_none() {
            self.acl = Some(self.agent.check_read_access(false).await?);
        }
        if self.node.is_none() {
            self.node = self.agent.node_name().await;
        }
        self.generation.borrow_and_update();
        self.choose_way();
        let listing = self
            .agent
            .health(&self.service, None, self.read_lane())
            .await?;
        let revision = self.revision(listing.index);
        self.take(&listing.body, revision)?;
        let entries = self.known.listing();
        self.non_empty = !entries.is_empty();
        Ok(Listing { entries, revision })
    }

    async fn next_once(&mut self) -> Result<Next<Instance>> {
        loop {
            self.check_open()?;
            let wait = self.wait.mul_f64(rand::thread_rng().gen_range(0.9..=1.0));
            if let Some(Way::Shared(_)) = &self.way {
                if let Ok(p) = self.agent.lanes().dedicated.clone().try_acquire_owned() {
                    tracing::debug!(service = %self.service, "consul: a per-service watch permit is free; this watch takes it");
                    self.way = Some(Way::Dedicated(p));
                }
            }
            // Any failure (a refused connection, an agent that does not answer) is an
            // outage: the machine reports `Stale`, and `Resynced` once the agent answers.
            let listing = match &mut self.way {
                Some(Way::Shared(ticket)) => {
                    ticket.changed(wait).await;
                    tokio::select! {
                        r = self.agent.health(&self.service, None, Lane::Watch) => r?,
                        _ = self.generation.changed() => {
                            return Err(Error::unavailable("consul: connections dropped (test hook)"));
                        }
                    }
                }
                _ => tokio::select! {
                    r = self.agent.health(&self.service, Some((self.index, wait)), Lane::Held) => r?,
                    e = self.agent.lost() => return Err(e),
                    _ = self.generation.changed() => {
                        return Err(Error::unavailable("consul: connections dropped (test hook)"));
                    }
                },
            };
            let got = listing.index.max(1);
            if got == self.index {
                continue; // the wait ran out with no change
            }
            let revision = self.revision(got);
            let changes = self.take(&listing.body, revision)?;
            let non_empty = self.known.has_instances();
            if !non_empty && self.non_empty && self.acl == Some(AclState::Valid) {
                // With ACLs, losing read access looks exactly like "everyone left".
                self.agent.check_read_access(true).await?;
            }
            self.non_empty = non_empty;
            return Ok(Next::Changes(changes));
        }
    }

    /// Takes a health answer as the last one: its changes since the last one, decoding
    /// only the entries whose bytes changed (see `feed/entries.rs`).
    fn take(&mut self, body: &[u8], revision: Revision) -> Result<Vec<Change<Instance>>> {
        self.known.update(body, revision).map_err(|source| {
            ConsulError::Decode {
                op: "health query",
                source,
            }
            .into()
        })
    }

    /// The watch's revision of the agent's index `index`, which becomes the index of the
    /// next blocking query. A restarted agent starts its indexes over: the revisions of one
    /// watch keep growing all the same (they are offset past the last one).
    fn revision(&mut self, index: u64) -> Revision {
        // Consul: an index below 1 must be 1 (0 would not block).
        let index = index.max(1);
        if index < self.index {
            tracing::info!(service = %self.service, "consul: the index went backwards (agent restarted?); listing again");
            self.offset = self.revision;
        }
        self.index = index;
        self.revision = self.revision.max(index + self.offset);
        self.revision
    }
}

#[async_trait]
impl Feed for HealthFeed {
    type Item = Instance;

    async fn list(&mut self) -> Result<Listing<Instance>> {
        self.list_once().await
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<Instance>> {
        self.next_once().await
    }

    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        // `{node}/{service}:{id}`, compared without allocating (called per entry).
        let Some((node, service_id)) = key.rsplit_once('/') else {
            return false;
        };
        let ours = service_id
            .strip_prefix(item.service.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            == Some(item.id.as_str());
        // The node is unknown (a token without `agent:read`): any node's.
        ours && self.node.as_deref().is_none_or(|n| n == node)
    }
}

/// The watch of `service`: core's machine over a [`HealthFeed`], shared by every local
/// watcher of the service through `hub` (one blocking query per service) and run in the
/// hub's own task, so it notices a lost agent while the consumers are not polling (a lazy
/// stream would find out only on its next blocking query, which a restarted agent with
/// lower indexes holds for the whole wait). The task ends when the last stream is dropped.
pub(crate) fn watch(
    hub: &WatchHub<ServiceName, Instance>,
    agent: &Agent,
    mux: &Mux,
    session: &Session<AgentDriver>,
    service: &ServiceName,
    wait: Duration,
) -> BoxStream<'static, Result<WatchEvent>> {
    let feed = HealthFeed::new(
        agent,
        service,
        wait,
        Some(session.clone()),
        Some(mux.clone()),
    );
    let (backoff, what) = (*session.backoff(), service.to_string());
    shared_instances(hub, service, move || {
        waypost_core::backend::watch::watch(feed, &backoff, what)
    })
}
