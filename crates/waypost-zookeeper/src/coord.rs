//! Locks, semaphores and elections: core's [`Coord`](waypost_core::backend::Coord) over
//! Curator's recipe nodes (see the crate docs, "Locks and elections").
//!
//! Every primitive is one request (or one watch) on the session's client, bounded by the
//! request timeout. Contender nodes are ephemeral sequential, bound to the session that
//! keeps the registrations alive.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use waypost_core::backend::{Contender, CoordDriver, Kind, Position, Session};
use waypost_core::coord::{FencingToken, Leader, Name};
use waypost_core::{Error, Result};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr, EventType, SessionState};

use crate::client::{self, Ctx, Failed};
use crate::coord_feed::{read_leader, ZkLeaderFeed};
use crate::coord_nodes::{self, Marker};
use crate::session::{Driver, ZkSession};

/// How long a waiter waits on one watch before it looks at its queue again anyway.
const RECHECK: Duration = Duration::from_secs(30);

/// How many times an enqueue creates the name's parents again when a container parent
/// was reaped between its creation and the contender's.
const ATTEMPTS: usize = 8;

/// One contender's node.
#[derive(Clone)]
pub(crate) struct ZkTicket {
    session: ZkSession,
    /// The name's node, `{coord_prefix}/{name}`.
    parent: String,
    /// The contender's node name below `parent`.
    node: String,
    election: bool,
    permits: usize,
    /// The node's `czxid`.
    token: FencingToken,
}

impl fmt::Debug for ZkTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkTicket")
            .field("path", &self.path())
            .field("session", &self.session)
            .field("token", &self.token.0)
            .finish()
    }
}

impl ZkTicket {
    fn path(&self) -> String {
        format!("{}/{}", self.parent, self.node)
    }
}

/// What a waiting contender waits on.
#[derive(Debug)]
pub(crate) enum ZkWait {
    /// Its predecessor's node (locks and elections: herd-free).
    Node(String),
    /// Any change of the name's children (semaphores: a holder anywhere ahead may go).
    Children,
}

/// The ZooKeeper backend's coordination primitives, bound to the session of a
/// [`ZkDiscovery`](crate::ZkDiscovery) (a new one after an expiry).
#[derive(Clone)]
pub(crate) struct ZkCoord {
    session: Session<Driver>,
    ctx: Arc<Ctx>,
}

impl fmt::Debug for ZkCoord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkCoord")
            .field("coord_prefix", &self.ctx.config.coord_prefix)
            .finish()
    }
}

/// An error of `session`: an expiry is reported to core's session at once.
pub(crate) fn lost(sessions: &Session<Driver>, session: &ZkSession, e: Error) -> Error {
    if matches!(e, Error::SessionExpired) {
        sessions.expired(session);
    }
    e
}

impl ZkCoord {
    pub(crate) fn new(session: Session<Driver>, ctx: Arc<Ctx>) -> Self {
        Self { session, ctx }
    }

    pub(crate) fn parent(&self, name: &Name) -> String {
        format!("{}/{name}", self.ctx.config.coord_prefix)
    }

    fn fail(&self, session: &ZkSession, f: Failed) -> Error {
        lost(&self.session, session, self.ctx.error(f))
    }

    /// `session`'s client once connected (waits up to `deadline` for a reconnection).
    async fn client(&self, session: &ZkSession, deadline: Instant) -> Result<Client> {
        let client = session.client()?;
        client::connected(&client, deadline)
            .await
            .map_err(|e| lost(&self.session, session, e))?;
        Ok(client)
    }

    /// The contender `id`'s node under `parent`, written by `session`, if any.
    async fn find(
        &self,
        client: &Client,
        session: &ZkSession,
        parent: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<Vec<(String, zookeeper_client::Stat)>> {
        let ctx = &self.ctx;
        let names = match ctx
            .call(
                deadline,
                "zookeeper list",
                parent,
                client.list_children(parent),
            )
            .await
        {
            Ok(n) => n,
            Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok(Vec::new()),
            Err(f) => return Err(self.fail(session, f)),
        };
        let prefix = coord_nodes::protected(id);
        let mut found = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
            let path = format!("{parent}/{name}");
            let stat = ctx
                .call(
                    deadline,
                    "zookeeper exists",
                    &path,
                    client.check_stat(&path),
                )
                .await
                .map_err(|f| self.fail(session, f))?;
            if let Some(stat) = stat.filter(|s| s.ephemeral_owner == session.id()) {
                found.push((name, stat));
            }
        }
        Ok(found)
    }

    fn ticket(&self, session: &ZkSession, c: &Contender, node: String, czxid: i64) -> ZkTicket {
        let permits = match c.kind {
            Kind::Lock { permits } => permits as usize,
            Kind::Election => 1,
        };
        ZkTicket {
            session: session.clone(),
            parent: self.parent(&c.name),
            node,
            election: c.kind == Kind::Election,
            permits,
            token: FencingToken(czxid.max(0) as u64),
        }
    }

    /// The children of `t`'s name in `t`'s queue, `None` when the name's node is gone.
    async fn queue(
        &self,
        t: &ZkTicket,
        deadline: Instant,
    ) -> Result<Option<Vec<coord_nodes::Contender>>> {
        let client = self.client(&t.session, deadline).await?;
        let list = client.list_children(&t.parent);
        match self
            .ctx
            .call(deadline, "zookeeper list", &t.parent, list)
            .await
        {
            Ok(names) => Ok(Some(coord_nodes::queue(&t.parent, &names, t.election))),
            Err(f) if f.code() == Some(&ZkErr::NoNode) => Ok(None),
            Err(f) => Err(self.fail(&t.session, f)),
        }
    }
}

/// Whether a watch fired because the session ended (rather than for the node).
fn session_ended(ev: &zookeeper_client::WatchedEvent) -> bool {
    ev.event_type == EventType::Session
        && matches!(
            ev.session_state,
            SessionState::Expired | SessionState::Closed
        )
}

#[async_trait]
impl CoordDriver for ZkCoord {
    type Handle = ZkSession;
    type Ticket = ZkTicket;
    type Wait = ZkWait;
    type Feed = ZkLeaderFeed;

    fn max_value_len(&self) -> usize {
        crate::MAX_VALUE_LEN
    }

    async fn enqueue(&self, session: &ZkSession, c: &Contender, retry: bool) -> Result<ZkTicket> {
        let ctx = &self.ctx;
        let deadline = ctx.deadline();
        let client = self.client(session, deadline).await?;
        let parent = self.parent(&c.name);
        if retry {
            // Curator's protected mode: the create whose reply was lost is found by its id.
            let found = self
                .find(&client, session, &parent, &c.id, deadline)
                .await?;
            if let Some((node, stat)) = found.into_iter().next() {
                return Ok(self.ticket(session, c, node, stat.czxid));
            }
        }
        let marker = Marker::of(c.kind);
        let prefix = format!(
            "{parent}/{}{}",
            coord_nodes::protected(&c.id),
            marker.as_str()
        );
        let opts = CreateMode::EphemeralSequential.with_acls(Acls::new(&ctx.node_acls));
        for _ in 0..ATTEMPTS {
            let create = client.create(&prefix, &c.value, &opts);
            match ctx
                .call(deadline, "zookeeper create", &prefix, create)
                .await
            {
                Ok((stat, seq)) => {
                    let node = format!("{}{}{seq}", coord_nodes::protected(&c.id), marker.as_str());
                    let czxid = if stat.is_invalid() {
                        let path = format!("{parent}/{node}");
                        let read = client.check_stat(&path);
                        ctx.call(deadline, "zookeeper exists", &path, read)
                            .await
                            .map_err(|f| self.fail(session, f))?
                            .map_or(0, |s| s.czxid)
                    } else {
                        stat.czxid
                    };
                    return Ok(self.ticket(session, c, node, czxid));
                }
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                    // Parents are container nodes, as Curator creates them.
                    ctx.ensure_parents(&client, &parent, deadline)
                        .await
                        .map_err(|f| self.fail(session, f))?;
                }
                Err(f) => return Err(self.fail(session, f)),
            }
        }
        Err(Error::unavailable(format!(
            "zookeeper: the parent `{parent}` vanished {ATTEMPTS} times while enqueueing"
        )))
    }

    async fn position(&self, t: &ZkTicket) -> Result<Position<ZkWait>> {
        let Some(queue) = self.queue(t, self.ctx.deadline()).await? else {
            return Ok(Position::Gone);
        };
        let Some(at) = queue.iter().position(|c| c.name == t.node) else {
            return Ok(Position::Gone);
        };
        Ok(if at < t.permits {
            Position::Held(t.token)
        } else if t.permits == 1 {
            Position::Waiting(ZkWait::Node(format!("{}/{}", t.parent, queue[at - 1].name)))
        } else {
            Position::Waiting(ZkWait::Children)
        })
    }

    async fn wait(&self, t: &ZkTicket, wait: &ZkWait) -> Result<()> {
        let ctx = &self.ctx;
        let deadline = ctx.deadline();
        let client = self.client(&t.session, deadline).await?;
        let watcher = match wait {
            ZkWait::Node(path) => {
                // A data watch (not `exists`): a node already gone leaves no watch behind.
                let read = client.get_and_watch_data(path);
                match ctx.call(deadline, "zookeeper watch", path, read).await {
                    Ok((_, _, w)) => w,
                    Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok(()),
                    Err(f) => return Err(self.fail(&t.session, f)),
                }
            }
            ZkWait::Children => {
                let list = client.get_and_watch_children(&t.parent);
                match ctx.call(deadline, "zookeeper watch", &t.parent, list).await {
                    // The watch is set with this listing: a holder that left since
                    // `position` is seen here, not awaited.
                    Ok((names, _, w)) => {
                        let queue = coord_nodes::queue(&t.parent, &names, t.election);
                        match queue.iter().position(|c| c.name == t.node) {
                            Some(at) if at >= t.permits => w,
                            _ => return Ok(()),
                        }
                    }
                    Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok(()),
                    Err(f) => return Err(self.fail(&t.session, f)),
                }
            }
        };
        // The watch alone must not keep a crashed client's connection open.
        drop(client);
        let _ = tokio::time::timeout(RECHECK, watcher.changed()).await;
        Ok(())
    }

    async fn watch_held(&self, t: &ZkTicket) -> Result<()> {
        let ctx = &self.ctx;
        let path = t.path();
        loop {
            let client = t.session.client()?;
            let read = client.get_and_watch_data(&path);
            let watcher = match ctx
                .call(ctx.deadline(), "zookeeper watch", &path, read)
                .await
            {
                Ok((_, stat, _)) if stat.ephemeral_owner != t.session.id() => return Ok(()),
                Ok((_, _, w)) => w,
                Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok(()),
                Err(f) => return Err(self.fail(&t.session, f)),
            };
            drop(client);
            match tokio::time::timeout(RECHECK, watcher.changed()).await {
                Ok(ev) if ev.event_type == EventType::NodeDeleted => return Ok(()),
                Ok(ev) if session_ended(&ev) => {
                    let e = crate::feed::session_error(ev.session_state);
                    return Err(lost(&self.session, &t.session, e));
                }
                // Data changed (a proclaim), a session event, or a while passed: look again.
                _ => {}
            }
        }
    }

    async fn dequeue(&self, t: &ZkTicket) -> Result<()> {
        // A session that was closed or expired took its nodes along.
        let Ok(client) = t.session.client() else {
            return Ok(());
        };
        if client.state().is_terminated() {
            return Ok(());
        }
        let ctx = &self.ctx;
        let deadline = ctx.deadline();
        client::connected(&client, deadline)
            .await
            .or_else(|e| matches!(e, Error::SessionExpired).then_some(()).ok_or(e))?;
        let path = t.path();
        match ctx
            .call(
                deadline,
                "zookeeper delete",
                &path,
                client.delete(&path, None),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(f) if matches!(f.code(), Some(ZkErr::NoNode | ZkErr::SessionExpired)) => Ok(()),
            Err(f) => Err(self.fail(&t.session, f)),
        }
    }

    async fn forget(&self, session: &ZkSession, c: &Contender) -> Result<()> {
        let Ok(client) = session.client() else {
            return Ok(());
        };
        if client.state().is_terminated() {
            return Ok(());
        }
        let deadline = self.ctx.deadline();
        let parent = self.parent(&c.name);
        for (node, _) in self
            .find(&client, session, &parent, &c.id, deadline)
            .await?
        {
            let path = format!("{parent}/{node}");
            let delete = client.delete(&path, None);
            match self
                .ctx
                .call(deadline, "zookeeper delete", &path, delete)
                .await
            {
                Ok(()) => {}
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
                Err(f) => return Err(self.fail(session, f)),
            }
        }
        Ok(())
    }

    async fn proclaim(&self, t: &ZkTicket, value: &[u8]) -> Result<()> {
        if value.len() > self.max_value_len() {
            return Err(Error::invalid_input(format!(
                "a value of {} bytes is larger than this registry stores ({} bytes)",
                value.len(),
                self.max_value_len()
            )));
        }
        let deadline = self.ctx.deadline();
        let client = self.client(&t.session, deadline).await?;
        let path = t.path();
        let set = client.set_data(&path, value, None);
        match self.ctx.call(deadline, "zookeeper set", &path, set).await {
            Ok(_) => Ok(()),
            Err(f) if f.code() == Some(&ZkErr::NoNode) => Err(Error::Closed {
                what: "leadership (its node is gone)",
            }),
            Err(f) => Err(self.fail(&t.session, f)),
        }
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        let session = self.session.current().await?;
        let deadline = self.ctx.deadline();
        let client = self.client(&session, deadline).await?;
        let parent = self.parent(election);
        read_leader(&self.ctx, &client, election, &parent, deadline)
            .await
            .map(|(leader, _)| leader)
            .map_err(|f| self.fail(&session, f))
    }

    fn leader_feed(&self, election: &Name) -> ZkLeaderFeed {
        ZkLeaderFeed::new(
            self.session.clone(),
            self.ctx.clone(),
            election.clone(),
            self.parent(election),
        )
    }
}
