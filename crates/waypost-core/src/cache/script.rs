//! A scripted [`Watcher`] for tests: every `watch` call opens a channel, and the test
//! receives its sending half to feed events, or drops it to end that watch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::event::{Snapshot, WatchEvent};
use crate::model::{Instance, InstanceId, ServiceName};
use crate::watcher::Watcher;

type Events = mpsc::UnboundedSender<Result<WatchEvent>>;

#[derive(Debug)]
pub(crate) struct ScriptedWatcher {
    watches: mpsc::UnboundedSender<Events>,
}

/// The test's side: one [`Feed`] per watch the code under test starts.
#[derive(Debug)]
pub(crate) struct Control {
    watches: mpsc::UnboundedReceiver<Events>,
}

impl ScriptedWatcher {
    pub(crate) fn new() -> (Arc<ScriptedWatcher>, Control) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(ScriptedWatcher { watches: tx }),
            Control { watches: rx },
        )
    }
}

impl Control {
    /// The next watch started, within 5 s (of paused or real time).
    pub(crate) async fn next_watch(&mut self) -> Feed {
        let events = tokio::time::timeout(Duration::from_secs(5), self.watches.recv())
            .await
            .expect("no watch was started within 5 s")
            .expect("the watcher was dropped");
        Feed { events }
    }

    /// Whether a watch was started and not yet taken.
    pub(crate) fn try_next_watch(&mut self) -> Option<Feed> {
        self.watches.try_recv().ok().map(|events| Feed { events })
    }
}

#[async_trait]
impl Watcher for ScriptedWatcher {
    async fn instances(&self, _: &ServiceName) -> Result<Snapshot> {
        Err(Error::unsupported("the scripted watcher only watches"))
    }

    fn watch(&self, _: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.watches.send(tx);
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .boxed()
    }
}

/// Feeds one watch; dropping it ends the watch's stream.
#[derive(Debug)]
pub(crate) struct Feed {
    events: Events,
}

pub(crate) fn svc() -> ServiceName {
    ServiceName::new("svc").unwrap()
}

/// An instance of `svc` with this id, port and weight.
pub(crate) fn inst(id: &str, port: u16, weight: u32) -> Instance {
    Instance::parse("svc", id, "127.0.0.1", port)
        .unwrap()
        .with_weight(weight)
}

pub(crate) fn id(s: &str) -> InstanceId {
    InstanceId::new(s).unwrap()
}

pub(crate) fn snapshot(instances: Vec<Instance>, revision: u64) -> Snapshot {
    Snapshot::new(svc(), instances, revision)
}

impl Feed {
    pub(crate) fn send(&self, event: WatchEvent) {
        self.events.send(Ok(event)).expect("the watch was dropped");
    }

    pub(crate) fn snapshot(&self, instances: Vec<Instance>, revision: u64) {
        self.send(WatchEvent::Snapshot(snapshot(instances, revision)));
    }

    pub(crate) fn resynced(&self, instances: Vec<Instance>, revision: u64) {
        self.send(WatchEvent::Resynced(snapshot(instances, revision)));
    }

    pub(crate) fn added(&self, instance: Instance, revision: u64) {
        self.send(WatchEvent::Added { instance, revision });
    }

    pub(crate) fn updated(&self, instance: Instance, revision: u64) {
        self.send(WatchEvent::Updated { instance, revision });
    }

    pub(crate) fn removed(&self, id_: &str, revision: u64) {
        self.send(WatchEvent::Removed {
            id: id(id_),
            revision,
        });
    }

    pub(crate) fn stale(&self) {
        self.send(WatchEvent::Stale {
            reason: Arc::new(Error::unavailable("scripted outage")),
        });
    }

    pub(crate) fn error(&self, e: Error) {
        self.events.send(Err(e)).expect("the watch was dropped");
    }

    /// Resolves when the consumer has dropped the watch's stream.
    pub(crate) async fn closed(&self) {
        self.events.closed().await;
    }
}
