//! Real clusters, one member partitioned (issue 13): a client is given all 3 members, each
//! reached through its own [`Proxy`](waypost_testkit::proxy::Proxy); the member it uses is blackholed, then the member
//! it moved to is cut (its connections reset, new ones refused). Each time the client
//! must fail over: its registration stays (or returns to) `Registered` and never leaves
//! another client's watch, and its own watch keeps delivering changes made by another
//! client. At the end every watcher's applied set must equal the registry's truth; one
//! table per backend is printed (run with `--nocapture`).
//!
//! ZooKeeper: a 3-server ensemble; etcd: 3 members. Consul's client talks to one agent,
//! so it has no member to fail over to: skipped here by design.
#![cfg(any(feature = "zookeeper", feature = "etcd"))]

mod clients;
mod truth;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::time::{timeout, Instant};
use truth::{drain_keeping, listed, print_table, proxy_each, Row};
use waypost_core::{Discovery, Instance, InstanceSet, RegistrationStatus, ServiceName};
use waypost_testkit::conformance::{wait_for_set, StatusLog};
use waypost_testkit::proxy::Mode;

/// The scenario on a cluster whose members' client addresses are `members`; `url` makes
/// a URL naming the given addresses; `connect` connects to a URL with the bound set.
async fn fail_over<U, C, F>(what: &str, members: Vec<String>, url: U, connect: C, bound: Duration)
where
    U: Fn(&[String]) -> String,
    C: Fn(String) -> F,
    F: Future<Output = Discovery>,
{
    let proxies = proxy_each(&members).await;
    let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let victim = connect(url(&through)).await;
    let observer = connect(url(&members)).await;
    let svc: ServiceName = format!("failover-{}", std::process::id()).parse().unwrap();
    let inst = |id: &str, port| Instance::parse(svc.as_str(), id, "127.0.0.1", port).unwrap();
    let mine = inst("v-1", 8001);
    let reg = victim
        .registrar
        .register(mine.clone())
        .await
        .expect("register");
    let statuses = StatusLog::start(reg.status());
    let mut status = reg.status();
    let (mut vw, mut ow) = (victim.watcher.watch(&svc), observer.watcher.watch(&svc));
    let (mut vset, mut oset) = (InstanceSet::new(), InstanceSet::new());
    for (w, s, who) in [
        (&mut vw, &mut vset, "victim"),
        (&mut ow, &mut oset, "observer"),
    ] {
        wait_for_set(w, s, bound * 2, &format!("the {who} sees v-1"), |x| {
            x.contains(&mine.id)
        })
        .await;
    }
    let mut truth = BTreeMap::from([(mine.id.clone(), mine.clone())]);
    let mut held = Vec::new();
    let mut rows = Vec::new();
    let mut faulted = Vec::new();
    // Blackhole one member, then cut a second: one is left. Then heal both and blackhole
    // the last: whichever member carried the client's streams was faulted once.
    let phases = [
        (Mode::Blackhole, "blackhole the member in use"),
        (Mode::RefuseNew, "cut the member in use"),
        (Mode::Blackhole, "heal both, blackhole the last"),
    ];
    for (phase, (mode, fault)) in phases.into_iter().enumerate() {
        let used = if phase == 2 {
            let last = (0..proxies.len()).find(|i| !faulted.contains(i)).unwrap();
            for &i in &faulted {
                proxies[i].set(Mode::Pass);
            }
            faulted.clear();
            last
        } else {
            // The member the victim uses now: the one with the most open connections.
            (0..proxies.len())
                .filter(|i| !faulted.contains(i))
                .max_by_key(|&i| (proxies[i].open_connections(), std::cmp::Reverse(i)))
                .unwrap()
        };
        let p = &proxies[used];
        assert!(
            p.open_connections() > 0,
            "{what}: the victim uses no member's proxy"
        );
        let cut = Instant::now();
        p.set(mode);
        if mode == Mode::RefuseNew {
            p.reset();
        }
        faulted.push(used);
        // A change made through another client reaches the victim's watch...
        let other = inst(&format!("o-{phase}"), 9000 + phase as u16);
        held.push(
            observer
                .registrar
                .register(other.clone())
                .await
                .expect("register o"),
        );
        truth.insert(other.id.clone(), other.clone());
        wait_for_set(
            &mut vw,
            &mut vset,
            bound * 3,
            &format!(
                "{what}: the victim's watch delivers {} after `{fault}` (member {used})",
                other.id
            ),
            |x| x.contains(&other.id),
        )
        .await;
        // ...and its registration is (again) Registered.
        timeout(
            bound * 3,
            status.wait_for(|s| *s == RegistrationStatus::Registered),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: not Registered after `{fault}` (member {used})"))
        .expect("status channel");
        let took = cut.elapsed();
        drain_keeping(&mut ow, &mut oset, &mine.id, "the observer").await;
        drain_keeping(&mut vw, &mut vset, &mine.id, "the victim").await;
        let now = listed(&observer, &svc).await;
        assert_eq!(now, truth, "{what}: the registry's truth after `{fault}`");
        eprintln!("{what}: `{fault}` (member {used}): failed over in {took:?}");
        rows.push(Row::new(fault, &truth, &[&vset, &oset], took, bound));
    }
    statuses.assert_recovered();
    print_table(&format!("{what}: one member partitioned"), &rows);
    for r in &rows {
        r.assert_clean(what);
        assert!(
            r.converge <= bound * 3,
            "{what}: {} took {:?}",
            r.scenario,
            r.converge
        );
    }
    for h in held {
        let _ = h.deregister().await;
    }
    let _ = reg.deregister().await;
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_client_fails_over_from_a_partitioned_member() {
    let Ok(ensemble) = waypost_testkit::ZooKeeperEnsemble::start().await else {
        panic!("a 3-server ZooKeeper ensemble did not start (is ZooKeeper installed?)");
    };
    let session = Duration::from_secs(4);
    fail_over(
        "zookeeper (3 servers)",
        ensemble.addresses(),
        |hosts| format!("zk://{}/services", hosts.join(",")),
        |url| async move { clients::zookeeper(&url, session, Duration::from_secs(1)).await },
        session,
    )
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_fails_over_from_a_partitioned_member() {
    let Ok(cluster) = waypost_testkit::EtcdCluster::start(3).await else {
        panic!("a 3-member etcd cluster did not start (is etcd installed?)");
    };
    // A blackholed member is left when the client's HTTP/2 ping goes unanswered: 6 s
    // between pings (etcd refuses them more often than every 5 s) plus the request timeout.
    // A lease shorter than that can run out first, as with etcd's own clients: the lease
    // here is the default 10 s, and the bound the table divides by.
    let ttl = Duration::from_secs(10);
    fail_over(
        "etcd (3 members)",
        cluster.addresses(),
        |hosts| format!("etcd://{}/services", hosts.join(",")),
        |url| async move {
            clients::etcd(&url, ttl, Duration::from_secs(1))
                .await
                .into_discovery()
        },
        ttl,
    )
    .await;
}
