//! One process with 1,000 instances on a real Consul agent, side by side in one run:
//!
//! - **registering** 1,000 instances: 1,000 concurrent `register()` calls (they share the
//!   client's control connections) against raw `reqwest` `PUT /v1/agent/service/register`s
//!   of the same bodies (an alias check of a heartbeat service) at the same concurrency as
//!   the control lane (the agent's floor);
//! - **keep-alive cost** at steady state: this process's CPU time and the agent's (its
//!   `/proc/<pid>/stat`) over a period, for waypost (one heartbeat TTL check per client,
//!   an alias check per instance, one `GET /v1/agent/services` per round; then the same
//!   with `read_back_every = 3`), for the same registrations raw without the read-back, and for the previous design replayed raw: a TTL check per instance, passed and read back once per
//!   round (a third of the TTL).
//!
//! `cargo bench -p waypost-consul --bench scale` prints markdown tables and writes them
//! into the crate's README.md between the `bench:scale` markers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{Instance, Registrar};
use waypost_testkit::bench::{keepalive_table, measure_cpu, write_readme_section, CpuRow};
use waypost_testkit::ConsulServer;

const INSTANCES: usize = 1_000;
const ROUNDS: usize = 3;
const TTL: Duration = Duration::from_secs(10);
/// How long each keep-alive row is measured.
const PERIOD: Duration = Duration::from_secs(60);
/// How long a state is held before it is measured.
const SETTLE: Duration = Duration::from_secs(30);

/// The agent's process id: the `consul` process started with this HTTP port.
fn agent_pid(port: u16) -> Option<u32> {
    let flag = format!("-http-port={port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        cmd.split(|b| *b == 0)
            .any(|a| a == flag.as_bytes())
            .then_some(pid)
    })
}

/// User + system CPU time of process `pid` (`/proc/<pid>/stat`, 100 ticks a second).
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn instance(service: &str, n: usize) -> Instance {
    Instance::parse(service, &format!("i-{n}"), "10.0.0.1", 8000).unwrap()
}

/// What the previous design registered: the instance with its own TTL check.
fn raw_body(service: &str, n: usize) -> String {
    serde_json::json!({
        "ID": format!("{service}:i-{n}"), "Name": service, "Address": "10.0.0.1", "Port": 8000,
        "Tags": [], "Meta": {}, "Weights": {"Passing": 100, "Warning": 1},
        "Checks": [{"CheckID": format!("service:{service}:i-{n}"), "Name": "ttl",
                    "TTL": format!("{}ms", TTL.as_millis()), "Status": "passing",
                    "DeregisterCriticalServiceAfter": "1m"}]
    })
    .to_string()
}

/// What waypost registers now: the instance with an alias check of a heartbeat service.
fn alias_body(service: &str, n: usize) -> String {
    serde_json::json!({
        "ID": format!("{service}:i-{n}"), "Name": service, "Address": "10.0.0.1", "Port": 8000,
        "Tags": [], "Meta": {}, "Weights": {"Passing": 100, "Warning": 1},
        "Checks": [{"CheckID": format!("service:{service}:i-{n}"), "Name": "alias",
                    "AliasService": RAW_HEARTBEAT, "Status": "passing",
                    "DeregisterCriticalServiceAfter": "1m"}]
    })
    .to_string()
}

/// The raw client's heartbeat service, with its TTL check `{RAW_HEARTBEAT}:ttl`.
const RAW_HEARTBEAT: &str = "waypost-heartbeat:raw";

fn raw_heartbeat_body() -> String {
    serde_json::json!({
        "ID": RAW_HEARTBEAT, "Name": "waypost-heartbeat", "Port": 0,
        "Checks": [{"CheckID": format!("{RAW_HEARTBEAT}:ttl"), "Name": "ttl",
                    "TTL": format!("{}ms", TTL.as_millis()), "Status": "passing",
                    "DeregisterCriticalServiceAfter": "2m"}]
    })
    .to_string()
}

struct Raw {
    http: reqwest::Client,
    base: String,
}

impl Raw {
    async fn put(&self, path: &str, body: Option<String>) {
        let mut req = self.http.put(format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.body(b);
        }
        let r = req.send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn get(&self, path: &str) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.bytes().await.unwrap();
    }

    async fn all<F, Fut>(&self, concurrency: usize, f: F)
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        futures::stream::iter(0..INSTANCES)
            .map(f)
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>()
            .await;
    }
}

fn config(server: &ConsulServer) -> ConsulConfig {
    ConsulConfig::from_url(&server.url()).unwrap().with_ttl(TTL)
}

/// Registers 1,000 instances both ways, `ROUNDS` times (alternating); returns the
/// durations (waypost, raw) and the control lane's concurrency.
async fn registering(server: &ConsulServer, raw: &Raw) -> (Vec<Duration>, Vec<Duration>, usize) {
    let (mut wp, mut rw, mut lane) = (Vec::new(), Vec::new(), 0);
    for round in 0..ROUNDS {
        let client = ConsulDiscovery::connect(config(server)).await.unwrap();
        lane = client.connection_budget().control_connections;
        let service = format!("scalewp{round}");
        let t0 = Instant::now();
        let regs = futures::future::join_all((0..INSTANCES).map(|n| {
            let c = client.clone();
            let i = instance(&service, n);
            async move { c.register(i).await.unwrap() }
        }))
        .await;
        wp.push(t0.elapsed());
        drop(regs);
        client.shutdown().await.unwrap();

        let service = format!("scaleraw{round}");
        raw.put("/v1/agent/service/register", Some(raw_heartbeat_body()))
            .await;
        let t0 = Instant::now();
        raw.all(lane, |n| {
            let body = alias_body(&service, n);
            async move { raw.put("/v1/agent/service/register", Some(body)).await }
        })
        .await;
        rw.push(t0.elapsed());
        raw.all(lane, |n| {
            let path = format!("/v1/agent/service/deregister/{service}:i-{n}");
            async move { raw.put(&path, None).await }
        })
        .await;
    }
    (wp, rw, lane)
}

/// Measures one steady state for `PERIOD`: (this process's row, the agent's CPU time).
async fn steady(label: &'static str, pid: Option<u32>) -> (CpuRow, Option<Duration>) {
    // The agent finishes what the registrations started (each alias check's first
    // evaluation, its sync) before the steady state is measured.
    tokio::time::sleep(SETTLE).await;
    let a0 = pid.map(cpu_of);
    let row = measure_cpu(label, PERIOD, || async { 0 }).await;
    (row, pid.map(|p| cpu_of(p) - a0.unwrap_or_default()))
}

/// A fresh agent (a `-dev` agent keeps nothing across a restart) and its process id: an
/// agent's own CPU grows with what it has been through, so each row starts from scratch.
async fn fresh(server: &mut ConsulServer) -> Option<u32> {
    server.restart().await.expect("restart the agent");
    agent_pid(server.port())
}

/// One client with 1,000 instances, measured at steady state, then shut down.
async fn waypost_row(
    config: ConsulConfig,
    label: &'static str,
    pid: Option<u32>,
) -> (CpuRow, Option<Duration>) {
    let client = ConsulDiscovery::connect(config).await.unwrap();
    let regs: Vec<_> = futures::stream::iter(0..INSTANCES)
        .map(|n| {
            let c = client.clone();
            async move { c.register(instance("keepwp", n)).await.unwrap() }
        })
        .buffer_unordered(INSTANCES)
        .collect()
        .await;
    let row = steady(label, pid).await;
    for r in &regs {
        assert_eq!(
            r.current_status(),
            waypost_core::RegistrationStatus::Registered
        );
    }
    drop(regs);
    client.shutdown().await.unwrap();
    row
}

async fn keepalive(
    server: &mut ConsulServer,
    raw: &Raw,
    lane: usize,
) -> Vec<(CpuRow, Option<Duration>)> {
    let mut rows = Vec::new();
    let pid = fresh(server).await;
    rows.push(steady("nothing registered", pid).await);

    let pid = fresh(server).await;
    rows.push(
        waypost_row(
            config(server),
            "waypost: 1,000 instances, one heartbeat",
            pid,
        )
        .await,
    );
    // The same, reading the agent's services back every third round only.
    let pid = fresh(server).await;
    let every_third = config(server).with_read_back_every(3);
    rows.push(waypost_row(every_third, "waypost: the same, `read_back_every = 3`", pid).await);

    // The same registrations raw, passing the heartbeat every round and reading nothing
    // back: what the agent spends on the alias checks and its own work, without the
    // keeper's one `GET /v1/agent/services` per round.
    let pid = fresh(server).await;
    raw.put("/v1/agent/service/register", Some(raw_heartbeat_body()))
        .await;
    raw.all(lane, |n| {
        let body = alias_body("keepalias", n);
        async move { raw.put("/v1/agent/service/register", Some(body)).await }
    })
    .await;
    let looping = every_round(raw, |raw| async move {
        raw.put(&format!("/v1/agent/check/pass/{RAW_HEARTBEAT}:ttl"), None)
            .await;
    });
    rows.push(steady("raw: the same, no read-back", pid).await);
    looping.stop().await;
    raw.all(lane, |n| {
        let path = format!("/v1/agent/service/deregister/keepalias:i-{n}");
        async move { raw.put(&path, None).await }
    })
    .await;
    raw.put(
        &format!("/v1/agent/service/deregister/{RAW_HEARTBEAT}"),
        None,
    )
    .await;

    // The previous design, replayed: a TTL check per instance, passed and read back once
    // per round.
    let pid = fresh(server).await;
    raw.all(lane, |n| {
        let body = raw_body("keepraw", n);
        async move { raw.put("/v1/agent/service/register", Some(body)).await }
    })
    .await;
    let looping = every_round(raw, move |raw| async move {
        raw.all(lane, |n| {
            let raw = &raw;
            async move {
                raw.put(&format!("/v1/agent/check/pass/service:keepraw:i-{n}"), None)
                    .await;
                raw.get(&format!("/v1/agent/service/keepraw:i-{n}")).await;
            }
        })
        .await;
    });
    rows.push(steady("per-instance TTL checks (previous design, raw)", pid).await);
    looping.stop().await;
    raw.all(lane, |n| {
        let path = format!("/v1/agent/service/deregister/keepraw:i-{n}");
        async move { raw.put(&path, None).await }
    })
    .await;
    rows
}

/// A task running `round` every keep-alive round (a third of the TTL) until stopped.
struct Rounds {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Rounds {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

fn every_round<F, Fut>(raw: &Raw, round: F) -> Rounds
where
    F: Fn(Arc<Raw>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let raw = Arc::new(Raw {
        http: raw.http.clone(),
        base: raw.base.clone(),
    });
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        while !flag.load(Ordering::Relaxed) {
            let next = tokio::time::Instant::now() + TTL / 3;
            round(raw.clone()).await;
            tokio::time::sleep_until(next).await;
        }
    });
    Rounds { stop, task }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(mut server) = waypost_testkit::server::consul().await else {
        eprintln!("consul is not installed: no benchmark");
        return;
    };
    let raw = Raw {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        base: format!("http://{}", server.address()),
    };
    let (mut wp, mut rw, lane) = registering(&server, &raw).await;
    wp.sort();
    rw.sort();
    let (w, r) = (wp[ROUNDS / 2], rw[ROUNDS / 2]);
    let mut table = format!(
        "| registering {INSTANCES} instances | median of {ROUNDS} | min | max |\n\
         | --- | ---: | ---: | ---: |\n\
         | waypost: {INSTANCES} concurrent `register()` | {} | {} | {} |\n\
         | raw `PUT /v1/agent/service/register`, {lane} at a time | {} | {} | {} |\n\n\
         waypost / raw (medians): {:.2}×. The control lane of this client allows {lane} requests in flight.\n\n",
        ms(w), ms(wp[0]), ms(wp[ROUNDS - 1]), ms(r), ms(rw[0]), ms(rw[ROUNDS - 1]),
        w.as_secs_f64() / r.as_secs_f64(),
    );
    let rows = keepalive(&mut server, &raw, lane).await;
    let cpu: Vec<CpuRow> = rows.iter().map(|(r, _)| r.clone()).collect();
    let mut ka = keepalive_table(&cpu, "");
    ka = ka.trim_end().to_string();
    table.push_str(&ka);
    table
        .push_str("\n\n| state | agent CPU time | agent, % of one core |\n| --- | ---: | ---: |\n");
    for (row, agent) in &rows {
        match agent {
            Some(a) => table.push_str(&format!(
                "| {} | {:.1} ms | {:.3}% |\n",
                row.label,
                a.as_secs_f64() * 1e3,
                a.as_secs_f64() / row.wall.as_secs_f64() * 100.0
            )),
            None => table.push_str(&format!("| {} | (agent pid not found) | |\n", row.label)),
        }
    }
    table.push_str(&format!(
        "\nRows measured one after the other in one run, each on a freshly restarted `-dev` agent, {PERIOD:?} each, {SETTLE:?} after the state was reached, TTL {TTL:?} (keep-alive round every {:?}); this process's CPU: `getrusage(RUSAGE_SELF)`; the agent's: `/proc/<pid>/stat` utime + stime over the same period (the requests column is not counted on Consul). {}\n",
        TTL / 3,
        common::measured_on("scale")
    ));
    print!("{table}");
    write_readme_section(
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "scale",
        &table,
    );
}
