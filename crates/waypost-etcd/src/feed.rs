//! Watching: a prefix read gives the listing and its revision, a prefix watch from the
//! next revision gives every change. Core's watch machine turns them into the watch
//! contract (snapshot, changes, `Stale`, `Resynced`).
//!
//! A stream dropped while the connection stays up (cancelled by etcd, or dropped by the
//! `drop_connections` test hook) is resumed from the last revision + 1 by the feed
//! itself, once (no loss, no duplicate, no `Stale`). If that fails, if the revision was
//! compacted, if the stream's connection is lost (the server went away: every connection
//! loss is an outage the consumer hears of), or if etcd leaves a progress probe
//! unanswered, the feed returns an error and the machine reports `Stale`, lists again and
//! reports `Resynced`.

use async_trait::async_trait;
use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::watch;
use tokio::time::Instant;
use waypost_core::backend::{Change, Entry, Feed, Listing, Next};
use waypost_core::{Error, Instance, Result, Revision, ServiceName};

use crate::client::Conn;
use crate::codec;
use crate::error::timed;

/// One service's watch primitives.
pub(crate) struct WatchFeed {
    conn: Conn,
    service: ServiceName,
    /// The service's key prefix, with the trailing `/`.
    sp: String,
    stream: Option<WatchStream>,
    /// Bumped by the `drop_connections` test hook: the stream is dropped.
    drops: Option<watch::Receiver<u64>>,
    last_heard: Instant,
    probe_sent: Option<Instant>,
}

impl WatchFeed {
    pub(crate) fn new(conn: &Conn, service: &ServiceName, drops: watch::Receiver<u64>) -> Self {
        Self {
            sp: codec::service_prefix(conn.config.key_prefix(), service),
            conn: conn.clone(),
            service: service.clone(),
            stream: None,
            drops: Some(drops),
            last_heard: Instant::now(),
            probe_sent: None,
        }
    }

    /// Everything under the service's prefix, at one revision; values that are not
    /// instances are skipped with a warning.
    pub(crate) async fn read(&self) -> Result<Listing<Instance>> {
        let resp = self
            .conn
            .call("listing a service", || {
                let mut kv = self.conn.client.kv_client();
                let sp = self.sp.clone();
                async move { kv.get(sp, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as Revision;
        let entries = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let item = self.decode(kv.key(), kv.value())?;
                Some(Entry {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    item,
                })
            })
            .collect();
        Ok(Listing { entries, revision })
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Option<Instance> {
        match codec::decode(self.conn.config.layout, &self.service, &self.sp, key, value) {
            Ok(i) => Some(i),
            Err(m) => {
                tracing::warn!(
                    key = %String::from_utf8_lossy(key),
                    "etcd: skipping a value that is not an instance: {m}"
                );
                None
            }
        }
    }

    /// Opens a prefix watch from `start` and waits for etcd to confirm it.
    async fn open(&mut self, start: i64) -> Result<()> {
        self.stream = None;
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream = self
            .conn
            .call("opening a watch", || {
                let mut wc = self.conn.client.watch_client();
                let (sp, opts) = (self.sp.clone(), opts.clone());
                async move { wc.watch(sp, Some(opts)).await }
            })
            .await?;
        match timed(self.conn.rt(), "opening a watch", stream.message()).await? {
            Some(r) if r.canceled() => return Err(cancel_error(&r)),
            Some(r) if r.created() => {}
            Some(_) => {
                return Err(Error::unavailable(
                    "etcd answered a watch request with something else",
                ))
            }
            None => return Err(Error::unavailable("etcd closed the watch stream")),
        }
        self.stream = Some(stream);
        self.last_heard = Instant::now();
        self.probe_sent = None;
        Ok(())
    }

    /// Waits for the stream's next message (`Ok(None)`: the test hook dropped the stream),
    /// sending a progress probe when the stream is idle and failing when it goes
    /// unanswered. A stream that fails or ends lost its connection: an error.
    async fn receive(&mut self) -> Result<Option<WatchResponse>> {
        let t = self.conn.rt();
        loop {
            let probe_at = match self.probe_sent {
                Some(sent) => sent + t,
                None => self.last_heard + self.conn.config.probe_interval,
            };
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            let hook = self.drops.as_mut();
            tokio::select! {
                biased;
                changed = async {
                    match hook {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        self.drops = None;
                        continue;
                    }
                    tracing::debug!(service = %self.service, "etcd: watch stream dropped by the test hook");
                }
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        self.last_heard = Instant::now();
                        self.probe_sent = None;
                        return Ok(Some(r));
                    }
                    // The connection is lost: an outage, reported as one.
                    Ok(None) => return Err(self.lost(None)),
                    Err(e) => return Err(self.lost(Some(e))),
                },
                _ = tokio::time::sleep_until(probe_at) => {
                    if self.probe_sent.is_some() {
                        self.stream = None;
                        return Err(Error::Timeout { operation: "etcd watch progress probe", after: t });
                    }
                    match stream.request_progress().await {
                        Ok(()) => {
                            self.probe_sent = Some(Instant::now());
                            continue;
                        }
                        Err(e) => return Err(self.lost(Some(e))),
                    }
                }
            }
            self.stream = None;
            return Ok(None);
        }
    }

    /// The stream failed or ended: its connection is gone.
    fn lost(&mut self, source: Option<etcd_client::Error>) -> Error {
        self.stream = None;
        tracing::debug!(service = %self.service, "etcd: watch stream lost: {source:?}");
        Error::Unavailable {
            message: "etcd watch stream lost its connection".into(),
            source: source.map(|e| Box::new(e) as waypost_core::BoxError),
        }
    }

    /// The changes of one watch response after `after`.
    fn changes(&self, r: &WatchResponse, after: i64) -> Vec<Change<Instance>> {
        r.events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                let rev = kv.mod_revision();
                if rev <= after {
                    return None;
                }
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let revision = rev as Revision;
                Some(match ev.event_type() {
                    EventType::Put => Change::Put {
                        item: self.decode(kv.key(), kv.value()),
                        key,
                        revision,
                    },
                    EventType::Delete => Change::Delete { key, revision },
                })
            })
            .collect()
    }
}

fn cancel_error(r: &WatchResponse) -> Error {
    let reason = r.cancel_reason();
    if reason.contains("permission denied") || reason.contains("auth") {
        Error::Unauthorized {
            message: format!("etcd cancelled the watch: {reason}"),
            source: None,
        }
    } else {
        Error::unavailable(format!("etcd cancelled the watch: {reason}"))
    }
}

#[async_trait]
impl Feed for WatchFeed {
    type Item = Instance;

    async fn list(&mut self) -> Result<Listing<Instance>> {
        self.stream = None;
        let listing = self.read().await?;
        self.open(listing.revision as i64 + 1).await?;
        Ok(listing)
    }

    async fn next(&mut self, after: Revision) -> Result<Next<Instance>> {
        let after = after as i64;
        // A dropped stream is resumed once; dropped again before it said anything, the
        // machine lists again.
        let mut resumed = false;
        loop {
            if self.stream.is_none() {
                if resumed {
                    return Err(Error::unavailable("etcd watch stream keeps dropping"));
                }
                resumed = true;
                self.open(after + 1).await?;
                tracing::debug!(service = %self.service, from = after + 1, "etcd: watch resumed");
            }
            let Some(r) = self.receive().await? else {
                continue;
            };
            resumed = false;
            if r.canceled() {
                self.stream = None;
                if r.compact_revision() > 0 {
                    tracing::warn!(
                        service = %self.service,
                        from = after + 1,
                        compacted = r.compact_revision(),
                        "etcd: changes were compacted before the watch resumed; resyncing"
                    );
                    return Err(Error::unavailable(format!(
                        "etcd compacted revisions up to {} before the watch could resume at {}",
                        r.compact_revision(),
                        after + 1
                    )));
                }
                tracing::debug!(service = %self.service, reason = r.cancel_reason(), "etcd: watch cancelled; resuming");
                continue;
            }
            let changes = self.changes(&r, after);
            if !changes.is_empty() {
                return Ok(Next::Changes(changes));
            }
        }
    }

    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        key == codec::key(self.conn.config.layout, self.conn.config.key_prefix(), item)
    }
}
