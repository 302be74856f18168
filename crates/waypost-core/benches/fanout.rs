//! Fan-out of one change to 1,000 local watchers of one service on one client (one
//! registry watch, shared through the client's `WatchHub`), side by side with a
//! `tokio::sync::broadcast` of the same event to 1,000 receiver tasks (sent from a task, as the hub's is), samples interleaved
//! in one run. Each latency is from the change (a write to the in-memory registry, or the
//! `send`) to one watcher receiving it; p50 and p99 are over every watcher of every sample.
//!
//! `cargo bench -p waypost-core --bench fanout` prints a markdown table and writes it into
//! the crate's README.md between the `bench:fanout` markers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, Barrier};
use waypost_core::memory::MemoryRegistry;
use waypost_core::{Instance, WatchEvent, Watcher};

const WATCHERS: usize = 1_000;

fn watchers() -> usize {
    std::env::var("FANOUT_WATCHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WATCHERS)
}
const SAMPLES: usize = 60;
const WARMUP: usize = 10;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let registry = MemoryRegistry::new("fanout");
    let client = registry.client(Duration::from_secs(600));
    let svc = "fan".parse().unwrap();

    // waypost: 1,000 watchers on one client, each in its own task, reporting when it
    // receives each Added.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Instant>();
    let ready = Arc::new(Barrier::new(watchers() + 1));
    for _ in 0..watchers() {
        let mut w = client.watch(&svc);
        let (seen_tx, ready) = (seen_tx.clone(), ready.clone());
        tokio::spawn(async move {
            assert!(matches!(w.next().await, Some(Ok(WatchEvent::Snapshot(_)))));
            ready.wait().await;
            while let Some(Ok(ev)) = w.next().await {
                if matches!(ev, WatchEvent::Added { .. }) {
                    let _ = seen_tx.send(Instant::now());
                }
            }
        });
    }
    ready.wait().await;
    assert_eq!(
        registry.open_watches(),
        1,
        "one registry watch for 1,000 watchers"
    );

    // broadcast: the same event to 1,000 receiver tasks, sent from a task that receives
    // it over a channel — as the watch's events reach the hub's task from the registry —
    // so both sides wake their receivers from a worker thread.
    let (tx, _) = broadcast::channel::<WatchEvent>(1024);
    let (relay, mut relayed) = mpsc::unbounded_channel::<WatchEvent>();
    tokio::spawn({
        let tx = tx.clone();
        async move {
            while let Some(ev) = relayed.recv().await {
                let _ = tx.send(ev);
            }
        }
    });
    let (bseen_tx, mut bseen_rx) = mpsc::unbounded_channel::<Instant>();
    for _ in 0..watchers() {
        let mut rx = tx.subscribe();
        let bseen_tx = bseen_tx.clone();
        tokio::spawn(async move {
            while let Ok(ev) = rx.recv().await {
                if matches!(ev, WatchEvent::Added { .. }) {
                    let _ = bseen_tx.send(Instant::now());
                }
            }
        });
    }

    let (mut wp, mut bc) = (Vec::new(), Vec::new());
    for n in 0..WARMUP + SAMPLES {
        let inst = Instance::parse("fan", &format!("i{n}"), "10.0.0.1", 80).unwrap();
        // waypost: a foreign write to the registry is the change.
        let t0 = Instant::now();
        registry.put_foreign(inst.id.as_str(), &inst);
        for _ in 0..watchers() {
            let at = seen_rx.recv().await.unwrap();
            if n >= WARMUP {
                wp.push(at - t0);
            }
        }
        // broadcast: the same event.
        let t0 = Instant::now();
        relay
            .send(WatchEvent::Added {
                instance: inst,
                revision: n as u64,
            })
            .unwrap();
        for _ in 0..watchers() {
            let at = bseen_rx.recv().await.unwrap();
            if n >= WARMUP {
                bc.push(at - t0);
            }
        }
    }
    let (w50, w99) = (pct(&mut wp, 0.5), pct(&mut wp, 0.99));
    let (b50, b99) = (pct(&mut bc, 0.5), pct(&mut bc, 0.99));
    let table = format!(
        "| fan-out of one change to 1,000 watchers | p50 | p99 |\n| --- | ---: | ---: |\n| `tokio::sync::broadcast` from a task, 1,000 receiver tasks | {} | {} |\n| waypost: 1,000 `watch()` streams on one client (one registry watch) | {} | {} |\n| waypost ÷ broadcast | {:.2}× | {:.2}× |\n\n{SAMPLES} changes after {WARMUP} warm-up ones, the two interleaved change by change, each latency from the change to one watcher receiving it (every watcher of every change counted); memory registry, 2 tokio worker threads; `cargo bench -p waypost-core --bench fanout`.\n",
        ms(b50),
        ms(b99),
        ms(w50),
        ms(w99),
        w50.as_secs_f64() / b50.as_secs_f64(),
        w99.as_secs_f64() / b99.as_secs_f64(),
    );
    println!("{table}");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    if let Ok(text) = std::fs::read_to_string(readme) {
        let (start, end) = ("<!-- bench:fanout:start -->", "<!-- bench:fanout:end -->");
        if let (Some(a), Some(b)) = (text.find(start), text.find(end)) {
            let new = format!("{}{start}\n{table}{}", &text[..a], &text[b..]);
            std::fs::write(readme, new).unwrap();
        }
    }
}
