//! register → watcher-sees-it latency on a real Consul agent, waypost against a raw
//! `reqwest` register + blocking health query, side by side in one run (samples
//! interleaved), with 0 and 1,000 other instances; and the watching client's CPU time per
//! change at 1,000 instances. Prints a markdown table and writes it into the crate's
//! README.md between the `bench:latency:start` / `bench:latency:end` markers.
//!
//! `cargo bench -p waypost-consul --bench latency`

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{Instance, Registrar, ServiceName, WatchEvent, Watcher};
use waypost_testkit::ConsulServer;

const SAMPLES_EMPTY: usize = 200;
const SAMPLES_FULL: usize = 60;
const OTHERS: usize = 1000;
/// Samples per block; blocks of waypost and raw alternate.
const BLOCK: usize = 10;

/// The process's CPU time (user + system, all threads), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10) // CLK_TCK = 100 on Linux
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The raw client: the same registration body, and a blocking-query loop that publishes
/// the set of service IDs it last saw.
struct Raw {
    http: reqwest::Client,
    base: String,
}

impl Raw {
    async fn register(&self, body: &serde_json::Value) {
        let r = self
            .http
            .put(format!("{}/v1/agent/service/register", self.base))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    async fn deregister(&self, id: &str) {
        self.http
            .put(format!("{}/v1/agent/service/deregister/{id}", self.base))
            .send()
            .await
            .unwrap();
    }

    fn watch(&self, service: &str) -> RawWatch {
        let (tx, rx) = watch::channel(HashSet::new());
        let http = self.http.clone();
        let url = format!("{}/v1/health/service/{service}", self.base);
        let task = tokio::spawn(async move {
            let mut index = 0u64;
            loop {
                let Ok(resp) = http
                    .get(&url)
                    .query(&[
                        ("passing", "true".to_string()),
                        ("index", index.to_string()),
                        ("wait", "60s".to_string()),
                    ])
                    .send()
                    .await
                else {
                    return;
                };
                index = resp
                    .headers()
                    .get("X-Consul-Index")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0)
                    .max(1);
                let Ok(body) = resp.bytes().await else { return };
                let entries: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                let ids = entries
                    .iter()
                    .filter_map(|e| e["Service"]["ID"].as_str().map(String::from))
                    .collect();
                if tx.send(ids).is_err() {
                    return;
                }
            }
        });
        RawWatch { rx, task }
    }
}

/// The raw watcher; stops when dropped.
struct RawWatch {
    rx: watch::Receiver<HashSet<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn raw_body(service: &str, id: &str, port: u16, ttl: &str) -> serde_json::Value {
    serde_json::json!({
        "ID": format!("{service}:{id}"), "Name": service, "Address": "127.0.0.1", "Port": port,
        "Tags": [], "Meta": {}, "Weights": {"Passing": 100, "Warning": 1},
        "Check": {"CheckID": format!("service:{service}:{id}"), "Name": "ttl", "TTL": ttl,
                  "Status": "passing", "DeregisterCriticalServiceAfter": "1m"}
    })
}

struct Row {
    others: usize,
    waypost: Vec<Duration>,
    raw: Vec<Duration>,
}

async fn scenario(server: &ConsulServer, others: usize, samples: usize) -> Row {
    let service = format!("bench{others}");
    let svc: ServiceName = service.parse().unwrap();
    let raw = Raw {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        base: format!("http://{}", server.address()),
    };
    for n in 0..others {
        raw.register(&raw_body(&service, &format!("other{n:04}"), 20000, "600s"))
            .await;
    }
    let config = ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_ttl(Duration::from_secs(600));
    let registrar = ConsulDiscovery::connect(config.clone()).await.unwrap();
    let watcher = ConsulDiscovery::connect(config).await.unwrap();
    let mut row = Row {
        others,
        waypost: Vec::new(),
        raw: Vec::new(),
    };
    // Blocks of samples, alternating; only the measured client's watcher runs during its
    // block (two watchers decoding every change at once would slow each other down).
    let mut n = 0;
    while n < samples {
        let mut stream = watcher.watch(&svc);
        match stream.next().await {
            Some(Ok(WatchEvent::Snapshot(s))) if s.len() == others => {}
            other => panic!("first event: {other:?}"),
        }
        for k in n..(n + BLOCK).min(samples) {
            let id = format!("wp{k}");
            let inst = Instance::parse(&service, &id, "127.0.0.1", 9000).unwrap();
            let t0 = Instant::now();
            let reg = registrar.register(inst).await.unwrap();
            loop {
                match stream.next().await {
                    Some(Ok(WatchEvent::Added { instance, .. })) if instance.id.as_str() == id => {
                        break
                    }
                    Some(Ok(_)) => {}
                    other => panic!("watch: {other:?}"),
                }
            }
            row.waypost.push(t0.elapsed());
            reg.deregister().await.unwrap();
            loop {
                if let Some(Ok(WatchEvent::Removed { id: gone, .. })) = stream.next().await {
                    if gone.as_str() == id {
                        break;
                    }
                }
            }
        }
        drop(stream);
        let mut rw = raw.watch(&service);
        rw.rx.wait_for(|s| s.len() == others).await.unwrap();
        for k in n..(n + BLOCK).min(samples) {
            let id = format!("raw{k}");
            let sid = format!("{service}:{id}");
            let t0 = Instant::now();
            raw.register(&raw_body(&service, &id, 9001, "600s")).await;
            rw.rx.wait_for(|s| s.contains(&sid)).await.unwrap();
            row.raw.push(t0.elapsed());
            raw.deregister(&sid).await;
            rw.rx.wait_for(|s| !s.contains(&sid)).await.unwrap();
        }
        drop(rw);
        n += BLOCK;
    }
    row
}

type Stream = futures::stream::BoxStream<'static, waypost_core::Result<WatchEvent>>;

/// Waits until whichever watcher runs shows `sid` present (or absent).
async fn seen(stream: &mut Option<Stream>, raw: &mut Option<RawWatch>, sid: &str, present: bool) {
    if let Some(s) = stream {
        loop {
            match s.next().await {
                Some(Ok(WatchEvent::Added { instance, .. }))
                    if present && sid.ends_with(&format!(":{}", instance.id)) =>
                {
                    return
                }
                Some(Ok(WatchEvent::Removed { id, .. }))
                    if !present && sid.ends_with(&format!(":{id}")) =>
                {
                    return
                }
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    } else if let Some(r) = raw {
        r.rx.wait_for(|s| s.contains(sid) == present).await.unwrap();
    }
}

/// CPU of this process per change while only one kind of watcher runs; the changes are
/// made by the same cheap raw PUTs in both phases.
async fn cpu_per_change(server: &ConsulServer, changes: usize) -> (Duration, Duration) {
    let service = "benchcpu".to_string();
    let svc: ServiceName = service.parse().unwrap();
    let raw = Raw {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        base: format!("http://{}", server.address()),
    };
    for n in 0..OTHERS {
        raw.register(&raw_body(&service, &format!("other{n:04}"), 20000, "600s"))
            .await;
    }
    let mut results = Vec::new();
    for phase in ["waypost", "raw"] {
        let watcher = ConsulDiscovery::connect(ConsulConfig::from_url(&server.url()).unwrap())
            .await
            .unwrap();
        let mut stream = (phase == "waypost").then(|| watcher.watch(&svc));
        if let Some(s) = stream.as_mut() {
            // The watch starts on its first poll: take its snapshot before changing anything.
            assert!(matches!(s.next().await, Some(Ok(WatchEvent::Snapshot(_)))));
        }
        let mut raw_seen = (phase == "raw").then(|| raw.watch(&service));
        // Warm up: the first listing.
        let sid = format!("{service}:warm-{phase}");
        raw.register(&raw_body(&service, &format!("warm-{phase}"), 1, "600s"))
            .await;
        seen(&mut stream, &mut raw_seen, &sid, true).await;
        raw.deregister(&sid).await;
        seen(&mut stream, &mut raw_seen, &sid, false).await;
        let c0 = cpu_time();
        for n in 0..changes / 2 {
            let id = format!("{phase}{n}");
            let sid = format!("{service}:{id}");
            raw.register(&raw_body(&service, &id, 1, "600s")).await;
            seen(&mut stream, &mut raw_seen, &sid, true).await;
            raw.deregister(&sid).await;
            seen(&mut stream, &mut raw_seen, &sid, false).await;
        }
        results.push((cpu_time() - c0) / (changes as u32));
    }
    (results[0], results[1])
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Some(server) = waypost_testkit::server::consul().await else {
            return;
        };
        let mut rows = Vec::new();
        rows.push(scenario(&server, 0, SAMPLES_EMPTY).await);
        rows.push(scenario(&server, OTHERS, SAMPLES_FULL).await);
        let (cpu_wp, cpu_raw) = cpu_per_change(&server, 100).await;

        let mut table = String::from(
            "| other instances | samples | waypost p50 (ms) | raw p50 (ms) | p50 ratio | waypost p99 (ms) | raw p99 (ms) |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in &mut rows {
            r.waypost.sort();
            r.raw.sort();
            let (w50, r50) = (pct(&r.waypost, 0.5), pct(&r.raw, 0.5));
            table.push_str(&format!(
                "| {} | {} | {} | {} | {:.2}× | {} | {} |\n",
                r.others,
                r.waypost.len(),
                ms(w50),
                ms(r50),
                w50.as_secs_f64() / r50.as_secs_f64(),
                ms(pct(&r.waypost, 0.99)),
                ms(pct(&r.raw, 0.99)),
            ));
        }
        table.push_str(&format!(
            "\nClient CPU time per change, watching a service of {OTHERS} instances (each answer \
             lists all of them; waypost decodes the entries whose bytes changed): waypost {} ms, \
             raw reqwest + serde_json::Value {} ms ({:.2}×).\n",
            ms(cpu_wp),
            ms(cpu_raw),
            cpu_wp.as_secs_f64() / cpu_raw.as_secs_f64().max(1e-9)
        ));
        table.push_str(&format!("\n{}\n", common::measured_on("latency")));
        println!("{table}");
        let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        waypost_testkit::bench::write_readme_section(readme, "latency", &table);
    });
}
