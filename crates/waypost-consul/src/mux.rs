//! The change signal of **shared watches**: the watches of one client beyond its
//! per-service blocking queries (see `budget.rs`) wait on it instead of holding a
//! connection each.
//!
//! Two blocking queries cover every change a `health/service/{name}?passing=true` listing
//! can show (measured on Consul 1.8.7, see the crate docs, "Many watched services"):
//!
//! - `/v1/catalog/services`: its index moves on every service registration, update and
//!   deregistration (also of services with no check). Its answer does not say which
//!   service changed in a way a listing shows (meta, address, port), so a move wakes
//!   **every** shared watch;
//! - `/v1/health/state/any`: its index moves on every check change; its answer lists each
//!   check with its service, so a move wakes only the watches of the services whose
//!   checks changed (node checks, with no service, wake every shared watch).
//!
//! A woken watch makes one targeted read of its service (`/v1/health/service/{name}`,
//! within the watch reads' budget) and reports a listing only when the service's own
//! index moved. A node-only change (a catalog node's address) moves neither index: every
//! shared watch also reads its service once per `wait` (60 s by default).
//!
//! When the signal loses the agent (or starts, or starts again), it wakes every shared
//! watch: their reads fail while the agent is away (one `Stale` each) and cover what
//! happened in between once it is back.
//!
//! **Blocking KV reads** (configuration watches, leader feeds, lock waits) beyond the
//! per-key permits wait on the signal of their KV prefix ([`Mux::kv`]): one blocking
//! query on `/v1/kv/{prefix}/?keys&separator=/`, whose index is the highest of every key
//! below the prefix and of its deleted keys (measured on Consul 1.8.7: a write or delete
//! three levels down moves it), so any move wakes every waiter of the prefix, each of
//! which reads its own key (see `Agent::get_blocking`).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use waypost_core::backend::BackoffOptions;
use waypost_core::{Error, ServiceName};

use crate::client::Agent;

/// The change signal of one client's shared watches. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Mux {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("watches", &self.inner.all.receiver_count())
            .finish_non_exhaustive()
    }
}

/// What a signal watches.
enum Source {
    /// Services: the catalog's and the checks' indexes.
    Services,
    /// Every key below a KV prefix: the path `/v1/kv/{prefix}/`.
    Kv(String),
}

struct Inner {
    agent: Agent,
    source: Source,
    wait: Duration,
    backoff: BackoffOptions,
    /// Per watched service, what wakes its watches.
    services: Mutex<HashMap<ServiceName, Weak<watch::Sender<u64>>>>,
    /// What wakes every shared watch.
    all: watch::Sender<u64>,
    running: Mutex<bool>,
}

/// A shared watch's subscription to the signal.
pub(crate) struct Ticket {
    mine: watch::Receiver<u64>,
    _tx: Arc<watch::Sender<u64>>,
    all: watch::Receiver<u64>,
    inner: Arc<Inner>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let lanes = self.inner.agent.lanes();
        lanes.shared_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Ticket {
    /// Waits until the service may have changed, or `every` passed (the safety net);
    /// what happened before this call returns is seen by the read that follows it.
    pub(crate) async fn changed(&mut self, every: Duration) {
        tokio::select! {
            _ = self.mine.changed() => {}
            _ = self.all.changed() => {}
            _ = tokio::time::sleep(every) => {}
        }
        self.mine.borrow_and_update();
        self.all.borrow_and_update();
    }
}

impl Mux {
    /// The change signal of `agent`'s shared service watches.
    pub(crate) fn new(agent: &Agent, wait: Duration, backoff: BackoffOptions) -> Self {
        Self::of(Source::Services, agent, wait, backoff)
    }

    /// The change signal of every key below the KV prefix `root` (with its `/`), for the
    /// blocking reads of that prefix that hold no per-key permit.
    pub(crate) fn kv(agent: &Agent, root: &str, wait: Duration) -> Self {
        let path = format!("/v1/kv/{root}");
        Self::of(Source::Kv(path), agent, wait, agent.backoff())
    }

    fn of(source: Source, agent: &Agent, wait: Duration, backoff: BackoffOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                agent: agent.clone(),
                source,
                wait,
                backoff,
                services: Mutex::default(),
                all: watch::Sender::new(0),
                running: Mutex::new(false),
            }),
        }
    }

    /// Subscribes a shared watch of `service`; starts the signal if it is not running.
    /// Take it before the watch's listing: a change after it wakes the watch.
    pub(crate) fn ticket(&self, service: &ServiceName) -> Ticket {
        let tx = {
            let mut services = self
                .inner
                .services
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            services.retain(|_, w| w.strong_count() > 0);
            match services.get(service).and_then(Weak::upgrade) {
                Some(tx) => tx,
                None => {
                    let tx = Arc::new(watch::Sender::new(0));
                    services.insert(service.clone(), Arc::downgrade(&tx));
                    tx
                }
            }
        };
        let ticket = Ticket {
            mine: tx.subscribe(),
            _tx: tx,
            all: self.subscribe(),
            inner: self.inner.clone(),
        };
        self.inner
            .agent
            .lanes()
            .shared_watches
            .fetch_add(1, Ordering::Relaxed);
        ticket
    }

    /// A receiver that changes on every wake of every waiter; starts the signal if it is
    /// not running. The signal runs while any receiver lives.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        let rx = self.inner.all.subscribe();
        let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if !*running {
            *running = true;
            tokio::spawn(run(self.inner.clone()));
        }
        rx
    }
}

impl Inner {
    fn wake_all(&self) {
        self.all.send_modify(|n| *n += 1);
    }

    fn wake(&self, service: &str) {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(name) = ServiceName::new(service) else {
            return;
        };
        if let Some(tx) = services.get(&name).and_then(Weak::upgrade) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Whether the signal may stop (no shared watch left); if so, it is marked stopped.
    fn stop(&self) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if self.all.receiver_count() == 0 {
            *running = false;
            true
        } else {
            false
        }
    }

    fn wait(&self) -> Duration {
        self.wait.mul_f64(rand::thread_rng().gen_range(0.9..=1.0))
    }
}

/// The signal's task: both blocking queries, until no shared watch is left.
async fn run(inner: Arc<Inner>) {
    let mut backoff = inner.backoff.backoff();
    let mut generation = inner.agent.generation();
    generation.borrow_and_update();
    loop {
        let started = tokio::time::Instant::now();
        let baselines = AtomicUsize::new(0);
        let e = tokio::select! {
            e = signal(&inner, &baselines) => e,
            e = inner.agent.lost() => e,
            _ = generation.changed() => Error::unavailable("consul: connections dropped (test hook)"),
            _ = inner.all.closed() => {
                if inner.stop() {
                    return;
                }
                continue;
            }
        };
        tracing::debug!("consul: the shared watches' change signal lost the agent: {e}");
        inner.wake_all();
        if started.elapsed() > Duration::from_secs(1) {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = inner.all.closed() => {
                if inner.stop() {
                    return;
                }
            }
        }
    }
}

/// The signal's blocking queries, until one fails.
async fn signal(inner: &Inner, baselines: &AtomicUsize) -> Error {
    match &inner.source {
        Source::Services => tokio::select! {
            e = catalog(inner, baselines) => e,
            e = checks(inner, baselines) => e,
        },
        Source::Kv(path) => kv(inner, path).await,
    }
}

/// `/v1/kv/{prefix}/?keys&separator=/`: any move wakes every waiter (as does its first
/// answer: what changed before the signal started is read).
async fn kv(inner: &Inner, path: &str) -> Error {
    let query = || vec![("keys", String::new()), ("separator", "/".to_string())];
    let mut index = 0;
    loop {
        let got = match inner
            .agent
            .blocking_get("KV change signal", path, query(), index, inner.wait())
            .await
        {
            Ok((_, got)) => got.max(1),
            Err(e) => return e.into(),
        };
        if got != index {
            inner.wake_all();
        }
        index = got;
    }
}

/// Once both queries have their first answer, every shared watch reads once: what
/// changed between its listing and the signal's start is seen.
fn baseline(inner: &Inner, baselines: &AtomicUsize) {
    if baselines.fetch_add(1, Ordering::AcqRel) == 1 {
        inner.wake_all();
    }
}

/// `/v1/catalog/services`: any move wakes every shared watch.
async fn catalog(inner: &Inner, baselines: &AtomicUsize) -> Error {
    let mut index = 0;
    loop {
        let got = match inner
            .agent
            .blocking_get(
                "catalog change signal",
                "/v1/catalog/services",
                Vec::new(),
                index,
                inner.wait(),
            )
            .await
        {
            Ok((_, got)) => got.max(1),
            Err(e) => return e.into(),
        };
        if index == 0 {
            baseline(inner, baselines);
        } else if got != index {
            inner.wake_all();
        }
        index = got;
    }
}

/// One check of `/v1/health/state/any`, as far as the signal cares.
#[derive(serde::Deserialize, Hash)]
struct Check {
    #[serde(rename = "Node", default)]
    node: String,
    #[serde(rename = "CheckID", default)]
    check: String,
    #[serde(rename = "ServiceName", default)]
    service: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// Per service (`""`: node checks), a fingerprint of its checks, whatever their order.
fn fingerprints(checks: &[Check]) -> HashMap<&str, (u64, usize)> {
    let mut out: HashMap<&str, (u64, usize)> = HashMap::new();
    for c in checks {
        let mut h = DefaultHasher::new();
        c.hash(&mut h);
        let e = out.entry(c.service.as_str()).or_default();
        e.0 ^= h.finish();
        e.1 += 1;
    }
    out
}

/// `/v1/health/state/any`: a move wakes the watches of the services whose checks changed.
async fn checks(inner: &Inner, baselines: &AtomicUsize) -> Error {
    let op = "check change signal";
    let mut index = 0;
    let mut last: HashMap<String, (u64, usize)> = HashMap::new();
    loop {
        let (body, got) = match inner
            .agent
            .blocking_get(op, "/v1/health/state/any", Vec::new(), index, inner.wait())
            .await
        {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let got = got.max(1);
        if got == index {
            continue;
        }
        let checks: Vec<Check> = match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(source) => return crate::error::ConsulError::Decode { op, source }.into(),
        };
        let now = fingerprints(&checks);
        if index == 0 {
            baseline(inner, baselines);
        } else if got < index || now.get("") != last.get("") {
            // A restarted agent, or a node check: anything may have changed.
            inner.wake_all();
        } else {
            for (service, fp) in &now {
                if last.get(*service) != Some(fp) {
                    inner.wake(service);
                }
            }
            for service in last.keys() {
                if !now.contains_key(service.as_str()) {
                    inner.wake(service);
                }
            }
        }
        last = now.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        index = got;
    }
}
