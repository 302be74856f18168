//! Real clusters, registry-specific faults (issue 13), each ending with the truth check
//! (every watcher's applied set equals what a fresh listing says) and one table per
//! backend (run with `--nocapture`):
//! - etcd: the whole cluster is blackholed for a watcher while changes are made and the
//!   history is compacted past its last revision; on heal it reports `Stale` then
//!   `Resynced` to the truth.
//! - Consul: every server is paused (SIGSTOP): the watch reports `Stale` once while the
//!   client agent cannot reach a leader and resumes with `Resynced`; then the client agent
//!   is restarted and the registrations come back by themselves.
#![cfg(any(feature = "etcd", feature = "consul"))]

mod clients;
mod truth;

use std::time::Duration;

use tokio::time::{timeout_at, Instant};
use truth::{assert_stale_then_resynced, by_id, listed, print_table, Row, Watch};
use waypost_core::{Discovery, Instance, InstanceSet, ServiceName, WatchEvent};
use waypost_testkit::conformance::wait_for_set;

/// A fresh service name for a scenario.
fn service(what: &str) -> ServiceName {
    format!("{what}-{}", std::process::id()).parse().unwrap()
}

fn instance(svc: &ServiceName, id: &str, port: u16) -> Instance {
    Instance::parse(svc.as_str(), id, "127.0.0.1", port).unwrap()
}

/// Applies watch events until `stop` holds for one, or `deadline`; returns the events.
async fn events_until(
    watch: &mut Watch,
    set: &mut InstanceSet,
    deadline: Instant,
    mut stop: impl FnMut(&WatchEvent) -> bool,
) -> Vec<WatchEvent> {
    let mut log = Vec::new();
    while let Ok(Some(Ok(e))) = timeout_at(deadline, futures::StreamExt::next(watch)).await {
        set.apply(&e);
        let done = stop(&e);
        log.push(e);
        if done {
            break;
        }
    }
    log
}

/// Waits until the watcher's set equals a fresh listing by `lister`; returns how long.
async fn converge(
    what: &str,
    watch: &mut Watch,
    set: &mut InstanceSet,
    lister: &Discovery,
    svc: &ServiceName,
    limit: Duration,
) -> (Duration, Vec<WatchEvent>) {
    let started = Instant::now();
    let mut log = Vec::new();
    loop {
        let truth = match lister.watcher.instances(svc).await {
            Ok(s) => by_id(s.instances),
            Err(_) => Default::default(),
        };
        if !truth.is_empty() && by_id(set.iter().cloned()) == truth {
            return (started.elapsed(), log);
        }
        assert!(
            started.elapsed() < limit,
            "{what}: the watcher never converged to {:?}: has {:?} after {log:?}",
            truth.keys().collect::<Vec<_>>(),
            set.ids().collect::<Vec<_>>()
        );
        log.extend(
            events_until(
                watch,
                set,
                Instant::now() + Duration::from_millis(300),
                |_| false,
            )
            .await,
        );
    }
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watcher_resyncs_after_compaction_during_a_partition() {
    use truth::proxy_each;
    use waypost_testkit::proxy::Mode;
    let what = "etcd (3 members)";
    let Ok(cluster) = waypost_testkit::EtcdCluster::start(3).await else {
        panic!("a 3-member etcd cluster did not start (is etcd installed?)");
    };
    let ttl = Duration::from_secs(3);
    let connect = |hosts: Vec<String>| async move {
        let url = format!("etcd://{}/services", hosts.join(","));
        clients::etcd(&url, ttl, Duration::from_secs(1)).await
    };
    let proxies = proxy_each(&cluster.addresses()).await;
    let victim = connect(proxies.iter().map(|p| p.addr().to_string()).collect())
        .await
        .into_discovery();
    let admin = connect(cluster.addresses()).await;
    let observer = connect(cluster.addresses()).await.into_discovery();
    let svc = service("compacted");
    let first = observer
        .registrar
        .register(instance(&svc, "a-0", 8000))
        .await
        .expect("register");
    let mut watch = victim.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, ttl * 2, "the watcher sees a-0", |s| {
        s.len() == 1
    })
    .await;

    for p in &proxies {
        p.set(Mode::Blackhole);
    }
    // Changes the watcher cannot see, then a compaction past its last revision.
    let mut held = Vec::new();
    for i in 1..4 {
        let r = observer
            .registrar
            .register(instance(&svc, &format!("a-{i}"), 8000 + i));
        held.push(r.await.expect("register"));
    }
    first.deregister().await.expect("deregister a-0");
    let client = admin.etcd_client();
    let rev = client
        .clone()
        .get("compaction-probe", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    client.clone().compact(rev, None).await.expect("compact");
    // Partitioned past the bound: the watcher must notice.
    let mut log = events_until(&mut watch, &mut set, Instant::now() + ttl * 3, |e| {
        matches!(e, WatchEvent::Stale { .. })
    })
    .await;
    let healed = Instant::now();
    for p in &proxies {
        p.set(Mode::Pass);
    }
    let (took, more) = converge(what, &mut watch, &mut set, &observer, &svc, ttl * 4).await;
    log.extend(more);
    assert_stale_then_resynced(what, &log);
    let truth = listed(&observer, &svc).await;
    let row = Row::new(
        "compaction while partitioned, healed",
        &truth,
        &[&set],
        took,
        ttl,
    );
    print_table(what, std::slice::from_ref(&row));
    row.assert_clean(what);
    assert!(healed.elapsed() <= ttl * 4);
    for r in held {
        let _ = r.deregister().await;
    }
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_watch_goes_stale_while_servers_pause_and_agent_restart_keeps_registrations() {
    let what = "consul (3 servers + client agent)";
    let Ok(mut cluster) = waypost_testkit::ConsulCluster::start().await else {
        panic!("a 3-server Consul cluster did not start (is Consul installed?)");
    };
    let ttl = Duration::from_secs(10);
    let d = clients::consul(&cluster.url(), ttl, Duration::from_secs(3)).await;
    let svc = service("paused");
    let mine = instance(&svc, "c-0", 8000);
    let reg = d.registrar.register(mine.clone()).await.expect("register");
    let mut watch = d.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, ttl, "the watch sees c-0", |s| {
        s.len() == 1
    })
    .await;

    // Every server stops: the agent has no leader to ask.
    for i in 0..cluster.len() {
        cluster.member(i).pause().expect("pause a server");
    }
    let paused = Instant::now();
    let mut log = events_until(&mut watch, &mut set, paused + ttl * 3, |e| {
        matches!(e, WatchEvent::Stale { .. })
    })
    .await;
    let stale_after = paused.elapsed();
    assert!(
        log.iter().any(|e| matches!(e, WatchEvent::Stale { .. })),
        "{what}: no Stale within {:?} while every server was paused: {log:?}",
        ttl * 3
    );
    // A registration meanwhile: it may fail, with a temporary error, and is retried
    // after the servers are back (what callers see is reported).
    let other = instance(&svc, "c-1", 8001);
    let during = d.registrar.register(other.clone()).await;
    if let Err(e) = &during {
        assert!(e.is_temporary(), "{what}: register while paused: {e}");
        eprintln!("{what}: register while every server is paused: {e} (temporary; retried)");
    }
    for i in 0..cluster.len() {
        cluster.member(i).resume().expect("resume a server");
    }
    let second = match during {
        Ok(r) => r,
        Err(_) => {
            let deadline = Instant::now() + ttl * 2;
            loop {
                match d.registrar.register(other.clone()).await {
                    Ok(r) => break r,
                    Err(e) if e.is_temporary() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => panic!("{what}: register after the resume: {e}"),
                }
            }
        }
    };
    let (took, more) = converge(what, &mut watch, &mut set, &d, &svc, ttl * 4).await;
    log.extend(more);
    assert_stale_then_resynced(what, &log);
    let stales = log
        .iter()
        .filter(|e| matches!(e, WatchEvent::Stale { .. }))
        .count();
    assert_eq!(stales, 1, "{what}: Stale once while paused: {log:?}");
    let truth = by_id([mine.clone(), other.clone()]);
    let mut rows = vec![Row::new(
        "servers paused, resumed",
        &truth,
        &[&set],
        took,
        ttl,
    )];
    eprintln!("{what}: Stale {stale_after:?} after the pause");

    // The client agent restarts: the registrations come back by themselves.
    let restarted = Instant::now();
    cluster
        .client_mut()
        .restart()
        .await
        .expect("restart the client agent");
    let (took, _) = converge(what, &mut watch, &mut set, &d, &svc, ttl * 4).await;
    wait_for_set(
        &mut watch,
        &mut set,
        ttl * 3,
        "both instances are back",
        |s| by_id(s.iter().cloned()) == truth,
    )
    .await;
    let now = listed(&d, &svc).await;
    assert_eq!(
        now, truth,
        "{what}: registrations after the agent's restart"
    );
    rows.push(Row::new(
        "client agent restarted",
        &truth,
        &[&set],
        took.max(restarted.elapsed()),
        ttl,
    ));
    print_table(what, &rows);
    for r in &rows {
        r.assert_clean(what);
    }
    let _ = second.deregister().await;
    let _ = reg.deregister().await;
}
