//! The faults against a real agent: a crashed registrant, a restarted agent, a
//! paused agent, a registration removed behind the client's back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{
    Instance, InstanceSet, Registrar, RegistrationStatus, Result, WatchEvent, Watcher,
};
use waypost_testkit::conformance::{wait_for_event, wait_for_set, Namespace};
use waypost_testkit::ConsulServer;

mod common;

const TTL: Duration = Duration::from_secs(3);
const T: Duration = Duration::from_secs(15);

async fn client(server: &ConsulServer) -> Arc<ConsulDiscovery> {
    let config = ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_ttl(TTL)
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1));
    Arc::new(ConsulDiscovery::connect(config).await.expect("connect"))
}

type Stream = futures::stream::BoxStream<'static, Result<WatchEvent>>;

async fn next_matching(
    watch: &mut Stream,
    set: &mut InstanceSet,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&WatchEvent) -> bool,
) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
            .expect("watch ended")
            .expect("watch error");
        set.apply(&ev);
        if pred(&ev) {
            return ev;
        }
    }
}

async fn health_raw(server: &ConsulServer, service: &str, passing: bool) -> serde_json::Value {
    let url = format!(
        "http://{}/v1/health/service/{service}{}",
        server.address(),
        if passing { "?passing=true" } else { "" }
    );
    serde_json::from_slice(&reqwest::get(url).await.unwrap().bytes().await.unwrap()).unwrap()
}

/// A registrant that crashes (heartbeats stop, nothing deregistered) leaves the watch
/// within TTL + margin, but not at once: its check goes critical, and Consul still lists
/// it as critical (it is removed after `deregister_critical_after`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_registrant_leaves_within_the_ttl() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("crash");
    let victim = client(&server).await;
    let survivor = client(&server).await;
    let watcher = client(&server).await;
    let dead = ns.instance(&svc, "dead", 1);
    let alive = ns.instance(&svc, "alive", 2);
    let dead_reg = victim.register(dead.clone()).await.unwrap();
    let _alive_reg = survivor.register(alive.clone()).await.unwrap();
    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "both", |s| s.len() == 2).await;

    waypost_core::backend::TestHooks::crash(&*victim);
    std::mem::forget(dead_reg);
    let crashed = Instant::now();
    wait_for_set(
        &mut watch,
        &mut set,
        TTL + Duration::from_secs(6),
        "dead gone",
        |s| !s.contains(&dead.id),
    )
    .await;
    let after = crashed.elapsed();
    // It stayed while its TTL ran: the heartbeats, not the crash hook, kept it.
    assert!(
        after >= TTL / 2,
        "gone after {after:?}, before its TTL could run out"
    );
    assert!(set.contains(&alive.id));
    let all = health_raw(&server, svc.as_str(), false).await;
    let statuses: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Service"]["ID"].as_str().unwrap().ends_with(":dead"))
        .flat_map(|e| e["Checks"].as_array().unwrap().clone())
        .filter(|c| c["ServiceID"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|c| c["Status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["critical"], "the crashed instance's check");
}

/// A restarted `-dev` agent comes back empty: every registration comes back by itself
/// (status through `Reregistering` or `Suspended` to `Registered`), updated instances as
/// updated, and a watcher converges to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_brings_registrations_back() {
    let Some(mut server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("restart");
    let a_client = client(&server).await;
    let b_client = client(&server).await;
    let watcher = client(&server).await;
    let mut reg_a = a_client.register(ns.instance(&svc, "a", 1)).await.unwrap();
    let updated = ns
        .instance(&svc, "a", 1)
        .with_metadata("v", "2")
        .with_weight(0);
    reg_a.update(updated.clone()).await.unwrap();
    let b = ns.instance(&svc, "b", 2).with_zone("z1");
    let reg_b = b_client.register(b.clone()).await.unwrap();
    let mut status_a = reg_a.status();
    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "both", |s| {
        s.get(&updated.id) == Some(&updated) && s.contains(&b.id)
    })
    .await;

    // Record every status the registration goes through.
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while status_a.changed().await.is_ok() {
            let s = *status_a.borrow_and_update();
            seen.push(s);
            if s == RegistrationStatus::Registered {
                break;
            }
        }
        seen
    });
    // Every state the catalog shows for the instances' checks from here on.
    let recorder = common::CheckRecorder::start(&server, svc.as_str());
    server.restart().await.unwrap();
    let seen = tokio::time::timeout(T, seen)
        .await
        .expect("status back to Registered")
        .unwrap();
    assert!(
        seen.len() >= 2 && seen.last() == Some(&RegistrationStatus::Registered),
        "statuses after the restart: {seen:?}"
    );
    reg_b
        .wait_status(T, |s| *s == RegistrationStatus::Registered)
        .await
        .unwrap();
    // The watcher saw the agent lose them (a resync or removals), then both come back. A
    // `Stale` alone proves nothing: it keeps the last known set.
    let mut gap = false;
    wait_for_event(&mut watch, &mut set, T, "a gap, then both back", |ev, s| {
        gap |= matches!(ev, WatchEvent::Resynced(_) | WatchEvent::Removed { .. });
        gap && s.get(&updated.id) == Some(&updated) && s.get(&b.id) == Some(&b)
    })
    .await;
    let truth = watcher.instances(&svc).await.unwrap();
    // They came back passing: an instance written before its client's heartbeat would
    // have shown a critical alias check ("could not be found on node") for a moment.
    let states = recorder.never_critical("an instance on its way back").await;
    assert_eq!(
        truth.instances,
        vec![updated, b],
        "check states: {states:?}"
    );
    assert!(
        states.iter().any(|(_, status, _)| status == "passing"),
        "no state recorded: {states:?}"
    );
}

/// A paused agent (accepts connections, answers nothing): the watch says `Stale` and the
/// registration `Suspended`; after resuming, `Resynced` and `Registered`, and changes flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_agent_makes_the_watch_stale_then_resyncs() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("pause");
    // The registrant's TTL outlasts the pause: a paused agent's TTL timers fire as soon as
    // it resumes, and with a shorter TTL the instance is critical until the registrant's
    // next heartbeat, so a resync in between would rightly be empty.
    let reg_client = Arc::new(
        ConsulDiscovery::connect(
            ConsulConfig::from_url(&server.url())
                .unwrap()
                .with_ttl(Duration::from_secs(30))
                .with_request_timeout(Duration::from_secs(2))
                .with_connect_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("connect"),
    );
    let watcher = client(&server).await;
    let a = ns.instance(&svc, "a", 1);
    let reg = reg_client.register(a.clone()).await.unwrap();
    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a", |s| s.contains(&a.id)).await;

    server.pause().unwrap();
    let paused = Instant::now();
    next_matching(&mut watch, &mut set, T, "Stale", |e| {
        matches!(e, WatchEvent::Stale { .. })
    })
    .await;
    // Ping every `timeout` (2 s), each failing after `timeout`.
    assert!(
        paused.elapsed() < Duration::from_secs(8),
        "{:?}",
        paused.elapsed()
    );
    assert!(set.contains(&a.id), "Stale keeps the last known set");
    reg.wait_status(T, |s| *s == RegistrationStatus::Suspended)
        .await
        .expect("Suspended while paused");

    server.resume().unwrap();
    let ev = next_matching(&mut watch, &mut set, T, "Resynced", |e| {
        matches!(e, WatchEvent::Resynced(_))
    })
    .await;
    let WatchEvent::Resynced(snap) = ev else {
        unreachable!()
    };
    assert_eq!(snap.instances, vec![a.clone()]);
    reg.wait_status(T, |s| *s == RegistrationStatus::Registered)
        .await
        .unwrap();
    let b = ns.instance(&svc, "b", 2);
    let _rb = reg_client.register(b.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, T, "b after resume", |s| {
        s.contains(&b.id)
    })
    .await;
    // The agent kept everything: keep-alives that timed out are no reason to register
    // the heartbeat again.
    assert_eq!(reg_client.heartbeat_registrations(), 1);
}

/// Deregistered behind the client's back (another tool): the heartbeat finds the check
/// unknown and registers the instance again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_behind_our_back_comes_back() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("behind");
    let c = client(&server).await;
    let a: Instance = ns.instance(&svc, "a", 1);
    let reg = c.register(a.clone()).await.unwrap();
    let mut watch = c.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a", |s| s.contains(&a.id)).await;
    common::agent_put(&server, &format!("service/deregister/{svc}:a"), None).await;
    wait_for_set(&mut watch, &mut set, T, "a removed", |s| s.is_empty()).await;
    wait_for_set(&mut watch, &mut set, T, "a back", |s| {
        s.get(&a.id) == Some(&a)
    })
    .await;
    reg.wait_status(T, |s| *s == RegistrationStatus::Registered)
        .await
        .expect("Registered again");
}

/// A `register` that fails while the agent is paused has an unknown outcome: the agent may
/// apply it after the client cleaned up. Such an entry would pass for as long as the client
/// lives (its alias check follows the client's heartbeat), so the client looks for it every
/// round and removes it. The late write is played here by a raw write of the same service
/// ID after the client's own clean-up, so the order is certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_with_an_unknown_outcome_is_removed() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("late");
    let c = client(&server).await;
    let anchor = ns.instance(&svc, "anchor", 1);
    let _anchor = c.register(anchor.clone()).await.unwrap();
    let lost = ns.instance(&svc, "lost", 2);
    server.pause().unwrap();
    let failed = tokio::time::timeout(T, c.register(lost.clone())).await;
    server.resume().unwrap();
    let err = failed
        .expect("register returns while the agent is paused")
        .expect_err("register fails while the agent is paused");
    assert!(err.is_temporary(), "{err}");
    let listed = |v: &serde_json::Value, id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["Service"]["ID"] == format!("{svc}:{id}"))
    };
    // The client's own clean-up of the leftover (whatever the agent applied). The client
    // goes on looking for it (`UNCERTAIN_FOR` TTLs): the late write lands within that.
    let deadline = Instant::now() + T;
    while listed(&health_raw(&server, svc.as_str(), false).await, "lost") {
        assert!(Instant::now() < deadline, "the leftover was never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The late write lands.
    let late = serde_json::json!({"ID": format!("{svc}:lost"), "Name": svc.as_str(), "Port": 2});
    common::agent_put(&server, "service/register", Some(late.to_string())).await;
    assert!(listed(
        &health_raw(&server, svc.as_str(), true).await,
        "lost"
    ));
    // Removed within a keep-alive round or two; the live registration stays.
    let deadline = Instant::now() + TTL * 2;
    loop {
        let all = health_raw(&server, svc.as_str(), false).await;
        if !listed(&all, "lost") {
            assert!(listed(&all, "anchor"), "the live registration went missing");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late write is still listed after {:?}",
            TTL * 2
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
