//! Keep-alive cost on a real ZooKeeper: the CPU time this process spends, and the requests
//! the server receives from it, while one client holds 1,000 registrations (then also 10
//! held locks) for a fixed period at steady state; beside the same client connected with
//! nothing registered, measured in the same run.
//!
//! `cargo bench -p waypost-zookeeper --bench keepalive` prints a markdown table and writes
//! it into the crate's README.md between the `bench:keepalive` markers.

use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::resource::{getrusage, UsageWho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_core::{Instance, Registrar};
use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};

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

    let mut rows = vec![measure("connected, nothing registered", &address).await];

    let started = Instant::now();
    let regs: Vec<_> = futures::stream::iter(0..INSTANCES)
        .map(|i| {
            let zk = zk.clone();
            async move {
                let instance = Instance::parse("keepalive", &format!("i-{i}"), "10.0.0.1", 8000)
                    .unwrap()
                    .with_zone("z1");
                zk.register(instance).await.expect("register")
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    eprintln!("{INSTANCES} registered in {:?}", started.elapsed());
    rows.push(measure("1,000 registrations", &address).await);

    let mut guards = Vec::new();
    for i in 0..LOCKS {
        let name = format!("keepalive/lock-{i}").parse().unwrap();
        guards.push(zk.coordinator().lock(&name).await.expect("lock"));
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
    zk.shutdown().await.unwrap();

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
        "\nOne `ZkDiscovery` in this process, rows measured one after the other in one run for {PERIOD:?} each once the state was reached (all registered, all locks held), against one ZooKeeper 3.8 on loopback (tickTime 2 s), default options (session timeout asked 10 s, granted {timeout:?}), 2-core machine. CPU: `getrusage(RUSAGE_SELF)` user + system over the period (the server is another process); requests: the server's `zk_packets_received` (`mntr`) over the period, pings included. `cargo bench -p waypost-zookeeper --bench keepalive`.\n"
    ));
    print!("{table}");
    waypost_testkit::bench::write_readme_section(
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "keepalive",
        &table,
    );
}
