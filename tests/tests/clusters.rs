//! Real clusters (issue 13): registrations churn while the cluster's leader is killed;
//! nothing is lost, nothing stays behind, watchers converge on the registry's truth. One
//! line per backend is printed (errors callers saw, time to converge ÷ the bound).
//!
//! ZooKeeper: a 3-server ensemble; etcd: 3 members; Consul: 3 servers and the client agent
//! the backend talks to (the server leader is killed; the agent stays).

mod clients;
mod truth;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::{timeout, Instant};
use waypost_core::{Discovery, Instance, InstanceSet, ServiceName, WatchEvent};

const OPS: usize = 30;

/// Registers `c-0..c-{OPS}`, deregistering the odd ones again, killing the leader a third
/// of the way through; every temporary error is retried (and counted). Then the watcher
/// and a fresh listing must hold exactly the even ones; returns how long the watcher took.
async fn churn<C, F, K, KF>(what: &str, connect: C, kill_leader: K, bound: Duration) -> Duration
where
    C: Fn() -> F,
    F: Future<Output = Discovery>,
    K: FnOnce() -> KF,
    KF: Future<Output = ()>,
{
    let svc: ServiceName = format!("churn-{}", std::process::id()).parse().unwrap();
    let registrant = connect().await;
    let watcher = connect().await;
    let mut watch = watcher.watcher.watch(&svc);
    let mut seen = InstanceSet::new();
    let mut kill = Some(kill_leader);
    let mut held = Vec::new();
    let mut errors = 0;
    for i in 0..OPS {
        if i == OPS / 3 {
            (kill.take().unwrap())().await;
            eprintln!("{what}: leader killed after {i} operations");
        }
        let inst = Instance::parse(
            svc.as_str(),
            &format!("c-{i}"),
            "127.0.0.1",
            9000 + i as u16,
        )
        .unwrap();
        let deadline = Instant::now() + bound * 3;
        let reg = loop {
            match timeout(bound, registrant.registrar.register(inst.clone())).await {
                Ok(Ok(r)) => break r,
                Ok(Err(e)) if e.is_temporary() => errors += 1,
                Ok(Err(e)) => panic!("{what}: register c-{i}: {e}"),
                Err(_) => errors += 1,
            }
            assert!(Instant::now() < deadline, "{what}: c-{i} never registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if i % 2 == 1 {
            // A deregistration whose reply is lost is completed by the keeper; an error
            // here is what the caller sees.
            if reg.deregister().await.is_err() {
                errors += 1;
            }
        } else {
            held.push(reg);
        }
    }
    let expected: BTreeSet<String> = (0..OPS).step_by(2).map(|i| format!("c-{i}")).collect();
    let started = Instant::now();
    let ids =
        |s: &InstanceSet| -> BTreeSet<String> { s.iter().map(|i| i.id.to_string()).collect() };
    while ids(&seen) != expected {
        let left = (bound * 3).saturating_sub(started.elapsed());
        match timeout(left, watch.next()).await {
            Ok(Some(Ok(e))) => {
                if let WatchEvent::Snapshot(s) | WatchEvent::Resynced(s) = &e {
                    seen = InstanceSet::from_snapshot(s);
                } else {
                    seen.apply(&e);
                }
            }
            other => panic!(
                "{what}: the watcher never converged: has {:?}, expected {expected:?} ({other:?})",
                ids(&seen)
            ),
        }
    }
    let converged = started.elapsed();
    // A fresh client lists the same: no phantom, nothing lost.
    let fresh = connect().await;
    let deadline = Instant::now() + bound * 2;
    let truth = loop {
        match fresh.watcher.instances(&svc).await {
            Ok(s)
                if s.instances
                    .iter()
                    .map(|i| i.id.to_string())
                    .collect::<BTreeSet<_>>()
                    == expected =>
            {
                break truth::by_id(s.instances)
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: the registry's truth differs: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The watcher's applied set against the truth, content included.
    let row = truth::Row::new(
        "leader killed during churn",
        &truth,
        &[&seen],
        converged,
        bound,
    );
    truth::print_table(what, std::slice::from_ref(&row));
    row.assert_clean(what);
    for r in held {
        let _ = r.deregister().await;
    }
    eprintln!(
        "| {what} | {OPS} | {errors} | {:.2} s | {:.2} |",
        converged.as_secs_f64(),
        converged.as_secs_f64() / bound.as_secs_f64()
    );
    converged
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_ensemble_leader_killed_during_churn() {
    let Ok(mut ensemble) = waypost_testkit::ZooKeeperEnsemble::start().await else {
        panic!("a 3-server ZooKeeper ensemble did not start (is ZooKeeper installed?)");
    };
    let session = Duration::from_secs(4);
    let url = ensemble.url();
    let leader = ensemble.leader().await.expect("a leader");
    let member = ensemble.member(leader);
    let converged = churn(
        "zookeeper (3 servers)",
        || clients::zookeeper(&url, session, Duration::from_secs(2)),
        || async move { member.kill().expect("kill the leader") },
        session,
    )
    .await;
    assert!(converged <= session * 3);
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_leader_killed_during_churn() {
    let Ok(mut cluster) = waypost_testkit::EtcdCluster::start(3).await else {
        panic!("a 3-member etcd cluster did not start (is etcd installed?)");
    };
    let ttl = Duration::from_secs(3);
    let url = cluster.url();
    let leader = cluster.leader().await.expect("a leader");
    let member = cluster.member(leader);
    let converged = churn(
        "etcd (3 members)",
        || async {
            clients::etcd(&url, ttl, Duration::from_secs(2))
                .await
                .into_discovery()
        },
        || async move { member.kill().expect("kill the leader") },
        ttl,
    )
    .await;
    assert!(converged <= ttl * 3);
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_cluster_leader_killed_during_churn() {
    let Ok(mut cluster) = waypost_testkit::ConsulCluster::start().await else {
        panic!("a 3-server Consul cluster did not start (is Consul installed?)");
    };
    let ttl = Duration::from_secs(10);
    let url = cluster.url();
    let leader = cluster.leader().await.expect("a leader");
    let member = cluster.member(leader);
    let converged = churn(
        "consul (3 servers + client agent)",
        || clients::consul(&url, ttl, Duration::from_secs(3)),
        || async move { member.kill().expect("kill the leader") },
        ttl,
    )
    .await;
    assert!(converged <= ttl * 3);
}
