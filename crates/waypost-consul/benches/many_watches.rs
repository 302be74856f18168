//! One client watching 10, 100 and 300 different services of a real Consul agent (its
//! default `http_max_conns_per_client`, 200: 63 per-service blocking queries, the rest
//! shared): the time until every watcher has its snapshot, and the latency from a catalog
//! write (a foreign instance, raw HTTP) until its watcher reports it. Prints a markdown
//! table, written into the crate's README between the `bench:many_watches` markers.
//!
//! `cargo bench -p waypost-consul --bench many_watches`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{ServiceName, WatchEvent, Watcher};
use waypost_testkit::ConsulServer;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn run(n: usize) -> String {
    let server = ConsulServer::start().await.expect("start consul");
    let d = Arc::new(
        ConsulDiscovery::connect(ConsulConfig::from_url(&server.url()).unwrap())
            .await
            .expect("connect"),
    );
    let services: Vec<ServiceName> = (0..n)
        .map(|i| format!("bench-{i}").parse().unwrap())
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant, bool)>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let mut w = d.watch(svc);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = w.next().await {
                match ev {
                    WatchEvent::Snapshot(_) => {
                        let _ = tx.send((i, Instant::now(), true));
                    }
                    WatchEvent::Added { .. } => {
                        let _ = tx.send((i, Instant::now(), false));
                    }
                    _ => {}
                }
            }
        }));
    }
    let mut last = started;
    for _ in 0..n {
        let (_, at, snap) = rx.recv().await.unwrap();
        assert!(snap);
        last = last.max(at);
    }
    let first_snapshots = last - started;
    // Let the shared watches' signal start, as a long-running process would be.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rounds = (300 / n).max(1);
    let raw = reqwest::Client::new();
    let mut lat = Vec::new();
    for round in 0..rounds {
        let mut written = vec![Instant::now(); n];
        for (i, svc) in services.iter().enumerate() {
            let body = serde_json::json!({
                "Node": "bench-foreign",
                "Address": "127.0.0.9",
                "Service": {"ID": format!("{svc}:r{round}"), "Service": svc.as_str(), "Port": 9000},
            });
            raw.put(format!("http://{}/v1/catalog/register", server.address()))
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            written[i] = Instant::now();
        }
        let mut seen = 0;
        while seen < n {
            let (i, at, snap) = tokio::time::timeout(Duration::from_secs(90), rx.recv())
                .await
                .expect("a change within 90 s")
                .unwrap();
            if !snap {
                lat.push(at.saturating_duration_since(written[i]));
                seen += 1;
            }
        }
    }
    lat.sort();
    let row = format!(
        "| {n} | {} | {} | {} | {} | {} | {} |",
        d.connection_budget().dedicated_watches.min(n),
        d.shared_watches(),
        ms(first_snapshots),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap()),
    );
    for t in tasks {
        t.abort();
    }
    row
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = String::from(
        "| watched services | per-service queries | shared | all snapshots | change p50 | change p99 | change max |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for n in [10, 100, 300] {
        let row = rt.block_on(run(n));
        println!("{row}");
        out.push_str(&row);
        out.push('\n');
    }
    out.push_str(&format!(
        "\n{} A shared watch's change costs one more round trip (its read) after the \
         signal, and a catalog write wakes every shared watch: with hundreds of them, 300 \
         writes in a row queue their reads behind the watch reads' budget (16), hence the \
         300-service p50.\n",
        common::measured_on("many_watches")
    ));
    println!("\n{out}");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    waypost_testkit::bench::write_readme_section(readme, "many_watches", &out);
}
