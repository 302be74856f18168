//! Locks on a real Consul agent: one uncontended `lock` + `release` through waypost, side
//! by side with raw `reqwest` doing what `consul lock` does once its session exists
//! (`PUT /v1/kv/{key}?acquire={session}`, then `?release={session}`), samples interleaved
//! in one run; then the failover time after a leader's crash against the session bound.
//!
//! `cargo bench -p waypost-consul --bench coord` prints a markdown table and writes it into
//! the crate's README.md between the `bench:coord` markers.

use std::time::{Duration, Instant};

use waypost_consul::{ConsulConfig, ConsulDiscovery, LOCK_FLAG_VALUE};
use waypost_core::coord::Name;
use waypost_testkit::bench::{coord_failover, coord_report, coord_row, RawLock};

const SAMPLES: usize = 300;
const WARMUP: usize = 30;
const ROUNDS: usize = 5;
/// The session TTL of the bench's clients: Consul's minimum (it refuses less than 10 s).
const TTL: Duration = Duration::from_secs(10);

/// The raw client: one long-lived Consul session (created like waypost's: TTL, lock-delay
/// 1 s, `Behavior = release`, no checks), renewed in the background, and a plain KV
/// acquire and release with the lock flags `consul lock` writes.
struct Raw {
    http: reqwest::Client,
    base: String,
    key: String,
    session: String,
}

impl Raw {
    async fn new(base: String, key: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let body = serde_json::json!({
            "Name": "raw-bench", "TTL": format!("{}s", TTL.as_secs()), "LockDelay": "1s",
            "Behavior": "release", "Checks": [],
        });
        let r = http
            .put(format!("{base}/v1/session/create"))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let session = r["ID"].as_str().expect("a session id").to_string();
        let (h, url) = (http.clone(), format!("{base}/v1/session/renew/{session}"));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TTL / 3).await;
                let ok = h
                    .put(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                assert!(ok, "the raw session was renewed");
            }
        });
        Self {
            http,
            base,
            key,
            session,
        }
    }

    /// `PUT /v1/kv/{key}?{verb}={session}&flags=...`; Consul answers `true` or `false`.
    async fn put(&self, verb: &str) -> bool {
        let r = self
            .http
            .put(format!(
                "{}/v1/kv/{}?{verb}={}&flags={LOCK_FLAG_VALUE}",
                self.base, self.key, self.session
            ))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{verb}: {r:?}");
        r.text().await.unwrap().trim() == "true"
    }
}

#[async_trait::async_trait]
impl RawLock for Raw {
    async fn lock_release(&mut self) -> Duration {
        let started = Instant::now();
        assert!(self.put("acquire").await, "the raw lock is free");
        assert!(self.put("release").await, "the raw lock is released");
        started.elapsed()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::consul().await else {
        eprintln!("consul is not installed: no benchmark");
        return;
    };
    let url = server.url();
    let config = move || ConsulConfig::from_url(&url).unwrap().with_ttl(TTL);
    let consul = ConsulDiscovery::connect(config()).await.unwrap();
    let mut raw = Raw::new(
        format!("http://{}", server.address()),
        "raw/bench/.lock".into(),
    )
    .await;
    let name: Name = "bench/lock".parse().unwrap();
    let mut row = coord_row((WARMUP, SAMPLES), &mut raw, consul.coordinator(), &name).await;
    eprintln!("lock + release: done");

    let election: Name = "bench/leader".parse().unwrap();
    let mut failover = coord_failover(
        ROUNDS,
        &election,
        || {
            let c = config();
            async move { ConsulDiscovery::connect(c).await.unwrap().into_discovery() }
        },
        |d| d.hooks.as_ref().expect("test hooks").crash(),
    )
    .await;
    eprintln!("failover: done");
    coord_report(
        &mut row,
        &mut failover,
        TTL,
        &format!(
            "{SAMPLES} samples after {WARMUP} warm-up rounds, raw and waypost interleaved, one Consul 1.8.7 `-dev` agent on loopback; \
             raw is `reqwest` on one long-lived session: `PUT /v1/kv/{{key}}?acquire={{session}}` then `?release={{session}}` (what `consul lock` sends once its session exists); \
             waypost is `Coordinator::lock` + `LockGuard::release`. Failover: {ROUNDS} rounds, each a leader crashed without resigning (test hook) while another client campaigns, \
             session TTL {}s (Consul's minimum), `lock_delay` 1s (the default); the bound is the TTL, and Consul invalidates a session up to 2 × TTL after its last renewal. \
             `cargo bench -p waypost-consul --bench coord`.",
            TTL.as_secs()
        ),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
