use std::collections::HashMap;
use std::time::Duration;

use super::rng::seed_this_thread;
use super::script::{id, inst, snapshot, svc, ScriptedWatcher};
use super::*;
use crate::backoff::Backoff;

mod edges;

const T: Duration = Duration::from_secs(5);

const STRATEGIES: [Strategy; 5] = [
    Strategy::RoundRobin,
    Strategy::Random,
    Strategy::Weighted,
    Strategy::PowerOfTwoChoices,
    Strategy::Sticky,
];

fn fast() -> CacheOptions {
    CacheOptions::default().with_backoff(Backoff::new(
        Duration::from_millis(1),
        Duration::from_millis(10),
    ))
}

fn fixed(instances: Vec<Instance>) -> ServiceCache {
    ServiceCache::from_snapshot(snapshot(instances, 1), fast())
}

fn names(v: &CacheView) -> Vec<&str> {
    v.iter().map(|i| i.id.as_str()).collect()
}

/// The id `strategy` picks, with a key that changes with `n` for `Sticky`.
fn pick_id(cache: &ServiceCache, strategy: Strategy, n: u64) -> Option<String> {
    cache
        .pick(strategy, Some(&n.to_le_bytes()))
        .map(|p| p.id().to_string())
}

fn counts(cache: &ServiceCache, strategy: Strategy, picks: u64) -> HashMap<String, u64> {
    let mut c = HashMap::new();
    for n in 0..picks {
        *c.entry(pick_id(cache, strategy, n).expect("a pick"))
            .or_default() += 1;
    }
    c
}

#[test]
fn cache_and_picks_are_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    fn send_sync<T: Send + Sync + 'static>() {}
    check::<ServiceCache>();
    send_sync::<Picked>();
    send_sync::<CacheView>();
}

#[tokio::test]
async fn applies_a_snapshot_then_added_updated_removed() {
    let (watcher, mut ctl) = ScriptedWatcher::new();
    let cache = ServiceCache::watch(watcher, svc(), fast());
    assert!(!cache.is_ready());
    assert!(cache.pick_round_robin().is_none());
    let feed = ctl.next_watch().await;
    feed.snapshot(vec![inst("b", 1, 100), inst("a", 1, 100)], 10);
    cache.wait_ready(T).await.unwrap();
    assert_eq!(names(&cache.view()), ["a", "b"]);
    assert_eq!(cache.revision(), 10);

    feed.added(inst("c", 1, 100), 11);
    cache.wait_for(T, |v| v.contains("c")).await.unwrap();
    feed.updated(inst("b", 2, 100), 12);
    let v = cache
        .wait_for(T, |v| v.get("b").is_some_and(|b| b.endpoint.port == 2))
        .await
        .unwrap();
    assert_eq!(v.revision(), 12);
    feed.removed("a", 13);
    let v = cache.wait_for(T, |v| !v.contains("a")).await.unwrap();
    assert_eq!(names(&v), ["b", "c"]);
    assert_eq!(v.revision(), 13);
    assert!(!v.is_stale() && v.is_ready());
    assert_eq!(cache.get(id("c")).unwrap().endpoint.port, 1);
    assert_eq!(cache.instances().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_keeps_serving_and_resynced_clears_it() {
    let (watcher, mut ctl) = ScriptedWatcher::new();
    let cache = ServiceCache::watch(watcher, svc(), fast());
    let feed = ctl.next_watch().await;
    feed.snapshot(vec![inst("a", 1, 100), inst("b", 1, 100)], 1);
    cache.wait_ready(T).await.unwrap();
    assert_eq!(cache.age(), Duration::ZERO);

    assert!(!cache.is_stale());
    feed.stale();
    let v = cache.wait_for(T, |v| v.is_stale()).await.unwrap();
    assert!(cache.is_stale(), "the cache says what its view says");
    assert_eq!(names(&v), ["a", "b"]);
    assert!(v.stale_reason().unwrap().is_temporary());
    assert!(cache.stale_since().is_some());
    for s in STRATEGIES {
        assert!(cache.pick(s, Some(b"k")).is_some(), "{s:?}");
    }
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(cache.age() >= Duration::from_secs(3), "{:?}", cache.age());

    feed.resynced(vec![inst("b", 1, 100), inst("c", 1, 100)], 5);
    let v = cache.wait_for(T, |v| !v.is_stale()).await.unwrap();
    assert_eq!(names(&v), ["b", "c"]);
    assert_eq!(v.revision(), 5);
    assert_eq!(cache.stale_since(), None);
    assert_eq!(cache.age(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn rewatches_after_the_stream_ends_or_fails() {
    let (watcher, mut ctl) = ScriptedWatcher::new();
    let cache = ServiceCache::watch(watcher, svc(), CacheOptions::default());
    let first = ctl.next_watch().await;
    first.snapshot(vec![inst("a", 1, 100)], 1);
    cache.wait_ready(T).await.unwrap();

    drop(first);
    let v = cache.wait_for(T, |v| v.is_stale()).await.unwrap();
    assert!(v.contains("a"), "the last known set is still served");
    assert_eq!(cache.pick_random().unwrap().id.as_str(), "a");

    let second = ctl.next_watch().await;
    second.snapshot(vec![inst("b", 1, 100)], 7);
    let v = cache
        .wait_for(T, |v| !v.is_stale() && v.contains("b"))
        .await
        .unwrap();
    assert_eq!(names(&v), ["b"]);

    second.error(Error::invalid_input("scripted failure"));
    let v = cache.wait_for(T, |v| v.is_stale()).await.unwrap();
    assert!(v
        .stale_reason()
        .unwrap()
        .to_string()
        .contains("scripted failure"));
    let third = ctl.next_watch().await;
    third.snapshot(vec![inst("b", 1, 100), inst("c", 1, 100)], 2);
    cache
        .wait_for(T, |v| !v.is_stale() && v.len() == 2)
        .await
        .unwrap();
}

#[tokio::test]
async fn dropping_the_last_clone_stops_the_watch() {
    let (watcher, mut ctl) = ScriptedWatcher::new();
    let cache = ServiceCache::watch(watcher, svc(), fast());
    let feed = ctl.next_watch().await;
    feed.snapshot(vec![inst("a", 1, 100)], 1);
    cache.wait_ready(T).await.unwrap();

    let clone = cache.clone();
    drop(cache);
    feed.added(inst("b", 1, 100), 2);
    clone.wait_for(T, |v| v.contains("b")).await.unwrap();

    drop(clone);
    tokio::time::timeout(T, feed.closed())
        .await
        .expect("the watch stream was not dropped");
    tokio::task::yield_now().await;
    assert!(
        ctl.try_next_watch().is_none(),
        "no new watch after the drop"
    );
}

#[tokio::test(start_paused = true)]
async fn waits_time_out_with_error_timeout() {
    let (watcher, mut ctl) = ScriptedWatcher::new();
    let cache = ServiceCache::watch(watcher, svc(), fast());
    let feed = ctl.next_watch().await;
    let e = cache.wait_ready(Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(e, Error::Timeout { after, .. } if after == Duration::from_secs(2)),
        "{e}"
    );
    feed.snapshot(vec![inst("a", 1, 100)], 1);
    cache.wait_ready(T).await.unwrap();
    let e = cache.wait_for(T, |v| v.len() == 2).await.unwrap_err();
    assert!(e.is_temporary());
}

#[test]
fn a_static_cache_is_ready_and_empty_sets_pick_nothing() {
    let cache = fixed(vec![]);
    assert!(cache.is_ready() && cache.is_empty() && !cache.is_stale());
    for s in STRATEGIES {
        assert!(cache.pick(s, Some(b"k")).is_none(), "{s:?}");
    }
}

#[test]
fn round_robin_cycles_through_all_in_id_order() {
    let cache = fixed(
        (0..5)
            .map(|i| inst(&format!("i{i}"), 1, 100 * (i + 1)))
            .collect(),
    );
    let picks: Vec<String> = (0..10)
        .map(|_| cache.pick_round_robin().unwrap().id.to_string())
        .collect();
    assert_eq!(
        picks,
        ["i0", "i1", "i2", "i3", "i4", "i0", "i1", "i2", "i3", "i4"]
    );
}

/// Asserts each count is within 5 standard deviations of `picks * weight / total`.
fn assert_proportional(counts: &HashMap<String, u64>, weights: &[(&str, u64)], picks: u64) {
    let total: u64 = weights.iter().map(|w| w.1).sum();
    for &(name, w) in weights {
        let p = w as f64 / total as f64;
        let expected = picks as f64 * p;
        let sigma = (picks as f64 * p * (1.0 - p)).sqrt();
        let got = counts.get(name).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() <= 5.0 * sigma + 1.0,
            "{name}: {got} picks, expected {expected} ± {}",
            5.0 * sigma
        );
    }
}

#[test]
fn weighted_follows_the_weights_and_random_ignores_them() {
    seed_this_thread(7);
    let cache = fixed(vec![
        inst("a", 1, 100),
        inst("b", 1, 200),
        inst("c", 1, 700),
        inst("d", 1, 0),
    ]);
    let n = 100_000;
    let weighted = counts(&cache, Strategy::Weighted, n);
    assert_proportional(
        &weighted,
        &[("a", 100), ("b", 200), ("c", 700), ("d", 0)],
        n,
    );
    let random = counts(&cache, Strategy::Random, n);
    assert_proportional(&random, &[("a", 1), ("b", 1), ("c", 1), ("d", 0)], n);
}

#[test]
fn draining_instances_are_picked_only_when_nothing_else_is() {
    let cache = fixed(vec![inst("a", 1, 100), inst("z", 1, 0)]);
    for s in STRATEGIES {
        let c = counts(&cache, s, 2_000);
        assert_eq!(c.get("z"), None, "{s:?} picked the draining instance");
    }
    let alone = fixed(vec![inst("z", 1, 0), inst("y", 1, 0)]);
    for s in STRATEGIES {
        let c = counts(&alone, s, 200);
        assert!(c.contains_key("z") || c.contains_key("y"), "{s:?}");
    }
    // A draining instance that works beats an ejected one.
    cache.report_failure("a");
    for s in STRATEGIES {
        assert_eq!(pick_id(&cache, s, 1).as_deref(), Some("z"), "{s:?}");
    }
}

#[test]
fn sticky_keys_stay_and_only_the_leavers_keys_move() {
    let cache = fixed((0..10).map(|i| inst(&format!("n{i}"), 1, 100)).collect());
    let keys: Vec<String> = (0..5_000).map(|k| format!("user-{k}")).collect();
    let map = |c: &ServiceCache| -> Vec<String> {
        keys.iter()
            .map(|k| c.pick_sticky(k).unwrap().id.to_string())
            .collect()
    };
    let before = map(&cache);
    assert_eq!(map(&cache), before, "same key, same instance");
    assert_eq!(
        cache.pick(Strategy::Sticky, Some(b"user-1")).unwrap().id(),
        &id(&before[1])
    );

    cache.apply(WatchEvent::Removed {
        id: id("n3"),
        revision: 2,
    });
    let after = map(&cache);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b == "n3" {
            assert_ne!(a, "n3");
            moved += 1;
        } else {
            assert_eq!(a, b, "a key moved though its instance stayed");
        }
    }
    // About 1/10 of the keys were on n3.
    assert!((250..=750).contains(&moved), "{moved} keys moved");

    // Coming back, n3 gets exactly its keys back; weight changes move nothing.
    cache.apply(WatchEvent::Added {
        instance: inst("n3", 1, 100),
        revision: 3,
    });
    assert_eq!(map(&cache), before);
    cache.apply(WatchEvent::Updated {
        instance: inst("n5", 1, 900),
        revision: 4,
    });
    assert_eq!(map(&cache), before);

    // An ejected instance's keys go elsewhere, and come back when it is readmitted.
    cache.report_failure("n5");
    let ejected = map(&cache);
    for (b, e) in before.iter().zip(&ejected) {
        if b == "n5" {
            assert_ne!(e, "n5");
        } else {
            assert_eq!(e, b);
        }
    }
    cache.report_success("n5");
    assert_eq!(map(&cache), before);
}

#[test]
fn p2c_prefers_the_less_loaded_and_counts_in_flight() {
    let cache = fixed(vec![inst("a", 1, 100), inst("b", 1, 100)]);
    // With two instances both are always drawn, so the choice is deterministic.
    let first = cache.pick_p2c().unwrap();
    assert!(first.is_tracked());
    let second = cache.pick_p2c().unwrap();
    assert_ne!(first.id(), second.id());
    assert_eq!(cache.in_flight("a"), Some(1));
    assert_eq!(cache.in_flight("b"), Some(1));
    let first_id = first.id().clone();
    drop(first);
    let third = cache.pick_p2c().unwrap();
    assert_eq!(third.id(), &first_id, "the idle instance wins");
    drop((second, third));
    assert_eq!(cache.in_flight("a"), Some(0));
    assert_eq!(cache.in_flight("b"), Some(0));

    // Loads follow the weights: b may carry three times what a carries.
    let cache = fixed(vec![inst("a", 1, 100), inst("b", 1, 300)]);
    let held: Vec<Picked> = (0..400).map(|_| cache.pick_p2c().unwrap()).collect();
    let a = cache.in_flight("a").unwrap();
    assert!((99..=101).contains(&a), "a carries {a} of 400");
    drop(held);
    assert_eq!(cache.in_flight("b"), Some(0));
    let untracked = cache.pick(Strategy::RoundRobin, None).unwrap();
    assert!(!untracked.is_tracked());
    let arc = cache
        .pick(Strategy::PowerOfTwoChoices, None)
        .unwrap()
        .into_instance();
    assert_eq!(cache.in_flight(&arc.id), Some(0));
}

#[tokio::test(start_paused = true)]
async fn ejected_instances_are_skipped_until_the_time_passes() {
    let ejection = Duration::from_secs(10);
    let cache = ServiceCache::from_snapshot(
        snapshot(
            vec![inst("a", 1, 100), inst("b", 1, 100), inst("c", 1, 100)],
            1,
        ),
        fast().with_ejection(ejection),
    );
    assert!(cache.report_failure("a"));
    assert!(!cache.report_failure("nope"));
    assert!(cache.is_ejected("a"));
    for s in STRATEGIES {
        assert_eq!(
            counts(&cache, s, 300).get("a"),
            None,
            "{s:?} picked an ejected instance"
        );
    }
    tokio::time::advance(ejection - Duration::from_millis(1)).await;
    assert!(cache.is_ejected("a"));
    assert_eq!(counts(&cache, Strategy::RoundRobin, 30).get("a"), None);
    tokio::time::advance(Duration::from_millis(2)).await;
    assert!(!cache.is_ejected("a"));
    assert_eq!(counts(&cache, Strategy::RoundRobin, 30).get("a"), Some(&10));

    // report_success readmits at once.
    cache.report_failure("b");
    assert!(cache.is_ejected("b"));
    assert!(cache.report_success("b"));
    assert!(!cache.is_ejected("b"));
}

#[test]
fn when_every_instance_is_ejected_ejection_is_ignored() {
    let cache = fixed(vec![inst("a", 1, 100), inst("b", 1, 100), inst("c", 1, 0)]);
    for i in ["a", "b", "c"] {
        cache.report_failure(i);
    }
    for s in STRATEGIES {
        let c = counts(&cache, s, 200);
        assert_eq!(c.get("c"), None, "{s:?}: serving before draining");
        assert_eq!(c.values().sum::<u64>(), 200, "{s:?}");
    }
    assert_eq!(counts(&cache, Strategy::RoundRobin, 10).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn ejection_survives_updates_and_a_quick_return() {
    let ejection = Duration::from_secs(10);
    let cache = ServiceCache::from_snapshot(
        snapshot(
            vec![inst("a", 1, 100), inst("b", 1, 100), inst("c", 1, 100)],
            1,
        ),
        fast().with_ejection(ejection),
    );
    cache.report_failure("a");
    cache.apply(WatchEvent::Updated {
        instance: inst("a", 2, 50),
        revision: 2,
    });
    assert!(cache.is_ejected("a"), "an update keeps the ejection");
    cache.apply(WatchEvent::Snapshot(snapshot(
        vec![inst("a", 2, 50), inst("b", 1, 100), inst("c", 1, 100)],
        3,
    )));
    assert!(cache.is_ejected("a"), "a snapshot keeps the ejection");

    cache.apply(WatchEvent::Removed {
        id: id("a"),
        revision: 4,
    });
    assert!(!cache.is_ejected("a"), "not listed");
    cache.apply(WatchEvent::Added {
        instance: inst("a", 3, 100),
        revision: 5,
    });
    assert!(
        cache.is_ejected("a"),
        "back within the ejection: still ejected"
    );

    cache.report_failure("b");
    cache.apply(WatchEvent::Snapshot(snapshot(
        vec![inst("a", 3, 100), inst("c", 1, 100)],
        6,
    )));
    tokio::time::advance(ejection + Duration::from_millis(1)).await;
    cache.apply(WatchEvent::Added {
        instance: inst("b", 1, 100),
        revision: 7,
    });
    assert!(!cache.is_ejected("b"), "back after the ejection: fresh");
    assert!(!cache.is_ejected("a"));
}

#[test]
fn duplicate_ids_in_a_snapshot_keep_the_last() {
    let cache = fixed(vec![
        inst("a", 1, 100),
        inst("b", 1, 100),
        inst("a", 2, 100),
    ]);
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.get("a").unwrap().endpoint.port, 2);
}

#[test]
fn view_round_trips_to_a_snapshot() {
    let s = snapshot(vec![inst("a", 1, 100), inst("b", 2, 0)], 9);
    let cache = ServiceCache::from_snapshot(s.clone(), CacheOptions::default());
    assert_eq!(cache.view().to_snapshot(), s);
    assert!(format!("{cache:?}").contains("\"b\""));
}

#[test]
fn accessors_and_builders_report_what_was_set() {
    let options = CacheOptions::default()
        .with_ejection(Duration::from_secs(7))
        .with_ring_vnodes(13)
        .with_backoff(Backoff::new(
            Duration::from_millis(3),
            Duration::from_millis(9),
        ));
    assert_eq!(options.ejection, Duration::from_secs(7));
    assert_eq!(options.ring_vnodes, 13);
    // The first delay of the backoff set (3 ms, jittered) is far below the default's.
    let first = options.backoff.clone().next_delay();
    assert!(
        first <= Duration::from_millis(6),
        "the backoff was set: {first:?}"
    );
    let cache = ServiceCache::from_snapshot(snapshot(vec![inst("a", 1, 100)], 1), options.clone());
    assert_eq!(cache.options().ejection, Duration::from_secs(7));
    assert_eq!(cache.options().ring_vnodes, 13);
    assert!(cache.contains("a") && !cache.contains("b"));
    assert!(!cache.is_empty());
    let empty = ServiceCache::from_snapshot(snapshot(Vec::new(), 1), options);
    assert!(empty.is_empty() && !empty.contains("a"));
    assert!(empty.pick_weighted().is_none());
}

#[test]
fn pick_weighted_follows_the_weights() {
    seed_this_thread(7);
    let cache = fixed(vec![inst("light", 1, 100), inst("heavy", 1, 300)]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..4000 {
        let picked = cache.pick_weighted().expect("a pick");
        *counts.entry(picked.id.to_string()).or_default() += 1;
    }
    let heavy = counts["heavy"] as f64 / 4000.0;
    assert!(
        (0.70..0.80).contains(&heavy),
        "heavy picked {heavy:.3} of the time, expected 0.75"
    );
}
