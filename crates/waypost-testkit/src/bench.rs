//! What the backends' latency benchmarks share: percentiles, the README table writer, and
//! the waypost side of the configuration benchmark (put → a watch sees it).
//!
//! Each backend's bench supplies the raw-client side itself (its registry's own client),
//! and interleaves raw and waypost samples in one run against one server, so both see the
//! same machine.

use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use waypost_core::backend::watch::Event;
use waypost_core::coord::{Coordinator, Name};
use waypost_core::kv::{ConfigEvent, ConfigKey, ConfigStore};
use waypost_core::Result;

/// A [`ServiceCache`](waypost_core::ServiceCache) of `service` on `watcher` (default
/// options), returned once it holds `n` instances (panics after 30 s): the cache side of the
/// register→visible benches.
pub async fn cache_holding(
    watcher: std::sync::Arc<dyn waypost_core::Watcher>,
    service: &str,
    n: usize,
) -> waypost_core::ServiceCache {
    let cache = waypost_core::ServiceCache::watch(
        watcher,
        service.parse().expect("a service name"),
        waypost_core::CacheOptions::default(),
    );
    cache
        .wait_for(Duration::from_secs(30), |v| v.len() == n)
        .await
        .expect("the cache holds every instance");
    cache
}

/// The `p` quantile (0.0–1.0) of `samples` (sorted in place).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// A duration in milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Replaces the text between `<!-- bench:{marker}:start -->` and
/// `<!-- bench:{marker}:end -->` in the README at `path` with `table` (nothing happens
/// if the markers are missing).
pub fn write_readme_section(path: &str, marker: &str, table: &str) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let start = format!("<!-- bench:{marker}:start -->");
    let end = format!("<!-- bench:{marker}:end -->");
    if let (Some(a), Some(b)) = (text.find(&start), text.find(&end)) {
        let new = format!("{}{start}\n{table}{}", &text[..a], &text[b..]);
        std::fs::write(path, new).expect("write the README");
    }
}

/// Puts `value` at `key` through waypost and waits until `watch` (a watch of the key or
/// of a prefix above it, past its snapshot) reports that value: the latency a user sees
/// from the start of `put` to the event.
pub async fn kv_put_seen(
    kv: &dyn ConfigStore,
    watch: &mut BoxStream<'static, Result<ConfigEvent>>,
    key: &ConfigKey,
    value: Vec<u8>,
) -> Duration {
    let started = Instant::now();
    let seen = async {
        loop {
            match watch.next().await {
                Some(Ok(Event::Added(e, _) | Event::Updated(e, _)))
                    if e.key == *key && e.value == value =>
                {
                    return Instant::now();
                }
                Some(Ok(_)) => {}
                other => panic!("the watch failed during the benchmark: {other:?}"),
            }
        }
    };
    let (put, seen) = tokio::join!(kv.put(key, value.clone()), seen);
    put.expect("put");
    seen - started
}

/// The raw client's side of one scenario of the configuration benchmark: its own probe
/// key, writer and watcher.
#[async_trait::async_trait]
pub trait RawKv: Send {
    /// Writes `value` at the raw probe key; returns how long until the raw watcher saw
    /// that value.
    async fn put_seen(&mut self, value: &str) -> Duration;
}

/// Runs one scenario: `warmup + samples` rounds, each a raw sample then a waypost sample
/// (`kv.put(key)` until `watch`, past its snapshot, reports it) of the same value.
pub async fn kv_row(
    scenario: &str,
    (warmup, samples): (usize, usize),
    raw: &mut dyn RawKv,
    kv: &dyn ConfigStore,
    watch: &mut BoxStream<'static, Result<ConfigEvent>>,
    key: &ConfigKey,
) -> KvRow {
    let (mut r, mut w) = (Vec::new(), Vec::new());
    for n in 0..warmup + samples {
        let value = format!("value-{n}");
        let rs = raw.put_seen(&value).await;
        let ws = kv_put_seen(kv, watch, key, value.into_bytes()).await;
        if n >= warmup {
            r.push(rs);
            w.push(ws);
        }
    }
    eprintln!("{scenario}: done");
    KvRow {
        scenario: scenario.into(),
        raw: r,
        waypost: w,
    }
}

/// One row of the configuration benchmark's table.
#[derive(Clone, Debug)]
pub struct KvRow {
    /// What was watched: "one key", "a prefix with 1,000 other keys".
    pub scenario: String,
    /// Raw client samples.
    pub raw: Vec<Duration>,
    /// waypost samples.
    pub waypost: Vec<Duration>,
}

/// The markdown table of `rows`: p50 and p99 of both sides and their ratios, then `note`.
pub fn kv_table(rows: &mut [KvRow], note: &str) -> String {
    let mut table = String::from(
        "| watched | raw p50 | raw p99 | waypost p50 | waypost p99 | waypost / raw p50 | waypost / raw p99 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows.iter_mut() {
        let (r50, r99) = (
            percentile(&mut row.raw, 0.5),
            percentile(&mut row.raw, 0.99),
        );
        let (w50, w99) = (
            percentile(&mut row.waypost, 0.5),
            percentile(&mut row.waypost, 0.99),
        );
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2}x | {:.2}x |\n",
            row.scenario,
            ms(r50),
            ms(r99),
            ms(w50),
            ms(w99),
            w50.as_secs_f64() / r50.as_secs_f64(),
            w99.as_secs_f64() / r99.as_secs_f64(),
        ));
    }
    format!("{table}\n{note}\n")
}

/// Prints the table of `rows` (see [`kv_table`]) and writes it into the README at
/// `readme` between the `bench:kv_latency` markers.
pub fn kv_report(rows: &mut [KvRow], note: &str, readme: &str) {
    let table = kv_table(rows, note);
    println!("{table}");
    write_readme_section(readme, "kv_latency", &table);
}

/// The raw client's side of the lock benchmark: the registry's own client doing the same
/// requests as one uncontended lock and release.
#[async_trait::async_trait]
pub trait RawLock: Send {
    /// Acquires the raw probe lock and releases it; returns how long both took.
    async fn lock_release(&mut self) -> Duration;
}

/// Times one uncontended `lock` + `release` through waypost.
pub async fn coord_lock_release(coord: &dyn Coordinator, name: &Name) -> Duration {
    let started = Instant::now();
    let g = coord.lock(name).await.expect("lock");
    g.release().await.expect("release");
    started.elapsed()
}

/// Runs `warmup + samples` rounds, each a raw lock+release then a waypost one.
pub async fn coord_row(
    (warmup, samples): (usize, usize),
    raw: &mut dyn RawLock,
    coord: &dyn Coordinator,
    name: &Name,
) -> KvRow {
    let (mut r, mut w) = (Vec::new(), Vec::new());
    for n in 0..warmup + samples {
        let rs = raw.lock_release().await;
        let ws = coord_lock_release(coord, name).await;
        if n >= warmup {
            r.push(rs);
            w.push(ws);
        }
    }
    KvRow {
        scenario: "uncontended lock + release".into(),
        raw: r,
        waypost: w,
    }
}

/// How long after `crash` (which kills the current leader's client) the candidate `next`
/// (already campaigning in `election`, through `observer`) leads: `rounds` times, each with
/// two fresh clients from `connect`.
pub async fn coord_failover<C, F>(
    rounds: usize,
    election: &Name,
    mut connect: C,
    crash: impl Fn(&waypost_core::Discovery),
) -> Vec<Duration>
where
    C: FnMut() -> F,
    F: std::future::Future<Output = waypost_core::Discovery>,
{
    let mut out = Vec::new();
    for _ in 0..rounds {
        let (a, b) = (connect().await, connect().await);
        let leader = a
            .coordinator()
            .unwrap()
            .campaign(election, b"a".to_vec())
            .await
            .expect("campaign");
        let coord_b = b.coordinator().unwrap();
        let e = election.clone();
        let next = tokio::spawn(async move { coord_b.campaign(&e, b"b".to_vec()).await });
        // Whether b queues before or after the crash, it leads only once a's session ran
        // out in the registry: the measured time is the same.
        let crashed = Instant::now();
        crash(&a);
        let l = next.await.unwrap().expect("campaign");
        out.push(crashed.elapsed());
        l.resign().await.expect("resign");
        drop(leader);
    }
    out
}

/// The lock benchmark's table: the lock row against the raw client, then failover times
/// against the session's bound (`bound`) plus one round trip (`rtt`, the raw p50).
pub fn coord_table(
    row: &mut KvRow,
    failover: &mut [Duration],
    bound: Duration,
    note: &str,
) -> String {
    let mut table = kv_table(std::slice::from_mut(row), "")
        .replace("| watched |", "| operation |")
        .trim_end()
        .to_string();
    table.push('\n');
    let rtt = percentile(&mut row.raw, 0.5) / 2;
    let (f50, fmax) = (percentile(failover, 0.5), *failover.iter().max().unwrap());
    let goal = bound + rtt;
    table.push_str(&format!(
        "\n| failover after a leader crash | session bound | p50 | max | p50 / (bound + rtt) | max / (bound + rtt) |\n| --- | ---: | ---: | ---: | ---: | ---: |\n| {} rounds | {} | {} | {} | {:.2}x | {:.2}x |\n\n{note}\n",
        failover.len(),
        ms(bound),
        ms(f50),
        ms(fmax),
        f50.as_secs_f64() / goal.as_secs_f64(),
        fmax.as_secs_f64() / goal.as_secs_f64(),
    ));
    table
}

/// Prints [`coord_table`] and writes it into the README at `readme` between the
/// `bench:coord` markers.
pub fn coord_report(
    row: &mut KvRow,
    failover: &mut [Duration],
    bound: Duration,
    note: &str,
    readme: &str,
) {
    let table = coord_table(row, failover, bound, note);
    println!("{table}");
    write_readme_section(readme, "coord", &table);
}

/// User + system CPU time of this process so far (`getrusage(RUSAGE_SELF)`).
pub fn process_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(u.user_time()) + t(u.system_time())
}

/// One row of the keep-alive benchmark: a steady state measured for a period.
#[derive(Clone, Debug)]
pub struct CpuRow {
    /// The state: "1,000 registrations".
    pub label: &'static str,
    /// CPU time this process used during the period.
    pub cpu: Duration,
    /// The period's wall time.
    pub wall: Duration,
    /// Requests the server received during the period (as it counts them).
    pub requests: u64,
}

impl CpuRow {
    /// CPU time ÷ wall time, in % of one core.
    pub fn share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64() * 100.0
    }
}

/// Measures the state the process is in for `period`: its CPU time, and the difference of
/// the server's request counter `requests` (read before and after).
pub async fn measure_cpu<F, Fut>(label: &'static str, period: Duration, requests: F) -> CpuRow
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let (r0, c0, t0) = (requests().await, process_cpu(), Instant::now());
    tokio::time::sleep(period).await;
    let (c1, wall) = (process_cpu(), t0.elapsed());
    let row = CpuRow {
        label,
        cpu: c1 - c0,
        wall,
        requests: requests().await - r0,
    };
    eprintln!(
        "{label}: {:.3}% of a core, {:.2} requests/s",
        row.share(),
        row.requests as f64 / wall.as_secs_f64()
    );
    row
}

/// The keep-alive benchmark's steady states on one client: `instances` registrations, then
/// also `locks` held locks, each measured for `period` (see [`measure_cpu`]); checks that
/// nothing was lost meanwhile, then releases everything.
pub async fn keepalive_rows<F, Fut>(
    d: &waypost_core::Discovery,
    (instances, locks): (usize, usize),
    period: Duration,
    requests: F,
) -> Vec<CpuRow>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let started = Instant::now();
    let regs: Vec<_> = futures::stream::iter(0..instances)
        .map(|i| {
            let registrar = d.registrar.clone();
            async move {
                let instance =
                    waypost_core::Instance::parse("keepalive", &format!("i-{i}"), "10.0.0.1", 8000)
                        .unwrap()
                        .with_zone("z1");
                registrar.register(instance).await.expect("register")
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    eprintln!("{instances} registered in {:?}", started.elapsed());
    let mut rows = vec![measure_cpu("1,000 registrations", period, &requests).await];
    let coord = d.coordinator().expect("a coordinator");
    let mut guards = Vec::new();
    for i in 0..locks {
        let name = format!("keepalive/lock-{i}").parse().unwrap();
        guards.push(coord.lock(&name).await.expect("lock"));
    }
    rows.push(measure_cpu("1,000 registrations + 10 held locks", period, &requests).await);
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
    rows
}

/// The keep-alive benchmark's table of `rows`, then `note`.
pub fn keepalive_table(rows: &[CpuRow], note: &str) -> String {
    let mut table = String::from(
        "| state | CPU time | wall time | % of one core | requests / s (server) |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        table.push_str(&format!(
            "| {} | {:.1} ms | {:.1} s | {:.3}% | {:.2} |\n",
            r.label,
            r.cpu.as_secs_f64() * 1e3,
            r.wall.as_secs_f64(),
            r.share(),
            r.requests as f64 / r.wall.as_secs_f64(),
        ));
    }
    table.push_str(&format!("\n{note}\n"));
    table
}
