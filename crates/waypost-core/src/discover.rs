//! Interop with tower: a watch as a [`tower::discover::Discover`] stream of
//! [`Change`]s, for tower's balancers (`tower::balance::p2c::Balance`) and anything else
//! that consumes `Discover`.

use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use tower::discover::Change;
use tracing::warn;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::{InstanceSet, WatchEvent};
use crate::model::{Instance, InstanceId, ServiceName};
use crate::watcher::Watcher;

/// The changes of `service`'s set as tower expects them, keyed by instance id.
///
/// - The first snapshot inserts every instance; `Added` and `Updated` insert (tower
///   replaces the service of a key that is inserted again); `Removed` removes.
/// - A `Resynced` snapshot, or the snapshot of a new watch, yields the difference with
///   what was reported before: removals of the instances that vanished, insertions of
///   the new and the changed ones. Unchanged instances yield nothing.
/// - `Stale` yields nothing: the balancer keeps its endpoints.
/// - A watch yields an error only when retrying cannot fix it
///   ([`ends_watch`](crate::backend::ends_watch): bad input, missing permissions, a
///   closed client) and ends after it, per the [`Watcher`] contract. A balancer must not
///   lose its endpoints over that: the error is passed on, so that the balancer reports
///   it, and the stream watches again after a jittered backoff (credentials can be fixed
///   while the process runs); it never ends. Any other error (a watch that does not keep
///   the contract) is logged and the stream watches again.
///
/// The stream implements [`Discover`](tower::discover::Discover) (through tower's impl
/// for every `TryStream` of `Change`). Map the `Instance` to a service with
/// `futures::TryStreamExt::map_ok`; here, a power-of-two-choices balancer over a
/// service of each instance (any `tower::Service`, an HTTP or gRPC client in practice):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> waypost_core::Result<()> {
/// use std::sync::Arc;
/// use futures::TryStreamExt;
/// use tower::{balance::p2c::Balance, load::{CompleteOnResponse, PendingRequests}};
/// use tower::{discover::Change, service_fn, Service, ServiceExt};
/// use waypost_core::{Instance, Registrar};
///
/// let d = waypost_core::memory::MemoryRegistry::new("discover-doc")
///     .client(std::time::Duration::from_secs(10))
///     .into_discovery();
/// let _r = d.registrar.register(Instance::parse("greeter", "g-1", "10.0.0.5", 8001)?).await?;
///
/// // Each instance becomes a service that answers with the endpoint it would call.
/// let service_of = |instance: Instance| {
///     let endpoint = instance.endpoint.to_string();
///     let svc = service_fn(move |_req: ()| {
///         let e = endpoint.clone();
///         async move { Ok::<_, waypost_core::Error>(e) }
///     });
///     PendingRequests::new(svc, CompleteOnResponse::default())
/// };
/// let endpoints = waypost_core::discover(d.watcher.clone(), "greeter".parse()?).map_ok(move |change| {
///     match change {
///         Change::Insert(id, instance) => Change::Insert(id, service_of(instance)),
///         Change::Remove(id) => Change::Remove(id),
///     }
/// });
/// let mut balancer = Balance::new(endpoints);
/// let answer = balancer.ready().await.map_err(|e| waypost_core::Error::unavailable(e.to_string()))?.call(()).await;
/// assert_eq!(answer.map_err(|e| e.to_string()).unwrap(), "10.0.0.5:8001");
/// # Ok(()) }
/// ```
pub fn discover(
    watcher: Arc<dyn Watcher>,
    service: ServiceName,
) -> BoxStream<'static, Result<Change<InstanceId, Instance>, Error>> {
    let state = DiscoverState {
        watcher,
        service,
        watch: None,
        known: InstanceSet::new(),
        backoff: Backoff::default(),
        retrying: false,
    };
    stream::unfold(state, |mut s| async move {
        let batch = s.next_batch().await;
        Some((stream::iter(batch), s))
    })
    .flatten()
    .boxed()
}

type Item = Result<Change<InstanceId, Instance>, Error>;

struct DiscoverState {
    watcher: Arc<dyn Watcher>,
    service: ServiceName,
    watch: Option<BoxStream<'static, crate::Result<WatchEvent>>>,
    /// What was reported to the consumer.
    known: InstanceSet,
    backoff: Backoff,
    /// Whether the next watch is a retry, to be delayed.
    retrying: bool,
}

impl DiscoverState {
    /// The next non-empty batch of changes.
    async fn next_batch(&mut self) -> Vec<Item> {
        loop {
            let watch = match &mut self.watch {
                Some(w) => w,
                None => {
                    if self.retrying {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                    self.watch.insert(self.watcher.watch(&self.service))
                }
            };
            let error = match watch.next().await {
                Some(Ok(event)) => {
                    let batch = self.apply(event);
                    if batch.is_empty() {
                        continue;
                    }
                    return batch;
                }
                Some(Err(e)) => Some(e),
                None => None,
            };
            self.watch = None;
            self.retrying = true;
            match error {
                Some(e) if crate::backend::ends_watch(&e) => {
                    warn!(service = %self.service, error = %e, "watch failed; passing the error on and watching again");
                    return vec![Err(e)];
                }
                Some(e) => {
                    warn!(service = %self.service, error = %e, "watch failed; watching again")
                }
                None => warn!(service = %self.service, "watch ended; watching again"),
            }
        }
    }

    fn apply(&mut self, event: WatchEvent) -> Vec<Item> {
        match event {
            WatchEvent::Snapshot(s) | WatchEvent::Resynced(s) => {
                self.backoff.reset();
                self.known
                    .diff_replace(s.instances, s.revision)
                    .into_iter()
                    .filter_map(|e| match e {
                        WatchEvent::Added { instance, .. }
                        | WatchEvent::Updated { instance, .. } => {
                            Some(Ok(Change::Insert(instance.id.clone(), instance)))
                        }
                        WatchEvent::Removed { id, .. } => Some(Ok(Change::Remove(id))),
                        _ => None,
                    })
                    .collect()
            }
            WatchEvent::Added { ref instance, .. } | WatchEvent::Updated { ref instance, .. } => {
                if self.known.get(&instance.id) == Some(instance) {
                    return Vec::new();
                }
                let instance = instance.clone();
                self.known.apply(&event);
                vec![Ok(Change::Insert(instance.id.clone(), instance))]
            }
            WatchEvent::Removed { ref id, .. } => {
                if !self.known.contains(id) {
                    return Vec::new();
                }
                let id = id.clone();
                self.known.apply(&event);
                vec![Ok(Change::Remove(id))]
            }
            WatchEvent::Stale { .. } => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::stream::BoxStream;
    use tokio::sync::mpsc;
    use tower::discover::Discover;

    use super::*;
    use crate::cache::script::{inst, svc, ScriptedWatcher};

    type Changes = BoxStream<'static, Item>;

    // The returned stream is a tower `Discover`, checked at compile time.
    const _: fn() = || {
        fn is_discover<D: Discover<Key = InstanceId, Service = Instance, Error = Error>>() {}
        is_discover::<Changes>();
    };

    /// Polls the stream in a task (it only watches while polled) and forwards its items.
    fn spawn_discover(watcher: Arc<dyn Watcher>) -> mpsc::UnboundedReceiver<Item> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut changes: Changes = discover(watcher, svc());
        tokio::spawn(async move {
            while let Some(item) = changes.next().await {
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        rx
    }

    async fn next_item(rx: &mut mpsc::UnboundedReceiver<Item>) -> Item {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no change within 5 s")
            .expect("the stream ended")
    }

    /// The next `n` changes as `+id:port` / `-id`, sorted.
    async fn next(rx: &mut mpsc::UnboundedReceiver<Item>, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(match next_item(rx).await.expect("an error") {
                Change::Insert(k, i) => {
                    assert_eq!(k, i.id);
                    format!("+{k}:{}", i.endpoint.port)
                }
                Change::Remove(k) => format!("-{k}"),
            });
        }
        out.sort();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_and_changes_become_inserts_and_removes() {
        let (watcher, mut ctl) = ScriptedWatcher::new();
        let mut rx = spawn_discover(watcher);
        let feed = ctl.next_watch().await;
        feed.snapshot(vec![inst("a", 1, 100), inst("b", 1, 100)], 1);
        assert_eq!(next(&mut rx, 2).await, ["+a:1", "+b:1"]);

        feed.added(inst("c", 1, 100), 2);
        assert_eq!(next(&mut rx, 1).await, ["+c:1"]);
        feed.updated(inst("b", 2, 100), 3);
        assert_eq!(next(&mut rx, 1).await, ["+b:2"]);
        feed.removed("a", 4);
        assert_eq!(next(&mut rx, 1).await, ["-a"]);

        // Yield nothing: an unknown removal, a repeated update, Stale. The next change
        // is the one after them, since events are handled in order.
        feed.removed("nope", 5);
        feed.updated(inst("b", 2, 100), 6);
        feed.stale();
        // Resynced: b unchanged, c vanished, d new.
        feed.resynced(vec![inst("b", 2, 100), inst("d", 1, 100)], 9);
        assert_eq!(next(&mut rx, 2).await, ["+d:1", "-c"]);

        // The watch ends: the new watch's snapshot yields only the difference.
        drop(feed);
        let feed = ctl.next_watch().await;
        feed.snapshot(
            vec![inst("b", 3, 100), inst("d", 1, 100), inst("e", 1, 100)],
            1,
        );
        assert_eq!(next(&mut rx, 2).await, ["+b:3", "+e:1"]);

        // A temporary error is not passed on: the stream watches again.
        feed.error(Error::unavailable("scripted"));
        let feed = ctl.next_watch().await;
        feed.snapshot(vec![inst("d", 1, 100), inst("e", 1, 100)], 1);
        assert_eq!(next(&mut rx, 1).await, ["-b"]);

        // A permanent error is passed on, and the stream goes on watching after it.
        feed.error(Error::invalid_input("scripted"));
        let e = next_item(&mut rx).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
        let feed = ctl.next_watch().await;
        feed.snapshot(vec![inst("e", 1, 100)], 1);
        assert_eq!(next(&mut rx, 1).await, ["-d"]);
    }
}
