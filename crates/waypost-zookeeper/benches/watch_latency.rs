//! Register → watcher-sees-it latency on a real ZooKeeper, with 0, 1,000 and 10,000
//! other instances in the service, side by side with the raw `zookeeper-client`
//! create → watch-event latency, in the same run on the same server. The same
//! registration is also timed until a `ServiceCache` on the watching client lists it
//! (the cache shares that client's registry watch), against the bare watch.
//!
//! `cargo bench -p waypost-zookeeper --bench watch_latency` prints a markdown table and
//! writes it into the crate's README.md (between the bench markers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost_core::{Instance, Registrar, ServiceCache, WatchEvent, Watcher};
use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};
use zookeeper_client::{Acls, AddWatchMode, Client, CreateMode, EventType};

const SAMPLES: usize = 300;
const WARMUP: usize = 50;
const SIZES: [usize; 3] = [0, 1_000, 10_000];

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn json(service: &str, id: &str, port: u16) -> Vec<u8> {
    format!(
        r#"{{"name":"{service}","id":"{id}","address":"127.0.0.1","port":{port},"sslPort":null,"payload":{{"@class":"java.util.HashMap","waypost-weight":"100"}},"registrationTimeUTC":0,"serviceType":"DYNAMIC","uriSpec":null}}"#
    )
    .into_bytes()
}

async fn prefill(client: &Client, path: &str, service: &str, n: usize) {
    client
        .mkdir(path, &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let datas: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|k| {
                (
                    format!("{path}/other-{k:05}"),
                    json(service, &format!("other-{k:05}"), 1),
                )
            })
            .collect();
        let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
        let futs: Vec<_> = datas
            .iter()
            .map(|(p, d)| client.create(p, d, &opts))
            .collect();
        for r in futures::future::join_all(futs).await {
            r.unwrap();
        }
    }
}

struct Case {
    service: String,
    registrar: ZkDiscovery,
    watch: futures::stream::BoxStream<'static, waypost_core::Result<WatchEvent>>,
    cache: ServiceCache,
    raw_path: String,
    writer: Client,
    reader: Client,
    raw_watch: zookeeper_client::PersistentWatcher,
}

async fn setup(server: &ZooKeeperServer, raw: &Client, n: usize) -> Case {
    let service = format!("bench-wp-{n}");
    prefill(raw, &format!("/services/{service}"), &service, n).await;
    let config = ZkConfig::from_url(&server.url()).unwrap();
    let registrar = ZkDiscovery::connect(config.clone()).await.unwrap();
    let watcher = ZkDiscovery::connect(config).await.unwrap();
    let mut watch = watcher.watch(&service.parse().unwrap());
    match watch.next().await.unwrap().unwrap() {
        WatchEvent::Snapshot(s) => assert_eq!(s.len(), n),
        e => panic!("{e:?}"),
    }
    let cache = waypost_testkit::bench::cache_holding(Arc::new(watcher), &service, n).await;
    let raw_service = format!("bench-raw-{n}");
    let raw_path = format!("/services/{raw_service}");
    prefill(raw, &raw_path, &raw_service, n).await;
    let writer = Client::connect(&server.address()).await.unwrap();
    let reader = Client::connect(&server.address()).await.unwrap();
    let raw_watch = reader
        .watch(&raw_path, AddWatchMode::PersistentRecursive)
        .await
        .unwrap();
    Case {
        service,
        registrar,
        watch,
        cache,
        raw_path,
        writer,
        reader,
        raw_watch,
    }
}

impl Case {
    /// `register()` until the watch yields `Added`, and until the cache lists the
    /// instance (the two observed at once).
    async fn waypost(&mut self, k: usize) -> (Duration, Duration) {
        let inst =
            Instance::parse(&self.service, &format!("probe-{k}"), "127.0.0.1", 8000).unwrap();
        let started = Instant::now();
        let reg = self.registrar.register(inst.clone()).await.unwrap();
        let (watch, cache) = (&mut self.watch, &self.cache);
        let bare = async {
            loop {
                match watch.next().await.unwrap().unwrap() {
                    WatchEvent::Added { instance, .. } if instance.id == inst.id => {
                        return started.elapsed()
                    }
                    _ => {}
                }
            }
        };
        let cached = async {
            cache
                .wait_for(Duration::from_secs(30), |v| v.contains(&inst.id))
                .await
                .unwrap();
            started.elapsed()
        };
        let took = tokio::join!(bare, cached);
        reg.deregister().await.unwrap();
        loop {
            if let WatchEvent::Removed { id, .. } = self.watch.next().await.unwrap().unwrap() {
                if id == inst.id {
                    break;
                }
            }
        }
        self.cache
            .wait_for(Duration::from_secs(30), |v| !v.contains(&inst.id))
            .await
            .unwrap();
        took
    }

    /// Raw client: `create` until the recursive watch fires (and, with `read`, until the
    /// watcher has read the new node's data, which it needs to know the instance).
    async fn raw(&mut self, k: usize, read: bool) -> Duration {
        let node = format!("{}/raw-{k}-{read}", self.raw_path);
        let data = json("raw", &format!("raw-{k}"), 8000);
        let opts = CreateMode::Ephemeral.with_acls(Acls::anyone_all());
        let started = Instant::now();
        self.writer.create(&node, &data, &opts).await.unwrap();
        loop {
            let ev = self.raw_watch.changed().await;
            if ev.event_type == EventType::NodeCreated && ev.path == node {
                break;
            }
        }
        if read {
            self.reader.get_data(&node).await.unwrap();
        }
        let took = started.elapsed();
        self.writer.delete(&node, None).await.unwrap();
        loop {
            let ev = self.raw_watch.changed().await;
            if ev.event_type == EventType::NodeDeleted && ev.path == node {
                break;
            }
        }
        took
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if require(ServerKind::ZooKeeper).is_none() {
        return;
    }
    let server = ZooKeeperServer::start_with(ZooKeeperOptions {
        max_session_timeout: Some(Duration::from_secs(30)),
        ..ZooKeeperOptions::default()
    })
    .await
    .expect("start ZooKeeper");
    let raw = Client::connect(&server.address()).await.unwrap();
    let mut rows = Vec::new();
    let mut cases = Vec::new();
    for n in SIZES {
        cases.push(setup(&server, &raw, n).await);
    }
    // Warm up (the server is a JVM), then interleave every measurement of every size round
    // by round, so that none runs on a warmer or quieter server than the others.
    for k in 0..WARMUP {
        for case in &mut cases {
            case.waypost(k).await;
            case.raw(k, false).await;
            case.raw(k, true).await;
        }
    }
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new(), Vec::new()); cases.len()];
    for k in WARMUP..WARMUP + SAMPLES {
        for (case, (wp, rw, rr, wc)) in cases.iter_mut().zip(samples.iter_mut()) {
            let (bare, cached) = case.waypost(k).await;
            wp.push(bare);
            wc.push(cached);
            rw.push(case.raw(k, false).await);
            rr.push(case.raw(k, true).await);
        }
    }
    let mut base_p50 = None;
    for (n, (mut wp, mut rw, mut rr, mut wc)) in SIZES.into_iter().zip(samples) {
        let (wp50, wp99) = (pct(&mut wp, 0.5), pct(&mut wp, 0.99));
        let (wc50, wc99) = (pct(&mut wc, 0.5), pct(&mut wc, 0.99));
        let (rw50, rw99) = (pct(&mut rw, 0.5), pct(&mut rw, 0.99));
        let (rr50, rr99) = (pct(&mut rr, 0.5), pct(&mut rr, 0.99));
        let base = *base_p50.get_or_insert(wp50);
        rows.push(format!(
            "| {n} | {} / {} | {} / {} | {:.2}× | {} / {} | {} / {} | {:.2}× | {:.2}× | {:.2}× |",
            ms(wp50),
            ms(wp99),
            ms(wc50),
            ms(wc99),
            wc50.as_secs_f64() / wp50.as_secs_f64(),
            ms(rw50),
            ms(rw99),
            ms(rr50),
            ms(rr99),
            wp50.as_secs_f64() / rw50.as_secs_f64(),
            wp50.as_secs_f64() / rr50.as_secs_f64(),
            wp50.as_secs_f64() / base.as_secs_f64(),
        ));
    }
    let table = format!(
        "| other instances | waypost p50 / p99 | through a `ServiceCache` p50 / p99 | cache ÷ watch (p50) | raw create→event p50 / p99 | raw create→event→get p50 / p99 | waypost ÷ raw event (p50) | waypost ÷ raw event+get (p50) | waypost ÷ waypost with 0 others (p50) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n{}\n\n{SAMPLES} samples per row after {WARMUP} warm-up rounds, all measurements of all sizes interleaved round by round in one run, one ZooKeeper 3.8 server on loopback (debian package, tickTime 200 ms), 2-core machine. waypost: `register()` until the watch yields `Added` (create, event, one read of the changed node, decode); through a `ServiceCache`: the same registration until a cache on the watching client lists it (it shares the client's registry watch; observed together with the bare watch, so both columns time the same registrations). raw: `zookeeper-client` `create` until the persistent recursive watch fires; \"+get\" also reads the new node's data, which any watcher needs to learn the instance.",
        rows.join("\n")
    );
    println!("{table}");
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    if let Ok(text) = std::fs::read_to_string(&readme) {
        let (start, end) = ("<!-- bench:start -->", "<!-- bench:end -->");
        if let (Some(a), Some(b)) = (text.find(start), text.find(end)) {
            let new = format!("{}{start}\n{table}\n{}", &text[..a], &text[b..]);
            std::fs::write(&readme, new).expect("write README.md");
            eprintln!("table written to {}", readme.display());
        }
    }
}
