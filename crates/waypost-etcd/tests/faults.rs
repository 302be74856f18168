//! The fault tests against real etcd: a killed and a paused registrant process,
//! a killed and restarted server, compaction while a watch is disconnected, and a
//! 3-member cluster losing its leader.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use waypost_core::backend::TestHooks;
use waypost_core::{Instance, InstanceSet, Registrar, RegistrationStatus, WatchEvent, Watcher};
use waypost_testkit::conformance::{next_event, wait_for_set, Namespace};
use waypost_testkit::EtcdCluster;

const T: Duration = Duration::from_secs(15);

/// Not a test of its own: the registrant process the fault tests start, kill and pause.
/// Does nothing unless started by them (with `WAYPOST_ETCD_CHILD_URL` set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for the fault tests"]
async fn child_registrant() {
    let Ok(url) = std::env::var("WAYPOST_ETCD_CHILD_URL") else {
        return;
    };
    let service = std::env::var("WAYPOST_ETCD_CHILD_SERVICE").unwrap();
    let d = common::connect(&url).await;
    let reg = d
        .register(Instance::parse(&service, "child", "127.0.0.1", 7000).unwrap())
        .await
        .expect("child registers");
    eprintln!("child registered: {reg:?}");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

fn spawn_child(url: &str, service: &str) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_registrant", "--exact", "--ignored", "--nocapture"])
        .env("WAYPOST_ETCD_CHILD_URL", url)
        .env("WAYPOST_ETCD_CHILD_SERVICE", service)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the registrant process")
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_registrant_key_gone_after_lease_ttl() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("killed");
    let w = common::connect(&server.url()).await;
    let mut watch = w.watch(&svc);
    let mut set = InstanceSet::new();
    let mut child = spawn_child(&server.url(), svc.as_str());
    wait_for_set(&mut watch, &mut set, T, "child registered", |s| {
        s.len() == 1
    })
    .await;

    child.start_kill().unwrap(); // SIGKILL: no guard, no revoke
    child.wait().await.unwrap();
    let killed = Instant::now();
    wait_for_set(&mut watch, &mut set, T, "child's key gone", |s| {
        s.is_empty()
    })
    .await;
    let after = killed.elapsed();
    tracing::info!(?after, "killed registrant's key expired");
    // Gone by lease expiry, not by anything the dead process did: it took about a TTL.
    assert!(
        after >= common::LEASE_TTL / 2,
        "gone after {after:?}: too early for a lease expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_registrant_past_ttl_reregisters_on_resume() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("paused");
    let w = common::connect(&server.url()).await;
    let mut watch = w.watch(&svc);
    let mut set = InstanceSet::new();
    let mut child = spawn_child(&server.url(), svc.as_str());
    wait_for_set(&mut watch, &mut set, T, "child registered", |s| {
        s.len() == 1
    })
    .await;
    let pid = child.id().unwrap();

    signal(pid, "-STOP");
    wait_for_set(
        &mut watch,
        &mut set,
        T,
        "paused child's lease expired",
        |s| s.is_empty(),
    )
    .await;
    signal(pid, "-CONT");
    wait_for_set(&mut watch, &mut set, T, "child registered again", |s| {
        s.len() == 1
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_registrations_and_watches_recover() {
    common::init_tracing();
    let Some(mut server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("restart");
    let d = common::connect(&server.url()).await;
    let w = common::connect(&server.url()).await;
    let a = ns.instance(&svc, "a", 1);
    let reg = d.register(a.clone()).await.unwrap();
    let mut status = reg.status();
    let mut watch = w.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a listed", |s| s.contains(&a.id)).await;

    server.kill().unwrap();
    let ev = tokio::time::timeout(T, async {
        loop {
            let ev = watch.next().await.unwrap().unwrap();
            if matches!(ev, WatchEvent::Stale { .. }) {
                break ev;
            }
        }
    })
    .await
    .expect("Stale while the server is down");
    set.apply(&ev);
    tokio::time::timeout(T, status.wait_for(|s| *s != RegistrationStatus::Registered))
        .await
        .expect("registration left Registered while the server was down")
        .unwrap();

    server.restart().await.unwrap();
    let ev = tokio::time::timeout(T, async {
        loop {
            let ev = watch.next().await.unwrap().unwrap();
            set.apply(&ev);
            if matches!(ev, WatchEvent::Resynced(_)) {
                break;
            }
        }
    })
    .await;
    ev.expect("Resynced after the restart");
    tokio::time::timeout(T, status.wait_for(|s| *s == RegistrationStatus::Registered))
        .await
        .expect("registration back to Registered")
        .unwrap();
    wait_for_set(&mut watch, &mut set, T, "a listed after restart", |s| {
        s.get(&a.id) == Some(&a)
    })
    .await;
    let b = ns.instance(&svc, "b", 2);
    let _rb = d.register(b.clone()).await.expect("register after restart");
    wait_for_set(&mut watch, &mut set, T, "b seen after restart", |s| {
        s.contains(&b.id)
    })
    .await;
    assert_eq!(
        InstanceSet::from_snapshot(&w.instances(&svc).await.unwrap()),
        InstanceSet::from_snapshot(&set.to_snapshot(svc.clone())),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_watch_disconnected_resyncs_to_the_truth() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("compact");
    let d = common::connect(&server.url()).await;
    let w = common::connect(&server.url()).await;
    let a = ns.instance(&svc, "a", 1);
    let ra = d.register(a.clone()).await.unwrap();
    let mut watch = w.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a listed", |s| s.contains(&a.id)).await;

    // Changes the watch does not read (its stream stalls), then a compaction past them,
    // then the watch's connection drops: it cannot resume from its last revision.
    w.stall_watches(true);
    let b = ns.instance(&svc, "b", 2);
    let _rb = d.register(b.clone()).await.unwrap();
    ra.deregister().await.unwrap();
    let mut admin = common::admin(&[server.endpoint()]).await;
    let rev = admin
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    admin.compact(rev, None).await.unwrap();
    w.drop_connections();
    w.stall_watches(false);

    let mut seen = Vec::new();
    tokio::time::timeout(T, async {
        loop {
            let ev = watch.next().await.unwrap().unwrap();
            set.apply(&ev);
            let done = matches!(ev, WatchEvent::Resynced(_));
            seen.push(ev);
            if done {
                break;
            }
        }
    })
    .await
    .expect("Resynced after compaction");
    assert!(
        matches!(seen.first(), Some(WatchEvent::Stale { .. })),
        "Stale before Resynced, got {seen:?}"
    );
    assert!(
        set.contains(&b.id) && !set.contains(&a.id),
        "resynced set is the truth"
    );
    // And the watch goes on.
    let c = ns.instance(&svc, "c", 3);
    let _rc = d.register(c.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, T, "c after resync", |s| {
        s.contains(&c.id)
    })
    .await;
}

/// Without compaction, a dropped stream resumes from the last revision: no Stale, no
/// loss, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_stream_resumes_without_loss_or_duplicates() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("resume");
    let d = common::connect(&server.url()).await;
    let w = common::connect(&server.url()).await;
    let mut watch = w.watch(&svc);
    let WatchEvent::Snapshot(first) = next_event(&mut watch, T).await else {
        panic!("first event must be a Snapshot");
    };
    let mut set = InstanceSet::from_snapshot(&first);
    let a = ns.instance(&svc, "a", 1);
    let ra = d.register(a.clone()).await.unwrap();
    let b = ns.instance(&svc, "b", 2);
    let _rb = d.register(b.clone()).await.unwrap();
    ra.deregister().await.unwrap();
    w.drop_connections();
    let c = ns.instance(&svc, "c", 3);
    let _rc = d.register(c.clone()).await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, T, "c seen", |s| s.contains(&c.id)).await;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added { instance, .. } => format!("+{}", instance.id),
            WatchEvent::Removed { id, .. } => format!("-{id}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["+a", "+b", "-a", "+c"]);
    let revs: Vec<u64> = events.iter().filter_map(WatchEvent::revision).collect();
    assert!(
        revs.windows(2).all(|p| p[0] < p[1]),
        "revisions increase: {revs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_killed_registration_and_watch_keep_working() {
    common::init_tracing();
    if waypost_testkit::server::require(waypost_testkit::ServerKind::Etcd).is_none() {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await.expect("3-member cluster");
    let ns = Namespace::new();
    let svc = ns.service("cluster");
    let d = common::connect(&cluster.url()).await;
    let w = common::connect(&cluster.url()).await;
    let a = ns.instance(&svc, "a", 1);
    let reg = d.register(a.clone()).await.unwrap();
    let mut watch = w.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a listed", |s| s.contains(&a.id)).await;

    let leader = cluster.wait_leader(T).await.unwrap();
    cluster.member(leader).kill().unwrap();
    cluster
        .wait_new_leader(leader, T)
        .await
        .expect("a new leader");

    // Registration goes on: a new one succeeds (retrying while the election settles).
    let b = ns.instance(&svc, "b", 2);
    let deadline = Instant::now() + T;
    let _rb = loop {
        match d.register(b.clone()).await {
            Ok(r) => break r,
            Err(e) if e.is_temporary() && Instant::now() < deadline => {
                tracing::info!("register during failover: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("register after leader loss: {e}"),
        }
    };
    wait_for_set(&mut watch, &mut set, T, "b seen after leader loss", |s| {
        s.contains(&b.id) && s.contains(&a.id)
    })
    .await;
    reg.wait_status(T, |s| *s == RegistrationStatus::Registered)
        .await
        .expect("a stays (or is back) Registered");
    // The keep-alive outlives a few TTLs on the new leader: for two TTLs the watch
    // reports no removal of either instance.
    let window = tokio::time::Instant::now() + common::LEASE_TTL * 2;
    while let Ok(ev) = tokio::time::timeout_at(window, watch.next()).await {
        let ev = ev.expect("watch open").expect("no watch error");
        assert!(
            !matches!(&ev, WatchEvent::Removed { id, .. } if *id == a.id || *id == b.id),
            "an instance left after the leader change: {ev:?}"
        );
        set.apply(&ev);
    }
    assert!(set.contains(&a.id) && set.contains(&b.id));
    let listed = w.instances(&svc).await.unwrap();
    assert!(listed.get(&a.id).is_some() && listed.get(&b.id).is_some());
}

/// An idle watch on a healthy server probes it (every `probe_interval`, 1 s here) and stays
/// live: no `Stale` over several probe rounds, and the next change still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_on_a_healthy_server_stays_live() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("idle");
    let d = common::connect(&server.url()).await;
    let mut watch = d.watch(&svc);
    let mut set = InstanceSet::new();
    let first = next_event(&mut watch, T).await;
    assert!(matches!(first, WatchEvent::Snapshot(_)), "{first:?}");
    set.apply(&first);
    match tokio::time::timeout(Duration::from_secs(4), watch.next()).await {
        Err(_) => {} // nothing happened: right
        Ok(ev) => panic!("an idle watch of a healthy server yielded {ev:?}"),
    }
    let a = ns.instance(&svc, "a", 1);
    let _ra = d.register(a.clone()).await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, T, "a after the idle time", |s| {
        s.contains(&a.id)
    })
    .await;
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, WatchEvent::Stale { .. } | WatchEvent::Resynced(_))),
        "no outage: {events:?}"
    );
}

/// A `register` that fails while the server is paused has an unknown outcome: etcd may
/// apply the put later (it waited in the server's socket), bound to the client's live
/// lease, after the client found the key absent. The client goes on looking for it for
/// `UNCERTAIN_FOR` lease TTLs and removes it. The late put is played here by a raw put of
/// the same key under the client's lease, after the client's own clean-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_put_with_an_unknown_outcome_is_removed() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("late");
    // A lease that outlives the pause: the late put lands under the same session.
    let d = waypost_etcd::EtcdDiscovery::connect(
        common::config(&server.url()).with_lease_ttl(Duration::from_secs(6)),
    )
    .await
    .unwrap();
    let anchor = ns.instance(&svc, "anchor", 1);
    let _anchor = d.register(anchor.clone()).await.unwrap();
    let lease = d.lease_id().expect("a lease");
    let mut admin = common::admin(&[server.endpoint()]).await;
    // `server.url()` names the prefix `/services`.
    let anchor_key = format!("/services/{svc}/anchor");
    let anchor_kv = admin
        .get(anchor_key.as_str(), None)
        .await
        .unwrap()
        .kvs()
        .first()
        .cloned()
        .expect("the anchor's key");
    let lost_key = anchor_kv.key_str().unwrap().replace("/anchor", "/lost");

    server.pause().unwrap();
    let failed = tokio::time::timeout(T, d.register(ns.instance(&svc, "lost", 2))).await;
    server.resume().unwrap();
    let err = failed
        .expect("register returns while the server is paused")
        .expect_err("register fails while the server is paused");
    assert!(err.is_temporary(), "{err}");
    // The client's own clean-up (of whatever the server applied).
    key_gone(&mut admin, &lost_key, "the leftover").await;
    // Two more keeper rounds: one ran whole with the key absent (a client that stopped
    // looking then would miss the late put).
    let rounds = d.keeper_rounds();
    let deadline = Instant::now() + T;
    while d.keeper_rounds() < rounds + 2 {
        assert!(Instant::now() < deadline, "the keeper ran no round");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.lease_id(), Some(lease), "the lease outlived the pause");
    // The late put lands, bound to the client's lease.
    let opts = etcd_client::PutOptions::new().with_lease(lease);
    admin
        .put(lost_key.as_str(), anchor_kv.value(), Some(opts))
        .await
        .unwrap();
    key_gone(&mut admin, &lost_key, "the late put").await;
    assert_eq!(
        admin.get(anchor_key.as_str(), None).await.unwrap().count(),
        1,
        "the live registration went missing"
    );
}

/// Waits (at most `T`) until `key` is gone.
async fn key_gone(admin: &mut etcd_client::Client, key: &str, what: &str) {
    let deadline = Instant::now() + T;
    while admin.get(key, None).await.unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{what} is still there after {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
