//! The task that feeds a watched cache: watch, apply, and on any end watch again.

use std::sync::Arc;

use futures::StreamExt;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::error::Error;
use crate::event::WatchEvent;
use crate::watcher::Watcher;

use super::state::Shared;

/// Aborts the watch task when the last clone of the cache is dropped.
#[derive(Debug)]
pub(crate) struct TaskGuard(pub(crate) AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches forever: applies every event; when the watch ends or yields an error, marks
/// the cache stale, waits with backoff and watches again. A new watch starts with a
/// snapshot, which replaces the set and clears the stale mark.
pub(crate) async fn run(shared: Arc<Shared>, watcher: Arc<dyn Watcher>) {
    let mut backoff = shared.options.backoff.clone();
    loop {
        debug!(service = %shared.service, "starting a watch");
        let mut stream = watcher.watch(&shared.service);
        let reason = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    if matches!(event, WatchEvent::Snapshot(_)) {
                        backoff.reset();
                    }
                    shared.apply(event);
                }
                Some(Err(e)) => break e,
                None => break Error::unavailable("the watch stream ended"),
            }
        };
        drop(stream);
        let delay = backoff.next_delay();
        warn!(
            service = %shared.service,
            error = %reason,
            retry_in = ?delay,
            "watch ended; watching again after a delay"
        );
        shared.mark_stale(Arc::new(reason));
        tokio::time::sleep(delay).await;
    }
}
