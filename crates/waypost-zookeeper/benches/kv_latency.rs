//! Configuration put → watcher-sees-it latency (p50, p99) on a real ZooKeeper, watching one
//! key and watching a prefix that holds 1,000 other keys, side by side with the raw
//! `zookeeper-client` (`set_data`, a persistent watch, then `get_data` of the changed node,
//! which any watcher needs to learn the value), samples interleaved in one run.
//!
//! `cargo bench -p waypost-zookeeper --bench kv_latency` prints a markdown table and
//! writes it into the crate's README.md between the `bench:kv_latency` markers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use waypost_core::kv::{ConfigKey, ConfigStore};
use waypost_testkit::bench::{kv_report, kv_row, RawKv};
use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};
use zookeeper_client::{Acls, AddWatchMode, Client, CreateMode, EventType, PersistentWatcher};

const SAMPLES: usize = 300;
const WARMUP: usize = 50;
const OTHERS: usize = 1_000;

/// Raw: `set_data`, the watch event of that node, then `get_data` until it holds `value`.
struct Raw {
    client: Client,
    watch: PersistentWatcher,
    path: String,
}

#[async_trait::async_trait]
impl RawKv for Raw {
    async fn put_seen(&mut self, value: &str) -> Duration {
        let started = Instant::now();
        let path = self.path.as_str();
        self.client
            .set_data(path, value.as_bytes(), None)
            .await
            .unwrap();
        loop {
            let ev = self.watch.changed().await;
            if ev.event_type == EventType::NodeDataChanged && ev.path == path {
                let (data, _) = self.client.get_data(path).await.unwrap();
                if data == value.as_bytes() {
                    return started.elapsed();
                }
            }
        }
    }
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
    // One connection for writer and watcher on both sides.
    let zk = ZkDiscovery::connect(ZkConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let kv: Arc<dyn ConfigStore> = Arc::new(zk.kv().clone());
    let raw = Client::connect(&server.address()).await.unwrap();
    let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let mut rows = Vec::new();
    for (scenario, others) in [("one key", 0), ("a prefix with 1,000 other keys", OTHERS)] {
        let dir: ConfigKey = format!("bench{others}").parse().unwrap();
        let key = dir.join("probe").unwrap();
        let raw_dir = format!("/rawbench{others}");
        let raw_key = format!("{raw_dir}/probe");
        raw.mkdir(&raw_dir, &opts).await.unwrap();
        raw.create(&raw_key, b"0", &opts).await.unwrap();
        kv.put(&key, b"0".to_vec()).await.unwrap();
        for k in 0..others {
            kv.put(&dir.join(&format!("other{k:04}")).unwrap(), vec![b'x'; 64])
                .await
                .unwrap();
            raw.create(&format!("{raw_dir}/other{k:04}"), &[b'x'; 64], &opts)
                .await
                .unwrap();
        }
        let (mut watch, raw_watch) = if others == 0 {
            (
                kv.watch(&key),
                raw.watch(&raw_key, AddWatchMode::Persistent).await.unwrap(),
            )
        } else {
            (
                kv.watch_prefix(&dir),
                raw.watch(&raw_dir, AddWatchMode::PersistentRecursive)
                    .await
                    .unwrap(),
            )
        };
        futures::StreamExt::next(&mut watch).await.unwrap().unwrap(); // the snapshot
        let mut side = Raw {
            client: raw.clone(),
            watch: raw_watch,
            path: raw_key,
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
        &format!("{SAMPLES} samples per row after {WARMUP} warm-up rounds, raw and waypost interleaved, one ZooKeeper 3.8 on loopback, writer and watcher sharing one connection on both sides; raw is `zookeeper-client` `set_data` + persistent watch + `get_data`; waypost's put of an existing key is one `set_data` too; `cargo bench -p waypost-zookeeper --bench kv_latency`."),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
