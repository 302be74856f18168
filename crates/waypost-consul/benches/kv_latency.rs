//! Configuration put → watcher-sees-it latency (p50, p99) on a real Consul agent, watching
//! one key and watching a prefix that holds 1,000 other keys, side by side with raw
//! `reqwest` (`PUT /v1/kv/{key}`, a blocking `GET` on the key or the prefix), samples
//! interleaved in one run.
//!
//! `cargo bench -p waypost-consul --bench kv_latency` prints a markdown table and writes
//! it into the crate's README.md between the `bench:kv_latency` markers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::kv::{ConfigKey, ConfigStore};
use waypost_testkit::bench::{kv_report, kv_row, RawKv};

const SAMPLES: usize = 300;
const WARMUP: usize = 30;
const OTHERS: usize = 1_000;

/// The raw client: a plain KV put and a blocking query, as a hand-written watcher does.
struct Raw {
    http: reqwest::Client,
    base: String,
    /// The blocking query's index.
    index: String,
}

impl Raw {
    /// Blocks until the key (or the prefix with `recurse`) changes past `self.index`;
    /// returns the body.
    async fn block(&mut self, path: &str, recurse: bool) -> Vec<u8> {
        let mut url = format!("{}/v1/kv/{path}?index={}&wait=30s", self.base, self.index);
        url.push_str(if recurse { "&recurse" } else { "&raw" });
        let r = self.http.get(url).send().await.unwrap();
        self.index = r.headers()["X-Consul-Index"].to_str().unwrap().to_string();
        r.bytes().await.unwrap().to_vec()
    }

    /// PUT, then blocking reads until one shows `value` (a recursive read is parsed as
    /// JSON and the key's base64 value decoded, as a hand-written watcher must).
    async fn sample(&mut self, key: &str, watched: &str, recurse: bool, value: &str) -> Duration {
        let started = Instant::now();
        let put = self
            .http
            .put(format!("{}/v1/kv/{key}", self.base))
            .body(value.to_string())
            .send();
        let seen = async {
            loop {
                let body = self.block(watched, recurse).await;
                let got = if recurse {
                    probe_value(&body, key)
                } else {
                    Some(body)
                };
                if got.as_deref() == Some(value.as_bytes()) {
                    return Instant::now();
                }
            }
        };
        let (put, seen) = tokio::join!(put, seen);
        assert!(put.unwrap().status().is_success());
        seen - started
    }
}

/// The raw side of one scenario: its probe key and what its blocking query watches.
struct Scenario<'a> {
    raw: &'a mut Raw,
    key: String,
    watched: String,
    recurse: bool,
}

#[async_trait::async_trait]
impl RawKv for Scenario<'_> {
    async fn put_seen(&mut self, value: &str) -> Duration {
        self.raw
            .sample(&self.key, &self.watched, self.recurse, value)
            .await
    }
}

/// The value of `key` in a recursive KV read (JSON, base64 values).
fn probe_value(body: &[u8], key: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let entries: serde_json::Value = serde_json::from_slice(body).ok()?;
    let entry = entries.as_array()?.iter().find(|e| e["Key"] == key)?;
    base64::engine::general_purpose::STANDARD
        .decode(entry["Value"].as_str()?)
        .ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::consul().await else {
        eprintln!("consul is not installed: no benchmark");
        return;
    };
    let consul = ConsulDiscovery::connect(ConsulConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let kv: Arc<dyn ConfigStore> = Arc::new(consul.kv().clone());
    let mut raw = Raw {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        base: format!("http://{}", server.address()),
        index: "0".into(),
    };
    let mut rows = Vec::new();
    for (scenario, others) in [("one key", 0), ("a prefix with 1,000 other keys", OTHERS)] {
        let dir: ConfigKey = format!("bench{others}").parse().unwrap();
        let key = dir.join("probe").unwrap();
        let raw_dir = format!("rawbench{others}");
        let raw_key = format!("{raw_dir}/probe");
        kv.put(&key, b"0".to_vec()).await.unwrap();
        raw.http
            .put(format!("{}/v1/kv/{raw_key}", raw.base))
            .body("0")
            .send()
            .await
            .unwrap();
        for k in 0..others {
            kv.put(&dir.join(&format!("other{k:04}")).unwrap(), vec![b'x'; 64])
                .await
                .unwrap();
            raw.http
                .put(format!("{}/v1/kv/{raw_dir}/other{k:04}", raw.base))
                .body(vec![b'x'; 64])
                .send()
                .await
                .unwrap();
        }
        let (mut watch, watched, recurse) = if others == 0 {
            (kv.watch(&key), raw_key.clone(), false)
        } else {
            (kv.watch_prefix(&dir), format!("{raw_dir}/"), true)
        };
        // The snapshot, and the raw watcher's first read (its index).
        futures::StreamExt::next(&mut watch).await.unwrap().unwrap();
        raw.index = "0".into();
        raw.block(&watched, recurse).await;
        let mut side = Scenario {
            raw: &mut raw,
            key: raw_key,
            watched,
            recurse,
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
        &format!("{SAMPLES} samples per row after {WARMUP} warm-up rounds, raw and waypost interleaved, one Consul 1.8.7 `-dev` agent on loopback; raw is `reqwest` `PUT /v1/kv/{{key}}` + a blocking `GET` (`?raw` on the key, `?recurse` on the prefix); the raw prefix watcher parses the answer as `serde_json::Value` and decodes the probe's value; waypost writes through `/v1/txn`, parses each answer into typed entries and decodes only those whose `ModifyIndex` changed; `cargo bench -p waypost-consul --bench kv_latency`."),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
