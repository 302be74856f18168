//! Locks on a real ZooKeeper: uncontended `lock` + `release` (p50, p99) side by side with
//! the raw `zookeeper-client` doing the requests of one uncontended Curator lock (create an
//! ephemeral sequential `lock-` node under a parent, `getChildren` of the parent to see it
//! is first, delete it), samples interleaved in one run; then the failover time after a
//! leader's crash against the session timeout.
//!
//! `cargo bench -p waypost-zookeeper --bench coord` prints a markdown table and writes it
//! into the crate's README.md between the `bench:coord` markers.

use std::time::{Duration, Instant};

use waypost_core::coord::Name;
use waypost_core::Discovery;
use waypost_testkit::bench::{
    coord_failover, coord_lock_release, coord_report, coord_row, RawLock,
};
use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};
use zookeeper_client::{Acls, Client, CreateMode};

const SAMPLES: usize = 300;
const WARMUP: usize = 30;
const ROUNDS: usize = 5;
/// Lock + release rounds whose requests are counted (on each side).
const COUNTED: usize = 200;
/// The session timeout of every client: the server's default maximum (20 ticks of
/// 200 ms), the shortest sensible one on a real network.
const SESSION: Duration = Duration::from_secs(4);

/// Raw: what one uncontended Curator `InterProcessMutex` acquire + release sends.
struct Raw {
    client: Client,
    parent: String,
}

#[async_trait::async_trait]
impl RawLock for Raw {
    async fn lock_release(&mut self) -> Duration {
        let opts = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
        let started = Instant::now();
        let (_, seq) = self
            .client
            .create(&format!("{}/lock-", self.parent), b"", &opts)
            .await
            .unwrap();
        let node = format!("lock-{seq}");
        let mut children = self.client.list_children(&self.parent).await.unwrap();
        children.sort();
        assert_eq!(children.first(), Some(&node), "uncontended: ours is first");
        self.client
            .delete(&format!("{}/{node}", self.parent), None)
            .await
            .unwrap();
        started.elapsed()
    }
}

/// How many requests the server received so far on the connections of the sessions
/// `(raw, waypost)` (`recved` of ZooKeeper's `cons`; a keep-alive or ping counts too).
async fn received(address: &str, (raw, waypost): (i64, i64)) -> (u64, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
    s.write_all(b"cons").await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let of = |sid: i64| {
        let line = reply
            .lines()
            .find(|l| l.contains(&format!("sid={sid:#x},")))
            .unwrap_or_else(|| panic!("session {sid:#x} in `cons`: {reply}"));
        let (_, rest) = line.split_once("recved=").unwrap();
        rest.split(',').next().unwrap().parse::<u64>().unwrap()
    };
    (of(raw), of(waypost))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if require(ServerKind::ZooKeeper).is_none() {
        return;
    }
    let server = ZooKeeperServer::start_with(ZooKeeperOptions::default())
        .await
        .expect("start ZooKeeper");
    let config = ZkConfig::from_url(&server.url())
        .unwrap()
        .with_session_timeout(SESSION);

    // Uncontended lock + release: waypost and raw, each on a session of its own.
    let zk = ZkDiscovery::connect(config.clone()).await.unwrap();
    let bound = zk.session_timeout().expect("a session");
    assert_eq!(
        bound, SESSION,
        "the server grants the session timeout asked"
    );
    let raw = Client::connector()
        .with_session_timeout(SESSION)
        .connect(&server.address())
        .await
        .unwrap();
    let parent = "/rawbench/lock".to_string();
    raw.mkdir(
        &parent,
        &CreateMode::Persistent.with_acls(Acls::anyone_all()),
    )
    .await
    .unwrap();
    let mut side = Raw {
        client: raw,
        parent,
    };
    let name: Name = "bench/lock".parse().unwrap();
    let mut row = coord_row((WARMUP, SAMPLES), &mut side, zk.coordinator(), &name).await;
    eprintln!("lock + release: done");

    // Requests per lock + release, as the server counts them on each side's connection.
    let addr = server.address();
    let sessions = (side.client.session_id().0, zk.session_id().unwrap());
    let count = |before: (u64, u64), after: (u64, u64)| {
        (
            (after.0 - before.0) as f64 / COUNTED as f64,
            (after.1 - before.1) as f64 / COUNTED as f64,
        )
    };
    let before = received(&addr, sessions).await;
    for _ in 0..COUNTED {
        side.lock_release().await;
    }
    let mid = received(&addr, sessions).await;
    for _ in 0..COUNTED {
        coord_lock_release(zk.coordinator(), &name).await;
    }
    let after = received(&addr, sessions).await;
    let (raw_requests, _) = count(before, mid);
    let (_, waypost_requests) = count(mid, after);
    eprintln!("requests per lock + release: raw {raw_requests:.2}, waypost {waypost_requests:.2}");

    // Failover: a leader's client crashes, a candidate waiting on another client leads
    // once the server expired the crashed session.
    let connect = || {
        let config = config.clone();
        async move {
            ZkDiscovery::connect(config)
                .await
                .expect("connect")
                .into_discovery()
        }
    };
    let crash = |d: &Discovery| d.hooks.as_ref().expect("test hooks").crash();
    let election: Name = "bench/election".parse().unwrap();
    let mut failover = coord_failover(ROUNDS, &election, connect, crash).await;
    eprintln!("failover: done");

    coord_report(
        &mut row,
        &mut failover,
        bound,
        &format!("{SAMPLES} samples after {WARMUP} warm-up rounds, raw and waypost interleaved, one ZooKeeper 3.8 on loopback (tickTime 200 ms), 2-core machine, each side on a session of its own. raw: `zookeeper-client` create ephemeral sequential `lock-` under a parent, `getChildren` of the parent (ours is first), delete, as one uncontended Curator `InterProcessMutex` acquire + release. waypost: `coordinator().lock()` + `release()`. Failover: {ROUNDS} rounds, a leader's client crashes (no close, its session left to expire) while another client campaigns; measured from the crash until the other leads; bound = the negotiated session timeout ({SESSION:?}, the server's default maximum), rtt = half the raw lock + release p50. Requests per lock + release, counted by the server on each side's connection ({COUNTED} rounds): raw {raw_requests:.2}, waypost {waypost_requests:.2}. `cargo bench -p waypost-zookeeper --bench coord`."),
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
    );
}
