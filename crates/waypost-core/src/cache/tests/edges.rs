//! Edges that mutation testing found unguarded: the generator, the ejection marks'
//! bookkeeping and deadline, the reuse of a sticky ring, and an empty pool.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use super::super::entry::{Clock, LazyNow, Marks};
use super::super::rng::{next_u64, seed_this_thread};
use super::super::set::{Pool, SetData};
use super::super::strategy::{Candidates, PickStrategy, Random, RoundRobin};
use super::{fixed, inst, snapshot, CacheOptions, ServiceCache, WatchEvent};
use crate::select::Ring;

#[test]
fn the_generator_is_wyrand_and_a_seed_replays_it() {
    seed_this_thread(42);
    let first: Vec<u64> = (0..4).map(|_| next_u64()).collect();
    // wyrand from state 43 (a seed is made odd), computed independently.
    assert_eq!(
        first,
        [
            411_277_609_273_760_860,
            57_143_146_735_519_273,
            17_089_851_055_592_100_142,
            17_306_813_842_622_919_323
        ]
    );
    seed_this_thread(42);
    assert_eq!(next_u64(), first[0]);
}

#[test]
fn each_thread_seeds_its_own_generator() {
    let sequences: HashSet<[u64; 2]> = (0..8)
        .map(|_| {
            std::thread::spawn(|| [next_u64(), next_u64()])
                .join()
                .unwrap()
        })
        .collect();
    assert_eq!(
        sequences.len(),
        8,
        "threads share a sequence: {sequences:?}"
    );
}

fn ejecting(ms: u64) -> ServiceCache {
    ServiceCache::from_snapshot(
        snapshot(vec![inst("a", 1, 100), inst("b", 2, 100)], 1),
        CacheOptions::default().with_ejection(Duration::from_millis(ms)),
    )
}

#[tokio::test(start_paused = true)]
async fn a_readmitted_instance_drops_its_mark() {
    let cache = ejecting(10_000);
    cache.report_failure("a");
    assert!(!cache.shared.marks.none());
    cache.report_success("a");
    assert!(cache.shared.marks.none(), "no mark left to check");
    cache.report_success("a");
    assert!(cache.shared.marks.none());
    cache.report_failure("b");
    assert!(
        !cache.shared.marks.none(),
        "a second readmit took b's count"
    );
}

#[tokio::test(start_paused = true)]
async fn an_ejection_ends_exactly_when_its_time_is_up() {
    let cache = ejecting(100);
    let picks = |c: &ServiceCache| -> HashSet<String> {
        (0..4)
            .map(|_| c.pick_round_robin().unwrap().id.to_string())
            .collect()
    };
    cache.report_failure("a");
    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(cache.is_ejected("a"));
    assert_eq!(picks(&cache), HashSet::from(["b".to_string()]));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!cache.is_ejected("a"));
    assert_eq!(picks(&cache).len(), 2, "a is back at its deadline");

    // Leaving at the deadline: nothing to keep, the mark is cleared at once.
    cache.report_failure("b");
    tokio::time::advance(Duration::from_millis(100)).await;
    cache.apply(WatchEvent::Removed {
        id: super::id("b"),
        revision: 2,
    });
    assert!(cache.shared.marks.none());
}

#[test]
fn an_empty_pool_offers_nothing() {
    let set = SetData::empty(1, None);
    let (clock, marks, ticket) = (Clock::new(), Marks::default(), AtomicUsize::new(0));
    let now = LazyNow::new(&clock, &marks);
    for check_ejection in [false, true] {
        let c = Candidates {
            set: &set,
            pool: &set.serving,
            kind: Pool::Serving,
            check_ejection,
            now: &now,
            ticket: &ticket,
            key: None,
        };
        assert_eq!((c.is_empty(), c.len()), (true, 0));
        assert_eq!(RoundRobin.choose(&c), None);
        assert_eq!(Random.choose(&c), None);
    }
}

#[test]
fn sticky_keys_spread_over_the_default_ring() {
    let cache = fixed((0..10).map(|i| inst(&format!("s{i}"), 1, 100)).collect());
    let view = cache.view();
    assert_eq!(view.instances().len(), 10);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for k in 0..20_000u64 {
        let id = cache.pick_sticky(k.to_le_bytes()).unwrap().id.to_string();
        *counts.entry(id).or_default() += 1;
    }
    // 2,000 each on average; 100 points each keep every instance within ±35%.
    assert_eq!(counts.len(), 10);
    assert!(
        counts.values().all(|&c| c.abs_diff(2_000) < 700),
        "{counts:?}"
    );
    let view = cache.view();
    let ring = view.set.serving.ring(&view.set.instances);
    assert_eq!(ring.vnodes(), cache.options().ring_vnodes);
}

#[test]
fn an_update_that_keeps_the_members_reuses_the_ring() {
    let cache = fixed((0..10).map(|i| inst(&format!("s{i}"), 1, 100)).collect());
    cache.pick_sticky("k");
    let before = cache.view();
    let ring: *const Ring = before.set.serving.ring(&before.set.instances);
    // A new port: a new set with the same serving members.
    cache.apply(WatchEvent::Updated {
        instance: inst("s3", 9, 100),
        revision: 2,
    });
    cache.pick_sticky("k");
    let after = cache.view();
    assert!(!Arc::ptr_eq(&before.set, &after.set));
    assert!(std::ptr::eq(
        ring,
        after.set.serving.ring(&after.set.instances)
    ));
}
