//! The stream handling every etcd feed shares (instances of a service, configuration
//! keys): a read at one revision, then a watch from the next revision, resumed or failed
//! by one set of rules.
//!
//! A stream dropped while the connection stays up (cancelled by etcd, or dropped by the
//! `drop_connections` test hook) is resumed from the last revision + 1 by the watch
//! itself, once (no loss, no duplicate, no `Stale`). If that fails, if the revision was
//! compacted, if the stream's connection is lost (the server went away: every connection
//! loss is an outage the consumer hears of), or if etcd leaves a progress probe
//! unanswered, [`EtcdWatch::next`] returns an error and core's watch machine reports
//! `Stale`, lists again and reports `Resynced`.

use etcd_client::{
    Event, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::watch;
use tokio::time::Instant;
use waypost_core::{Error, Result, Revision};

use crate::client::Conn;
use crate::error::timed;

/// What one watch covers: one etcd key, or every key that starts with a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Range {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this (which ends with `/`).
    Prefix(String),
}

impl Range {
    fn key(&self) -> &str {
        match self {
            Range::Key(k) | Range::Prefix(k) => k,
        }
    }

    fn get_options(&self) -> Option<GetOptions> {
        match self {
            Range::Key(_) => None,
            Range::Prefix(_) => Some(GetOptions::new().with_prefix()),
        }
    }

    fn watch_options(&self, start: i64) -> WatchOptions {
        let opts = WatchOptions::new().with_start_revision(start);
        match self {
            Range::Key(_) => opts,
            Range::Prefix(_) => opts.with_prefix(),
        }
    }
}

/// The bit of the test-hook channel's value that stalls every watch stream (it is not
/// read until cleared); the other bits count `drop_connections` calls.
pub(crate) const STALL: u64 = 1 << 63;

/// One revisioned etcd watch of a [`Range`]: its read, its stream, its probes.
pub(crate) struct EtcdWatch {
    conn: Conn,
    range: Range,
    /// What is watched, for logs (`service greeter`, `config prefix app/`).
    what: String,
    stream: Option<WatchStream>,
    /// Bumped by the `drop_connections` test hook: the stream is dropped. Its [`STALL`]
    /// bit (the `stall_watches` hook) stops reading the stream.
    drops: Option<watch::Receiver<u64>>,
    /// The drop count last acted on.
    seen_drops: u64,
    last_heard: Instant,
    probe_sent: Option<Instant>,
}

impl EtcdWatch {
    pub(crate) fn new(
        conn: &Conn,
        range: Range,
        what: String,
        drops: watch::Receiver<u64>,
    ) -> Self {
        let seen_drops = *drops.borrow() & !STALL;
        Self {
            conn: conn.clone(),
            range,
            what,
            stream: None,
            seen_drops,
            drops: Some(drops),
            last_heard: Instant::now(),
            probe_sent: None,
        }
    }

    /// What is watched, for logs.
    pub(crate) fn what(&self) -> &str {
        &self.what
    }

    /// Every key of the range and the revision they were read at (no stream opened).
    pub(crate) async fn read(&self, operation: &'static str) -> Result<(Vec<KeyValue>, Revision)> {
        let mut resp = self
            .conn
            .call(operation, || {
                let mut kv = self.conn.client.kv_client();
                let (key, opts) = (self.range.key().to_string(), self.range.get_options());
                async move { kv.get(key, opts).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as Revision;
        Ok((resp.take_kvs(), revision))
    }

    /// [`EtcdWatch::read`], then a stream from the next revision: what
    /// [`Feed::list`](waypost_core::backend::Feed::list) does.
    pub(crate) async fn list(
        &mut self,
        operation: &'static str,
    ) -> Result<(Vec<KeyValue>, Revision)> {
        self.stream = None;
        let (kvs, revision) = self.read(operation).await?;
        self.open(revision as i64 + 1).await?;
        Ok((kvs, revision))
    }

    /// Opens the watch from `start` and waits for etcd to confirm it.
    async fn open(&mut self, start: i64) -> Result<()> {
        self.stream = None;
        let opts = self.range.watch_options(start);
        let mut stream = self
            .conn
            .call("opening a watch", || {
                let mut wc = self.conn.client.watch_client();
                let (key, opts) = (self.range.key().to_string(), opts.clone());
                async move { wc.watch(key, Some(opts)).await }
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
            let stalled = self
                .drops
                .as_ref()
                .is_some_and(|rx| *rx.borrow() & STALL != 0);
            let hook = self.drops.as_mut();
            tokio::select! {
                biased;
                changed = async {
                    match hook {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(rx) = self.drops.as_ref().filter(|_| changed) else {
                        self.drops = None;
                        continue;
                    };
                    let drops = *rx.borrow() & !STALL;
                    if drops == self.seen_drops {
                        continue; // only the stall changed
                    }
                    self.seen_drops = drops;
                    tracing::debug!(watch = %self.what, "etcd: watch stream dropped by the test hook");
                }
                msg = stream.message(), if !stalled => match msg {
                    Ok(Some(r)) => {
                        self.last_heard = Instant::now();
                        self.probe_sent = None;
                        return Ok(Some(r));
                    }
                    // The connection is lost: an outage, reported as one.
                    Ok(None) => return Err(self.lost(None)),
                    Err(e) => return Err(self.lost(Some(e))),
                },
                _ = tokio::time::sleep_until(probe_at), if !stalled => {
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
        tracing::debug!(watch = %self.what, "etcd: watch stream lost: {source:?}");
        Error::Unavailable {
            message: "etcd watch stream lost its connection".into(),
            source: source.map(|e| Box::new(e) as waypost_core::BoxError),
        }
    }

    /// Waits for the next watch response with at least one event after `after` (the
    /// revision the machine holds): what
    /// [`Feed::next`](waypost_core::backend::Feed::next) does. Iterate its events with
    /// [`events_after`].
    pub(crate) async fn next(&mut self, after: Revision) -> Result<WatchResponse> {
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
                tracing::debug!(watch = %self.what, from = after + 1, "etcd: watch resumed");
            }
            let Some(r) = self.receive().await? else {
                continue;
            };
            resumed = false;
            if r.canceled() {
                self.stream = None;
                if r.compact_revision() > 0 {
                    tracing::warn!(
                        watch = %self.what,
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
                tracing::debug!(watch = %self.what, reason = r.cancel_reason(), "etcd: watch cancelled; resuming");
                continue;
            }
            if events_after(&r, after as Revision).next().is_some() {
                return Ok(r);
            }
        }
    }
}

/// The events of `r` whose revision is above `after`, with that revision (a resumed
/// stream may repeat events the machine already holds).
pub(crate) fn events_after(
    r: &WatchResponse,
    after: Revision,
) -> impl Iterator<Item = (EventType, &KeyValue, Revision)> {
    r.events().iter().filter_map(move |ev: &Event| {
        let kv = ev.kv()?;
        let rev = kv.mod_revision();
        (rev > after as i64).then_some((ev.event_type(), kv, rev as Revision))
    })
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
