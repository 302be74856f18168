//! Keep-alive cost on a real ZooKeeper: the CPU time this process spends, and the requests
//! the server receives from it, while one client holds 1,000 registrations (then also 10
//! held locks) for a fixed period at steady state; beside the same client connected with
//! nothing registered, measured in the same run.
//!
//! `cargo bench -p waypost-zookeeper --bench keepalive` prints a markdown table and writes
//! it into the crate's README.md between the `bench:keepalive` markers.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_testkit::bench::{keepalive_rows, keepalive_table, measure_cpu, write_readme_section};
use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};

const INSTANCES: usize = 1_000;
const LOCKS: usize = 10;
/// How long each row is measured, once its state is reached.
const PERIOD: Duration = Duration::from_secs(30);

/// `zk_packets_received` of the server's `mntr` (every request of every client; ours is
/// the only client).
async fn packets_received(address: &str) -> u64 {
    let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
    s.write_all(b"mntr").await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    reply
        .lines()
        .find_map(|l| l.strip_prefix("zk_packets_received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("zk_packets_received in `mntr`: {reply}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if require(ServerKind::ZooKeeper).is_none() {
        return;
    }
    // ZooKeeper's usual tickTime, so the default session timeout (10 s) is granted as
    // asked (the server allows 2 to 20 ticks).
    let server = ZooKeeperServer::start_with(ZooKeeperOptions {
        tick_time: Duration::from_secs(2),
        ..ZooKeeperOptions::default()
    })
    .await
    .expect("start ZooKeeper");
    let address = server.address();
    let zk = ZkDiscovery::connect(ZkConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let timeout = zk.session_timeout().expect("a session");

    let requests = || packets_received(&address);
    let mut rows = vec![measure_cpu("connected, nothing registered", PERIOD, requests).await];
    let d = zk.clone().into_discovery();
    rows.extend(keepalive_rows(&d, (INSTANCES, LOCKS), PERIOD, requests).await);
    zk.shutdown().await.unwrap();
    let table = keepalive_table(
        &rows,
        &format!("One `ZkDiscovery` in this process, rows measured one after the other in one run for {PERIOD:?} each once the state was reached (all registered, all locks held), against one ZooKeeper 3.8 on loopback (tickTime 2 s), default options (session timeout asked 10 s, granted {timeout:?}), 2-core machine. CPU: `getrusage(RUSAGE_SELF)` user + system over the period (the server is another process); requests: the server's `zk_packets_received` (`mntr`) over the period, pings included. `cargo bench -p waypost-zookeeper --bench keepalive`."),
    );
    print!("{table}");
    write_readme_section(
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "keepalive",
        &table,
    );
}
