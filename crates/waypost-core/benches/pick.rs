//! What a pick costs with each strategy, on 1,000 instances (mixed weights) and on 10,
//! and what applying one change to a 1,000-instance cache costs (the precomputation for
//! picking: weights, pools, sticky ring).
//!
//! `cargo bench -p waypost-core --bench pick`; about 40 s.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use waypost_core::cache::{CacheOptions, ServiceCache, Strategy};
use waypost_core::{Instance, InstanceId, ServiceName, Snapshot, WatchEvent};

const STRATEGIES: [(&str, Strategy); 5] = [
    ("round_robin", Strategy::RoundRobin),
    ("random", Strategy::Random),
    ("weighted", Strategy::Weighted),
    ("p2c", Strategy::PowerOfTwoChoices),
    ("sticky", Strategy::Sticky),
];

fn instance(i: usize) -> Instance {
    // Weights 50..=500 in steps of 50, and one in 50 draining.
    let weight = if i % 50 == 7 {
        0
    } else {
        50 * (1 + (i * 7 % 10) as u32)
    };
    Instance::parse(
        "bench",
        &format!("inst-{i:05}"),
        "10.0.0.1",
        1000 + (i % 60000) as u16,
    )
    .unwrap()
    .with_weight(weight)
}

fn cache(n: usize) -> ServiceCache {
    let service = ServiceName::new("bench").unwrap();
    let instances = (0..n).map(instance).collect();
    ServiceCache::from_snapshot(
        Snapshot::new(service, instances, 1),
        CacheOptions::default(),
    )
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [1_000, 10] {
        let cache = cache(n);
        for (name, strategy) in STRATEGIES {
            group.bench_with_input(BenchmarkId::new(name, n), &cache, |b, cache| {
                let mut k = 0u64;
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let key = k.to_le_bytes();
                    // The tracked p2c handle is dropped here, as a finished request would be.
                    black_box(cache.pick(strategy, Some(&key)))
                })
            });
        }
    }
    group.finish();
}

fn update(c: &mut Criterion) {
    let mut group = c.benchmark_group("update");
    let cache = cache(1_000);
    let newcomer = instance(1_000_000 - 1);
    let id: InstanceId = newcomer.id.clone();
    // Only the Added is timed; the Removed that restores the set is not.
    group.bench_function("added_to_1000", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for r in 0..iters {
                let added = WatchEvent::Added {
                    instance: newcomer.clone(),
                    revision: 2 * r + 2,
                };
                let start = Instant::now();
                cache.apply(added);
                timed += start.elapsed();
                cache.apply(WatchEvent::Removed {
                    id: id.clone(),
                    revision: 2 * r + 3,
                });
            }
            timed
        })
    });
    // A change that leaves the serving members as they are: the ring is shared.
    let reweighted = instance(500).with_weight(123);
    group.bench_function("weight_change_in_1000", |b| {
        b.iter(|| {
            cache.apply(WatchEvent::Updated {
                instance: reweighted.clone(),
                revision: 1,
            })
        })
    });
    let service = ServiceName::new("bench").unwrap();
    let fresh = Snapshot::new(service, (0..1_000).map(instance).collect(), 1);
    group.bench_function("snapshot_of_1000", |b| {
        let cache = self::cache(10);
        b.iter(|| {
            cache.apply(WatchEvent::Snapshot(fresh.clone()));
            cache.apply(WatchEvent::Snapshot(Snapshot::new(
                fresh.service.clone(),
                vec![],
                1,
            )));
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = pick, update
}
criterion_main!(benches);
