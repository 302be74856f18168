//! The fallback watch for servers without persistent watches (ZooKeeper < 3.6): a
//! child watch on the service node and a data watch per instance node.

use std::sync::Arc;

use futures::StreamExt;
use waypost_core::{Error, Result};
use zookeeper_client::{Error as ZkErr, EventType, SessionState, WatchedEvent};

use super::{Next, WatchTask};
use crate::error::ZkError;
use crate::nodes::{self, Listing};
use crate::session::Conn;

impl WatchTask {
    /// The fallback for servers without persistent watches (< 3.6): a child watch on the
    /// service node and a data watch on each instance node, re-armed as they fire. A
    /// children change re-lists the names (one request) and reads only new nodes.
    pub(super) async fn follow_children(
        &mut self,
        conn: &Conn,
        conn_rx: &mut tokio::sync::watch::Receiver<Option<Arc<Conn>>>,
    ) -> Result<Next> {
        use futures::stream::FuturesUnordered;
        type Pending = futures::future::BoxFuture<'static, (String, WatchedEvent)>;
        let client = &conn.client;
        let mut states = client.state_watcher();
        let mut data_watches: FuturesUnordered<Pending> = FuturesUnordered::new();
        let path = self.path.clone();
        let op = |e| -> Error { ZkError::op("watch children", &path, e).into() };
        let mut fresh = true;
        loop {
            // The names, with a watch on them (or on the service node's creation).
            let (names, child_watch) = match client.list_and_watch_children(&self.path).await {
                Ok(x) => x,
                Err(ZkErr::NoNode) => match client.check_and_watch_stat(&self.path).await {
                    Ok((None, w)) => (Vec::new(), w),
                    Ok((Some(_), _)) => continue, // created meanwhile
                    Err(e) => return Err(op(e)),
                },
                Err(e) => return Err(op(e)),
            };
            let known: Vec<String> = if fresh {
                Vec::new()
            } else {
                self.nodes.keys().cloned().collect()
            };
            let mut listing = Listing::default();
            let mut events = Vec::new();
            for gone in known.iter().filter(|n| !names.contains(n)) {
                events.extend(self.node_gone(gone));
            }
            let reads: Vec<_> = names
                .iter()
                .filter(|n| fresh || !self.nodes.contains_key(*n))
                .map(|n| {
                    (
                        n.clone(),
                        client.get_and_watch_data(&format!("{}/{n}", self.path)),
                    )
                })
                .collect();
            for (name, read) in reads {
                match read.await {
                    Ok((data, stat, w)) => {
                        self.revision = self.revision.max(stat.mzxid.max(0) as u64);
                        let n = name.clone();
                        data_watches.push(Box::pin(async move { (n, w.changed().await) }));
                        if let Some(i) = nodes::decode_node(&self.service, &name, &data) {
                            if fresh {
                                listing.instances.push((name, i));
                            } else {
                                events.extend(self.node_is(&name, i));
                            }
                        }
                    }
                    Err(ZkErr::NoNode) => {}
                    Err(e) => return Err(op(e)),
                }
            }
            if fresh {
                listing.revision = self.revision;
                self.emit_listing(listing).await?;
                fresh = false;
            }
            for ev in events {
                self.set.apply(&ev);
                if !self.send(Ok(ev)).await {
                    return Ok(Next::Stop);
                }
            }
            let mut child_changed = std::pin::pin!(child_watch.changed());
            loop {
                tokio::select! {
                    ev = &mut child_changed => {
                        if ev.event_type == EventType::Session {
                            return Ok(Next::NewSession(conn.generation));
                        }
                        break; // re-list the names
                    }
                    Some((name, ev)) = data_watches.next(), if !data_watches.is_empty() => {
                        match ev.event_type {
                            EventType::Session => return Ok(Next::NewSession(conn.generation)),
                            EventType::NodeDataChanged => {
                                match client.get_and_watch_data(&ev.path).await {
                                    Ok((data, stat, w)) => {
                                        self.revision = self.revision.max(stat.mzxid.max(0) as u64);
                                        let n = name.clone();
                                        data_watches.push(Box::pin(async move { (n, w.changed().await) }));
                                        let out = match nodes::decode_node(&self.service, &name, &data) {
                                            Some(i) => self.node_is(&name, i),
                                            None => self.node_gone(&name),
                                        };
                                        for ev in out {
                                            self.set.apply(&ev);
                                            if !self.send(Ok(ev)).await {
                                                return Ok(Next::Stop);
                                            }
                                        }
                                    }
                                    Err(ZkErr::NoNode) => {}
                                    Err(e) => return Err(op(e)),
                                }
                            }
                            // Deletions arrive through the child watch as well.
                            _ => {}
                        }
                    }
                    s = states.changed() => match s {
                        SessionState::Disconnected => {
                            if !self.stale(Error::unavailable("lost the connection to ZooKeeper")).await {
                                return Ok(Next::Stop);
                            }
                        }
                        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                            return Ok(Next::Relist);
                        }
                        SessionState::Expired | SessionState::Closed => {
                            if !self.stale(Error::SessionExpired).await {
                                return Ok(Next::Stop);
                            }
                            return Ok(Next::NewSession(conn.generation));
                        }
                        SessionState::AuthFailed => {
                            return Err(Error::Unauthorized {
                                message: "ZooKeeper authentication failed".into(),
                                source: None,
                            })
                        }
                    },
                    _ = self.tx.closed() => return Ok(Next::Stop),
                    r = conn_rx.changed() => {
                        if r.is_err() || conn_rx.borrow().is_none() {
                            return Ok(Next::Stop);
                        }
                    }
                }
            }
        }
    }
}
