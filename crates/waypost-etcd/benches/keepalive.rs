//! Keep-alive cost on a real etcd: the CPU time this process spends, and the requests
//! the server receives from it, while one client holds 1,000 registrations (then also 10
//! held locks) for a fixed period at steady state; beside the same client connected with
//! nothing registered, measured in the same run.
//!
//! `cargo bench -p waypost-etcd --bench keepalive` prints a markdown table and writes
//! it into the crate's README.md between the `bench:keepalive` markers.

use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::resource::{getrusage, UsageWho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_core::{Instance, Registrar};
use waypost_etcd::{EtcdConfig, EtcdDiscovery};

const INSTANCES: usize = 1_000;
const LOCKS: usize = 10;
/// How long each row is measured, once its state is reached.
const PERIOD: Duration = Duration::from_secs(30);
/// Registrations in flight at once while setting up.
const CONCURRENCY: usize = 64;

/// User + system CPU time of this process so far.
fn cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(u.user_time()) + t(u.system_time())
}

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

struct Row {
    label: &'static str,
    cpu: Duration,
    wall: Duration,
    requests: u64,
}

impl Row {
    fn share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64() * 100.0
    }
}

async fn measure(label: &'static str, address: &str) -> Row {
    let (p0, c0, t0) = (packets_received(address).await, cpu(), Instant::now());
    tokio::time::sleep(PERIOD).await;
    let (c1, wall) = (cpu(), t0.elapsed());
    let requests = packets_received(address).await - p0;
    let row = Row {
        label,
        cpu: c1 - c0,
        wall,
        requests,
    };
    eprintln!(
        "{label}: {:.3}% of a core, {:.2} requests/s",
        row.share(),
        requests as f64 / wall.as_secs_f64()
    );
    row
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

    let mut rows = vec![measure("connected, nothing registered", &address).await];

    let started = Instant::now();
    let regs: Vec<_> = futures::stream::iter(0..INSTANCES)
        .map(|i| {
            let etcd = etcd.clone();
            async move {
                let instance = Instance::parse("keepalive", &format!("i-{i}"), "10.0.0.1", 8000)
                    .unwrap()
                    .with_zone("z1");
                etcd.register(instance).await.expect("register")
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    eprintln!("{INSTANCES} registered in {:?}", started.elapsed());
    // The lease is granted with the first registration.
    let timeout = etcd.granted_ttl().expect("a lease");
    rows.push(measure("1,000 registrations", &address).await);

    let mut guards = Vec::new();
    for i in 0..LOCKS {
        let name = format!("keepalive/lock-{i}").parse().unwrap();
        guards.push(etcd.coordinator().lock(&name).await.expect("lock"));
    }
    rows.push(measure("1,000 registrations + 10 held locks", &address).await);
    for g in guards {
        assert!(!g.is_lost(), "a lock was lost during the measurement");
        g.release().await.unwrap();
    }
    for r in &regs {
        assert_eq!(
            r.current_status(),
            waypost_core::RegistrationStatus::Registered
        );
    }
    drop(regs);
    etcd.shutdown().await.unwrap();

    let mut table = String::from(
        "| state | CPU time | wall time | % of one core | requests / s (server) |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.1} ms | {:.1} s | {:.3}% | {:.2} |\n",
            r.label,
            r.cpu.as_secs_f64() * 1e3,
            r.wall.as_secs_f64(),
            r.share(),
            r.requests as f64 / r.wall.as_secs_f64(),
        ));
    }
    table.push_str(&format!(
        "\nOne `EtcdDiscovery` in this process, rows measured one after the other in one run for {PERIOD:?} each once the state was reached (all registered, all locks held), against one etcd 3.4 on loopback, default options (lease TTL asked 10 s, granted {timeout:?}), 2-core machine. CPU: `getrusage(RUSAGE_SELF)` user + system over the period (the server is another process); requests: the server's `grpc_server_msg_received_total` summed over all methods (unary requests and stream messages such as lease keep-alives) over the period. `cargo bench -p waypost-etcd --bench keepalive`.\n"
    ));
    print!("{table}");
    waypost_testkit::bench::write_readme_section(
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "keepalive",
        &table,
    );
}
