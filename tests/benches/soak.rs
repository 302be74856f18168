//! Soak (issue 13): minutes of churn against each real registry, with the server restarted
//! every few minutes, and what the client process looks like at the end.
//!
//! `cargo bench -p waypost-tests --bench soak` (10 minutes per backend, a restart every
//! 2 minutes); `SOAK_SECS` and `SOAK_RESTART_SECS` change both; arguments pick backends
//! (`zookeeper`, `etcd`, `consul`; all three by default).
//!
//! One process holds two clients of one registry: a registrant that keeps 20 to 60
//! instances of three services alive while it registers, updates and deregisters one of
//! them every 25 ms, and a watcher client whose six watch streams are replaced one at a
//! time every 5 s. After the churn the run waits (up to 3 session bounds) until every
//! watcher's applied set and a fresh listing equal what the registrant holds. It reports
//! the process's resident memory, open file descriptors and live tokio tasks after a
//! warm-up and at the end (same number of watches and registrations open), the operations
//! done, the errors callers saw and the time to converge.
#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use waypost_core::{Discovery, Instance, InstanceSet, Registration, ServiceName};

const SERVICES: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
const WATCHES: usize = 6;
const MIN_LIVE: usize = 20;
const MAX_LIVE: usize = 60;
const OP_EVERY: Duration = Duration::from_millis(25);
const WATCH_TURNOVER: Duration = Duration::from_secs(5);
const WARM_UP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Kind {
    ZooKeeper,
    Etcd,
    Consul,
}

/// One real server of any kind.
enum Server {
    ZooKeeper(waypost_testkit::ZooKeeperServer),
    Etcd(waypost_testkit::EtcdServer),
    Consul(waypost_testkit::ConsulServer),
}

impl Server {
    async fn start(kind: Kind) -> Self {
        let server = match kind {
            Kind::ZooKeeper => waypost_testkit::server::zookeeper()
                .await
                .map(Server::ZooKeeper),
            Kind::Etcd => waypost_testkit::server::etcd().await.map(Server::Etcd),
            Kind::Consul => waypost_testkit::server::consul().await.map(Server::Consul),
        };
        server.unwrap_or_else(|| panic!("{kind:?} is not installed (scripts/install-servers.sh)"))
    }

    fn url(&self) -> String {
        match self {
            Server::ZooKeeper(s) => s.url(),
            Server::Etcd(s) => s.url(),
            Server::Consul(s) => s.url(),
        }
    }

    async fn restart(&mut self) {
        let r = match self {
            Server::ZooKeeper(s) => s.restart().await,
            Server::Etcd(s) => s.restart().await,
            Server::Consul(s) => s.restart().await,
        };
        r.expect("restart the server");
    }
}

/// The session bound of every backend: its default (ZooKeeper `session_timeout`, etcd
/// `lease_ttl`, Consul `ttl`), set explicitly.
const BOUND: Duration = Duration::from_secs(10);

/// A client with the session bound [`BOUND`].
async fn connect(kind: Kind, url: &str) -> Discovery {
    match kind {
        Kind::ZooKeeper => {
            let config = waypost_zookeeper::ZkConfig::from_url(url)
                .unwrap()
                .with_session_timeout(BOUND);
            waypost_zookeeper::ZkDiscovery::connect(config)
                .await
                .expect("connect")
                .into_discovery()
        }
        Kind::Etcd => {
            let config = waypost_etcd::EtcdConfig::from_url(url)
                .unwrap()
                .with_lease_ttl(BOUND);
            waypost_etcd::EtcdDiscovery::connect(config)
                .await
                .expect("connect")
                .into_discovery()
        }
        Kind::Consul => {
            let config = waypost_consul::ConsulConfig::from_url(url)
                .unwrap()
                .with_ttl(BOUND);
            waypost_consul::ConsulDiscovery::connect(config)
                .await
                .expect("connect")
                .into_discovery()
        }
    }
}

/// The process's resident memory (KiB), open descriptors and live tokio tasks.
#[derive(Clone, Copy, Debug)]
struct Usage {
    rss_kib: u64,
    fds: usize,
    tasks: usize,
}

fn usage() -> Usage {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    Usage {
        rss_kib,
        fds,
        tasks,
    }
}

/// One watch stream applied to a set, in a task of its own.
struct Watch {
    service: ServiceName,
    set: Arc<Mutex<InstanceSet>>,
    task: JoinHandle<()>,
}

impl Watch {
    fn open(d: &Discovery, service: &ServiceName, errors: Arc<Mutex<u64>>) -> Self {
        let set = Arc::new(Mutex::new(InstanceSet::new()));
        let mut stream = d.watcher.watch(service);
        let applied = set.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => applied.lock().unwrap().apply(&event),
                    Err(e) => {
                        eprintln!("watch error (the stream ends): {e}");
                        *errors.lock().unwrap() += 1;
                    }
                }
            }
        });
        Watch {
            service: service.clone(),
            set,
            task,
        }
    }

    fn ids(&self) -> BTreeSet<String> {
        self.set
            .lock()
            .unwrap()
            .ids()
            .map(|i| i.as_str().to_owned())
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Row {
    kind: Kind,
    secs: u64,
    restarts: u32,
    ops: u64,
    errors: u64,
    start: Usage,
    end: Usage,
    rss_max_kib: u64,
    converged: Option<Duration>,
    bound: Duration,
}

async fn soak(kind: Kind, total: Duration, restart_every: Duration) -> Row {
    let mut server = Server::start(kind).await;
    let url = server.url();
    let bound = BOUND;
    let registrant = connect(kind, &url).await;
    let watcher = connect(kind, &url).await;
    let services: Vec<ServiceName> = SERVICES.iter().map(|s| s.parse().unwrap()).collect();
    let errors = Arc::new(Mutex::new(0u64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut watches: Vec<Watch> = (0..WATCHES)
        .map(|i| Watch::open(&watcher, &services[i % services.len()], errors.clone()))
        .collect();
    let mut live: BTreeMap<String, Registration> = BTreeMap::new();
    let (mut ops, mut restarts, mut next_id, mut version) = (0u64, 0u32, 0u64, 0u64);
    let began = Instant::now();
    let mut next_restart = began + restart_every;
    let mut next_turnover = began + WATCH_TURNOVER;
    let mut start = None;
    let mut rss_max_kib = 0;
    while began.elapsed() < total {
        if start.is_none() && began.elapsed() >= WARM_UP {
            start = Some(usage());
        }
        rss_max_kib = rss_max_kib.max(usage().rss_kib);
        if Instant::now() >= next_restart {
            eprintln!("{kind:?}: restarting the server at {:?}", began.elapsed());
            server.restart().await;
            restarts += 1;
            next_restart = Instant::now() + restart_every;
        }
        if Instant::now() >= next_turnover {
            let i = rng.gen_range(0..watches.len());
            let service = watches[i].service.clone();
            watches[i] = Watch::open(&watcher, &service, errors.clone());
            next_turnover = Instant::now() + WATCH_TURNOVER;
        }
        let roll: u32 = rng.gen_range(0..3);
        let result = if live.len() < MIN_LIVE || (roll == 0 && live.len() < MAX_LIVE) {
            next_id += 1;
            let id = format!("i-{next_id}");
            let service = &SERVICES[next_id as usize % SERVICES.len()];
            let port = 10_000 + (next_id % 50_000) as u16;
            let inst = Instance::parse(service, &id, "127.0.0.1", port).unwrap();
            match tokio::time::timeout(bound, registrant.registrar.register(inst)).await {
                Ok(Ok(r)) => {
                    live.insert(id, r);
                    Ok(())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("register timed out".into()),
            }
        } else {
            let key = live
                .keys()
                .nth(rng.gen_range(0..live.len()))
                .unwrap()
                .clone();
            if roll == 1 {
                version += 1;
                let r = live.get_mut(&key).unwrap();
                let inst = r.instance().clone().with_metadata("v", version.to_string());
                match tokio::time::timeout(bound, r.update(inst)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("update timed out".into()),
                }
            } else {
                let r = live.remove(&key).unwrap();
                match tokio::time::timeout(bound, r.deregister()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("deregister timed out".into()),
                }
            }
        };
        ops += 1;
        if let Err(e) = result {
            *errors.lock().unwrap() += 1;
            eprintln!("{kind:?}: operation failed at {:?}: {e}", began.elapsed());
        }
        tokio::time::sleep(OP_EVERY).await;
    }
    let converged = converge(&registrant, &watches, &live, &services, bound * 3).await;
    let end = usage();
    let row = Row {
        kind,
        secs: total.as_secs(),
        restarts,
        ops,
        errors: *errors.lock().unwrap(),
        start: start.unwrap_or(end),
        end,
        rss_max_kib,
        converged,
        bound,
    };
    drop(watches);
    for (_, r) in live {
        let _ = r.deregister().await;
    }
    let _ = registrant.shutdown().await;
    let _ = watcher.shutdown().await;
    row
}

/// Waits until every watch and a fresh listing hold exactly the live registrations;
/// `None` if they did not within `deadline`.
async fn converge(
    registrant: &Discovery,
    watches: &[Watch],
    live: &BTreeMap<String, Registration>,
    services: &[ServiceName],
    deadline: Duration,
) -> Option<Duration> {
    let began = Instant::now();
    let truth = |service: &ServiceName| -> BTreeSet<String> {
        live.iter()
            .filter(|(_, r)| &r.instance().service == service)
            .map(|(id, _)| id.clone())
            .collect()
    };
    loop {
        let mut ok = watches.iter().all(|w| w.ids() == truth(&w.service));
        for s in services {
            if !ok {
                break;
            }
            ok = match registrant.watcher.instances(s).await {
                Ok(snap) => {
                    let listed: BTreeSet<String> = snap
                        .instances
                        .iter()
                        .map(|i| i.id.as_str().to_owned())
                        .collect();
                    listed == truth(s)
                }
                Err(_) => false,
            };
        }
        if ok {
            return Some(began.elapsed());
        }
        if began.elapsed() > deadline {
            for w in watches {
                let (have, want) = (w.ids(), truth(&w.service));
                eprintln!(
                    "{}: watcher holds {} extra {:?}, misses {:?}",
                    w.service,
                    have.len(),
                    have.difference(&want).collect::<Vec<_>>(),
                    want.difference(&have).collect::<Vec<_>>()
                );
            }
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(default), Duration::from_secs)
    };
    let total = secs("SOAK_SECS", 600);
    let restart_every = secs("SOAK_RESTART_SECS", 120);
    let mut kinds: Vec<Kind> = std::env::args()
        .skip(1)
        .filter_map(|a| match a.as_str() {
            "zookeeper" => Some(Kind::ZooKeeper),
            "etcd" => Some(Kind::Etcd),
            "consul" => Some(Kind::Consul),
            _ => None,
        })
        .collect();
    if kinds.is_empty() {
        kinds = vec![Kind::ZooKeeper, Kind::Etcd, Kind::Consul];
    }
    let mut rows = Vec::new();
    for kind in kinds {
        let row = soak(kind, total, restart_every).await;
        rows.push(row);
    }
    println!(
        "| backend | minutes | restarts | operations | errors seen | RSS start → end (max), MiB | fds start → end | tokio tasks start → end | converged after (÷ bound) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let converged = match r.converged {
            Some(d) => format!(
                "{:.1} s ({:.2})",
                d.as_secs_f64(),
                d.as_secs_f64() / r.bound.as_secs_f64()
            ),
            None => "**no**".into(),
        };
        println!(
            "| {:?} | {:.1} | {} | {} | {} | {} → {} ({}) | {} → {} | {} → {} | {} |",
            r.kind,
            r.secs as f64 / 60.0,
            r.restarts,
            r.ops,
            r.errors,
            mib(r.start.rss_kib),
            mib(r.end.rss_kib),
            mib(r.rss_max_kib),
            r.start.fds,
            r.end.fds,
            r.start.tasks,
            r.end.tasks,
            converged
        );
    }
    if rows.iter().any(|r| r.converged.is_none()) {
        eprintln!("some watchers did not converge");
        std::process::exit(1);
    }
}
