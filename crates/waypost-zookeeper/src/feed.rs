//! The watch primitives: a service's nodes listed at a zxid, then the changes after it.
//! Core's watch machine turns them into the watch contract (snapshot, changes, `Stale`,
//! `Resynced`, one entry per id).
//!
//! On ZooKeeper ≥ 3.6 one persistent recursive watch on the service node reports every
//! change, and each change costs one read of the node that changed. Before 3.6 (`addWatch`
//! answers `Unimplemented`) a child watch on the service node and a data watch per
//! instance node do the same: a change of the children costs one listing of the names and
//! a read of each new node. A lost connection ends the feed's view (changes made
//! meanwhile fire nothing): it fails, and the machine lists again once the client is back.
//!
//! Revisions are zxids where ZooKeeper tells them (the listing; each read node's `mzxid`);
//! a change whose zxid the server does not report (a deletion) gets the next number after
//! the last one, so revisions only grow and never fall behind the registry's.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::time::Instant;
use waypost_core::backend::{Change, Entry, Feed, Listing, Next, Session};
use waypost_core::{Error, Instance, Result, Revision, ServiceName};
use zookeeper_client::{
    AddWatchMode, Client, Error as ZkErr, EventType, OneshotWatcher, PersistentWatcher,
    SessionState, StateWatcher, WatchedEvent,
};

use crate::client::{self, Ctx, Failed};
use crate::codec;
use crate::session::{Driver, ZkSession};
use crate::store::is_own_name;

/// How many queued change events are read from the server in one pipelined batch.
const BATCH: usize = 256;

/// Decodes one node, logging and skipping what is not an instance.
pub(crate) fn decode_node(service: &ServiceName, name: &str, data: &[u8]) -> Option<Instance> {
    match codec::decode(service, data) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(%service, node = name, bytes = data.len(), "zookeeper: skipping a node that is not a service instance: {e}");
            None
        }
    }
}

pub(crate) fn zxid(z: i64) -> Revision {
    z.max(0) as Revision
}

/// Reads every node of a service (names, then all data pipelined), at the highest zxid
/// seen. Entries are keyed by node name.
pub(crate) async fn read_service(
    ctx: &Ctx,
    client: &Client,
    service: &ServiceName,
    path: &str,
    deadline: Instant,
) -> std::result::Result<Listing<Instance>, Failed> {
    let (names, stat) = match ctx
        .call(deadline, "zookeeper list", path, client.get_children(path))
        .await
    {
        Ok(x) => x,
        Err(f) if f.code() == Some(&ZkErr::NoNode) => {
            return Ok(Listing {
                entries: Vec::new(),
                revision: 0,
            })
        }
        Err(f) => return Err(f),
    };
    let mut revision = zxid(stat.pzxid);
    // The client sends requests when they are made: all reads are pipelined.
    let reads: Vec<_> = names
        .iter()
        .map(|n| client.get_data(&format!("{path}/{n}")))
        .collect();
    let results = ctx
        .call(deadline, "zookeeper get", path, async {
            Ok(futures::future::join_all(reads).await)
        })
        .await?;
    let mut entries = Vec::with_capacity(names.len());
    for (name, r) in names.into_iter().zip(results) {
        match r {
            Ok((data, stat)) => {
                revision = revision.max(zxid(stat.mzxid));
                if let Some(item) = decode_node(service, &name, &data) {
                    entries.push(Entry { key: name, item });
                }
            }
            Err(ZkErr::NoNode) => {}
            Err(e) => return Err(Failed::Zk("zookeeper get", format!("{path}/{name}"), e)),
        }
    }
    Ok(Listing { entries, revision })
}

/// The fallback watch's state: a child watch, a data watch per node, the names known.
struct Children {
    states: StateWatcher,
    child: Option<BoxFuture<'static, WatchedEvent>>,
    data: FuturesUnordered<BoxFuture<'static, (String, WatchedEvent)>>,
    names: HashSet<String>,
}

enum Mode {
    Persistent(PersistentWatcher),
    Children(Children),
}

struct Live {
    session: ZkSession,
    mode: Mode,
    /// A connection loss seen after the changes of the last batch: the next call fails.
    lost: Option<Error>,
}

/// One service's nodes, followed through the client's session.
pub(crate) struct ZkFeed {
    reader: Reader,
    /// No persistent watches (server < 3.6, or forced for tests).
    legacy: bool,
    live: Option<Live>,
}

/// What the feed reads with (shared by reference across awaits, so apart from the
/// watches, which are not `Sync`).
struct Reader {
    session: Session<Driver>,
    ctx: Arc<Ctx>,
    service: ServiceName,
    path: String,
}

impl fmt::Debug for ZkFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkFeed")
            .field("path", &self.reader.path)
            .field("legacy", &self.legacy)
            .finish()
    }
}

pub(crate) fn session_error(state: SessionState) -> Error {
    match state {
        SessionState::Expired => Error::SessionExpired,
        SessionState::AuthFailed => Error::Unauthorized {
            message: "ZooKeeper authentication failed".into(),
            source: None,
        },
        SessionState::Closed => Error::unavailable("the ZooKeeper session was closed"),
        _ => Error::unavailable("lost the connection to ZooKeeper"),
    }
}

impl ZkFeed {
    pub(crate) fn new(session: Session<Driver>, ctx: Arc<Ctx>, service: &ServiceName) -> Self {
        Self {
            legacy: ctx.child_watches.load(Ordering::Acquire),
            reader: Reader {
                path: ctx.service_path(service),
                session,
                ctx,
                service: service.clone(),
            },
            live: None,
        }
    }
}

impl Reader {
    /// An error of `session`: an expiry is reported to core's session at once.
    fn lost(&self, session: &ZkSession, e: Error) -> Error {
        if matches!(e, Error::SessionExpired) {
            self.session.expired(session);
        }
        e
    }

    fn child_name<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.strip_prefix(&self.path)?
            .strip_prefix('/')
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }

    /// The service's node names with a watch on them (or on the service node's creation),
    /// and its `pzxid`.
    async fn watch_names(
        &self,
        client: &Client,
        deadline: Instant,
    ) -> std::result::Result<(Vec<String>, Revision, OneshotWatcher), Failed> {
        let (ctx, path) = (&self.ctx, &self.path);
        loop {
            let list = client.get_and_watch_children(path);
            match ctx
                .call(deadline, "zookeeper watch children", path, list)
                .await
            {
                Ok((names, stat, w)) => return Ok((names, zxid(stat.pzxid), w)),
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                    let check = client.check_and_watch_stat(path);
                    match ctx.call(deadline, "zookeeper watch", path, check).await? {
                        (None, w) => return Ok((Vec::new(), 0, w)),
                        (Some(_), _) => continue, // created meanwhile
                    }
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// Lists with a child watch and a data watch per node.
    async fn list_children(
        &self,
        client: &Client,
        deadline: Instant,
    ) -> std::result::Result<(Listing<Instance>, Children), Failed> {
        let (names, revision, child) = self.watch_names(client, deadline).await?;
        let mut children = Children {
            states: client.state_watcher(),
            child: Some(child.changed().boxed()),
            data: FuturesUnordered::new(),
            names: HashSet::new(),
        };
        let mut listing = Listing {
            entries: Vec::new(),
            revision,
        };
        for name in names {
            if let Some((item, rev)) = self
                .read_watched(client, &mut children, &name, deadline)
                .await?
            {
                listing.revision = listing.revision.max(rev);
                if let Some(item) = item {
                    listing.entries.push(Entry { key: name, item });
                }
            }
        }
        Ok((listing, children))
    }

    /// Reads node `name` with a data watch on it: `None` if it is gone.
    async fn read_watched(
        &self,
        client: &Client,
        children: &mut Children,
        name: &str,
        deadline: Instant,
    ) -> std::result::Result<Option<(Option<Instance>, Revision)>, Failed> {
        let path = format!("{}/{name}", self.path);
        let read = client.get_and_watch_data(&path);
        match self.ctx.call(deadline, "zookeeper get", &path, read).await {
            Ok((data, stat, w)) => {
                children.names.insert(name.to_string());
                let n = name.to_string();
                children
                    .data
                    .push(async move { (n, w.changed().await) }.boxed());
                Ok(Some((
                    decode_node(&self.service, name, &data),
                    zxid(stat.mzxid),
                )))
            }
            Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                children.names.remove(name);
                Ok(None)
            }
            Err(f) => Err(f),
        }
    }

    /// The persistent watch's next changes: node events read pipelined, in order.
    async fn next_persistent(
        &self,
        session: &ZkSession,
        watcher: &mut PersistentWatcher,
        lost: &mut Option<Error>,
        after: Revision,
    ) -> Result<Vec<Change<Instance>>> {
        let first = watcher.changed().await;
        // Take what else is queued, up to a session event.
        let mut batch = vec![first];
        while batch.len() < BATCH && batch.last().map(|e| e.event_type) != Some(EventType::Session)
        {
            match watcher.changed().now_or_never() {
                Some(ev) => batch.push(ev),
                None => break,
            }
        }
        if let Some(ev) = batch.last().filter(|e| e.event_type == EventType::Session) {
            *lost = Some(session_error(ev.session_state));
            batch.pop();
        }
        let client = session.client()?;
        let deadline = self.ctx.deadline();
        let reads: Vec<_> = batch
            .iter()
            .map(|ev| {
                let wanted = matches!(
                    ev.event_type,
                    EventType::NodeCreated | EventType::NodeDataChanged
                ) && self.child_name(&ev.path).is_some();
                wanted.then(|| client.get_data(&ev.path))
            })
            .collect();
        let mut rev = after;
        let mut changes = Vec::new();
        for (ev, read) in batch.iter().zip(reads) {
            let Some(name) = self.child_name(&ev.path) else {
                continue;
            };
            rev = (rev + 1).max(zxid(ev.zxid));
            match (ev.event_type, read) {
                (EventType::NodeDeleted, _) => changes.push(Change::Delete {
                    key: name.to_string(),
                    revision: rev,
                }),
                (_, Some(read)) => {
                    match self
                        .ctx
                        .call(deadline, "zookeeper get", &ev.path, read)
                        .await
                    {
                        Ok((data, stat)) => {
                            rev = rev.max(zxid(stat.mzxid));
                            changes.push(Change::Put {
                                key: name.to_string(),
                                item: decode_node(&self.service, name, &data),
                                revision: rev,
                            });
                        }
                        // Gone again before we read it: its NodeDeleted follows.
                        Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
                        Err(f) => return Err(self.lost(session, self.ctx.error(f))),
                    }
                }
                _ => {}
            }
        }
        Ok(changes)
    }

    /// The fallback's next changes: a children change re-lists the names and reads the
    /// new ones; a data change re-reads that node.
    async fn next_children(
        &self,
        session: &ZkSession,
        children: &mut Children,
        after: Revision,
    ) -> Result<Vec<Change<Instance>>> {
        enum Fired {
            Children(WatchedEvent),
            Data(String, WatchedEvent),
            State(SessionState),
        }
        let fired = {
            let child = async {
                match children.child.as_mut() {
                    Some(f) => f.await,
                    None => futures::future::pending().await,
                }
            };
            let data = async {
                match children.data.next().await {
                    Some(x) => x,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                ev = child => Fired::Children(ev),
                (name, ev) = data => Fired::Data(name, ev),
                s = children.states.changed() => Fired::State(s),
            }
        };
        let client = session.client()?;
        let deadline = self.ctx.deadline();
        let fail = |f: Failed| self.lost(session, self.ctx.error(f));
        let mut changes = Vec::new();
        let mut rev = after;
        let mut put = |changes: &mut Vec<Change<Instance>>,
                       name: &str,
                       found: Option<(Option<Instance>, Revision)>| {
            rev = (rev + 1).max(found.as_ref().map_or(0, |f| f.1));
            changes.push(match found {
                Some((item, _)) => Change::Put {
                    key: name.to_string(),
                    item,
                    revision: rev,
                },
                None => Change::Delete {
                    key: name.to_string(),
                    revision: rev,
                },
            });
        };
        match fired {
            Fired::State(SessionState::SyncConnected | SessionState::ConnectedReadOnly) => {}
            Fired::State(s) => return Err(self.lost(session, session_error(s))),
            Fired::Children(ev) | Fired::Data(_, ev) if ev.event_type == EventType::Session => {
                return Err(self.lost(session, session_error(ev.session_state)))
            }
            Fired::Children(_) => {
                children.child = None;
                let (names, _, w) = self.watch_names(&client, deadline).await.map_err(fail)?;
                children.child = Some(w.changed().boxed());
                let now: HashSet<String> = names.into_iter().collect();
                let mut gone: Vec<String> = children.names.difference(&now).cloned().collect();
                gone.sort();
                for name in gone {
                    children.names.remove(&name);
                    put(&mut changes, &name, None);
                }
                let mut new: Vec<&String> = now
                    .iter()
                    .filter(|n| !children.names.contains(*n))
                    .collect();
                new.sort();
                for name in new {
                    let found = self
                        .read_watched(&client, children, name, deadline)
                        .await
                        .map_err(fail)?;
                    if found.is_some() {
                        put(&mut changes, name, found);
                    }
                }
            }
            Fired::Data(name, ev) => {
                // Changed, or deleted (and maybe created again): read it again either way,
                // which also re-arms its watch.
                let _ = ev;
                let found = self
                    .read_watched(&client, children, &name, deadline)
                    .await
                    .map_err(fail)?;
                put(&mut changes, &name, found);
            }
        }
        Ok(changes)
    }
}

#[async_trait]
impl Feed for ZkFeed {
    type Item = Instance;

    async fn list(&mut self) -> Result<Listing<Instance>> {
        self.live = None;
        let legacy = &mut self.legacy;
        let this = &self.reader;
        let session = this.session.current().await?;
        let client = session.client()?;
        let deadline = this.ctx.deadline();
        if let Err(e) = client::connected(&client, deadline).await {
            return Err(this.lost(&session, e));
        }
        if !*legacy {
            let add = client.watch(&this.path, AddWatchMode::PersistentRecursive);
            match this
                .ctx
                .call(deadline, "zookeeper watch", &this.path, add)
                .await
            {
                Ok(watcher) => {
                    let listing =
                        read_service(&this.ctx, &client, &this.service, &this.path, deadline)
                            .await
                            .map_err(|f| this.lost(&session, this.ctx.error(f)))?;
                    self.live = Some(Live {
                        session,
                        mode: Mode::Persistent(watcher),
                        lost: None,
                    });
                    return Ok(listing);
                }
                Err(Failed::Zk(_, _, ZkErr::Unimplemented)) => {
                    tracing::info!(service = %this.service, "zookeeper: no persistent watches on this server (< 3.6): falling back to child and data watches");
                    *legacy = true;
                }
                Err(f) => return Err(this.lost(&session, this.ctx.error(f))),
            }
        }
        let (listing, children) = this
            .list_children(&client, deadline)
            .await
            .map_err(|f| this.lost(&session, this.ctx.error(f)))?;
        self.live = Some(Live {
            session,
            mode: Mode::Children(children),
            lost: None,
        });
        Ok(listing)
    }

    async fn next(&mut self, after: Revision) -> Result<Next<Instance>> {
        let Some(mut live) = self.live.take() else {
            return Err(Error::unavailable("the ZooKeeper watch is not established"));
        };
        let this = &self.reader;
        loop {
            if let Some(e) = live.lost.take() {
                return Err(this.lost(&live.session, e));
            }
            let changes = match &mut live.mode {
                Mode::Persistent(w) => {
                    this.next_persistent(&live.session, w, &mut live.lost, after)
                        .await
                }
                Mode::Children(c) => this.next_children(&live.session, c, after).await,
            };
            match changes {
                Ok(c) if c.is_empty() => {}
                Ok(c) => {
                    self.live = Some(live);
                    return Ok(Next::Changes(c));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        is_own_name(self.reader.ctx.config.layout, key, &item.id)
    }
}
