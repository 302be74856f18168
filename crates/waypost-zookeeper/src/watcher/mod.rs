//! `Watcher` on ZooKeeper: one persistent recursive watch per service node; each change
//! reads only the node that changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use tokio::sync::mpsc;
use waypost_core::{
    Backoff, Error, InstanceId, InstanceSet, Result, ServiceName, Snapshot, WatchEvent, Watcher,
};
use zookeeper_client::{AddWatchMode, Error as ZkErr, EventType, SessionState, WatchedEvent};

use crate::error::ZkError;
use crate::nodes::{self, Listing};
use crate::session::{Conn, Inner};
use crate::ZkDiscovery;

mod children;

/// How many queued change events are read from the server in one pipelined batch.
const BATCH: usize = 256;

#[async_trait]
impl Watcher for ZkDiscovery {
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        let conn = self.inner.live_conn().await?;
        let path = self.inner.service_path(service);
        let listing = nodes::list(&conn.client, &path, service).await?;
        Ok(snapshot(service, &listing, listing.revision))
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let (tx, rx) = mpsc::channel(1024);
        let task = WatchTask {
            inner: self.inner.clone(),
            service: service.clone(),
            path: self.inner.service_path(service),
            tx,
            set: InstanceSet::new(),
            owners: HashMap::new(),
            nodes: HashMap::new(),
            revision: 0,
            first: true,
            stale_sent: false,
        };
        // The task starts on the first poll, inside the caller's runtime.
        futures::stream::once(async move {
            tokio::spawn(task.run());
            tokio_stream::wrappers::ReceiverStream::new(rx)
        })
        .flatten()
        .boxed()
    }
}

fn snapshot(service: &ServiceName, listing: &Listing, revision: u64) -> Snapshot {
    let mut by_id: HashMap<InstanceId, waypost_core::Instance> = HashMap::new();
    for (_, i) in &listing.instances {
        by_id.insert(i.id.clone(), i.clone());
    }
    Snapshot::new(service.clone(), by_id.into_values().collect(), revision)
}

/// Why the event loop of one watch stopped.
enum Next {
    /// Re-add the watch and re-list on the same session (after a reconnect).
    Relist,
    /// The session is gone: wait for the next one.
    NewSession(u64),
    /// The consumer dropped the stream, or the client was shut down.
    Stop,
}

struct WatchTask {
    inner: Arc<Inner>,
    service: ServiceName,
    path: String,
    tx: mpsc::Sender<Result<WatchEvent>>,
    /// What the consumer holds.
    set: InstanceSet,
    /// Instance id → the node it was last read from.
    owners: HashMap<InstanceId, String>,
    /// Node name → the instance id read from it.
    nodes: HashMap<String, InstanceId>,
    revision: u64,
    first: bool,
    stale_sent: bool,
}

impl WatchTask {
    async fn send(&self, ev: Result<WatchEvent>) -> bool {
        self.tx.send(ev).await.is_ok()
    }

    async fn stale(&mut self, why: Error) -> bool {
        if self.first || self.stale_sent {
            return true;
        }
        self.stale_sent = true;
        self.send(Ok(WatchEvent::Stale {
            reason: Arc::new(why),
        }))
        .await
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut conn_rx = self.inner.conn.subscribe();
        let mut legacy = self
            .inner
            .child_watches
            .load(std::sync::atomic::Ordering::Acquire);
        loop {
            let Some(conn) = conn_rx.borrow_and_update().clone() else {
                return;
            };
            if self.inner.is_crashed() {
                return;
            }
            let established = if legacy {
                self.follow_children(&conn, &mut conn_rx).await
            } else {
                match self.establish(&conn).await {
                    Ok(watcher) => Ok(self.follow(&conn, watcher, &mut conn_rx).await),
                    Err(Error::Unsupported { .. }) => {
                        tracing::info!(service = %self.service, "zookeeper: no persistent watches on this server (< 3.6): falling back to child and data watches");
                        legacy = true;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            };
            let next = match established {
                Ok(next) => {
                    backoff.reset();
                    next
                }
                Err(e) => match e {
                    Error::Unsupported { .. } | Error::Unauthorized { .. } => {
                        let _ = self.send(Err(e)).await;
                        return;
                    }
                    e => {
                        tracing::debug!(service = %self.service, "zookeeper: watch not established yet: {e}");
                        if !self.stale(e).await {
                            return;
                        }
                        if conn.client.state().is_terminated() {
                            Next::NewSession(conn.generation)
                        } else {
                            tokio::select! {
                                _ = tokio::time::sleep(backoff.next_delay()) => Next::Relist,
                                _ = self.tx.closed() => Next::Stop,
                            }
                        }
                    }
                },
            };
            match next {
                Next::Relist => {}
                Next::Stop => return,
                Next::NewSession(gen) => {
                    self.inner.kick.notify_one();
                    let wait =
                        conn_rx.wait_for(|c| c.as_ref().map_or(true, |c| c.generation > gen));
                    tokio::select! {
                        r = wait => if r.is_err() { return },
                        _ = self.tx.closed() => return,
                    }
                }
            }
        }
    }

    /// Adds the watch, then lists: the first snapshot, a resync after `Stale`, or the
    /// changes since the last listing.
    async fn establish(&mut self, conn: &Conn) -> Result<zookeeper_client::PersistentWatcher> {
        let watcher = conn
            .client
            .watch(&self.path, AddWatchMode::PersistentRecursive)
            .await
            .map_err(|e| match e {
                ZkErr::Unimplemented => Error::unsupported(
                    "watching on ZooKeeper older than 3.6 (no persistent recursive watches)",
                ),
                e => ZkError::op("watch", &self.path, e).into(),
            })?;
        let listing = nodes::list(&conn.client, &self.path, &self.service).await?;
        self.emit_listing(listing).await?;
        Ok(watcher)
    }

    /// Reports a fresh listing: the first snapshot, a resync after `Stale`, or the
    /// changes since the last listing.
    async fn emit_listing(&mut self, listing: Listing) -> Result<()> {
        self.revision = self.revision.max(listing.revision);
        self.nodes.clear();
        self.owners.clear();
        for (name, i) in &listing.instances {
            self.nodes.insert(name.clone(), i.id.clone());
            self.owners.insert(i.id.clone(), name.clone());
        }
        let snap = snapshot(&self.service, &listing, self.revision);
        if self.first || self.stale_sent {
            self.set = InstanceSet::from_snapshot(&snap);
            let ev = if self.first {
                WatchEvent::Snapshot(snap)
            } else {
                WatchEvent::Resynced(snap)
            };
            self.first = false;
            self.stale_sent = false;
            if !self.send(Ok(ev)).await {
                return Err(Error::Closed { what: "watch" });
            }
        } else {
            for ev in self.set.diff_replace(snap.instances, self.revision) {
                if !self.send(Ok(ev)).await {
                    return Err(Error::Closed { what: "watch" });
                }
            }
        }
        Ok(())
    }

    /// Follows the watch until the session is lost or the consumer goes.
    async fn follow(
        &mut self,
        conn: &Conn,
        mut watcher: zookeeper_client::PersistentWatcher,
        conn_rx: &mut tokio::sync::watch::Receiver<Option<Arc<Conn>>>,
    ) -> Next {
        let prefix = format!("{}/", self.path);
        loop {
            let first = tokio::select! {
                ev = watcher.changed() => ev,
                _ = self.tx.closed() => return Next::Stop,
                r = conn_rx.changed() => {
                    if r.is_err() || conn_rx.borrow().is_none() {
                        return Next::Stop;
                    }
                    continue;
                }
            };
            // Take what else is queued, up to a session event, and read it pipelined.
            let mut batch = vec![first];
            while batch.len() < BATCH
                && batch.last().map(|e| e.event_type) != Some(EventType::Session)
            {
                match watcher.changed().now_or_never() {
                    Some(ev) => batch.push(ev),
                    None => break,
                }
            }
            let session_event = match batch.last() {
                Some(e) if e.event_type == EventType::Session => batch.pop(),
                _ => None,
            };
            if !self.apply_changes(conn, &prefix, batch).await {
                return Next::Stop;
            }
            let Some(ev) = session_event else { continue };
            match ev.session_state {
                SessionState::Disconnected => {
                    let why = Error::unavailable("lost the connection to ZooKeeper");
                    if !self.stale(why).await {
                        return Next::Stop;
                    }
                }
                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                    // Persistent watches are not re-added by the client after a reconnect,
                    // and changes made meanwhile fired nothing: add it again and re-list.
                    return Next::Relist;
                }
                SessionState::Expired => {
                    if !self.stale(Error::SessionExpired).await {
                        return Next::Stop;
                    }
                    return Next::NewSession(conn.generation);
                }
                SessionState::AuthFailed => {
                    let _ = self
                        .send(Err(Error::Unauthorized {
                            message: "ZooKeeper authentication failed".into(),
                            source: None,
                        }))
                        .await;
                    return Next::Stop;
                }
                SessionState::Closed => return Next::NewSession(conn.generation),
            }
        }
    }

    /// Applies node events: reads each created or changed node (one read per change,
    /// all reads of a batch pipelined), drops deleted ones.
    async fn apply_changes(&mut self, conn: &Conn, prefix: &str, batch: Vec<WatchedEvent>) -> bool {
        let mut reads = Vec::with_capacity(batch.len());
        for ev in &batch {
            let child = ev
                .path
                .strip_prefix(prefix)
                .filter(|n| !n.is_empty() && !n.contains('/'));
            let read = match (child, ev.event_type) {
                (Some(_), EventType::NodeCreated | EventType::NodeDataChanged) => {
                    Some(conn.client.get_data(&ev.path))
                }
                _ => None,
            };
            reads.push(read);
        }
        let mut results = Vec::with_capacity(batch.len());
        for r in reads {
            results.push(match r {
                Some(f) => Some(f.await),
                None => None,
            });
        }
        for (ev, read) in batch.into_iter().zip(results) {
            if ev.zxid > 0 {
                self.revision = self.revision.max(ev.zxid as u64);
            }
            let Some(name) = ev
                .path
                .strip_prefix(prefix)
                .filter(|n| !n.is_empty() && !n.contains('/'))
            else {
                continue;
            };
            let events = match (ev.event_type, read) {
                (EventType::NodeDeleted, _) => self.node_gone(name),
                (_, Some(Ok((data, stat)))) => {
                    self.revision = self.revision.max(stat.mzxid.max(0) as u64);
                    match nodes::decode_node(&self.service, name, &data) {
                        Some(instance) => self.node_is(name, instance),
                        None => self.node_gone(name),
                    }
                }
                // Gone again before we read it: its NodeDeleted follows.
                (_, Some(Err(ZkErr::NoNode))) => Vec::new(),
                (_, Some(Err(e))) => {
                    // Connection trouble: a session event follows, and a re-list.
                    tracing::debug!(node = %ev.path, "zookeeper: reading a changed node failed: {e}");
                    Vec::new()
                }
                _ => Vec::new(),
            };
            for out in events {
                self.set.apply(&out);
                if !self.send(Ok(out)).await {
                    return false;
                }
            }
        }
        true
    }

    fn node_gone(&mut self, name: &str) -> Vec<WatchEvent> {
        let Some(id) = self.nodes.remove(name) else {
            return Vec::new();
        };
        if self.owners.get(&id).map(String::as_str) != Some(name) {
            return Vec::new(); // another node holds this id now
        }
        self.owners.remove(&id);
        if !self.set.contains(&id) {
            return Vec::new();
        }
        vec![WatchEvent::Removed {
            id,
            revision: self.revision,
        }]
    }

    fn node_is(&mut self, name: &str, instance: waypost_core::Instance) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        if let Some(old) = self.nodes.insert(name.to_string(), instance.id.clone()) {
            if old != instance.id && self.owners.get(&old).map(String::as_str) == Some(name) {
                // The node now carries another id (foreign writers): the old one is gone.
                self.owners.remove(&old);
                out.push(WatchEvent::Removed {
                    id: old,
                    revision: self.revision,
                });
            }
        }
        self.owners.insert(instance.id.clone(), name.to_string());
        match self.set.get(&instance.id) {
            Some(cur) if *cur == instance => {}
            Some(_) => out.push(WatchEvent::Updated {
                instance,
                revision: self.revision,
            }),
            None => out.push(WatchEvent::Added {
                instance,
                revision: self.revision,
            }),
        }
        out
    }
}
