//! Configuration put → watcher-sees-it latency (p50, p99) on a real etcd, watching one key
//! and watching a prefix that holds 1,000 other keys, side by side with raw `etcd-client`
//! put → watch event, samples interleaved in one run against one server.
//!
//! `cargo bench -p waypost-etcd --bench kv_latency` prints a markdown table and writes it
//! into the crate's README.md between the `bench:kv_latency` markers.

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions, WatchStream};
use waypost_core::kv::ConfigKey;
use waypost_etcd::{EtcdConfig, EtcdDiscovery};
use waypost_testkit::bench::{kv_report, kv_row, RawKv};

const SAMPLES: usize = 300;
const WARMUP: usize = 30;
const OTHERS: usize = 1_000;

/// Raw: put, then the watch event of that key with that value.
struct Raw {
    client: Client,
    watch: WatchStream,
    key: String,
}

#[async_trait::async_trait]
impl RawKv for Raw {
    async fn put_seen(&mut self, value: &str) -> Duration {
        let started = Instant::now();
        let mut writer = self.client.clone();
        let (key, watch) = (&self.key, &mut self.watch);
        let seen = async {
            loop {
                let r = watch.message().await.unwrap().expect("watch open");
                if r.events().iter().any(|e| {
                    e.event_type() == EventType::Put
                        && e.kv().is_some_and(|kv| {
                            kv.key() == key.as_bytes() && kv.value() == value.as_bytes()
                        })
                }) {
                    return Instant::now();
                }
            }
        };
        let (put, seen) = tokio::join!(writer.put(key.as_str(), value, None), seen);
        put.unwrap();
        seen - started
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::etcd().await else {
        eprintln!("etcd is not installed: no benchmark");
        return;
    };
    // One connection for writer and watcher on both sides.
    let etcd = EtcdDiscovery::connect(EtcdConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let kv = etcd.kv();
    let mut raw = Client::connect([server.endpoint()], None).await.unwrap();
    let mut rows = Vec::new();
    for (scenario, others) in [("one key", 0), ("a prefix with 1,000 other keys", OTHERS)] {
        let dir: ConfigKey = format!("bench{others}").parse().unwrap();
        let key = dir.join("probe").unwrap();
        let raw_dir = format!("/rawbench{others}/");
        let raw_key = format!("{raw_dir}probe");
        for k in 0..others {
            kv.put(&dir.join(&format!("other{k:04}")).unwrap(), vec![b'x'; 64])
                .await
                .unwrap();
            raw.put(format!("{raw_dir}other{k:04}"), vec![b'x'; 64], None)
                .await
                .unwrap();
        }
        let (mut watch, mut raw_watch) = if others == 0 {
            let s = raw.watch(raw_key.as_str(), None).await.unwrap();
            (kv.watch(&key), s)
        } else {
            let s = raw
                .watch(raw_dir.as_str(), Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            (kv.watch_prefix(&dir), s)
        };
        raw_watch.message().await.unwrap(); // created
        futures::StreamExt::next(&mut watch).await.unwrap().unwrap(); // the snapshot
        let mut side = Raw {
            client: raw.clone(),
            watch: raw_watch,
            key: raw_key,
        };
        rows.push(
            kv_row(
                scenario,
                (WARMUP, SAMPLES),
                &mut side,
                &*kv,
                &mut watch,
                &key,
            )
            .await,
        );
    }
    kv_report(
        &mut rows,
        &format!("{SAMPLES} samples per row after {WARMUP} warm-up rounds, raw and waypost interleaved, one etcd 3.4 on loopback, writer and watcher sharing one connection on both sides; raw is `etcd-client` put + watch; `cargo bench -p waypost-etcd --bench kv_latency`."),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
