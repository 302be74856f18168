//! Zone-aware selection, the [`PickStrategy`] hook, the lazily built sticky ring and the
//! per-thread view.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::script::{id, inst, snapshot};
use super::strategy::{Candidates, PickStrategy, Random, RoundRobin};
use super::*;

const STRATEGIES: [Strategy; 5] = [
    Strategy::RoundRobin,
    Strategy::Random,
    Strategy::Weighted,
    Strategy::PowerOfTwoChoices,
    Strategy::Sticky,
];

/// Six instances: a-0..a-2 in zone "a", b-0..b-2 in zone "b", and a draining one in "a".
fn zoned(options: CacheOptions) -> ServiceCache {
    let mut v = Vec::new();
    for z in ["a", "b"] {
        for i in 0..3 {
            v.push(inst(&format!("{z}-{i}"), 1, 100).with_zone(z));
        }
    }
    v.push(inst("a-drain", 1, 0).with_zone("a"));
    ServiceCache::from_snapshot(snapshot(v, 1), options)
}

/// The ids of `picks` picks with `strategy` (a fresh key each for `Sticky`).
fn picked(cache: &ServiceCache, strategy: Strategy, picks: u64) -> HashSet<String> {
    (0..picks)
        .map(|n| {
            cache
                .pick(strategy, Some(&n.to_le_bytes()))
                .expect("a pick")
                .id()
                .to_string()
        })
        .collect()
}

#[test]
fn every_strategy_stays_in_the_callers_zone() {
    let cache = zoned(CacheOptions::default().with_zone("b"));
    for s in STRATEGIES {
        let got = picked(&cache, s, 300);
        assert!(got.iter().all(|i| i.starts_with("b-")), "{s:?}: {got:?}");
        assert_eq!(got.len(), 3, "{s:?} used every local instance: {got:?}");
    }
    // Without a zone, or with a zone nobody is in, every zone is used.
    for options in [
        CacheOptions::default(),
        CacheOptions::default().with_zone("c"),
    ] {
        let cache = zoned(options);
        let got = picked(&cache, Strategy::RoundRobin, 60);
        assert_eq!(got.len(), 6, "{got:?}");
    }
}

#[test]
fn falls_back_to_all_zones_below_the_threshold() {
    // Zone "b" has 3 instances; asking for 4 sends every pick to all zones.
    let cache = zoned(
        CacheOptions::default()
            .with_zone("b")
            .with_zone_min_available(4),
    );
    for s in STRATEGIES {
        let got = picked(&cache, s, 600);
        assert!(got.iter().any(|i| i.starts_with("a-")), "{s:?}: {got:?}");
        assert!(!got.contains("a-drain"), "{s:?}: a draining instance");
    }

    // With a threshold of 2, ejecting two of b's three leaves one: below it.
    let cache = zoned(
        CacheOptions::default()
            .with_zone("b")
            .with_zone_min_available(2),
    );
    assert!(picked(&cache, Strategy::Random, 200)
        .iter()
        .all(|i| i.starts_with("b-")));
    cache.report_failure("b-0");
    let got = picked(&cache, Strategy::RoundRobin, 60);
    assert_eq!(
        got,
        ["b-1", "b-2"].map(String::from).into(),
        "2 left: still local"
    );
    cache.report_failure("b-1");
    for s in STRATEGIES {
        let got = picked(&cache, s, 600);
        assert!(got.iter().any(|i| i.starts_with("a-")), "{s:?}: {got:?}");
        assert!(
            !got.contains("b-0") && !got.contains("b-1"),
            "{s:?}: ejected"
        );
    }
    // Readmitted: back to the local zone.
    cache.report_success("b-1");
    for s in STRATEGIES {
        let got = picked(&cache, s, 300);
        assert!(
            got.iter().all(|i| i == "b-1" || i == "b-2"),
            "{s:?}: {got:?}"
        );
    }
}

#[test]
fn zone_membership_follows_updates() {
    let cache = zoned(CacheOptions::default().with_zone("b"));
    // b-2 moves to zone "a"; a-0 moves to "b".
    cache.apply(WatchEvent::Updated {
        instance: inst("b-2", 1, 100).with_zone("a"),
        revision: 2,
    });
    cache.apply(WatchEvent::Updated {
        instance: inst("a-0", 1, 100).with_zone("b"),
        revision: 3,
    });
    let got = picked(&cache, Strategy::RoundRobin, 30);
    assert_eq!(got, ["a-0", "b-0", "b-1"].map(String::from).into());
    // The sticky mapping within the zone is the one of a cache holding only that zone.
    let only_b = ServiceCache::from_snapshot(
        snapshot(
            ["a-0", "b-0", "b-1"]
                .iter()
                .map(|i| inst(i, 1, 100))
                .collect(),
            1,
        ),
        CacheOptions::default(),
    );
    for k in 0..500u64 {
        let key = k.to_le_bytes();
        assert_eq!(
            cache.pick_sticky(key).unwrap().id,
            only_b.pick_sticky(key).unwrap().id
        );
    }
}

/// A strategy that counts its calls and picks the last eligible candidate.
#[derive(Debug, Default)]
struct Last {
    calls: AtomicUsize,
    skip_serving: bool,
}

impl PickStrategy for Last {
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        self.calls.fetch_add(1, Relaxed);
        if self.skip_serving && !c.is_draining() {
            return None;
        }
        (0..c.len()).rev().find(|&q| c.is_eligible(q))
    }
}

#[test]
fn a_strategy_of_ones_own_plugs_in_and_gets_the_fallbacks() {
    let cache = zoned(CacheOptions::default());
    let last = Last::default();
    assert_eq!(cache.pick_with(&last, None).unwrap().id().as_str(), "b-2");
    cache.report_failure("b-2");
    let p = cache.pick_with(&last, None).unwrap();
    assert_eq!(
        p.id().as_str(),
        "b-1",
        "ejected candidates are not eligible"
    );
    assert!(!p.is_tracked());
    assert_eq!(last.calls.load(Relaxed), 2);

    // Declining the serving pool gets the draining one offered next.
    let drain_only = Last {
        skip_serving: true,
        ..Last::default()
    };
    assert_eq!(
        cache.pick_with(&drain_only, None).unwrap().id().as_str(),
        "a-drain"
    );
    assert_eq!(drain_only.calls.load(Relaxed), 2);

    // Boxed, shared and through `dyn`; built-ins and the enum implement the trait.
    let boxed: Box<dyn PickStrategy> = Box::new(RoundRobin);
    assert!(cache.pick_with(&boxed, None).is_some());
    let shared: Arc<dyn PickStrategy> = Arc::new(Strategy::PowerOfTwoChoices);
    let tracked = cache.pick_with(&shared, None).unwrap();
    assert!(tracked.is_tracked());
    assert_eq!(cache.in_flight(tracked.id()), Some(1));
    drop(tracked);
    assert!(cache.pick_with(&Random, Some(b"k")).is_some());
    assert!(zoned(CacheOptions::default())
        .pick_with(&Strategy::Sticky, Some(b"k"))
        .is_some());
}

#[test]
fn candidates_report_load_weight_and_key() {
    struct Probe;
    impl PickStrategy for Probe {
        fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
            assert_eq!(c.key(), Some(&b"key"[..]));
            assert!(!c.is_local_zone() && !c.is_empty());
            let q = (0..c.len()).find(|&q| c.instance(q).id.as_str() == "a-1")?;
            assert_eq!((c.weight(q), c.in_flight(q)), (100, 1));
            let t = c.next_ticket();
            assert_eq!(c.next_ticket(), t + 1);
            Some(q)
        }
    }
    let cache = zoned(CacheOptions::default());
    let held = (0..200)
        .map(|_| cache.pick_p2c().unwrap())
        .find(|p| p.id().as_str() == "a-1")
        .expect("p2c picks a-1 sometimes");
    assert_eq!(
        cache.pick_with(&Probe, Some(b"key")).unwrap().id().as_str(),
        "a-1"
    );
    drop(held);
}

#[test]
fn the_ring_is_built_on_the_first_sticky_pick_and_merged() {
    let cache = ServiceCache::from_snapshot(
        snapshot(
            (0..50).map(|i| inst(&format!("n{i:02}"), 1, 100)).collect(),
            1,
        ),
        CacheOptions::default().with_ring_vnodes(40),
    );
    let has_ring = |c: &ServiceCache| c.shared.view.load().set.serving.has_ring();
    assert!(!has_ring(&cache), "no ring before a sticky pick");
    cache.pick_round_robin();
    assert!(!has_ring(&cache), "other strategies do not build it");
    cache.pick_sticky("k");
    assert!(has_ring(&cache));

    // Changes without sticky picks in between, then one merge from the last ring.
    cache.apply(WatchEvent::Removed {
        id: id("n07"),
        revision: 2,
    });
    cache.apply(WatchEvent::Added {
        instance: inst("x", 1, 100),
        revision: 3,
    });
    cache.apply(WatchEvent::Updated {
        instance: inst("n09", 1, 0),
        revision: 4,
    });
    assert!(!has_ring(&cache));
    let fresh = ServiceCache::from_snapshot(
        cache.view().to_snapshot(),
        CacheOptions::default().with_ring_vnodes(40),
    );
    for k in 0..2_000u64 {
        let key = k.to_le_bytes();
        assert_eq!(
            cache.pick_sticky(key).unwrap().id,
            fresh.pick_sticky(key).unwrap().id,
            "key {k}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn ejection_marks_are_counted_and_cleared() {
    let cache = zoned(CacheOptions::default().with_ejection(Duration::from_secs(10)));
    let marks = |c: &ServiceCache| !c.shared.marks.none();
    assert!(!marks(&cache));
    cache.report_failure("a-0");
    cache.report_failure("a-0");
    cache.report_failure("a-1");
    assert!(marks(&cache));
    cache.report_success("a-0");
    cache.report_success("a-0");
    assert!(marks(&cache), "a-1 is still ejected");
    tokio::time::advance(Duration::from_secs(11)).await;
    // The next pick that meets a-1's expired mark clears it.
    for _ in 0..20 {
        cache.pick_round_robin();
    }
    assert!(!marks(&cache));

    // An instance that leaves while ejected keeps its mark until the time runs out.
    cache.report_failure("b-0");
    cache.apply(WatchEvent::Removed {
        id: id("b-0"),
        revision: 2,
    });
    assert!(marks(&cache));
    tokio::time::advance(Duration::from_secs(11)).await;
    cache.apply(WatchEvent::Added {
        instance: inst("z", 1, 100),
        revision: 3,
    });
    assert!(
        !marks(&cache),
        "the writer clears retired marks that ran out"
    );
}

#[test]
fn other_threads_see_an_update_at_their_next_pick() {
    let cache = zoned(CacheOptions::default());
    let c = cache.clone();
    let seen = std::thread::spawn(move || {
        let first = picked(&c, Strategy::RoundRobin, 12);
        (first, c)
    })
    .join()
    .unwrap();
    assert_eq!(seen.0.len(), 6);
    // That thread cached the view; an update must still reach a pick there.
    cache.apply(WatchEvent::Snapshot(snapshot(
        vec![inst("only", 1, 100)],
        9,
    )));
    let c = seen.1;
    let after = std::thread::spawn(move || picked(&c, Strategy::RoundRobin, 5))
        .join()
        .unwrap();
    assert_eq!(after, ["only".to_string()].into());
    // And this thread, which picked before through the same slot.
    assert_eq!(
        picked(&cache, Strategy::Random, 5),
        ["only".to_string()].into()
    );
}

/// Picks the last candidate and records what it was offered.
#[derive(Default)]
struct Recorder {
    seen: std::sync::Mutex<Vec<(usize, bool, bool)>>,
    tracked: bool,
}

impl PickStrategy for Recorder {
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        self.seen
            .lock()
            .unwrap()
            .push((c.len(), c.is_empty(), c.is_local_zone()));
        let a = c.random();
        let b = c.random();
        assert_ne!((a, b), (0, 0), "random numbers, not constants");
        assert_ne!(a, b, "two draws differ");
        Some(c.len() - 1)
    }

    fn tracks_in_flight(&self) -> bool {
        self.tracked
    }
}

#[test]
fn wrapped_strategies_forward_choose_and_tracking() {
    let cache = ServiceCache::from_snapshot(
        snapshot(
            vec![inst("a", 1, 100), inst("b", 1, 100), inst("c", 1, 100)],
            1,
        ),
        CacheOptions::default(),
    );
    let plain = Recorder::default();
    let tracked = Recorder {
        tracked: true,
        ..Recorder::default()
    };
    // The last candidate is `c`, through a reference, a Box and an Arc.
    assert_eq!(cache.pick_with(&plain, None).unwrap().id().as_str(), "c");
    assert_eq!(cache.pick_with(&&plain, None).unwrap().id().as_str(), "c");
    let boxed: Box<dyn PickStrategy> = Box::new(Recorder::default());
    assert_eq!(cache.pick_with(&boxed, None).unwrap().id().as_str(), "c");
    let arc: Arc<dyn PickStrategy> = Arc::new(Recorder::default());
    assert_eq!(cache.pick_with(&arc, None).unwrap().id().as_str(), "c");
    // Tracking follows the wrapped strategy.
    for s in [&plain as &dyn PickStrategy, &tracked] {
        let via_ref = cache.pick_with(&s, None).unwrap();
        let via_box = cache.pick_with(&Box::new(s), None).unwrap();
        let via_arc = cache.pick_with(&Arc::new(s), None).unwrap();
        let expected = if s.tracks_in_flight() { 3 } else { 0 };
        assert_eq!(cache.in_flight("c"), Some(expected));
        drop((via_ref, via_box, via_arc));
    }
    let p2c = cache.pick_with(&strategy::PowerOfTwoChoices, None).unwrap();
    assert_eq!(cache.in_flight(p2c.id()), Some(1), "p2c picks are tracked");
    let seen = plain.seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|&(n, empty, local)| n == 3 && !empty && !local),
        "{seen:?}"
    );
}

#[test]
fn the_local_zone_pool_says_so() {
    let cache = ServiceCache::from_snapshot(
        snapshot(
            vec![
                inst("a", 1, 100).with_zone("z1"),
                inst("b", 1, 100).with_zone("z2"),
            ],
            1,
        ),
        CacheOptions::default().with_zone("z1"),
    );
    let s = Recorder::default();
    assert_eq!(cache.pick_with(&s, None).unwrap().id().as_str(), "a");
    let seen = s.seen.lock().unwrap();
    assert_eq!(
        seen.as_slice(),
        &[(1, false, true)],
        "offered the local pool first"
    );
}

#[test]
fn with_pick_borrows_the_same_pick_and_tracks_p2c_while_it_runs() {
    let cache = zoned(CacheOptions::default());
    for n in 0..50u64 {
        let key = n.to_le_bytes();
        let owned = cache.pick_sticky(key).unwrap();
        let borrowed = cache.with_pick(&Strategy::Sticky, Some(&key), |i| i.id.clone());
        assert_eq!(borrowed.as_ref(), Some(&owned.id));
    }
    cache.with_pick(&Strategy::RoundRobin, None, |i| {
        assert_eq!(
            cache.in_flight(&i.id),
            Some(0),
            "round robin is not tracked"
        );
    });

    // Two serving instances: p2c draws both, so a pick made while the first one's
    // request runs (inside `f`) goes to the other, and none stays in flight after.
    let two = ServiceCache::from_snapshot(
        snapshot(vec![inst("x", 1, 100), inst("y", 2, 100)], 1),
        CacheOptions::default(),
    );
    for _ in 0..20 {
        let (outer, inner) = two
            .with_pick(&Strategy::PowerOfTwoChoices, None, |a| {
                assert_eq!(two.in_flight(&a.id), Some(1));
                let b = two.with_pick(&Strategy::PowerOfTwoChoices, None, |b| b.id.clone());
                (a.id.clone(), b.unwrap())
            })
            .unwrap();
        assert_ne!(outer, inner);
        assert_eq!(two.in_flight(&outer), Some(0));
    }

    let empty = ServiceCache::from_snapshot(snapshot(vec![], 1), CacheOptions::default());
    assert_eq!(empty.with_pick(&Strategy::Random, None, |_| ()), None);
}
