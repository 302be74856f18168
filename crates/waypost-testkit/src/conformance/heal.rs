//! Healing: writes whose outcome is unknown, foreign deletes, and foreign entries that
//! claim a live instance's id.

use std::time::Duration;

use waypost_core::{Instance, InstanceSet, RegistrationStatus, ServiceName, Watcher};

use super::faults::{faults, listed, Listed};
use super::util::{wait_for_event, wait_for_set, Namespace};
use super::TestBackend;
use waypost_core::WatchEvent;

/// Watches `svc` for `window` and returns the set at its end: what the registry holds
/// once a bound has passed (a late write may land and be removed inside the window).
async fn set_after(w: &dyn Watcher, svc: &ServiceName, window: Duration) -> InstanceSet {
    let mut watch = w.watch(svc);
    let mut set = InstanceSet::new();
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut watch)).await {
            Err(_) => return set,
            Ok(Some(Ok(ev))) => set.apply(&ev),
            Ok(Some(Err(e))) => panic!("watch yielded an error: {e}"),
            Ok(None) => panic!("watch ended"),
        }
    }
}

/// How many entries of `id` a listing holds.
async fn listed_times(w: &dyn Watcher, svc: &ServiceName, id: &waypost_core::InstanceId) -> usize {
    let snap = w.instances(svc).await.expect("instances");
    snap.instances.iter().filter(|i| i.id == *id).count()
}

/// `register` while the registry does not answer fails; once the registry is back, the
/// registry does not hold the instance after the session bound (the write may have landed
/// late: it is removed), and no watcher lists it.
pub async fn outcome_unknown_create_is_removed(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let ns = Namespace::new();
    let svc = ns.service("unknown-create");
    let d = b.connect().await;
    let w = b.connect().await;
    // The registrant holds a live session before the outage, as a running service does.
    let anchor = ns.instance(&svc, "anchor", 1);
    let _anchor = d.registrar.register(anchor.clone()).await.unwrap();
    let lost = ns.instance(&svc, "lost", 2);

    f.make_unreachable().await;
    let outcome = tokio::time::timeout(s.liveness, d.registrar.register(lost.clone())).await;
    f.make_reachable().await;
    match outcome {
        Err(_) => panic!(
            "register did not return within {:?} while the registry was unreachable",
            s.liveness
        ),
        Ok(Ok(_)) => panic!("register succeeded while the registry was unreachable"),
        Ok(Err(e)) => assert!(
            e.is_temporary(),
            "an unreachable registry is a temporary error: {e}"
        ),
    }
    let set = set_after(w.watcher.as_ref(), &svc, s.liveness).await;
    assert!(
        !set.contains(&lost.id),
        "the failed registration is listed after the session bound"
    );
    assert!(
        set.contains(&anchor.id),
        "the live registration went missing"
    );
    assert_eq!(
        listed_times(w.watcher.as_ref(), &svc, &lost.id).await,
        0,
        "the registry still holds the failed registration"
    );
}

/// `deregister` while the registry does not answer: once it is back, the instance is gone
/// within the session bound.
pub async fn outcome_unknown_delete_completes(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let Listed {
        a,
        reg,
        mut watch,
        mut set,
        ..
    } = listed(b, "unknown-delete", false).await;
    f.make_unreachable().await;
    let outcome = tokio::time::timeout(s.liveness, reg.deregister()).await;
    f.make_reachable().await;
    assert!(
        outcome.is_ok(),
        "deregister did not return while unreachable"
    );
    wait_for_set(
        &mut watch,
        &mut set,
        s.liveness * 2,
        "the deregistered instance to go",
        |x| !x.contains(&a.id),
    )
    .await;
}

/// A live registration's entry deleted by another client comes back by itself; its status
/// passes through another state and ends `Registered`; watchers converge.
pub async fn foreign_delete_is_healed(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let Listed {
        svc,
        w,
        a,
        reg,
        mut watch,
        mut set,
        ..
    } = listed(b, "foreign-delete", true).await;
    let mut status = reg.status();
    assert_eq!(*status.borrow_and_update(), RegistrationStatus::Registered);

    f.foreign_delete(&a).await;
    let mut gone = false;
    wait_for_event(
        &mut watch,
        &mut set,
        s.liveness * 2,
        "the deleted instance to go and come back",
        |ev, x| {
            gone |= matches!(ev, WatchEvent::Removed { id, .. } if *id == a.id);
            gone && x.get(&a.id) == Some(&a)
        },
    )
    .await;
    // It started `Registered` (seen); a change that ends at `Registered` went elsewhere
    // first (statuses change only when they differ).
    tokio::time::timeout(s.liveness, async {
        loop {
            status.changed().await.expect("status channel open");
            if *status.borrow_and_update() == RegistrationStatus::Registered {
                break;
            }
        }
    })
    .await
    .expect("the status passed through Reregistering and came back to Registered");
    assert_eq!(listed_times(w.watcher.as_ref(), &svc, &a.id).await, 1);
    drop(reg);
}

/// Two entries claim one id, ours and a foreign one: it is listed once, ours wins;
/// removing either claimant leaves the other listed.
pub async fn one_entry_per_id(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let Listed {
        svc,
        w,
        a,
        reg,
        mut watch,
        mut set,
        ..
    } = listed(b, "claims", false).await;
    let mut foreign: Instance = a.clone();
    foreign.endpoint.port = a.endpoint.port + 1000;

    let key = f.foreign_claim(&foreign).await;
    // A fresh listing and a fresh watch see both entries: the id once, ours.
    assert_eq!(listed_times(w.watcher.as_ref(), &svc, &a.id).await, 1);
    let snap = w.watcher.instances(&svc).await.unwrap();
    assert_eq!(
        snap.get(&a.id),
        Some(&a),
        "ours must win over a foreign claimant"
    );
    // The first event of a fresh watch is its authoritative snapshot: the id once, ours.
    let mut fresh = w.watcher.watch(&svc);
    match super::util::next_event(&mut fresh, s.timeout).await {
        WatchEvent::Snapshot(snap) => {
            assert_eq!(
                snap.instances.iter().filter(|i| i.id == a.id).count(),
                1,
                "a fresh snapshot lists the id once"
            );
            assert_eq!(snap.get(&a.id), Some(&a), "a fresh watch lists ours");
        }
        other => panic!("first event must be a Snapshot, got {other:?}"),
    }
    drop(fresh);

    f.foreign_remove(&foreign, &key).await;
    assert_eq!(listed_times(w.watcher.as_ref(), &svc, &a.id).await, 1);
    assert_eq!(
        w.watcher.instances(&svc).await.unwrap().get(&a.id),
        Some(&a),
        "removing the foreign claimant must leave ours"
    );

    // The other way round: with a foreign claimant present, removing ours re-exposes it.
    let key = f.foreign_claim(&foreign).await;
    reg.deregister().await.expect("deregister");
    wait_for_set(
        &mut watch,
        &mut set,
        s.liveness,
        "the foreign claimant to be listed after ours left",
        |x| x.get(&a.id) == Some(&foreign),
    )
    .await;
    assert_eq!(listed_times(w.watcher.as_ref(), &svc, &a.id).await, 1);
    f.foreign_remove(&foreign, &key).await;
    wait_for_set(&mut watch, &mut set, s.liveness, "the id gone", |x| {
        !x.contains(&a.id)
    })
    .await;
}
