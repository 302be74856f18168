//! One heartbeat per client (`heartbeat.rs`): many instances, one TTL check; a crashed
//! client takes all its instances out of the passing set within its TTL, Consul reaps them
//! after `deregister_critical_after`, and a heartbeat service deregistered behind the
//! client's back comes back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{InstanceSet, Registrar, RegistrationStatus, ServiceName, Watcher};
use waypost_testkit::conformance::{wait_for_set, Namespace};
use waypost_testkit::ConsulServer;

mod common;

const TTL: Duration = Duration::from_secs(3);
const T: Duration = Duration::from_secs(15);
const N: usize = 40;

async fn client(server: &ConsulServer) -> Arc<ConsulDiscovery> {
    client_with_ttl(server, TTL).await
}

async fn client_with_ttl(server: &ConsulServer, ttl: Duration) -> Arc<ConsulDiscovery> {
    connect(config(server, ttl)).await
}

fn config(server: &ConsulServer, ttl: Duration) -> ConsulConfig {
    ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_ttl(ttl)
        .with_request_timeout(Duration::from_secs(2))
}

async fn connect(config: ConsulConfig) -> Arc<ConsulDiscovery> {
    Arc::new(ConsulDiscovery::connect(config).await.expect("connect"))
}

/// The ID of the client's heartbeat service on the agent (there is one client).
async fn heartbeat_service(server: &ConsulServer) -> String {
    let hb = checks_of(server, "waypost-heartbeat").await;
    hb[0].0.trim_end_matches(":ttl").to_string()
}

/// Deregisters instance `id` of `svc`, then the heartbeat, behind the client's back. The
/// instance first: with the heartbeat gone first, its alias check would go critical before
/// this removed it.
async fn deregister_with_heartbeat(server: &ConsulServer, svc: &ServiceName, id: &str) {
    let hb_service = heartbeat_service(server).await;
    for service in [format!("{svc}:{id}"), hb_service] {
        common::agent_put(server, &format!("service/deregister/{service}"), None).await;
    }
}

async fn get(server: &ConsulServer, path: &str) -> serde_json::Value {
    let url = format!("http://{}{path}", server.address());
    serde_json::from_slice(&reqwest::get(url).await.unwrap().bytes().await.unwrap()).unwrap()
}

/// The agent's checks of service `service`, as (check ID, type, status).
async fn checks_of(server: &ConsulServer, service: &str) -> Vec<(String, String, String)> {
    let checks = get(server, "/v1/agent/checks").await;
    let mut out: Vec<_> = checks
        .as_object()
        .unwrap()
        .values()
        .filter(|c| c["ServiceName"] == service)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("CheckID"), s("Type"), s("Status"))
        })
        .collect();
    out.sort();
    out
}

/// Waits until `cond` holds for what `read` returns, or fails naming `what`.
async fn until<F, Fut, V>(within: Duration, what: &str, read: F, cond: impl Fn(&V) -> bool) -> V
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = V>,
    V: std::fmt::Debug,
{
    let deadline = Instant::now() + within;
    loop {
        let v = read().await;
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: last {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Many instances of one client cost one TTL check (the heartbeat's) and an alias check
/// each; the heartbeat service is in the catalog but not in `services()`; when the client
/// crashes, every instance leaves the passing set within the TTL (not at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_client_takes_all_its_instances_out_within_the_ttl() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("hb");
    let victim = client(&server).await;
    let watcher = client(&server).await;
    let mut regs = Vec::new();
    for n in 0..N {
        regs.push(
            victim
                .register(ns.instance(&svc, &format!("i{n}"), 1000 + n as u16))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        victim.heartbeat_registrations(),
        1,
        "one heartbeat for {N} instances"
    );
    assert_eq!(watcher.heartbeat_registrations(), 0, "a watcher has none");
    let checks = checks_of(&server, svc.as_str()).await;
    assert_eq!(checks.len(), N);
    assert!(
        checks
            .iter()
            .all(|(_, ty, st)| ty == "alias" && st == "passing"),
        "{checks:?}"
    );
    let heartbeat = checks_of(&server, "waypost-heartbeat").await;
    assert_eq!(heartbeat.len(), 1, "{heartbeat:?}");
    assert_eq!(
        (heartbeat[0].1.as_str(), heartbeat[0].2.as_str()),
        ("ttl", "passing")
    );
    let catalog = get(&server, "/v1/catalog/services").await;
    assert!(catalog.get("waypost-heartbeat").is_some());
    let listed = watcher.services().await.unwrap();
    assert!(listed.contains(&svc));
    assert!(!listed.iter().any(|s| s.as_str() == "waypost-heartbeat"));

    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "all", |s| s.len() == N).await;
    // Several keep-alive rounds: the instances stay (one pass per round keeps them all).
    tokio::time::sleep(TTL * 2).await;
    assert!(regs
        .iter()
        .all(|r| r.current_status() == RegistrationStatus::Registered));
    assert_eq!(
        get(&server, &format!("/v1/health/service/{svc}?passing=true"))
            .await
            .as_array()
            .unwrap()
            .len(),
        N
    );

    waypost_core::backend::TestHooks::crash(&*victim);
    for r in regs {
        std::mem::forget(r);
    }
    let crashed = Instant::now();
    wait_for_set(
        &mut watch,
        &mut set,
        TTL + Duration::from_secs(4),
        "all gone",
        |s| s.is_empty(),
    )
    .await;
    let after = crashed.elapsed();
    assert!(
        after >= TTL / 2,
        "gone after {after:?}, before the TTL could run out"
    );
    let checks = checks_of(&server, svc.as_str()).await;
    assert!(
        checks.iter().all(|(_, _, st)| st == "critical"),
        "{checks:?}"
    );
}

/// `deregister_critical_after` still removes a crashed client's instances (a minute before
/// their heartbeat service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_clients_instances_are_reaped() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("reap");
    let victim = client(&server).await;
    for n in 0..3 {
        std::mem::forget(
            victim
                .register(ns.instance(&svc, &format!("r{n}"), 1))
                .await
                .unwrap(),
        );
    }
    waypost_core::backend::TestHooks::crash(&*victim);
    // Consul's floor of 1 minute, then its reaper's period (30 s in 1.8).
    let services = || async {
        get(&server, "/v1/agent/services")
            .await
            .as_object()
            .unwrap()
            .values()
            .map(|s| s["Service"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let left = until(
        Duration::from_secs(120),
        "instances reaped",
        services,
        |s| !s.iter().any(|n| n == svc.as_str()),
    )
    .await;
    // The heartbeat goes a minute later: nothing came back passing meanwhile.
    assert!(left.iter().any(|n| n == "waypost-heartbeat"), "{left:?}");
    assert!(get(&server, &format!("/v1/health/service/{svc}"))
        .await
        .as_array()
        .unwrap()
        .is_empty());
}

/// A heartbeat service deregistered behind the client's back is registered again by the
/// next keep-alive; the instances stay registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_deregistered_behind_our_back_comes_back() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("hbback");
    let c = client(&server).await;
    let reg = c.register(ns.instance(&svc, "a", 1)).await.unwrap();
    let hb_service = heartbeat_service(&server).await;
    let mut statuses = reg.status();
    statuses.borrow_and_update();
    common::agent_put(&server, &format!("service/deregister/{hb_service}"), None).await;
    until(
        T,
        "heartbeat back",
        || checks_of(&server, "waypost-heartbeat"),
        |c| c.len() == 1 && c[0].2 == "passing",
    )
    .await;
    assert_eq!(reg.current_status(), RegistrationStatus::Registered);
    // The alias check follows the heartbeat; the catalog follows the agent's state (its
    // sync runs in the background).
    let passing = format!("/v1/health/service/{svc}?passing=true");
    until(
        T,
        "the instance passing",
        || get(&server, &passing),
        |p| p.as_array().map_or(0, Vec::len) == 1,
    )
    .await;
    // Registered once more (not again for a read-back that overlapped that registration),
    // and not on every keep-alive round: three rounds go by.
    tokio::time::sleep(TTL).await;
    assert_eq!(c.heartbeat_registrations(), 2);
    // No outage either: the keep-alive's unknown-check answer is handled, not reported.
    assert!(
        !statuses.has_changed().unwrap(),
        "the registration left Registered: {:?}",
        *statuses.borrow()
    );
    // At shutdown the heartbeat goes with the instance.
    c.shutdown().await.unwrap();
    assert!(checks_of(&server, "waypost-heartbeat").await.is_empty());
}

/// The heartbeat and an instance deregistered behind the client's back at once: whether
/// the keeper's read-back or the keep-alive notices first, the heartbeat is registered
/// before the instance, which never shows a critical check on its way back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_instance_deregistered_together_come_back_in_order() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("hbboth");
    let c = client(&server).await;
    for round in 0..5 {
        let id = format!("r{round}");
        let reg = c.register(ns.instance(&svc, &id, 1)).await.unwrap();
        let recorder = common::CheckRecorder::start(&server, svc.as_str());
        deregister_with_heartbeat(&server, &svc, &id).await;
        // Both back on the agent; then the catalog is watched for one more keep-alive
        // interval (a critical check would reach it with the agent's next sync).
        until(
            T,
            "the heartbeat and the instance back on the agent",
            || checks_of(&server, svc.as_str()),
            |checks| checks.len() == 1 && c.heartbeat_registrations() > 1 + round,
        )
        .await;
        tokio::time::sleep(TTL / 3).await;
        recorder
            .never_critical(&format!("round {round}: the instance on its way back"))
            .await;
        reg.deregister().await.unwrap();
    }
}

/// The heartbeat and an instance deregistered behind the client's back while the
/// keep-alive passes nothing (a test hook): the keeper's read-back alone notices, and the
/// heartbeat is registered again before the instance, whose alias check never goes
/// critical. (With both running, the keep-alive often gets there first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_the_read_back_misses_is_registered_before_the_instance() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("hbread");
    // A TTL that leaves room for the keeper's round (a third of it) while passes are held.
    let ttl = Duration::from_secs(9);
    let c = client_with_ttl(&server, ttl).await;
    let reg = c.register(ns.instance(&svc, "a", 1)).await.unwrap();
    c.hold_heartbeat_passes(true);
    let recorder = common::CheckRecorder::start(&server, svc.as_str());
    deregister_with_heartbeat(&server, &svc, "a").await;
    let held_since = Instant::now();
    until(
        T,
        "the keeper registered the heartbeat again, and the instance",
        || checks_of(&server, svc.as_str()),
        |checks| checks.len() == 1 && c.heartbeat_registrations() == 2,
    )
    .await;
    let held_for = held_since.elapsed();
    c.hold_heartbeat_passes(false);
    assert!(
        held_for < ttl,
        "the keeper took {held_for:?}, past the TTL: the heartbeat may have run out"
    );
    // One more keep-alive interval of catalog states (a critical check reaches the
    // catalog with the agent's next sync).
    tokio::time::sleep(ttl / 3).await;
    recorder
        .never_critical("the instance coming back after its heartbeat")
        .await;
    assert_eq!(reg.current_status(), RegistrationStatus::Registered);
    reg.deregister().await.unwrap();
}

/// With `read_back_every = 10` the keeper reads the agent's services back only every tenth
/// round; a keep-alive that finds the heartbeat gone asks for a read-back at once, so an
/// instance the agent lost with it (an agent restart, a deregistration behind our back)
/// comes back within a few rounds, not ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_found_gone_asks_for_a_read_back_at_once() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("hbrb");
    let c = connect(config(&server, TTL).with_read_back_every(10)).await;
    let reg = c.register(ns.instance(&svc, "a", 1)).await.unwrap();
    // The register's own keeper round (a read-back: round 0) starts at once; nothing
    // outside marks its end, so a keep-alive interval goes by before the removal (else
    // that round would heal it and the test would prove nothing).
    tokio::time::sleep(TTL / 3).await;
    deregister_with_heartbeat(&server, &svc, "a").await;
    let gone = Instant::now();
    until(
        T,
        "the heartbeat and the instance back on the agent",
        || checks_of(&server, svc.as_str()),
        |checks| checks.len() == 1 && c.heartbeat_registrations() == 2,
    )
    .await;
    let took = gone.elapsed();
    // Ten rounds would be 10 s; the keep-alive notices within a round, the read-back is
    // the round after.
    let bound = TTL / 3 * 4;
    assert!(
        took <= bound,
        "the instance came back {took:?} after it was removed (bound {bound:?}): the read-back waited for its turn"
    );
    assert_eq!(reg.current_status(), RegistrationStatus::Registered);
    reg.deregister().await.unwrap();
}
