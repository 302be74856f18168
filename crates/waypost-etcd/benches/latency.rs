//! register → watcher-sees-it latency (p50, p99) with 0, 1,000 and 10,000 other
//! instances in the service, side by side with raw `etcd-client` put → watch event, in
//! one run against one real etcd (samples interleaved, so both see the same machine).
//! The same registration is also timed until a `ServiceCache` on the watching client
//! lists it (the cache shares that client's registry watch), against the bare watch.
//!
//! `cargo bench -p waypost-etcd --bench latency` prints a markdown table and writes it
//! into the crate's README.md between the `bench:latency` markers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use futures::StreamExt;
use waypost_core::{Instance, Registrar, ServiceCache, WatchEvent, Watcher};
use waypost_etcd::{EtcdConfig, EtcdDiscovery};

const SAMPLES: usize = 200;
const SIZES: [usize; 3] = [0, 1_000, 10_000];

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Fills `prefix` with `n` valid instances under one lease, in batched transactions.
async fn fill(admin: &mut Client, service: &str, n: usize) {
    let lease = admin.lease_grant(600, None).await.unwrap().id();
    let ops: Vec<TxnOp> = (0..n)
        .map(|k| {
            let i = Instance::parse(service, &format!("other-{k:05}"), "10.1.0.1", 9000).unwrap();
            TxnOp::put(
                format!("/services/{service}/{}", i.id),
                serde_json::to_vec(&i).unwrap(),
                Some(PutOptions::new().with_lease(lease)),
            )
        })
        .collect();
    for chunk in ops.chunks(100) {
        admin
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .unwrap();
    }
}

/// Register → the watch yields `Added`, and → the cache lists it (observed together).
async fn waypost_sample(
    d: &EtcdDiscovery,
    watch: &mut futures::stream::BoxStream<'static, waypost_core::Result<WatchEvent>>,
    cache: &ServiceCache,
    service: &str,
    n: usize,
) -> (Duration, Duration) {
    let inst = Instance::parse(service, &format!("probe-{n}"), "10.2.0.1", 8000).unwrap();
    let id = inst.id.clone();
    let t0 = Instant::now();
    let seen = async {
        loop {
            if let Some(Ok(WatchEvent::Added { instance, .. })) = watch.next().await {
                if instance.id == id {
                    return Instant::now();
                }
            }
        }
    };
    let cached = async {
        cache
            .wait_for(Duration::from_secs(30), |v| v.contains(&id))
            .await
            .unwrap();
        Instant::now()
    };
    let (reg, seen, cached) = tokio::join!(d.register(inst), seen, cached);
    let latency = (seen - t0, cached - t0);
    let reg = reg.unwrap();
    reg.deregister().await.unwrap();
    // Consume the removal.
    loop {
        if let Some(Ok(WatchEvent::Removed { .. })) = watch.next().await {
            break;
        }
    }
    cache
        .wait_for(Duration::from_secs(30), |v| !v.contains(&id))
        .await
        .unwrap();
    latency
}

/// Raw `etcd-client`: a plain put (`txn = false`), or the same create-if-absent
/// transaction waypost sends (`txn = true`), then the watch event.
async fn raw_sample(
    client: &mut Client,
    stream: &mut etcd_client::WatchStream,
    service: &str,
    n: usize,
    txn: bool,
) -> Duration {
    let inst = Instance::parse(service, &format!("raw-{n}"), "10.2.0.1", 8000).unwrap();
    let key = format!("/services/{service}/{}", inst.id);
    let value = serde_json::to_vec(&inst).unwrap();
    let t0 = Instant::now();
    let mut c2 = client.clone();
    let write = async {
        if txn {
            let t = Txn::new()
                .when([etcd_client::Compare::create_revision(
                    key.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(key.as_str(), value.clone(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            c2.txn(t).await.map(|_| ())
        } else {
            c2.put(key.as_str(), value.clone(), None).await.map(|_| ())
        }
    };
    let seen = async {
        loop {
            let r = stream.message().await.unwrap().unwrap();
            if r.events().iter().any(|e| {
                e.event_type() == EventType::Put && e.kv().unwrap().key() == key.as_bytes()
            }) {
                return Instant::now();
            }
        }
    };
    let (put, seen) = tokio::join!(write, seen);
    put.unwrap();
    let latency = seen - t0;
    client.delete(key.as_str(), None).await.unwrap();
    loop {
        let r = stream.message().await.unwrap().unwrap();
        if r.events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            break;
        }
    }
    latency
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::etcd().await else {
        eprintln!("etcd is not installed: no benchmark");
        return;
    };
    let mut admin = Client::connect([server.endpoint()], None).await.unwrap();
    let mut rows = Vec::new();
    for &n in &SIZES {
        let service = format!("bench{n}");
        fill(&mut admin, &service, n).await;
        let cfg = EtcdConfig::from_url(&server.url()).unwrap();
        // One connection for writer and watcher, as on the raw side.
        let registrar = EtcdDiscovery::connect(cfg).await.unwrap();
        let watcher = registrar.clone();
        let mut watch = watcher.watch(&service.parse().unwrap());
        match watch.next().await {
            Some(Ok(WatchEvent::Snapshot(s))) => assert_eq!(s.len(), n),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        let cache = waypost_testkit::bench::cache_holding(Arc::new(watcher), &service, n).await;
        let mut raw_client = Client::connect([server.endpoint()], None).await.unwrap();
        let mut raw_watch = raw_client
            .watch(
                format!("/services/{service}/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        raw_watch.message().await.unwrap(); // created
                                            // Warm up both paths.
        for k in 0..10 {
            raw_sample(&mut raw_client, &mut raw_watch, &service, k, false).await;
            raw_sample(&mut raw_client, &mut raw_watch, &service, k, true).await;
            waypost_sample(&registrar, &mut watch, &cache, &service, k).await;
        }
        let (mut raw, mut rawtxn, mut wp, mut wc) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for k in 0..SAMPLES {
            raw.push(raw_sample(&mut raw_client, &mut raw_watch, &service, k, false).await);
            rawtxn.push(raw_sample(&mut raw_client, &mut raw_watch, &service, k, true).await);
            let (bare, cached) = waypost_sample(&registrar, &mut watch, &cache, &service, k).await;
            wp.push(bare);
            wc.push(cached);
        }
        raw.sort();
        rawtxn.sort();
        wp.sort();
        wc.sort();
        rows.push((
            n,
            pct(&raw, 0.5),
            pct(&raw, 0.99),
            pct(&rawtxn, 0.5),
            pct(&wp, 0.5),
            pct(&wp, 0.99),
            pct(&wc, 0.5),
            pct(&wc, 0.99),
        ));
        eprintln!("{n} other instances: done");
    }
    let base = rows[0].4;
    let mut table = String::from(
        "| other instances | raw put p50 | raw put p99 | raw create-txn p50 | waypost p50 | waypost p99 | through a `ServiceCache` p50 | through a `ServiceCache` p99 | cache / watch p50 | waypost / raw put p50 | waypost / raw txn p50 | waypost p50 vs 0 others |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (n, rp50, rp99, rt50, wp50, wp99, wc50, wc99) in &rows {
        table.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |\n",
            ms(*rp50),
            ms(*rp99),
            ms(*rt50),
            ms(*wp50),
            ms(*wp99),
            ms(*wc50),
            ms(*wc99),
            wc50.as_secs_f64() / wp50.as_secs_f64(),
            wp50.as_secs_f64() / rp50.as_secs_f64(),
            wp50.as_secs_f64() / rt50.as_secs_f64(),
            wp50.as_secs_f64() / base.as_secs_f64(),
        ));
    }
    let table = format!(
        "{table}\n{SAMPLES} samples per row after 10 warm-up rounds, raw and waypost interleaved, one etcd {} on loopback, writer and watcher sharing one connection on both sides; raw create-txn is the same create-if-absent transaction waypost sends; through a `ServiceCache`: the same registrations until a cache on the watching client lists them (it shares the client's registry watch; observed together with the bare watch); `cargo bench -p waypost-etcd --bench latency`.\n",
        "3.4"
    );
    println!("{table}");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    if let Ok(text) = std::fs::read_to_string(readme) {
        let (start, end) = ("<!-- bench:latency:start -->", "<!-- bench:latency:end -->");
        if let (Some(a), Some(b)) = (text.find(start), text.find(end)) {
            let new = format!("{}{start}\n{table}{}", &text[..a], &text[b..]);
            std::fs::write(readme, new).unwrap();
        }
    }
}
