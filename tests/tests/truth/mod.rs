//! The end-of-scenario check of the fault suites (issue 13): a watcher's applied set
//! against the registry's truth, and the table printed per backend.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::time::Instant;
use waypost_core::{Discovery, Instance, InstanceId, InstanceSet, Result, ServiceName, WatchEvent};
use waypost_testkit::proxy::Proxy;

/// One line of a backend's table.
pub(crate) struct Row {
    /// What happened.
    pub(crate) scenario: String,
    /// Instances of the truth missing from a watcher's set (summed over the watchers).
    pub(crate) lost: usize,
    /// Instances in a watcher's set that the truth lacks.
    pub(crate) phantom: usize,
    /// Instances whose content differs from the truth's.
    pub(crate) diverged: usize,
    /// From the fault (or heal) until the watchers converged.
    pub(crate) converge: Duration,
    /// The session bound (session timeout, lease or check TTL).
    pub(crate) bound: Duration,
}

impl Row {
    /// The row of `scenario`: every set in `sets` compared with `truth`.
    pub(crate) fn new(
        scenario: impl Into<String>,
        truth: &BTreeMap<InstanceId, Instance>,
        sets: &[&InstanceSet],
        converge: Duration,
        bound: Duration,
    ) -> Self {
        let mut row = Self {
            scenario: scenario.into(),
            lost: 0,
            phantom: 0,
            diverged: 0,
            converge,
            bound,
        };
        for set in sets {
            let (l, p, d) = compare(truth, set);
            row.lost += l;
            row.phantom += p;
            row.diverged += d;
        }
        row
    }

    /// Fails unless nothing was lost, phantom or diverged.
    pub(crate) fn assert_clean(&self, backend: &str) {
        assert_eq!(
            (self.lost, self.phantom, self.diverged),
            (0, 0, 0),
            "{backend}: {} (lost, phantom, diverged)",
            self.scenario
        );
    }
}

/// The truth as a map by id.
pub(crate) fn by_id(
    instances: impl IntoIterator<Item = Instance>,
) -> BTreeMap<InstanceId, Instance> {
    instances.into_iter().map(|i| (i.id.clone(), i)).collect()
}

/// Prints one table for `backend` (visible with `--nocapture`).
pub(crate) fn print_table(backend: &str, rows: &[Row]) {
    println!("\n{backend}\n| scenario | lost | phantom | diverged | converge | ÷ bound |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} s | {:.2} |",
            r.scenario,
            r.lost,
            r.phantom,
            r.diverged,
            r.converge.as_secs_f64(),
            r.converge.as_secs_f64() / r.bound.as_secs_f64()
        );
    }
}

/// Compares a watcher's applied set with the truth: (lost, phantom, diverged).
pub(crate) fn compare(
    truth: &BTreeMap<InstanceId, Instance>,
    seen: &InstanceSet,
) -> (usize, usize, usize) {
    let lost = truth.keys().filter(|id| !seen.contains(id)).count();
    let phantom = seen.ids().filter(|id| !truth.contains_key(*id)).count();
    let diverged = seen
        .iter()
        .filter(|i| truth.get(&i.id).is_some_and(|t| t != *i))
        .count();
    (lost, phantom, diverged)
}

/// A watch stream.
pub(crate) type Watch = BoxStream<'static, Result<WatchEvent>>;

/// Applies what the watch delivers within `quiet`, failing if `id` is removed.
pub(crate) async fn drain_keeping(
    watch: &mut Watch,
    set: &mut InstanceSet,
    id: &InstanceId,
    who: &str,
) {
    let quiet = Instant::now() + Duration::from_millis(300);
    while let Ok(Some(Ok(e))) = tokio::time::timeout_at(quiet, watch.next()).await {
        assert!(
            !matches!(&e, WatchEvent::Removed { id: gone, .. } if gone == id),
            "{who} saw {id} leave during a one-member partition"
        );
        set.apply(&e);
    }
}

/// The registry's truth as `d` lists it now.
pub(crate) async fn listed(d: &Discovery, svc: &ServiceName) -> BTreeMap<InstanceId, Instance> {
    by_id(d.watcher.instances(svc).await.expect("list").instances)
}

/// One proxy in front of each of `members` (`127.0.0.1:PORT`).
pub(crate) async fn proxy_each(members: &[String]) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for m in members {
        proxies.push(
            Proxy::start(m.parse().expect("an address"))
                .await
                .expect("proxy"),
        );
    }
    proxies
}

/// The outage rule, not vacuously: the log has a `Stale`, every `Resynced` answers one,
/// and the last of them is a `Resynced`.
pub(crate) fn assert_stale_then_resynced(what: &str, log: &[WatchEvent]) {
    waypost_testkit::conformance::assert_stale_before_resynced(log);
    let last = log
        .iter()
        .rev()
        .find(|e| matches!(e, WatchEvent::Stale { .. } | WatchEvent::Resynced(_)));
    assert!(
        matches!(last, Some(WatchEvent::Resynced(_))),
        "{what}: expected Stale then Resynced, got {log:?}"
    );
}
