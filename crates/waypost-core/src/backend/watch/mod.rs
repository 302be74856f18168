//! The watch machine: one implementation of the watch contract for every backend and every
//! kind of watched item.
//!
//! A backend supplies a [`Feed`]: "list everything at a revision" and "the next changes
//! after a revision" (or, for registries that only offer blocking listings, a fresh
//! listing). The machine owns the rest of the contract:
//!
//! - a [`Event::Snapshot`] first, always, and only once the registry answered;
//! - `Added` / `Updated` / `Removed` computed against what the consumer holds, so a change
//!   is never delivered twice and a change that changes nothing is not delivered;
//! - [`Event::Stale`] once per outage, and [`Event::Resynced`] only after a `Stale`;
//! - retries with jittered backoff for as long as the stream is held, and one rule for
//!   which errors end the stream ([`ends_watch`]);
//! - one id, one entry: when several registry entries claim the same id (a foreign writer
//!   beside us), the consumer sees one of them, chosen by a fixed rule, and removing one
//!   claimant re-exposes the next.
//!
//! # Which claimant wins
//!
//! Among the entries that claim one id, the entry the backend itself would write for that
//! id ([`Feed::is_canonical`]: ours) wins; among the others, the smallest registry key.
//! The rule depends only on what the registry holds, so every watcher of every process
//! agrees.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, Revision, ServiceName};

use super::options::BackoffOptions;

mod shared;
pub use shared::WatchHub;

/// Something a watch delivers: instances now, configuration entries next.
pub trait Item: Clone + PartialEq + Debug + Send + Sync + 'static {
    /// What identifies an item for consumers (an instance id, a configuration key).
    type Id: Ord + Clone + Debug + Send + Sync + 'static;
    /// This item's id.
    fn id(&self) -> &Self::Id;
    /// What kind of item, as a metrics label (`instance`, `config`, `leader`).
    const KIND: &'static str = "item";
}

impl Item for Instance {
    type Id = InstanceId;
    const KIND: &'static str = "instance";
    fn id(&self) -> &InstanceId {
        &self.id
    }
}

/// One registry entry: where it is stored and what it holds (already decoded; a backend
/// skips and logs entries it cannot decode).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<T> {
    /// The entry's key in the registry (a node path, an etcd key, a Consul node/service
    /// id): unique among the entries of one listing.
    pub key: String,
    /// The decoded item.
    pub item: T,
}

/// Everything the registry holds for one watch, read at one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing<T> {
    /// The entries, in any order.
    pub entries: Vec<Entry<T>>,
    /// The registry revision the listing was read at.
    pub revision: Revision,
}

/// One change to one registry entry.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<T> {
    /// The entry at `key` was written. `item: None`: what was written is not an item (a
    /// foreign or malformed value, logged by the backend): the key holds nothing for us.
    Put {
        /// The entry's key.
        key: String,
        /// The decoded item, if the value is one.
        item: Option<T>,
        /// The revision of the change.
        revision: Revision,
    },
    /// The entry at `key` is gone.
    Delete {
        /// The entry's key.
        key: String,
        /// The revision of the change.
        revision: Revision,
    },
}

impl<T> Change<T> {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

/// What [`Feed::next`] found.
///
/// Revisions: every change a feed reports after `after` must carry a revision strictly
/// above it (the machine ignores changes at or below the revision it holds, since a
/// resumed stream may repeat them). A registry that sends no revision with its events
/// numbers them itself (the last revision plus one, say); one with no revisions at all
/// answers with [`Next::Listing`].
#[derive(Clone, Debug, PartialEq)]
pub enum Next<T> {
    /// Changes after the revision asked for, in registry order. Changes at or below the
    /// revision the machine already holds are ignored (a resumed stream may repeat them).
    Changes(Vec<Change<T>>),
    /// A fresh listing (registries whose watches are blocking listings, such as Consul's
    /// blocking queries, or ZooKeeper's child watches): the machine diffs it against
    /// what it holds. This is not an outage: no `Stale` is reported.
    Listing(Listing<T>),
}

/// The registry primitives of one watch. The machine calls [`Feed::list`] first and after
/// every failure, and [`Feed::next`] in between.
///
/// A feed may keep a connection or a server-side watch open between calls to `next`, and
/// resume it by itself after a dropped connection when the registry can replay from a
/// revision (etcd). It must return an error when it cannot tell what happened since the
/// revision it was asked for (a compacted revision, a server that stays silent past its
/// deadline): the machine then reports `Stale` and lists again.
#[async_trait]
pub trait Feed: Send + 'static {
    /// What this feed delivers.
    type Item: Item;

    /// Reads everything the watch covers, at one revision, and arranges for [`Feed::next`]
    /// to report what changes after it.
    async fn list(&mut self) -> Result<Listing<Self::Item>>;

    /// Waits for the next changes after `after` (the revision of the last listing or
    /// change the machine applied).
    async fn next(&mut self, after: Revision) -> Result<Next<Self::Item>>;

    /// Whether `key` is where this backend itself writes `item` (ours): such an entry
    /// wins over foreign entries claiming the same id. Defaults to none.
    fn is_canonical(&self, key: &str, item: &Self::Item) -> bool {
        let _ = (key, item);
        false
    }
}

/// Whether an error ends a watch stream (yielded as `Err`, then the stream ends): an error
/// that retrying cannot fix, [`Error::is_temporary`] false — invalid input or
/// configuration, missing permissions, a datacenter or a thing that does not exist, an
/// unsupported operation, a registry that does not speak its protocol, a client that was
/// shut down. Everything temporary is retried with backoff and reported as `Stale`.
///
/// One rule for every backend and every watch; a backend decides by how it classifies
/// its errors (its error enum's mapping into [`Error`]).
pub fn ends_watch(error: &Error) -> bool {
    !error.is_temporary()
}

/// What the machine yields: the watch contract, generic over the item.
#[derive(Clone, Debug)]
pub enum Event<T: Item> {
    /// The first event: the authoritative set, sorted by id.
    Snapshot(Vec<T>, Revision),
    /// An item appeared.
    Added(T, Revision),
    /// An item changed.
    Updated(T, Revision),
    /// An item is gone.
    Removed(T::Id, Revision),
    /// The registry is unreachable: keep the last known set.
    Stale(Arc<Error>),
    /// The registry is back: the authoritative set, replacing the last one.
    Resynced(Vec<T>, Revision),
}

/// The set of items a listing describes, one per id, chosen by the claimant rule (see the
/// module docs). What [`Watcher::instances`](crate::Watcher::instances) returns.
pub fn resolve<F: Feed + ?Sized>(feed: &F, listing: Listing<F::Item>) -> (Vec<F::Item>, Revision) {
    let mut claims = Claims::default();
    for e in listing.entries {
        let canonical = feed.is_canonical(&e.key, &e.item);
        claims.put(e.key, e.item, canonical);
    }
    let items = claims.winners().cloned().collect();
    (items, listing.revision)
}

/// Which registry entries claim which id.
struct Claims<T: Item> {
    by_key: HashMap<String, (T, bool)>,
    /// Per id, its claimants ordered by the rule: (not canonical, key).
    by_id: BTreeMap<T::Id, BTreeSet<(bool, String)>>,
}

impl<T: Item> Default for Claims<T> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            by_id: BTreeMap::new(),
        }
    }
}

impl<T: Item> Claims<T> {
    /// Records `key` → `item`; returns the ids whose claimants changed.
    fn put(&mut self, key: String, item: T, canonical: bool) -> Vec<T::Id> {
        let mut touched = self.delete(&key);
        let id = item.id().clone();
        self.by_id
            .entry(id.clone())
            .or_default()
            .insert((!canonical, key.clone()));
        self.by_key.insert(key, (item, canonical));
        if !touched.contains(&id) {
            touched.push(id);
        }
        touched
    }

    fn delete(&mut self, key: &str) -> Vec<T::Id> {
        let Some((old, canonical)) = self.by_key.remove(key) else {
            return Vec::new();
        };
        let id = old.id().clone();
        if let Some(set) = self.by_id.get_mut(&id) {
            set.remove(&(!canonical, key.to_string()));
            if set.is_empty() {
                self.by_id.remove(&id);
            }
        }
        vec![id]
    }

    fn winner(&self, id: &T::Id) -> Option<&T> {
        let (_, key) = self.by_id.get(id)?.iter().next()?;
        self.by_key.get(key).map(|(item, _)| item)
    }

    fn winners(&self) -> impl Iterator<Item = &T> {
        self.by_id.keys().filter_map(|id| self.winner(id))
    }
}

/// The watch machine over one [`Feed`]. Build one with [`watch`] (generic events) or
/// [`watch_instances`] (the [`Watcher`](crate::Watcher) contract).
struct Machine<F: Feed> {
    feed: F,
    claims: Claims<F::Item>,
    /// What the consumer holds: the winner of every id, as last yielded.
    visible: BTreeMap<<F::Item as Item>::Id, F::Item>,
    revision: Revision,
    live: bool,
    first: bool,
    stale_sent: bool,
    done: bool,
    pending: VecDeque<Result<Event<F::Item>>>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    what: String,
}

/// How many events the machine reads ahead of a slow consumer.
const READ_AHEAD: usize = 1024;

/// Runs the watch machine over `feed`: a stream of [`Event`]s that keeps the watch
/// contract. `what` names the watch in logs (a service, a key prefix).
///
/// The machine runs when the stream is polled; wrap the stream in [`spawned`] to run it
/// in its own task instead.
pub fn watch<F: Feed>(
    feed: F,
    backoff: &BackoffOptions,
    what: impl Into<String>,
) -> BoxStream<'static, Result<Event<F::Item>>> {
    let machine = Machine {
        feed,
        claims: Claims::default(),
        visible: BTreeMap::new(),
        revision: 0,
        live: false,
        first: true,
        stale_sent: false,
        done: false,
        pending: VecDeque::new(),
        backoff: backoff.backoff(),
        retry_at: None,
        what: what.into(),
    };
    let stale_since: Option<std::time::Instant> = None;
    futures::stream::unfold(
        (machine, stale_since),
        |(mut m, mut stale_since)| async move {
            let ev = m.next().await?;
            if let Ok(e) = &ev {
                let kind = match e {
                    Event::Snapshot(..) => "snapshot",
                    Event::Added(..) => "added",
                    Event::Updated(..) => "updated",
                    Event::Removed(..) => "removed",
                    Event::Stale(_) => {
                        stale_since = Some(std::time::Instant::now());
                        "stale"
                    }
                    Event::Resynced(..) => {
                        if let Some(at) = stale_since.take() {
                            crate::metrics::watch_stale(F::Item::KIND, at.elapsed().as_secs_f64());
                        }
                        "resynced"
                    }
                };
                crate::metrics::watch_event(F::Item::KIND, kind);
            }
            Some((ev, (m, stale_since)))
        },
    )
    .boxed()
}

/// Runs a watch stream in its own task, started at the first poll, reading up to 1,024
/// events ahead of the consumer: the machine follows the registry (and notices an outage)
/// while the consumer is busy, and a change is read while `register` is still returning.
/// Dropping the returned stream ends the task, which drops the feed and releases its
/// registry watch. Backends whose feeds wait on the registry between polls (ZooKeeper's
/// reads after a watch event, Consul's blocking queries) use it.
pub fn spawned<T: Send + 'static>(events: BoxStream<'static, T>) -> BoxStream<'static, T> {
    futures::stream::once(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::spawn(async move {
            let mut events = events;
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(ev) => if tx.send(ev).await.is_err() { return },
                        None => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    })
    .flatten()
    .boxed()
}

/// [`watch`] for instances of `service`, as [`WatchEvent`]s: what a backend's
/// [`Watcher::watch`](crate::Watcher::watch) returns.
pub fn watch_instances<F: Feed<Item = Instance>>(
    feed: F,
    backoff: &BackoffOptions,
    service: &ServiceName,
) -> BoxStream<'static, Result<WatchEvent>> {
    instance_events(service, watch(feed, backoff, service.to_string()))
}

/// A watch of `service` through `hub`: one registry watch per service per client,
/// whatever the number of local watchers (see [`WatchHub`]). `start` builds the
/// machine's stream ([`watch`] over the backend's feed, or [`spawned`] around it) when no
/// watch of the service runs yet. What a backend's
/// [`Watcher::watch`](crate::Watcher::watch) returns.
pub fn shared_instances(
    hub: &WatchHub<ServiceName, Instance>,
    service: &ServiceName,
    start: impl FnOnce() -> BoxStream<'static, Result<Event<Instance>>> + Send + 'static,
) -> BoxStream<'static, Result<WatchEvent>> {
    instance_events(service, hub.watch(service.clone(), start))
}

/// Machine events of `service` as [`WatchEvent`]s.
fn instance_events(
    service: &ServiceName,
    events: BoxStream<'static, Result<Event<Instance>>>,
) -> BoxStream<'static, Result<WatchEvent>> {
    let svc = service.clone();
    events
        .map(move |ev| ev.map(|ev| to_watch_event(&svc, ev)))
        .boxed()
}

/// The instance snapshot of a listing, resolved by the claimant rule: what a backend's
/// [`Watcher::instances`](crate::Watcher::instances) returns.
pub fn snapshot<F: Feed<Item = Instance> + ?Sized>(
    feed: &F,
    service: &ServiceName,
    listing: Listing<Instance>,
) -> Snapshot {
    let (items, revision) = resolve(feed, listing);
    Snapshot::new(service.clone(), items, revision)
}

fn to_watch_event(service: &ServiceName, ev: Event<Instance>) -> WatchEvent {
    match ev {
        Event::Snapshot(items, rev) => {
            WatchEvent::Snapshot(Snapshot::new(service.clone(), items, rev))
        }
        Event::Resynced(items, rev) => {
            WatchEvent::Resynced(Snapshot::new(service.clone(), items, rev))
        }
        Event::Added(instance, revision) => WatchEvent::Added { instance, revision },
        Event::Updated(instance, revision) => WatchEvent::Updated { instance, revision },
        Event::Removed(id, revision) => WatchEvent::Removed { id, revision },
        Event::Stale(reason) => WatchEvent::Stale { reason },
    }
}

impl<F: Feed> Machine<F> {
    async fn next(&mut self) -> Option<Result<Event<F::Item>>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            if let Some(at) = self.retry_at.take() {
                tokio::time::sleep_until(at).await;
            }
            if !self.live {
                match self.feed.list().await {
                    Ok(listing) => self.relist(listing),
                    Err(e) => self.fail(e),
                }
                continue;
            }
            match self.feed.next(self.revision).await {
                Ok(Next::Changes(changes)) => self.apply(changes),
                Ok(Next::Listing(listing)) => self.diff(listing),
                Err(e) => self.fail(e),
            }
        }
    }

    fn rebuild(&mut self, listing: Listing<F::Item>) {
        self.claims = Claims::default();
        for e in listing.entries {
            let canonical = self.feed.is_canonical(&e.key, &e.item);
            self.claims.put(e.key, e.item, canonical);
        }
        self.revision = listing.revision;
    }

    /// After a (re)connection: the authoritative set.
    fn relist(&mut self, listing: Listing<F::Item>) {
        self.rebuild(listing);
        self.visible = self
            .claims
            .winners()
            .map(|i| (i.id().clone(), i.clone()))
            .collect();
        let items: Vec<F::Item> = self.visible.values().cloned().collect();
        self.live = true;
        self.backoff.reset();
        let ev = if std::mem::replace(&mut self.first, false) {
            Event::Snapshot(items, self.revision)
        } else {
            tracing::info!(watch = %self.what, revision = self.revision, "watch resynced");
            Event::Resynced(items, self.revision)
        };
        self.stale_sent = false;
        self.pending.push_back(Ok(ev));
    }

    /// A fresh listing while live: only the differences are yielded.
    fn diff(&mut self, listing: Listing<F::Item>) {
        self.rebuild(listing);
        let mut ids: BTreeSet<<F::Item as Item>::Id> = self.visible.keys().cloned().collect();
        ids.extend(self.claims.by_id.keys().cloned());
        let revision = self.revision;
        for id in ids {
            self.settle(&id, revision);
        }
    }

    fn apply(&mut self, changes: Vec<Change<F::Item>>) {
        let floor = self.revision;
        for change in changes {
            let revision = change.revision();
            if revision <= floor && floor > 0 {
                continue;
            }
            let touched = match change {
                Change::Put {
                    key,
                    item: Some(item),
                    ..
                } => {
                    let canonical = self.feed.is_canonical(&key, &item);
                    self.claims.put(key, item, canonical)
                }
                Change::Put {
                    key, item: None, ..
                }
                | Change::Delete { key, .. } => self.claims.delete(&key),
            };
            self.revision = self.revision.max(revision);
            for id in touched {
                self.settle(&id, revision);
            }
        }
    }

    /// Yields what changed for `id` between what the consumer holds and the winner now.
    fn settle(&mut self, id: &<F::Item as Item>::Id, revision: Revision) {
        let now = self.claims.winner(id).cloned();
        let ev = match (self.visible.get(id), now) {
            (None, None) => return,
            (Some(old), Some(new)) if *old == new => return,
            (None, Some(new)) => {
                self.visible.insert(id.clone(), new.clone());
                Event::Added(new, revision)
            }
            (Some(_), Some(new)) => {
                self.visible.insert(id.clone(), new.clone());
                Event::Updated(new, revision)
            }
            (Some(_), None) => {
                self.visible.remove(id);
                Event::Removed(id.clone(), revision)
            }
        };
        self.pending.push_back(Ok(ev));
    }

    fn fail(&mut self, e: Error) {
        if ends_watch(&e) {
            tracing::warn!(watch = %self.what, "watch ends: {e}");
            self.pending.push_back(Err(e));
            self.done = true;
            return;
        }
        self.live = false;
        let delay = self.backoff.next_delay();
        tracing::debug!(watch = %self.what, retry_in = ?delay, "watch lost the registry: {e}");
        self.retry_at = Some(Instant::now() + delay);
        if !self.first && !self.stale_sent {
            self.stale_sent = true;
            self.pending.push_back(Ok(Event::Stale(Arc::new(e))));
        }
    }
}

#[cfg(test)]
mod tests;
