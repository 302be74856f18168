//! Keep-alive cost on a real etcd: the CPU time this process spends, and the requests
//! the server receives from it, while one client holds 1,000 registrations (then also 10
//! held locks) for a fixed period at steady state; beside the same client connected with
//! nothing registered, measured in the same run.
//!
//! `cargo bench -p waypost-etcd --bench keepalive` prints a markdown table and writes
//! it into the crate's README.md between the `bench:keepalive` markers.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_etcd::{EtcdConfig, EtcdDiscovery};
use waypost_testkit::bench::{keepalive_rows, keepalive_table, measure_cpu, write_readme_section};

const INSTANCES: usize = 1_000;
const LOCKS: usize = 10;
/// How long each row is measured, once its state is reached.
const PERIOD: Duration = Duration::from_secs(30);

/// The gRPC messages the server received so far from every client (the sum of
/// `grpc_server_msg_received_total` over all methods: each unary request, and each
/// message on a stream such as a lease keep-alive; ours is the only client).
async fn packets_received(address: &str) -> u64 {
    let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let total: f64 = reply
        .lines()
        .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum();
    assert!(
        reply.contains("grpc_server_msg_received_total{"),
        "grpc_server_msg_received_total in /metrics: {reply}"
    );
    total as u64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(server) = waypost_testkit::server::etcd().await else {
        eprintln!("etcd is not installed: no benchmark");
        return;
    };
    let address = server.address();
    let etcd = EtcdDiscovery::connect(EtcdConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let requests = || packets_received(&address);
    let mut rows = vec![measure_cpu("connected, nothing registered", PERIOD, requests).await];
    let d = etcd.clone().into_discovery();
    rows.extend(keepalive_rows(&d, (INSTANCES, LOCKS), PERIOD, requests).await);
    // The lease was granted with the first registration.
    let timeout = etcd.granted_ttl().expect("a lease");
    etcd.shutdown().await.unwrap();
    let table = keepalive_table(
        &rows,
        &format!("One `EtcdDiscovery` in this process, rows measured one after the other in one run for {PERIOD:?} each once the state was reached (all registered, all locks held), against one etcd 3.4 on loopback, default options (lease TTL asked 10 s, granted {timeout:?}), 2-core machine. CPU: `getrusage(RUSAGE_SELF)` user + system over the period (the server is another process); requests: the server's `grpc_server_msg_received_total` summed over all methods (unary requests and stream messages such as lease keep-alives) over the period. `cargo bench -p waypost-etcd --bench keepalive`."),
    );
    print!("{table}");
    write_readme_section(
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "keepalive",
        &table,
    );
}
