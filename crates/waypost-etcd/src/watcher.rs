//! Watching: a prefix read gives the snapshot and its revision, a prefix watch from the
//! next revision gives every change as one event, resumed from the last revision after a
//! dropped stream, resynced (`Stale`, then `Resynced`) when that is not possible.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use futures::stream::{BoxStream, StreamExt};
use tokio::time::Instant;
use waypost_core::{
    Backoff, Error, InstanceId, InstanceSet, Result, ServiceName, Snapshot, WatchEvent, Watcher,
};

use crate::client::EtcdDiscovery;
use crate::codec;
use crate::config::EtcdConfig;
use crate::error::{is_fatal, retried, timed};

/// What a watch needs of the client: the connection and the config (not the lease, so
/// a watch does not keep registrations alive).
#[derive(Clone)]
struct Ctx {
    client: Client,
    config: Arc<EtcdConfig>,
    /// Test hook (see `EtcdDiscovery::drop_watch_streams_for_tests`).
    drop_watches: Option<tokio::sync::watch::Receiver<u64>>,
}

struct Listing {
    snapshot: Snapshot,
    keys: HashMap<Vec<u8>, InstanceId>,
    revision: i64,
}

impl Ctx {
    fn prefix(&self, service: &ServiceName) -> String {
        codec::service_prefix(self.config.key_prefix(), service)
    }

    async fn read(&self, service: &ServiceName) -> Result<Listing> {
        let sp = self.prefix(service);
        let attempts = 2 * self.config.endpoints.len() + 1;
        let resp = retried(
            self.config.request_timeout,
            attempts,
            "listing a service",
            || {
                let mut kv = self.client.kv_client();
                let sp = sp.clone();
                async move { kv.get(sp, Some(GetOptions::new().with_prefix())).await }
            },
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut by_id = BTreeMap::new();
        let mut keys = HashMap::new();
        for kv in resp.kvs() {
            match codec::decode(self.config.layout, service, &sp, kv.key(), kv.value()) {
                Ok(i) => {
                    keys.insert(kv.key().to_vec(), i.id.clone());
                    by_id.insert(i.id.clone(), i);
                }
                Err(m) => tracing::warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    "etcd: skipping a value that is not an instance: {m}"
                ),
            }
        }
        Ok(Listing {
            snapshot: Snapshot::new(
                service.clone(),
                by_id.into_values().collect(),
                revision as u64,
            ),
            keys,
            revision,
        })
    }

    /// Opens a prefix watch from `start` and waits for etcd to confirm it.
    async fn open(&self, service: &ServiceName, start: i64) -> Result<WatchStream> {
        let t = self.config.request_timeout;
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let attempts = 2 * self.config.endpoints.len() + 1;
        let mut stream = retried(t, attempts, "opening a watch", || {
            let mut wc = self.client.watch_client();
            let (prefix, opts) = (self.prefix(service), opts.clone());
            async move { wc.watch(prefix, Some(opts)).await }
        })
        .await?;
        match timed(t, "opening a watch", stream.message()).await? {
            Some(r) if r.canceled() => Err(cancel_error(&r)),
            Some(r) if r.created() => Ok(stream),
            Some(_) => Err(Error::unavailable(
                "etcd answered a watch request with something else",
            )),
            None => Err(Error::unavailable("etcd closed the watch stream")),
        }
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
impl Watcher for EtcdDiscovery {
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        self.inner.check_alive()?;
        Ok(self.ctx().read(service).await?.snapshot)
    }

    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let ctx = self.ctx();
        let backoff_max = ctx
            .config
            .request_timeout
            .clamp(Duration::from_millis(500), Duration::from_secs(10));
        let st = WatchState {
            sp: ctx.prefix(service),
            ctx,
            service: service.clone(),
            set: InstanceSet::new(),
            keys: HashMap::new(),
            last_rev: 0,
            stream: None,
            need_snapshot: true,
            first: true,
            stale_sent: false,
            done: false,
            pending: VecDeque::new(),
            backoff: Backoff::new(Duration::from_millis(100), backoff_max),
            retry_at: None,
            last_heard: Instant::now(),
            probe_sent: None,
        };
        futures::stream::unfold(st, |mut st| async move {
            let ev = st.next().await?;
            Some((ev, st))
        })
        .boxed()
    }
}

impl EtcdDiscovery {
    fn ctx(&self) -> Ctx {
        Ctx {
            client: self.inner.client.clone(),
            config: self.inner.config.clone(),
            drop_watches: Some(self.inner.drop_watches.subscribe()),
        }
    }
}

struct WatchState {
    ctx: Ctx,
    service: ServiceName,
    sp: String,
    /// What the consumer holds, to tell `Added` from `Updated` and drop what turns bad.
    set: InstanceSet,
    /// Which instance each key holds.
    keys: HashMap<Vec<u8>, InstanceId>,
    /// Every change up to this revision has been yielded.
    last_rev: i64,
    stream: Option<WatchStream>,
    need_snapshot: bool,
    first: bool,
    stale_sent: bool,
    done: bool,
    pending: VecDeque<Result<WatchEvent>>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_heard: Instant,
    probe_sent: Option<Instant>,
}

impl WatchState {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            if self.stream.is_some() {
                self.step().await;
                continue;
            }
            if let Some(at) = self.retry_at.take() {
                tokio::time::sleep_until(at).await;
            }
            if self.need_snapshot {
                self.resync().await;
            } else {
                self.resume().await;
            }
        }
    }

    fn connected(&mut self, stream: WatchStream) {
        self.stream = Some(stream);
        self.last_heard = Instant::now();
        self.probe_sent = None;
    }

    /// Reads the prefix and watches from the revision after it.
    async fn resync(&mut self) {
        let listing = match self.ctx.read(&self.service).await {
            Ok(l) => l,
            Err(e) => return self.fail(e),
        };
        let stream = match self.ctx.open(&self.service, listing.revision + 1).await {
            Ok(s) => s,
            Err(e) => return self.fail(e),
        };
        self.connected(stream);
        self.last_rev = listing.revision;
        self.keys = listing.keys;
        self.set = InstanceSet::from_snapshot(&listing.snapshot);
        self.need_snapshot = false;
        self.stale_sent = false;
        self.backoff.reset();
        let ev = if std::mem::replace(&mut self.first, false) {
            WatchEvent::Snapshot(listing.snapshot)
        } else {
            tracing::info!(service = %self.service, revision = listing.revision, "etcd: watch resynced");
            WatchEvent::Resynced(listing.snapshot)
        };
        self.pending.push_back(Ok(ev));
    }

    /// After a dropped stream: watch again from the revision after the last one seen.
    async fn resume(&mut self) {
        match self.ctx.open(&self.service, self.last_rev + 1).await {
            Ok(s) => {
                tracing::debug!(service = %self.service, from = self.last_rev + 1, "etcd: watch resumed");
                self.connected(s);
            }
            Err(e) => self.fail(e),
        }
    }

    /// Could not (re)connect: `Stale` once (after the first snapshot), retry with backoff
    /// from a fresh snapshot; give up only on errors retrying cannot fix.
    fn fail(&mut self, e: Error) {
        self.stream = None;
        if is_fatal(&e) {
            self.pending.push_back(Err(e));
            self.done = true;
            return;
        }
        self.need_snapshot = true;
        let delay = self.backoff.next_delay();
        tracing::debug!(service = %self.service, retry_in = ?delay, "etcd: watch disconnected: {e}");
        self.retry_at = Some(Instant::now() + delay);
        self.stale(e);
    }

    fn stale(&mut self, reason: Error) {
        self.need_snapshot = true;
        if !self.first && !self.stale_sent {
            self.stale_sent = true;
            self.pending.push_back(Ok(WatchEvent::Stale {
                reason: Arc::new(reason),
            }));
        }
    }

    /// Waits for the next message or probe deadline.
    async fn step(&mut self) {
        let t = self.ctx.config.request_timeout;
        let probe_at = match self.probe_sent {
            Some(sent) => sent + t,
            None => self.last_heard + self.ctx.config.probe_interval,
        };
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let hook = self.ctx.drop_watches.as_mut();
        tokio::select! {
            biased;
            changed = async {
                match hook {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if changed {
                    tracing::debug!(service = %self.service, "etcd: watch stream dropped by the test hook; resuming");
                    self.stream = None;
                } else {
                    self.ctx.drop_watches = None;
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(r)) => {
                    self.last_heard = Instant::now();
                    self.probe_sent = None;
                    self.handle(r);
                }
                Ok(None) => {
                    tracing::debug!(service = %self.service, "etcd: watch stream ended; resuming");
                    self.stream = None;
                }
                Err(e) => {
                    tracing::debug!(service = %self.service, "etcd: watch stream failed: {e}; resuming");
                    self.stream = None;
                }
            },
            _ = tokio::time::sleep_until(probe_at) => {
                if self.probe_sent.is_some() {
                    self.stream = None;
                    self.retry_at = None;
                    self.stale(Error::Timeout { operation: "etcd watch progress probe", after: t });
                } else if let Err(e) = stream.request_progress().await {
                    tracing::debug!(service = %self.service, "etcd: watch probe not sent: {e}; resuming");
                    self.stream = None;
                } else {
                    self.probe_sent = Some(Instant::now());
                }
            }
        }
    }

    fn handle(&mut self, r: WatchResponse) {
        if r.canceled() {
            self.stream = None;
            if r.compact_revision() > 0 {
                tracing::warn!(
                    service = %self.service,
                    from = self.last_rev + 1,
                    compacted = r.compact_revision(),
                    "etcd: changes were compacted before the watch resumed; resyncing"
                );
                self.stale(Error::unavailable(format!(
                    "etcd compacted revisions up to {} before the watch could resume at {}",
                    r.compact_revision(),
                    self.last_rev + 1
                )));
            } else {
                tracing::debug!(service = %self.service, reason = r.cancel_reason(), "etcd: watch cancelled; resuming");
            }
            return;
        }
        let seen = self.last_rev;
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            if rev <= seen {
                continue;
            }
            self.last_rev = self.last_rev.max(rev);
            let revision = rev as u64;
            match ev.event_type() {
                EventType::Put => {
                    match codec::decode(
                        self.ctx.config.layout,
                        &self.service,
                        &self.sp,
                        kv.key(),
                        kv.value(),
                    ) {
                        Ok(inst) => {
                            let old = self.keys.insert(kv.key().to_vec(), inst.id.clone());
                            if let Some(old) = old.filter(|o| *o != inst.id) {
                                self.emit(WatchEvent::Removed { id: old, revision });
                            }
                            let ev = match self.set.get(&inst.id) {
                                Some(cur) if *cur == inst => continue,
                                Some(_) => WatchEvent::Updated {
                                    instance: inst,
                                    revision,
                                },
                                None => WatchEvent::Added {
                                    instance: inst,
                                    revision,
                                },
                            };
                            self.emit(ev);
                        }
                        Err(m) => {
                            tracing::warn!(
                                key = %String::from_utf8_lossy(kv.key()),
                                "etcd: skipping a value that is not an instance: {m}"
                            );
                            if let Some(id) = self.keys.remove(kv.key()) {
                                self.emit(WatchEvent::Removed { id, revision });
                            }
                        }
                    }
                }
                EventType::Delete => {
                    if let Some(id) = self.keys.remove(kv.key()) {
                        self.emit(WatchEvent::Removed { id, revision });
                    }
                }
            }
        }
    }

    fn emit(&mut self, ev: WatchEvent) {
        if let WatchEvent::Removed { id, .. } = &ev {
            if !self.set.contains(id) {
                return;
            }
        }
        self.set.apply(&ev);
        self.pending.push_back(Ok(ev));
    }
}
