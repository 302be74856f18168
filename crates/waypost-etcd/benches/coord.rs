//! Locks on a real etcd: an uncontended lock + release through waypost, side by side with
//! raw `etcd-client` doing what `etcdctl lock` amounts to (the server's v3lock service:
//! `Lock` on a long-lived lease, then `Unlock`), samples interleaved in one run against one
//! server; then the failover time of an election after its leader's client crashed,
//! against the lease TTL.
//!
//! `cargo bench -p waypost-etcd --bench coord` prints a markdown table and writes it into
//! the crate's README.md between the `bench:coord` markers.

use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions};
use waypost_core::coord::Name;
use waypost_etcd::{EtcdConfig, EtcdDiscovery};
use waypost_testkit::bench::{coord_failover, coord_report, coord_row, RawLock};

const SAMPLES: usize = 300;
const WARMUP: usize = 30;
const FAILOVER_ROUNDS: usize = 5;
/// The bench clients' lease TTL: the shortest sensible one (etcd's own floor is about
/// 2 s with its default election timeout; `etcdctl lock` uses 60 s).
const LEASE_TTL: Duration = Duration::from_secs(5);

/// Raw: `Lock` under one long-lived lease, then `Unlock` of the key it returned.
struct Raw {
    client: Client,
    lease: i64,
    name: String,
}

#[async_trait::async_trait]
impl RawLock for Raw {
    async fn lock_release(&mut self) -> Duration {
        let started = Instant::now();
        let locked = self
            .client
            .lock(
                self.name.as_str(),
                Some(LockOptions::new().with_lease(self.lease)),
            )
            .await
            .expect("raw lock");
        self.client
            .unlock(locked.key().to_vec())
            .await
            .expect("raw unlock");
        started.elapsed()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::etcd().await else {
        eprintln!("etcd is not installed: no benchmark");
        return;
    };
    let config = EtcdConfig::from_url(&server.url())
        .unwrap()
        .with_lease_ttl(LEASE_TTL);
    let etcd = EtcdDiscovery::connect(config.clone()).await.unwrap();
    let coord = etcd.coordinator();
    let mut raw = Client::connect([server.endpoint()], None).await.unwrap();
    // Long enough for the whole row: no keep-alive needed on the raw side.
    let lease = raw.lease_grant(300, None).await.unwrap().id();
    let mut side = Raw {
        client: raw.clone(),
        lease,
        name: "/rawbench/lock".into(),
    };
    let name: Name = "bench/lock".parse().unwrap();
    let mut row = coord_row((WARMUP, SAMPLES), &mut side, &*coord, &name).await;
    eprintln!("lock row: done");
    raw.lease_revoke(lease).await.unwrap();

    let election: Name = "bench/leader".parse().unwrap();
    let mut failover = coord_failover(
        FAILOVER_ROUNDS,
        &election,
        || {
            let config = config.clone();
            async move {
                EtcdDiscovery::connect(config)
                    .await
                    .unwrap()
                    .into_discovery()
            }
        },
        |d| d.hooks.as_ref().expect("test hooks").crash(),
    )
    .await;
    eprintln!("failover: done");
    let granted = etcd.granted_ttl().expect("a lease is granted");
    assert_eq!(granted, LEASE_TTL, "etcd granted the asked TTL");
    coord_report(
        &mut row,
        &mut failover,
        granted,
        &format!("{SAMPLES} lock samples after {WARMUP} warm-up rounds, raw and waypost interleaved, one etcd 3.4 on loopback, each side on its own connection; raw is `etcd-client`'s `lock` (the server's v3lock service, what `etcdctl lock` amounts to) on one long-lived lease, then `unlock`. Failover: {FAILOVER_ROUNDS} rounds, two fresh clients each with a {}s lease TTL (the session bound), the leader's client crashed (keep-alives stop, nothing revoked), time until the waiting candidate leads; rtt = raw p50 / 2. `cargo bench -p waypost-etcd --bench coord`.", LEASE_TTL.as_secs()),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
