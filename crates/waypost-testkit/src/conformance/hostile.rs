//! What several backends tested on their own, now held to one rule: a restarted server,
//! an id held by another live session, foreign and malformed entries in a service's path,
//! and endpoints that refuse or never answer.

use std::time::{Duration, Instant};

use waypost_core::{Error, InstanceSet, RegistrationStatus, WatchEvent};

use super::faults::{faults, listed, Listed};
use super::util::{assert_stale_before_resynced, wait_for_event, wait_for_set, Namespace};
use super::TestBackend;

/// The registry server stops and starts again: registrations come back by themselves
/// (`Registered`), watchers report `Stale` then `Resynced`, converge to the truth, and
/// later changes flow.
pub async fn server_restart_recovers(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let Listed {
        d,
        a,
        reg,
        mut watch,
        mut set,
        ..
    } = listed(b, "restart", true).await;
    let mut status = reg.status();

    f.restart().await;
    let mut resynced = false;
    let log = wait_for_event(
        &mut watch,
        &mut set,
        s.liveness * 3,
        "Resynced after the restart, listing `a`",
        |ev, x| {
            resynced |= matches!(ev, WatchEvent::Resynced(_));
            resynced && x.get(&a.id) == Some(&a)
        },
    )
    .await;
    assert_stale_before_resynced(&log);
    tokio::time::timeout(
        s.liveness * 2,
        status.wait_for(|x| *x == RegistrationStatus::Registered),
    )
    .await
    .expect("registration back to Registered after the restart")
    .expect("status channel open");
    let b2 = ns_instance(&a, "b");
    let _rb = d
        .registrar
        .register(b2.clone())
        .await
        .expect("register after restart");
    wait_for_set(
        &mut watch,
        &mut set,
        s.timeout,
        "b after the restart",
        |x| x.contains(&b2.id),
    )
    .await;
}

fn ns_instance(like: &waypost_core::Instance, id: &str) -> waypost_core::Instance {
    waypost_core::Instance::new(
        like.service.clone(),
        id.parse().expect("valid id"),
        like.endpoint.clone(),
    )
}

/// A second client registering an id that a live registration of another client holds:
/// [`Error::AlreadyExists`] where the registry can tell, and
/// the first registration is untouched. Where it cannot (Consul's agent services, which
/// replace), the id is still listed once.
pub async fn id_held_by_another_session(b: &dyn TestBackend) {
    let ns = Namespace::new();
    let svc = ns.service("held");
    let first = b.connect().await;
    let second = b.connect().await;
    let w = b.connect().await;
    let a = ns.instance(&svc, "a", 1);
    let reg = first.registrar.register(a.clone()).await.unwrap();
    let mut other = a.clone();
    other.endpoint.port = 2;
    let taken = second.registrar.register(other.clone()).await;
    if b.exclusive_ids() {
        match taken {
            Err(Error::AlreadyExists { .. }) => {}
            other => panic!("registering a held id must be AlreadyExists, got {other:?}"),
        }
        let snap = w.watcher.instances(&svc).await.unwrap();
        assert_eq!(snap.get(&a.id), Some(&a), "the holder's entry was touched");
        assert_eq!(reg.current_status(), RegistrationStatus::Registered);
    } else {
        let _taken = taken.expect("a registry that replaces accepts the second registration");
        let snap = w.watcher.instances(&svc).await.unwrap();
        assert_eq!(
            snap.instances.iter().filter(|i| i.id == a.id).count(),
            1,
            "the id must be listed once"
        );
    }
}

/// Entries in a service's path that are not instances (garbage bytes, JSON of another
/// shape, oversized values), written by a foreign client, are skipped and logged: listings
/// and watches keep working and list only real instances; registering beside them works.
pub async fn malformed_entries_are_skipped(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let ns = Namespace::new();
    let svc = ns.service("malformed");
    let d = b.connect().await;
    let w = b.connect().await;
    f.write_malformed(&svc).await;
    let snap = w
        .watcher
        .instances(&svc)
        .await
        .expect("instances beside malformed entries");
    assert!(
        snap.is_empty(),
        "malformed entries listed: {:?}",
        snap.instances
    );
    let mut watch = w.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    let first = super::util::next_event(&mut watch, s.timeout).await;
    assert!(
        matches!(&first, WatchEvent::Snapshot(s) if s.is_empty()),
        "first event must be an empty Snapshot: {first:?}"
    );
    set.apply(&first);
    let a = ns.instance(&svc, "a", 1);
    let _reg = d
        .registrar
        .register(a.clone())
        .await
        .expect("register beside malformed entries");
    wait_for_set(&mut watch, &mut set, s.timeout, "a listed", |x| {
        x.contains(&a.id)
    })
    .await;
    // Malformed entries written while a watch runs are skipped too.
    f.write_malformed(&svc).await;
    let b2 = ns.instance(&svc, "b", 2);
    let _rb = d.registrar.register(b2.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, s.timeout, "b listed", |x| {
        x.contains(&b2.id)
    })
    .await;
    assert_eq!(set.len(), 2, "only the real instances are listed");
    assert_eq!(w.watcher.instances(&svc).await.unwrap().len(), 2);
}

/// Connecting to an endpoint where nothing listens, and to one that accepts connections
/// but never answers, fails with a temporary error within the connect timeout (plus a
/// margin), never hangs.
pub async fn unreachable_and_hung_endpoints_fail_in_time(b: &dyn TestBackend) {
    let connect_timeout = Duration::from_secs(2);
    let margin = Duration::from_secs(3);
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        addr.to_string()
    };
    // Accepts and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hung.accept().await {
            held.push(sock);
        }
    });
    for (what, endpoint) in [("refused", refused), ("hung", hung_addr)] {
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            connect_timeout + margin * 2,
            b.connect_to(&endpoint, connect_timeout),
        )
        .await
        .unwrap_or_else(|_| panic!("connecting to a {what} endpoint hung"));
        let took = started.elapsed();
        match outcome {
            Ok(_) => panic!("connecting to a {what} endpoint succeeded"),
            Err(e) => {
                assert!(e.is_temporary(), "{what}: not a temporary error: {e}");
                assert!(
                    took <= connect_timeout + margin,
                    "{what}: took {took:?} with a connect timeout of {connect_timeout:?}"
                );
            }
        }
    }
    holder.abort();
}
