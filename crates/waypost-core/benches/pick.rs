//! What a pick costs with each strategy on 1,000 instances, next to baselines measured in
//! the same run, and what applying one change to a 1,000-instance cache costs.
//!
//! `cargo bench -p waypost-core --bench pick` (about a minute) prints markdown tables;
//! `PICK_PROFILE=<row>` runs one row alone, for a profiler (see [`profile`]).
//! Every case runs in short batches, and the cases take turns: round after round, each
//! case runs one batch, so a burst of load from elsewhere on the machine hits all cases
//! alike. A figure is the median over the rounds, and ratios are taken between medians
//! of the same run.
//!
//! Baselines:
//! - `floor`: an `ArcSwap<Vec<Arc<Instance>>>` load, one `fetch_add` on a shared counter,
//!   and an index into the vector (the cheapest round robin over a swappable list);
//! - `RwLock<Vec<_>> round robin`: a read lock, a `fetch_add`, an index and an `Arc`
//!   clone;
//! - tower's `p2c::Balance` over the same 1,000 endpoints wrapped in `PendingRequests`:
//!   `poll_ready` then `call`, the response dropped (one thread: the balancer is `&mut`).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Barrier, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use waypost_core::cache::strategy::{Candidates, PickStrategy, RoundRobin};
use waypost_core::cache::{CacheOptions, ServiceCache, Strategy};
use waypost_core::{Instance, ServiceName, Snapshot, WatchEvent};

const N: usize = 1_000;
/// Rounds of the pick table; each case runs one batch per round.
const ROUNDS: usize = 21;
/// Picks per batch on one thread, and per thread with two.
const BATCH: u64 = 100_000;

const STRATEGIES: [(&str, Strategy); 5] = [
    ("round robin", Strategy::RoundRobin),
    ("random", Strategy::Random),
    ("weighted", Strategy::Weighted),
    ("p2c (incl. guard drop)", Strategy::PowerOfTwoChoices),
    ("sticky", Strategy::Sticky),
];

fn instance(i: usize) -> Instance {
    // Weights 50..=500 in steps of 50, one in 50 draining, three zones.
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
    .with_zone(["z-a", "z-b", "z-c"][i % 3])
}

fn snapshot(n: usize) -> Snapshot {
    let service = ServiceName::new("bench").unwrap();
    Snapshot::new(service, (0..n).map(instance).collect(), 1)
}

fn cache(n: usize, options: CacheOptions) -> ServiceCache {
    ServiceCache::from_snapshot(snapshot(n), options)
}

/// Runs `ops` iterations of a loop body and returns the time per iteration, in ns.
type Batch = Box<dyn FnMut(u64) -> f64>;

/// A batch that runs `op` `n` times on this thread.
fn one_thread(mut op: impl FnMut(u64) + 'static) -> Batch {
    let mut k = 0u64;
    Box::new(move |n| {
        let start = Instant::now();
        for _ in 0..n {
            k = k.wrapping_add(1);
            op(k);
        }
        start.elapsed().as_nanos() as f64 / n as f64
    })
}

/// A batch that runs `op` `n` times on each of two threads at once; the time per
/// iteration of one thread (wall time from the common start to the last finish, over `n`).
fn two_threads(op: impl Fn(u64) + Send + Sync + 'static) -> Batch {
    let op = Arc::new(op);
    Box::new(move |n| {
        let barrier = Barrier::new(3);
        let start = std::thread::scope(|s| {
            for t in 0..2u64 {
                let (op, barrier) = (Arc::clone(&op), &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for k in 0..n {
                        op(k.wrapping_mul(2).wrapping_add(t));
                    }
                });
            }
            barrier.wait();
            Instant::now()
        });
        start.elapsed().as_nanos() as f64 / n as f64
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs every batch once per round, `rounds` times, and returns each one's median.
fn interleaved(batches: &mut [Batch], rounds: usize, ops: u64) -> Vec<f64> {
    let mut samples = vec![Vec::with_capacity(rounds); batches.len()];
    for b in batches.iter_mut() {
        b(ops / 10); // warm-up
    }
    for _ in 0..rounds {
        for (b, s) in batches.iter_mut().zip(&mut samples) {
            s.push(b(ops));
        }
    }
    samples.into_iter().map(median).collect()
}

// ---- baselines ----

fn floor_op() -> impl Fn(u64) + Send + Sync + Clone + 'static {
    let list: Vec<Arc<Instance>> = (0..N).map(|i| Arc::new(instance(i))).collect();
    let swap = Arc::new(ArcSwap::from_pointee(list));
    let counter = Arc::new(AtomicUsize::new(0));
    move |_| {
        let list = swap.load();
        let i = counter.fetch_add(1, Relaxed) % list.len();
        black_box(&list[i]);
    }
}

fn rwlock_op() -> impl Fn(u64) + Send + Sync + Clone + 'static {
    let list: Vec<Arc<Instance>> = (0..N).map(|i| Arc::new(instance(i))).collect();
    let lock = Arc::new(RwLock::new(list));
    let counter = Arc::new(AtomicUsize::new(0));
    move |_| {
        let list = lock.read().unwrap();
        let i = counter.fetch_add(1, Relaxed) % list.len();
        black_box(Arc::clone(&list[i]));
    }
}

mod tower_p2c {
    use super::*;
    use tower::balance::p2c::Balance;
    use tower::discover::ServiceList;
    use tower::load::{CompleteOnResponse, PendingRequests};
    use tower::Service;

    /// An endpoint that is always ready and answers at once.
    #[derive(Clone, Debug)]
    pub(super) struct Endpoint(pub(super) Arc<Instance>);

    impl Service<()> for Endpoint {
        type Response = ();
        type Error = Infallible;
        type Future = std::future::Ready<Result<(), Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: ()) -> Self::Future {
            black_box(&self.0);
            std::future::ready(Ok(()))
        }
    }

    pub(super) fn batch() -> Batch {
        let endpoints: Vec<_> = (0..N)
            .map(|i| {
                PendingRequests::new(
                    Endpoint(Arc::new(instance(i))),
                    CompleteOnResponse::default(),
                )
            })
            .collect();
        let mut balance = Balance::new(ServiceList::new(endpoints));
        let waker = futures::task::noop_waker();
        // The first poll moves every endpoint from pending to ready.
        assert!(balance
            .poll_ready(&mut Context::from_waker(&waker))
            .is_ready());
        one_thread(move |_| {
            let mut cx = Context::from_waker(&waker);
            let ready = balance.poll_ready(&mut cx);
            assert!(matches!(ready, Poll::Ready(Ok(()))));
            let mut fut = std::pin::pin!(balance.call(()));
            black_box(fut.as_mut().poll(&mut cx).is_ready());
        })
    }
}

// ---- the cache ----

fn strategy_op(cache: ServiceCache, strategy: Strategy) -> impl Fn(u64) + Send + Sync + Clone {
    move |k| {
        // The tracked p2c handle is dropped here, as a finished request would be.
        black_box(cache.pick(strategy, Some(&k.to_le_bytes())));
    }
}

struct Row {
    name: String,
    one: Batch,
    two: Option<Batch>,
}

fn row(name: impl Into<String>, op: impl Fn(u64) + Send + Sync + Clone + 'static) -> Row {
    Row {
        name: name.into(),
        one: one_thread(op.clone()),
        two: Some(two_threads(op)),
    }
}

/// A strategy of a user's: round robin, plus one branch per pick.
#[derive(Debug)]
struct Mine;

impl PickStrategy for Mine {
    fn choose(&self, c: &Candidates<'_>) -> Option<usize> {
        if c.is_draining() {
            return None;
        }
        RoundRobin.choose(c)
    }
}

fn pick_table() {
    let cache = cache(N, CacheOptions::default());
    // The caller is in one of three zones: a third of the instances are local.
    let zoned = self::cache(N, CacheOptions::default().with_zone("z-b"));
    let mut rows = vec![
        row("floor: `ArcSwap` load + `fetch_add` + index", floor_op()),
        row("`RwLock<Vec<_>>` round robin", rwlock_op()),
        Row {
            name: "tower `p2c::Balance` (`poll_ready` + `call`)".into(),
            one: tower_p2c::batch(),
            two: None,
        },
    ];
    for (name, strategy) in STRATEGIES {
        rows.push(row(
            format!("`ServiceCache::pick`, {name}"),
            strategy_op(cache.clone(), strategy),
        ));
    }
    let c = cache.clone();
    rows.push(row("`pick_round_robin()`", move |_| {
        black_box(c.pick_round_robin());
    }));
    let c = cache.clone();
    rows.push(row("`pick_sticky(key)`", move |k| {
        black_box(c.pick_sticky(k.to_le_bytes()));
    }));
    let c = cache.clone();
    rows.push(row("`pick_with(&Mine)` (a user's strategy)", move |_| {
        black_box(c.pick_with(&Mine, None));
    }));
    for (name, strategy) in STRATEGIES {
        let c = cache.clone();
        rows.push(row(format!("`with_pick` (borrowed), {name}"), move |k| {
            black_box(c.with_pick(&strategy, Some(&k.to_le_bytes()), |i| {
                black_box(i);
            }));
        }));
    }
    for (name, strategy) in STRATEGIES {
        rows.push(row(
            format!("zone-aware (1/3 local), {name}"),
            strategy_op(zoned.clone(), strategy),
        ));
    }
    print_rows(rows);
}

/// `PICK_PROFILE=<part of a row's name>`: runs only the matching rows, one thread,
/// `PICK_PROFILE_OPS` picks each (default 1,000,000), for a profiler such as
/// `valgrind --tool=callgrind` (the batch closure's inclusive cost over the picks).
fn profile(rows: &mut [Row], which: &str) {
    let ops = std::env::var("PICK_PROFILE_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    for r in rows.iter_mut().filter(|r| r.name.contains(which)) {
        let ns = (r.one)(ops);
        println!("{}: {ops} picks, {ns:.1} ns each", r.name);
    }
}

fn print_rows(mut rows: Vec<Row>) {
    if let Ok(which) = std::env::var("PICK_PROFILE") {
        return profile(&mut rows, &which);
    }
    let mut singles: Vec<Batch> = Vec::new();
    let mut doubles: Vec<Batch> = Vec::new();
    let mut has_two = Vec::new();
    for r in &mut rows {
        singles.push(std::mem::replace(&mut r.one, Box::new(|_| 0.0)));
        has_two.push(r.two.is_some());
        doubles.extend(r.two.take());
    }
    let one = interleaved(&mut singles, ROUNDS, BATCH);
    let mut two_it = interleaved(&mut doubles, ROUNDS, BATCH).into_iter();
    let two: Vec<Option<f64>> = has_two
        .iter()
        .map(|&h| if h { two_it.next() } else { None })
        .collect();
    let (f1, f2) = (one[0], two[0].expect("the floor runs on two threads"));
    println!();
    println!("| ns per pick, {N} instances | 1 thread | × floor | 2 threads (each) | × floor on 2 threads |");
    println!("|---|---|---|---|---|");
    for (i, r) in rows.iter().enumerate() {
        let t2 = two[i].map_or("– | –".into(), |t| format!("{t:.1} | {:.2}", t / f2));
        println!("| {} | {:.1} | {:.2} | {t2} |", r.name, one[i], one[i] / f1);
    }
}

// ---- updates ----

/// The median time of `reps` runs of `timed`, each after an untimed `setup`, in µs.
fn time_median(reps: usize, mut setup: impl FnMut(u64), mut timed: impl FnMut(u64)) -> f64 {
    let mut v = Vec::with_capacity(reps);
    for r in 0..reps as u64 {
        setup(r);
        let start = Instant::now();
        timed(r);
        v.push(start.elapsed().as_secs_f64() * 1e6);
    }
    median(v)
}

fn update_table() {
    const REPS: usize = 301;
    let newcomer = instance(999_999);
    let id = newcomer.id.clone();
    let reweighted = instance(500).with_weight(123);
    println!("\n| µs per change, {N} instances | median |");
    println!("|---|---|");
    for sticky in [false, true] {
        let cache = cache(N, CacheOptions::default());
        let use_ring = |c: &ServiceCache| {
            if sticky {
                black_box(c.pick_sticky(b"warm"));
            }
        };
        let when = if sticky {
            "sticky picks in use"
        } else {
            "no sticky picks"
        };
        let added = time_median(
            REPS,
            |r| {
                cache.apply(WatchEvent::Removed {
                    id: id.clone(),
                    revision: 2 * r + 1,
                });
                use_ring(&cache);
            },
            |r| {
                cache.apply(WatchEvent::Added {
                    instance: newcomer.clone(),
                    revision: 2 * r + 2,
                })
            },
        );
        let removed = time_median(
            REPS,
            |r| {
                cache.apply(WatchEvent::Added {
                    instance: newcomer.clone(),
                    revision: 2 * r + 1,
                });
                use_ring(&cache);
            },
            |r| {
                cache.apply(WatchEvent::Removed {
                    id: id.clone(),
                    revision: 2 * r + 2,
                })
            },
        );
        let updated = time_median(
            REPS,
            |_| use_ring(&cache),
            |r| {
                cache.apply(WatchEvent::Updated {
                    instance: reweighted.clone().with_weight(100 + (r % 2) as u32),
                    revision: r,
                })
            },
        );
        println!("| one `Added`, {when} | {added:.1} |");
        println!("| one `Removed`, {when} | {removed:.1} |");
        println!("| one `Updated` (weight), {when} | {updated:.1} |");
        if sticky {
            // Every timed pick is the first on a set whose members changed.
            let first = time_median(
                REPS,
                |r| {
                    cache.apply(if r % 2 == 0 {
                        WatchEvent::Added {
                            instance: newcomer.clone(),
                            revision: r,
                        }
                    } else {
                        WatchEvent::Removed {
                            id: id.clone(),
                            revision: r,
                        }
                    })
                },
                |_| use_ring(&cache),
            );
            println!("| first sticky pick after members changed (ring merged) | {first:.1} |");
        }
    }
    let cache = cache(N, CacheOptions::default());
    let weighted = time_median(
        REPS,
        |r| {
            cache.apply(WatchEvent::Updated {
                instance: reweighted.clone().with_weight(100 + (r % 2) as u32),
                revision: r,
            })
        },
        |_| {
            black_box(cache.pick_weighted());
        },
    );
    println!("| first weighted pick after a change (alias table built) | {weighted:.1} |");
    let fresh = snapshot(N);
    let cache = self::cache(10, CacheOptions::default());
    let snap = time_median(
        31,
        |_| {
            cache.apply(WatchEvent::Snapshot(Snapshot::new(
                fresh.service.clone(),
                vec![],
                1,
            )))
        },
        |_| cache.apply(WatchEvent::Snapshot(fresh.clone())),
    );
    println!("| a snapshot of {N} replacing an empty set | {snap:.1} |");
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |t: &str| filter.is_empty() || filter.iter().any(|f| t.contains(f.as_str()));
    if wants("pick") {
        pick_table();
    }
    if wants("update") {
        update_table();
    }
}
