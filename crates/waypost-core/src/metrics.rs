//! What waypost reports through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! waypost installs no recorder and no exporter: an application that installs one (for
//! example `metrics-exporter-prometheus`) gets these; one that does not pays nothing but a
//! no-op call per event. `examples/metrics_prometheus.rs` installs
//! `metrics-exporter-prometheus` and serves these at `/metrics`.
//!
//! | name | type | labels | what |
//! | --- | --- | --- | --- |
//! | `waypost_registrations` | gauge | `status` (`registered`, `suspended`, `reregistering`) | registrations of this process by status |
//! | `waypost_reregistrations_total` | counter | `backend` | times a registration was lost by the registry and written again |
//! | `waypost_session_expiries_total` | counter | | sessions (ZooKeeper session, etcd lease, Consul session or agent epoch) the registry lost |
//! | `waypost_watch_events_total` | counter | `item` (`instance`, `config`, `leader`), `kind` (`snapshot`, `added`, `updated`, `removed`, `stale`, `resynced`) | events yielded by registry watches (one per registry watch, before fan-out to local watchers) |
//! | `waypost_watch_stale_seconds` | histogram | `item` | how long each outage of a watch lasted, from its `Stale` to its `Resynced` |
//! | `waypost_cache_picks_total` | counter | `service` | instances picked from a [`ServiceCache`](crate::ServiceCache) |
//! | `waypost_cache_ejections_total` | counter | `service` | instances ejected from a cache by [`report_failure`](crate::ServiceCache::report_failure) |
//! | `waypost_request_duration_seconds` | histogram | `operation`, `outcome` (`ok`, `error`) | registry round trips made by core's backend layer: `open`, `keep_alive` (sessions), `write`, `inspect`, `delete` (registrations), `kv_get`, `kv_put`, `kv_delete`, `kv_list`, `enqueue`, `position`, `dequeue` (locks) |
//! | `waypost_locks_lost_total` | counter | `reason` | held locks and leaderships lost (session expired, unconfirmed, deleted) |

use std::future::Future;
use std::time::Instant;

use crate::registrar::RegistrationStatus;

fn status_label(s: RegistrationStatus) -> Option<&'static str> {
    match s {
        RegistrationStatus::Registered => Some("registered"),
        RegistrationStatus::Suspended => Some("suspended"),
        RegistrationStatus::Reregistering => Some("reregistering"),
        RegistrationStatus::Deregistered => None,
    }
}

/// A registration moved from `old` (`None`: new) to `new`.
pub(crate) fn registration_status(old: Option<RegistrationStatus>, new: RegistrationStatus) {
    if old == Some(new) {
        return;
    }
    if let Some(l) = old.and_then(status_label) {
        metrics::gauge!("waypost_registrations", "status" => l).decrement(1.0);
    }
    if let Some(l) = status_label(new) {
        metrics::gauge!("waypost_registrations", "status" => l).increment(1.0);
    }
}

/// A registration is written again after the registry lost it.
pub(crate) fn reregistration(backend: &'static str) {
    metrics::counter!("waypost_reregistrations_total", "backend" => backend).increment(1);
}

/// The registry lost a session.
pub(crate) fn session_expired() {
    metrics::counter!("waypost_session_expiries_total").increment(1);
}

/// A registry watch yielded an event.
pub(crate) fn watch_event(item: &'static str, kind: &'static str) {
    metrics::counter!("waypost_watch_events_total", "item" => item, "kind" => kind).increment(1);
}

/// A watch's outage ended after `secs`.
pub(crate) fn watch_stale(item: &'static str, secs: f64) {
    metrics::histogram!("waypost_watch_stale_seconds", "item" => item).record(secs);
}

/// A held lock or leadership was lost.
pub(crate) fn lock_lost(reason: &'static str) {
    metrics::counter!("waypost_locks_lost_total", "reason" => reason).increment(1);
}

/// Runs one registry round trip, recording its duration under `operation`, in a
/// `waypost.request` span naming the operation (the caller's span names the service, the
/// instance or the key).
pub(crate) async fn timed<T, E>(
    operation: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let span = tracing::debug_span!("waypost.request", operation);
    let r = tracing::Instrument::instrument(f, span).await;
    let outcome = if r.is_ok() { "ok" } else { "error" };
    metrics::histogram!("waypost_request_duration_seconds", "operation" => operation, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use crate::memory::MemoryRegistry;
    use crate::{Instance, Registrar, Watcher};

    /// Snapshots drain histograms: keep their sample counts across snapshots.
    struct Seen {
        snap: Snapshotter,
        samples: std::cell::RefCell<std::collections::HashMap<String, u64>>,
    }

    fn counter(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut total = 0;
        for (k, _, _, v) in seen.snap.snapshot().into_vec() {
            let id = format!("{:?}", k.key());
            let value = match v {
                DebugValue::Counter(c) => c,
                DebugValue::Gauge(g) => g.into_inner() as u64,
                DebugValue::Histogram(h) => {
                    let mut samples = seen.samples.borrow_mut();
                    let n = samples.entry(id).or_default();
                    *n += h.len() as u64;
                    *n
                }
            };
            let matches = k.key().name() == name
                && labels
                    .iter()
                    .all(|(l, v)| k.key().labels().any(|x| x.key() == *l && x.value() == *v));
            if matches {
                total += value;
            }
        }
        total
    }

    /// The key metrics move as the registry is used: registrations by status, requests,
    /// watch events, session expiries and re-registrations, stale time, picks, ejections.
    #[test]
    fn the_key_metrics_move() {
        let recorder = DebuggingRecorder::new();
        let seen = Seen {
            snap: recorder.snapshotter(),
            samples: Default::default(),
        };
        let snap = &seen;
        metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let r = MemoryRegistry::new("metrics");
                let c = r.client(Duration::from_millis(200));
                let mut w = c.watch(&"svc".parse().unwrap());
                use futures::StreamExt;
                w.next().await.unwrap().unwrap(); // snapshot
                let reg = c
                    .register(Instance::parse("svc", "a", "127.0.0.1", 1).unwrap())
                    .await
                    .unwrap();
                w.next().await.unwrap().unwrap(); // added
                assert_eq!(
                    counter(snap, "waypost_registrations", &[("status", "registered")]),
                    1
                );
                r.expire_all_sessions();
                reg.wait_status(Duration::from_secs(5), |s| {
                    *s == crate::RegistrationStatus::Registered
                })
                .await
                .unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while counter(snap, "waypost_reregistrations_total", &[]) == 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no re-registration counted"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(counter(snap, "waypost_session_expiries_total", &[]) >= 1);
                r.set_reachable(false);
                loop {
                    if matches!(
                        w.next().await.unwrap().unwrap(),
                        crate::WatchEvent::Stale { .. }
                    ) {
                        break;
                    }
                }
                r.set_reachable(true);
                loop {
                    if matches!(
                        w.next().await.unwrap().unwrap(),
                        crate::WatchEvent::Resynced(_)
                    ) {
                        break;
                    }
                }
                assert_eq!(
                    counter(snap, "waypost_watch_stale_seconds", &[("item", "instance")]),
                    1
                );
                assert!(counter(snap, "waypost_watch_events_total", &[("kind", "added")]) >= 1);
                assert!(counter(snap, "waypost_watch_events_total", &[("kind", "snapshot")]) >= 1);
                assert!(
                    counter(
                        snap,
                        "waypost_request_duration_seconds",
                        &[("operation", "write"), ("outcome", "ok")]
                    ) >= 2
                );
                assert!(
                    counter(
                        snap,
                        "waypost_request_duration_seconds",
                        &[("operation", "keep_alive")]
                    ) >= 1
                );

                let cache = crate::ServiceCache::watch(
                    std::sync::Arc::new(c.clone()),
                    "svc".parse().unwrap(),
                    crate::CacheOptions::default(),
                );
                cache
                    .wait_for(Duration::from_secs(5), |v| !v.is_empty())
                    .await
                    .unwrap();
                for _ in 0..3 {
                    cache.pick_round_robin().unwrap();
                }
                assert_eq!(
                    counter(snap, "waypost_cache_picks_total", &[("service", "svc")]),
                    3
                );
                assert!(cache.report_failure("a"));
                assert_eq!(
                    counter(snap, "waypost_cache_ejections_total", &[("service", "svc")]),
                    1
                );

                let g = c
                    .coordinator()
                    .lock(&"jobs/r".parse().unwrap())
                    .await
                    .unwrap();
                g.release().await.unwrap();
                assert_eq!(
                    counter(snap, "waypost_locks_lost_total", &[]),
                    0,
                    "a release is no loss"
                );
                let g = c
                    .coordinator()
                    .lock(&"jobs/m".parse().unwrap())
                    .await
                    .unwrap();
                assert!(
                    counter(
                        snap,
                        "waypost_request_duration_seconds",
                        &[("operation", "enqueue")]
                    ) >= 1
                );
                r.expire_all_sessions();
                tokio::time::timeout(Duration::from_secs(5), g.lost())
                    .await
                    .unwrap();
                // The entry vanished with the session; the client may not have heard of the
                // expiry yet, so the reason is the one or the other.
                assert_eq!(
                    counter(
                        snap,
                        "waypost_locks_lost_total",
                        &[("reason", "session_expired")]
                    ) + counter(snap, "waypost_locks_lost_total", &[("reason", "deleted")]),
                    1
                );
                assert_eq!(counter(snap, "waypost_locks_lost_total", &[]), 1);
                // Each reason has its label: an entry deleted behind the holder's back, and
                // a session the registry stopped confirming.
                let deleted = counter(snap, "waypost_locks_lost_total", &[("reason", "deleted")]);
                let n: crate::coord::Name = "jobs/d".parse().unwrap();
                let g = c.coordinator().lock(&n).await.unwrap();
                assert_eq!(r.delete_contenders(&n, false), 1);
                let why = tokio::time::timeout(Duration::from_secs(5), g.lost())
                    .await
                    .unwrap();
                assert_eq!(why, crate::coord::Lost::Deleted);
                assert_eq!(
                    counter(snap, "waypost_locks_lost_total", &[("reason", "deleted")]),
                    deleted + 1
                );
                let g = c.coordinator().lock(&n).await.unwrap();
                r.set_reachable(false);
                let why = tokio::time::timeout(Duration::from_secs(5), g.lost())
                    .await
                    .unwrap();
                assert_eq!(why, crate::coord::Lost::Unconfirmed);
                assert_eq!(
                    counter(
                        snap,
                        "waypost_locks_lost_total",
                        &[("reason", "unconfirmed")]
                    ),
                    1
                );
                assert_eq!(counter(snap, "waypost_locks_lost_total", &[]), 3);
                r.set_reachable(true);

                reg.deregister().await.unwrap();
                assert_eq!(
                    counter(snap, "waypost_registrations", &[("status", "registered")]),
                    0
                );
            });
        });
    }
}
