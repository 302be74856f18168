//! One registry watch per key per client, shared by every local watcher of that key.
//!
//! Many parts of one process watch the same service (several `ServiceCache`s, `discover()`
//! streams, a CLI `watch`). A [`WatchHub`] runs the watch machine once per key and fans
//! its events out to every local subscriber through a `tokio::sync::broadcast` channel,
//! keeping the current set so that a late subscriber still starts with a `Snapshot`:
//!
//! - a subscriber that joins a running watch gets a `Snapshot` of the set as it stands
//!   (and `Stale` right after it if the registry is unreachable), then every later event;
//! - a subscriber too slow to keep up (more than 1,024 events behind) is not cut off: it
//!   gets `Stale`, then `Resynced` with the current set, and goes on from there;
//! - an error that ends the watch reaches every subscriber, and the next watch of the key
//!   starts afresh;
//! - when the last subscriber of a key is dropped, the machine stops and its feed — the
//!   registry watch — is dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::{Event, Item, READ_AHEAD};
use crate::error::{Error, Result};
use crate::model::Revision;

/// What the broadcast carries: an event, or the error that ended the watch.
type Msg<T> = std::result::Result<Event<T>, Arc<Error>>;

/// What a shared watch has told so far.
struct State<T: Item> {
    /// The current set and its revision; `None` until the first `Snapshot`.
    set: Option<(BTreeMap<T::Id, T>, Revision)>,
    /// Why the registry is unreachable, while it is.
    stale: Option<Arc<Error>>,
    /// The error that ended the watch.
    failed: Option<Arc<Error>>,
}

impl<T: Item> State<T> {
    fn apply(&mut self, msg: &Msg<T>) {
        match msg {
            Ok(Event::Snapshot(items, rev) | Event::Resynced(items, rev)) => {
                let set = items.iter().map(|i| (i.id().clone(), i.clone())).collect();
                self.set = Some((set, *rev));
                self.stale = None;
            }
            Ok(Event::Added(item, rev) | Event::Updated(item, rev)) => {
                if let Some((set, r)) = &mut self.set {
                    set.insert(item.id().clone(), item.clone());
                    *r = *rev;
                }
            }
            Ok(Event::Removed(id, rev)) => {
                if let Some((set, r)) = &mut self.set {
                    set.remove(id);
                    *r = *rev;
                }
            }
            Ok(Event::Stale(reason)) => self.stale = Some(reason.clone()),
            Err(e) => self.failed = Some(e.clone()),
        }
    }

    fn items(&self) -> Option<(Vec<T>, Revision)> {
        self.set
            .as_ref()
            .map(|(set, rev)| (set.values().cloned().collect(), *rev))
    }
}

/// The state and the channel of one shared watch: held by its task and its subscribers.
struct Core<T: Item> {
    state: Mutex<State<T>>,
    tx: broadcast::Sender<Msg<T>>,
}

impl<T: Item> Core<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One running shared watch. Subscribers hold it; dropping the last one stops the task.
struct Running<T: Item> {
    core: Arc<Core<T>>,
    task: tokio::task::AbortHandle,
}

impl<T: Item> Drop for Running<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One registry watch per key, shared by every local watcher of the key. Cheap to clone;
/// clones share the watches.
pub struct WatchHub<K, T: Item> {
    running: Arc<Mutex<HashMap<K, Weak<Running<T>>>>>,
}

impl<K, T: Item> Clone for WatchHub<K, T> {
    fn clone(&self) -> Self {
        Self {
            running: self.running.clone(),
        }
    }
}

impl<K, T: Item> Default for WatchHub<K, T> {
    fn default() -> Self {
        Self {
            running: Arc::default(),
        }
    }
}

impl<K, T: Item> fmt::Debug for WatchHub<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchHub")
            .field("watches", &self.len())
            .finish()
    }
}

impl<K, T: Item> WatchHub<K, T> {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many shared watches run now (each one registry watch).
    pub fn len(&self) -> usize {
        let map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Whether no shared watch runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, T> WatchHub<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + Unpin + 'static,
    T: Item,
{
    /// A watch of `key`: joins the shared watch of `key` if one runs, else starts one with
    /// `start` (the watch machine's stream for the key, built only when needed). The
    /// stream keeps the watch contract (see the module docs). Joining happens at the first
    /// poll, on the runtime that polls.
    pub fn watch(
        &self,
        key: K,
        start: impl FnOnce() -> BoxStream<'static, Result<Event<T>>> + Send + 'static,
    ) -> BoxStream<'static, Result<Event<T>>> {
        HubStream::Joining {
            hub: self.clone(),
            key,
            start: Box::new(start),
        }
        .boxed()
    }

    fn join(
        &self,
        key: K,
        start: impl FnOnce() -> BoxStream<'static, Result<Event<T>>>,
    ) -> Subscriber<T> {
        let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let live = map
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|r| r.core.lock().failed.is_none());
        let running = match live {
            Some(r) => r,
            None => {
                let r = Arc::new(spawn(start()));
                map.retain(|_, w| w.strong_count() > 0);
                map.insert(key, Arc::downgrade(&r));
                r
            }
        };
        drop(map);
        subscribe(running)
    }
}

/// Starts the task that runs `events` and fans them out.
fn spawn<T: Item>(mut events: BoxStream<'static, Result<Event<T>>>) -> Running<T> {
    let (tx, _) = broadcast::channel(READ_AHEAD);
    let core = Arc::new(Core {
        state: Mutex::new(State {
            set: None,
            stale: None,
            failed: None,
        }),
        tx,
    });
    let task = tokio::spawn({
        let core = core.clone();
        async move {
            while let Some(ev) = events.next().await {
                let msg = ev.map_err(Arc::new);
                let end = msg.is_err();
                {
                    // Under the lock: a subscriber joins either before (and gets the
                    // message) or after (and finds it in the state), never both.
                    let mut st = core.lock();
                    st.apply(&msg);
                    let _ = core.tx.send(msg);
                }
                if end {
                    return;
                }
            }
            // The machine ends only after an error; be safe if it ever does not.
            let mut st = core.lock();
            if st.failed.is_none() {
                let e = Arc::new(Error::Closed { what: "watch" });
                st.failed = Some(e.clone());
                let _ = core.tx.send(Err(e));
            }
        }
    });
    Running {
        core,
        task: task.abort_handle(),
    }
}

/// One subscriber's view of a shared watch.
struct Subscriber<T: Item> {
    running: Arc<Running<T>>,
    rx: BroadcastStream<Msg<T>>,
    /// Events to yield before reading the channel.
    queued: std::collections::VecDeque<Msg<T>>,
    /// Whether this subscriber last yielded `Stale` (so `Stale` comes once per outage).
    stale: bool,
    done: bool,
}

fn subscribe<T: Item>(running: Arc<Running<T>>) -> Subscriber<T> {
    let (rx, queued) = {
        let st = running.core.lock();
        let rx = BroadcastStream::new(running.core.tx.subscribe());
        let mut queued = std::collections::VecDeque::new();
        if let Some(e) = &st.failed {
            queued.push_back(Err(e.clone()));
        } else if let Some((items, rev)) = st.items() {
            queued.push_back(Ok(Event::Snapshot(items, rev)));
            if let Some(reason) = &st.stale {
                queued.push_back(Ok(Event::Stale(reason.clone())));
            }
        }
        (rx, queued)
    };
    Subscriber {
        running,
        rx,
        queued,
        stale: false,
        done: false,
    }
}

/// A watch through a hub: joins at its first poll (on the runtime that polls), then
/// reads its subscription.
enum HubStream<K, T: Item> {
    Joining {
        hub: WatchHub<K, T>,
        key: K,
        start: Box<dyn FnOnce() -> BoxStream<'static, Result<Event<T>>> + Send>,
    },
    Joined(Subscriber<T>),
    /// Transient, while joining.
    Empty,
}

// Nothing in a `HubStream` is pinned in place: it holds its subscription by value and
// polls it through `poll_next_unpin`.
impl<K: Unpin, T: Item> Unpin for HubStream<K, T> {}

impl<K, T> Stream for HubStream<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + Unpin + 'static,
    T: Item,
{
    type Item = Result<Event<T>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let HubStream::Joining { .. } = this {
            let HubStream::Joining { hub, key, start } = std::mem::replace(this, HubStream::Empty)
            else {
                unreachable!("matched above")
            };
            *this = HubStream::Joined(hub.join(key, start));
        }
        match this {
            HubStream::Joined(sub) => sub.poll_next(cx),
            _ => Poll::Ready(None),
        }
    }
}

impl<T: Item> Subscriber<T> {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event<T>>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let msg = match self.queued.pop_front() {
            Some(m) => m,
            None => match ready!(self.rx.poll_next_unpin(cx)) {
                Some(Ok(m)) => m,
                Some(Err(BroadcastStreamRecvError::Lagged(n))) => {
                    self.catch_up(n);
                    match self.queued.pop_front() {
                        Some(m) => m,
                        None => return Poll::Ready(None),
                    }
                }
                None => return Poll::Ready(None),
            },
        };
        Poll::Ready(Some(match msg {
            Ok(ev) => {
                match &ev {
                    Event::Stale(_) => self.stale = true,
                    Event::Snapshot(..) | Event::Resynced(..) => self.stale = false,
                    _ => {}
                }
                Ok(ev)
            }
            Err(e) => {
                self.done = true;
                Err(shared_error(&e))
            }
        }))
    }

    /// Fell `n` events behind: start over from the current set, as after an outage.
    fn catch_up(&mut self, n: u64) {
        tracing::debug!(missed = n, "a watch subscriber fell behind; resyncing it");
        let st = self.running.core.lock();
        self.rx = BroadcastStream::new(self.running.core.tx.subscribe());
        if let Some(e) = &st.failed {
            self.queued.push_back(Err(e.clone()));
            return;
        }
        if !self.stale {
            self.queued
                .push_back(Ok(Event::Stale(Arc::new(Error::unavailable(format!(
                    "this watcher fell {n} events behind"
                ))))));
        }
        if let Some((items, rev)) = st.items() {
            self.queued.push_back(Ok(Event::Resynced(items, rev)));
        }
        if let Some(reason) = &st.stale {
            self.queued.push_back(Ok(Event::Stale(reason.clone())));
        }
    }
}

/// An error every subscriber of a shared watch receives: the same variant and message,
/// with the original error as its source.
fn shared_error(e: &Arc<Error>) -> Error {
    let source = || -> crate::error::BoxError { Box::new(Shared(e.clone())) };
    match &**e {
        Error::InvalidInput { message } => Error::InvalidInput {
            message: message.clone(),
        },
        Error::InvalidConfig { message } => Error::InvalidConfig {
            message: message.clone(),
        },
        Error::NotFound { what } => Error::NotFound { what: what.clone() },
        Error::AlreadyExists { what } => Error::AlreadyExists { what: what.clone() },
        Error::Unavailable { message, .. } => Error::Unavailable {
            message: message.clone(),
            source: Some(source()),
        },
        Error::Timeout { operation, after } => Error::Timeout {
            operation,
            after: *after,
        },
        Error::SessionExpired => Error::SessionExpired,
        Error::Unauthorized { message, .. } => Error::Unauthorized {
            message: message.clone(),
            source: Some(source()),
        },
        Error::Conflict { what, current } => Error::Conflict {
            what: what.clone(),
            current: *current,
        },
        Error::Unsupported { what } => Error::Unsupported { what: what.clone() },
        Error::Closed { what } => Error::Closed { what },
        Error::Backend {
            backend, temporary, ..
        } => Error::Backend {
            backend,
            temporary: *temporary,
            source: source(),
        },
        other => Error::Backend {
            backend: "watch",
            temporary: other.is_temporary(),
            source: source(),
        },
    }
}

/// The original error behind a shared one: displays as it, and chains to its source.
#[derive(Debug)]
struct Shared(Arc<Error>);

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Instance;

    #[test]
    fn a_shared_error_keeps_the_variant_and_chains_to_the_original() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied by the agent");
        let original = Arc::new(Error::Unauthorized {
            message: "token revoked".into(),
            source: Some(Box::new(io)),
        });
        let e = shared_error(&original);
        assert!(matches!(&e, Error::Unauthorized { message, .. } if message == "token revoked"));
        let first = std::error::Error::source(&e).expect("the original as source");
        assert_eq!(first.to_string(), original.to_string());
        let second = first.source().expect("the original's own source");
        assert_eq!(second.to_string(), "denied by the agent");
    }

    fn one_snapshot() -> BoxStream<'static, Result<Event<Instance>>> {
        futures::stream::iter([Ok(Event::Snapshot(Vec::new(), 1))])
            .chain(futures::stream::pending())
            .boxed()
    }

    #[tokio::test]
    async fn watches_of_other_keys_do_not_evict_a_running_one() {
        let hub: WatchHub<&'static str, Instance> = WatchHub::new();
        assert!(hub.is_empty());
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = |starts: Arc<std::sync::atomic::AtomicUsize>| {
            move || {
                starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                one_snapshot()
            }
        };
        let mut a1 = hub.watch("a", counted(starts.clone()));
        a1.next().await;
        assert_eq!((hub.len(), hub.is_empty()), (1, false));
        let mut b = hub.watch("b", counted(starts.clone()));
        b.next().await;
        assert_eq!(hub.len(), 2);
        let mut a2 = hub.watch("a", counted(starts.clone()));
        a2.next().await;
        assert_eq!(
            starts.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the second watcher of `a` joined the running watch"
        );
        drop((a1, a2));
        assert_eq!(hub.len(), 1, "`a` stopped with its last watcher");
        // A new key clears the dead entries of the map.
        let mut c = hub.watch("c", counted(starts.clone()));
        c.next().await;
        let map = hub.running.lock().unwrap().len();
        assert_eq!(map, 2, "b and c, not the stopped a");
    }
}
