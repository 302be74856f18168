//! The watch primitives of configuration keys: a key's node, or every node below a
//! prefix's node, read at a zxid, then the changes after it. Core's watch machine turns
//! them into the watch contract.
//!
//! One persistent watch (`addWatch`, ZooKeeper ≥ 3.6) is added before the listing, so
//! nothing that changes after the read is missed: `PERSISTENT` on a key's node (its data
//! and its children, so that an empty value turning into a directory is seen),
//! `PERSISTENT_RECURSIVE` on a prefix's node. Either may be added before the node exists.
//! Each event costs one read of the node that changed (pipelined within a batch); a
//! deletion costs none.
//!
//! Revisions are zxids where ZooKeeper tells them (each read node's `mzxid`); a change
//! whose zxid is not known (a deletion) gets the next number after the last, and every
//! change's revision is at least one above the previous, so they strictly rise even when
//! a read returns a later state than the event that caused it.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use waypost_core::backend::{Change, Entry, Feed, Listing, Next, Scope, Session};
use waypost_core::kv::ConfigEntry;
use waypost_core::{Error, Result, Revision};
use zookeeper_client::{AddWatchMode, Client, EventType, PersistentWatcher};

use crate::client::{self, Ctx, Failed};
use crate::feed::{session_error, zxid};
use crate::kv_nodes::{entry_at, is_key, read, relative, walk};
use crate::session::{Driver, ZkSession};

/// How many queued events are read from the server in one pipelined batch.
const BATCH: usize = 256;

struct Live {
    session: ZkSession,
    watcher: PersistentWatcher,
    /// A connection loss seen after the changes of the last batch: the next call fails.
    lost: Option<Error>,
    /// The nodes in scope last seen as keys with an empty value: a child created below
    /// one of them makes it a directory without an event of its own.
    empty: HashSet<String>,
}

/// A watch of one key or one prefix, through the client's session.
pub struct ZkKvFeed {
    session: Session<Driver>,
    ctx: Arc<Ctx>,
    scope: Scope,
    /// The node of the key or of the prefix.
    path: String,
    live: Option<Live>,
}

impl fmt::Debug for ZkKvFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkKvFeed")
            .field("scope", &self.scope)
            .field("path", &self.path)
            .finish()
    }
}

/// What one event asks for.
enum Step {
    /// The node at this path is gone.
    Deleted(String, Revision),
    /// Read the node at this path (the event's zxid, if any).
    Read(String, Revision),
}

impl ZkKvFeed {
    pub(crate) fn new(session: Session<Driver>, ctx: Arc<Ctx>, scope: Scope, path: String) -> Self {
        Self {
            session,
            ctx,
            scope,
            path,
            live: None,
        }
    }
}

/// An error of `session`: an expiry is reported to core's session at once.
fn lost(sessions: &Session<Driver>, session: &ZkSession, e: Error) -> Error {
    if matches!(e, Error::SessionExpired) {
        sessions.expired(session);
    }
    e
}

/// Whether a node path is in the scope of a watch on `top`.
fn in_scope(scope: &Scope, top: &str, path: &str) -> bool {
    match scope {
        Scope::Key(_) => path == top,
        Scope::Prefix(_) => path
            .strip_prefix(top)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
    }
}

/// The change one read node makes: a key (or a node whose name is not a key: nothing for
/// us), or a directory (no key there).
fn change_of(
    root: &str,
    path: &str,
    found: (Vec<u8>, zookeeper_client::Stat),
    revision: Revision,
    empty: &mut HashSet<String>,
) -> Change<ConfigEntry> {
    let (data, stat) = found;
    let key = relative(root, path).to_string();
    if !is_key(&data, &stat) {
        empty.remove(path);
        return Change::Delete { key, revision };
    }
    if data.is_empty() {
        empty.insert(path.to_string());
    } else {
        empty.remove(path);
    }
    Change::Put {
        item: entry_at(root, path, data, &stat),
        key,
        revision,
    }
}

/// The listing of a key's node or of a prefix's subtree.
async fn listing(
    ctx: &Ctx,
    client: &Client,
    scope: &Scope,
    top: &str,
) -> std::result::Result<Listing<ConfigEntry>, Failed> {
    let root = &ctx.config.config_prefix;
    let deadline = ctx.deadline();
    match scope {
        Scope::Prefix(_) => walk(ctx, client, root, top, deadline).await,
        Scope::Key(_) => {
            let mut listing = Listing {
                entries: Vec::new(),
                revision: 0,
            };
            if let Some((data, stat)) = read(ctx, client, top, deadline).await? {
                listing.revision = zxid(stat.mzxid);
                if is_key(&data, &stat) {
                    if let Some(item) = entry_at(root, top, data, &stat) {
                        listing.entries.push(Entry {
                            key: relative(root, top).to_string(),
                            item,
                        });
                    }
                }
            }
            Ok(listing)
        }
    }
}

#[async_trait]
impl Feed for ZkKvFeed {
    type Item = ConfigEntry;

    async fn list(&mut self) -> Result<Listing<ConfigEntry>> {
        self.live = None;
        let session = self.session.current().await?;
        let client = session.client()?;
        let ctx = &self.ctx;
        let deadline = ctx.deadline();
        if let Err(e) = client::connected(&client, deadline).await {
            return Err(lost(&self.session, &session, e));
        }
        let mode = match self.scope {
            Scope::Key(_) => AddWatchMode::Persistent,
            Scope::Prefix(_) => AddWatchMode::PersistentRecursive,
        };
        let add = client.watch(&self.path, mode);
        let watcher = ctx
            .call(deadline, "zookeeper watch", &self.path, add)
            .await
            .map_err(|f| lost(&self.session, &session, ctx.error(f)))?;
        let listing = listing(ctx, &client, &self.scope, &self.path)
            .await
            .map_err(|f| lost(&self.session, &session, ctx.error(f)))?;
        let root = &ctx.config.config_prefix;
        let empty = listing
            .entries
            .iter()
            .filter(|e| e.item.value.is_empty())
            .map(|e| format!("{root}/{}", e.key))
            .collect();
        self.live = Some(Live {
            session,
            watcher,
            lost: None,
            empty,
        });
        Ok(listing)
    }

    async fn next(&mut self, after: Revision) -> Result<Next<ConfigEntry>> {
        let Some(mut live) = self.live.take() else {
            return Err(Error::unavailable("the ZooKeeper watch is not established"));
        };
        let ctx = &self.ctx;
        let root = &ctx.config.config_prefix;
        loop {
            if let Some(e) = live.lost.take() {
                return Err(lost(&self.session, &live.session, e));
            }
            let first = live.watcher.changed().await;
            // Take what else is queued, up to a session event.
            let mut batch = vec![first];
            while batch.len() < BATCH
                && batch.last().map(|e| e.event_type) != Some(EventType::Session)
            {
                match live.watcher.changed().now_or_never() {
                    Some(ev) => batch.push(ev),
                    None => break,
                }
            }
            if let Some(ev) = batch.last().filter(|e| e.event_type == EventType::Session) {
                live.lost = Some(session_error(ev.session_state));
                batch.pop();
            }
            let mut steps = Vec::new();
            for ev in &batch {
                if !in_scope(&self.scope, &self.path, &ev.path) {
                    continue;
                }
                let z = zxid(ev.zxid);
                match ev.event_type {
                    EventType::NodeDeleted => steps.push(Step::Deleted(ev.path.clone(), z)),
                    EventType::NodeCreated
                    | EventType::NodeDataChanged
                    | EventType::NodeChildrenChanged => {
                        steps.push(Step::Read(ev.path.clone(), z));
                        // A child below a key with an empty value makes it a directory.
                        if ev.event_type == EventType::NodeCreated {
                            if let Some((parent, _)) = ev.path.rsplit_once('/') {
                                if live.empty.contains(parent) {
                                    steps.push(Step::Read(parent.to_string(), z));
                                }
                            }
                        }
                    }
                    EventType::Session => {}
                }
            }
            if steps.is_empty() {
                continue;
            }
            let client = match live.session.client() {
                Ok(c) => c,
                Err(e) => return Err(e),
            };
            let deadline = ctx.deadline();
            let reads: Vec<_> = steps
                .iter()
                .map(|s| match s {
                    Step::Read(path, _) => Some(client.get_data(path)),
                    Step::Deleted(..) => None,
                })
                .collect();
            let mut rev = after;
            let mut changes = Vec::new();
            for (step, read) in steps.into_iter().zip(reads) {
                match (step, read) {
                    (Step::Deleted(path, z), _) => {
                        rev = (rev + 1).max(z);
                        live.empty.remove(&path);
                        changes.push(Change::Delete {
                            key: relative(root, &path).to_string(),
                            revision: rev,
                        });
                    }
                    (Step::Read(path, z), Some(read)) => {
                        match ctx.call(deadline, "zookeeper get", &path, read).await {
                            Ok(found) => {
                                rev = (rev + 1).max(z).max(zxid(found.1.mzxid));
                                changes.push(change_of(root, &path, found, rev, &mut live.empty));
                            }
                            // Gone again before we read it: its NodeDeleted follows.
                            Err(f) if f.code() == Some(&zookeeper_client::Error::NoNode) => {}
                            Err(f) => return Err(lost(&self.session, &live.session, ctx.error(f))),
                        }
                    }
                    (Step::Read(..), None) => {}
                }
            }
            if !changes.is_empty() {
                self.live = Some(live);
                return Ok(Next::Changes(changes));
            }
        }
    }
}
