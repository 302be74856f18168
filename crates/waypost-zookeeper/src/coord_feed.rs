//! The leader of an election, read and watched: the first `latch-` child of the
//! election's node, its data the leader's value, its `czxid` the token.
//!
//! A listing sets one-shot watches on the election node's children (or on the node's
//! creation) and on the leader's node (a proclaim changes its data); when either fires the
//! feed lists again ([`Next::Listing`]), which sets them again, so nothing between two
//! listings is missed. A new candidate queueing also re-lists (observers are not
//! contenders: they may wake for nothing). Revisions are the larger of the election
//! node's `pzxid` and the leader's `mzxid`, never below the last one reported.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::{select_all, BoxFuture};
use futures::FutureExt;
use tokio::time::Instant;
use waypost_core::backend::{Entry, Feed, Listing, Next, Session};
use waypost_core::coord::{FencingToken, Leader, Name};
use waypost_core::{Error, Result, Revision};
use zookeeper_client::{Client, Error as ZkErr, EventType, SessionState, StateWatcher};

use crate::client::{self, Ctx, Failed};
use crate::coord::lost;
use crate::coord_nodes;
use crate::feed::{session_error, zxid};
use crate::session::{Driver, ZkSession};

/// How many times a read starts over when the leader it found left before it was read.
const ATTEMPTS: usize = 16;

type Watches = Vec<BoxFuture<'static, zookeeper_client::WatchedEvent>>;

/// The leader of `election` (node `parent`), with the listing's revision; with `watch`,
/// the watches that fire on the next change.
async fn read(
    ctx: &Ctx,
    client: &Client,
    election: &Name,
    parent: &str,
    deadline: Instant,
    watch: bool,
) -> std::result::Result<(Option<Leader>, Revision, Watches), Failed> {
    for _ in 0..ATTEMPTS {
        let mut watches: Watches = Vec::new();
        let (names, pzxid) = if watch {
            let list = client.get_and_watch_children(parent);
            match ctx.call(deadline, "zookeeper watch", parent, list).await {
                Ok((names, stat, w)) => {
                    watches.push(w.changed().boxed());
                    (names, stat.pzxid)
                }
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                    let check = client.check_and_watch_stat(parent);
                    match ctx.call(deadline, "zookeeper watch", parent, check).await? {
                        (None, w) => return Ok((None, 0, vec![w.changed().boxed()])),
                        (Some(_), _) => continue, // created meanwhile
                    }
                }
                Err(f) => return Err(f),
            }
        } else {
            let list = client.get_children(parent);
            match ctx.call(deadline, "zookeeper list", parent, list).await {
                Ok((names, stat)) => (names, stat.pzxid),
                Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok((None, 0, watches)),
                Err(f) => return Err(f),
            }
        };
        let Some(first) = coord_nodes::queue(parent, &names, true).into_iter().next() else {
            return Ok((None, zxid(pzxid), watches));
        };
        let path = format!("{parent}/{}", first.name);
        let found = if watch {
            let get = client.get_and_watch_data(&path);
            ctx.call(deadline, "zookeeper get", &path, get)
                .await
                .map(|(data, stat, w)| {
                    watches.push(w.changed().boxed());
                    (data, stat)
                })
        } else {
            let get = client.get_data(&path);
            ctx.call(deadline, "zookeeper get", &path, get).await
        };
        match found {
            Ok((data, stat)) => {
                let leader = Leader::new(election.clone(), data, FencingToken(zxid(stat.czxid)));
                return Ok((Some(leader), zxid(pzxid.max(stat.mzxid)), watches));
            }
            // The leader left between the two reads: read again.
            Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
            Err(f) => return Err(f),
        }
    }
    Err(Failed::Timeout("zookeeper read leader", parent.to_string()))
}

/// The current leader of `election` (node `parent`) and the listing's revision.
pub(crate) async fn read_leader(
    ctx: &Ctx,
    client: &Client,
    election: &Name,
    parent: &str,
    deadline: Instant,
) -> std::result::Result<(Option<Leader>, Revision), Failed> {
    read(ctx, client, election, parent, deadline, false)
        .await
        .map(|(l, r, _)| (l, r))
}

/// Holds no client: a crashed client's connection must end with its last request.
struct Live {
    session: ZkSession,
    states: StateWatcher,
    /// The first of the listing's watches to fire.
    fired: BoxFuture<'static, zookeeper_client::WatchedEvent>,
}

/// The first of `watches` to fire (never, without any).
fn first(watches: Watches) -> BoxFuture<'static, zookeeper_client::WatchedEvent> {
    if watches.is_empty() {
        return futures::future::pending().boxed();
    }
    select_all(watches).map(|(ev, _, _)| ev).boxed()
}

/// A watch of one election's leader, through the client's session.
pub(crate) struct ZkLeaderFeed {
    session: Session<Driver>,
    ctx: Arc<Ctx>,
    election: Name,
    parent: String,
    /// The last revision reported: listings never go below it.
    revision: Revision,
    live: Option<Live>,
}

impl fmt::Debug for ZkLeaderFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkLeaderFeed")
            .field("election", &self.election)
            .field("node", &self.parent)
            .finish()
    }
}

impl ZkLeaderFeed {
    pub(crate) fn new(
        session: Session<Driver>,
        ctx: Arc<Ctx>,
        election: Name,
        parent: String,
    ) -> Self {
        Self {
            session,
            ctx,
            election,
            parent,
            revision: 0,
            live: None,
        }
    }

    /// Lists with fresh watches through `client`.
    async fn listing(
        &mut self,
        session: &ZkSession,
        client: &Client,
    ) -> Result<(Listing<Leader>, Watches)> {
        let deadline = self.ctx.deadline();
        let (leader, rev, watches) = read(
            &self.ctx,
            client,
            &self.election,
            &self.parent,
            deadline,
            true,
        )
        .await
        .map_err(|f| lost(&self.session, session, self.ctx.error(f)))?;
        self.revision = self.revision.max(rev);
        let entries = leader
            .map(|item| Entry {
                key: self.election.to_string(),
                item,
            })
            .into_iter()
            .collect();
        Ok((
            Listing {
                entries,
                revision: self.revision,
            },
            watches,
        ))
    }
}

#[async_trait]
impl Feed for ZkLeaderFeed {
    type Item = Leader;

    async fn list(&mut self) -> Result<Listing<Leader>> {
        self.live = None;
        let session = self.session.current().await?;
        let client = session.client()?;
        if let Err(e) = client::connected(&client, self.ctx.deadline()).await {
            return Err(lost(&self.session, &session, e));
        }
        let states = client.state_watcher();
        let (listing, watches) = self.listing(&session, &client).await?;
        drop(client);
        self.live = Some(Live {
            session,
            states,
            fired: first(watches),
        });
        Ok(listing)
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<Leader>> {
        let Some(mut live) = self.live.take() else {
            return Err(Error::unavailable("the ZooKeeper watch is not established"));
        };
        loop {
            let fired = tokio::select! {
                ev = &mut live.fired => Some(ev),
                s = live.states.changed() => match s {
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => None,
                    s => return Err(lost(&self.session, &live.session, session_error(s))),
                },
            };
            let Some(ev) = fired else { continue };
            if ev.event_type == EventType::Session {
                return Err(lost(
                    &self.session,
                    &live.session,
                    session_error(ev.session_state),
                ));
            }
            // The remaining watches are dropped: the listing sets them again.
            let client = live.session.client()?;
            let (listing, watches) = self.listing(&live.session, &client).await?;
            drop(client);
            live.fired = first(watches);
            self.live = Some(live);
            return Ok(Next::Listing(listing));
        }
    }
}
