//! Faults: crashed registrants, expired sessions, an unreachable registry.

use std::time::Instant;

use waypost_core::{Instance, InstanceSet, RegistrationStatus, WatchEvent};

use super::util::{
    assert_stale_before_resynced, next_event, wait_for_event, wait_for_set, Namespace, StatusLog,
};
use super::{Faults, TestBackend};

pub(crate) fn faults(b: &dyn TestBackend) -> &dyn Faults {
    b.faults().unwrap_or_else(|| {
        panic!(
            "the {} test backend offers no fault injection: this suite cannot run (it is never skipped silently)",
            b.name()
        )
    })
}

/// One registrant with instance `a` of a fresh service, and a watcher (another client)
/// that already lists it.
pub(crate) struct Listed {
    pub(crate) svc: waypost_core::ServiceName,
    pub(crate) d: waypost_core::Discovery,
    pub(crate) w: waypost_core::Discovery,
    pub(crate) a: waypost_core::Instance,
    pub(crate) reg: waypost_core::Registration,
    pub(crate) watch: futures::stream::BoxStream<'static, waypost_core::Result<WatchEvent>>,
    pub(crate) set: InstanceSet,
}

pub(crate) async fn listed(b: &dyn TestBackend, name: &str, a_meta: bool) -> Listed {
    let ns = Namespace::new();
    let svc = ns.service(name);
    let d = b.connect().await;
    let w = b.connect().await;
    let mut a = ns.instance(&svc, "a", 1);
    if a_meta {
        a = a.with_metadata("k", "v");
    }
    let reg = d.registrar.register(a.clone()).await.unwrap();
    let mut watch = w.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(
        &mut watch,
        &mut set,
        b.settings().timeout,
        "a listed",
        |x| x.contains(&a.id),
    )
    .await;
    Listed {
        svc,
        d,
        w,
        a,
        reg,
        watch,
        set,
    }
}

/// A registrant that dies without deregistering is dropped by the registry within its
/// liveness window (session / lease / TTL plus a margin); the others stay.
pub async fn crashed_registrant_is_dropped(b: &dyn TestBackend) {
    let s = b.settings();
    let ns = Namespace::new();
    let svc = ns.service("crash");
    let victim = b.connect().await;
    let survivor = b.connect().await;
    let w = b.connect().await;
    let dead = ns.instance(&svc, "dead", 1);
    let alive = ns.instance(&svc, "alive", 2);
    let dead_reg = victim.registrar.register(dead.clone()).await.unwrap();
    let _alive_reg = survivor.registrar.register(alive.clone()).await.unwrap();
    let mut watch = w.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, s.timeout, "both listed", |x| {
        x.len() == 2
    })
    .await;

    let killed = match b.faults() {
        Some(f) => f.crash(&victim).await,
        None => false,
    };
    // A crashed process never runs its guards' destructors.
    std::mem::forget(dead_reg);
    if !killed {
        drop(victim);
    }
    let started = Instant::now();
    wait_for_set(
        &mut watch,
        &mut set,
        s.liveness,
        "the crashed instance to go",
        |x| !x.contains(&dead.id),
    )
    .await;
    tracing::info!(backend = b.name(), after = ?started.elapsed(), "crashed instance dropped");
    assert!(set.contains(&alive.id), "the surviving instance went too");
}

/// When the registry expires every session, registrants register their instances again
/// by themselves; the registration ends `Registered` and watchers converge to the truth.
pub async fn session_expiry_reregisters(b: &dyn TestBackend) {
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
    } = listed(b, "expiry", true).await;
    let mut status = reg.status();
    let statuses = StatusLog::start(reg.status());

    f.expire_sessions().await;
    // The registry dropped `a`: the watcher sees it removed, or (if the watcher lost the
    // registry too) a Resynced snapshot; then `a` back. A Stale alone proves nothing: it
    // keeps the last known set, `a` included.
    let mut gap = false;
    let log = wait_for_event(
        &mut watch,
        &mut set,
        s.liveness * 2,
        "removal and return of `a`",
        |ev, x| {
            gap |= matches!(ev, WatchEvent::Removed { id, .. } if *id == a.id)
                || matches!(ev, WatchEvent::Resynced(_));
            gap && x.get(&a.id) == Some(&a)
        },
    )
    .await;
    assert_stale_before_resynced(&log);
    tokio::time::timeout(
        s.liveness,
        status.wait_for(|x| *x == RegistrationStatus::Registered),
    )
    .await
    .expect("status back to Registered")
    .expect("status channel open");
    // (A re-registration can be quicker than a poll of the status channel: Reregistering
    // may coalesce away; what is asserted is that every step seen is allowed.)
    statuses.assert_recovered();
    // Another client's listing converges too (a registry may lag by a moment): poll it
    // until it lists `a`, with a deadline.
    let deadline = tokio::time::Instant::now() + s.liveness;
    loop {
        match w.watcher.instances(&svc).await {
            Ok(truth) if truth.get(&a.id) == Some(&a) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "instances() never listed the re-registered `a`: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    reg.deregister()
        .await
        .expect("deregister after re-registration");
    wait_for_set(&mut watch, &mut set, s.timeout, "a gone for good", |x| {
        x.is_empty()
    })
    .await;
}

/// While the registry is unreachable the watch says `Stale` and keeps nothing from the
/// consumer; registrations report `Suspended`. When it is back the watch yields a fresh
/// snapshot equal to the truth, registrations are `Registered`, and later changes flow.
pub async fn unreachable_then_resync(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let Listed {
        svc,
        d,
        w,
        a,
        reg,
        mut watch,
        mut set,
    } = listed(b, "partition", false).await;
    let mut status = reg.status();
    let statuses = StatusLog::start(reg.status());

    f.make_unreachable().await;
    let mut log = wait_for_event(
        &mut watch,
        &mut set,
        s.liveness,
        "Stale while unreachable",
        |ev, _| matches!(ev, WatchEvent::Stale { .. }),
    )
    .await;
    assert!(
        set.contains(&a.id),
        "a Stale watch must keep the last known set"
    );
    tokio::time::timeout(
        s.liveness,
        status.wait_for(|x| *x == RegistrationStatus::Suspended),
    )
    .await
    .expect("registration never Suspended while the registry was unreachable")
    .expect("status channel open");

    f.make_reachable().await;
    log.extend(
        wait_for_event(
            &mut watch,
            &mut set,
            s.liveness,
            "Resynced after the registry came back",
            |ev, _| matches!(ev, WatchEvent::Resynced(_)),
        )
        .await,
    );
    assert_stale_before_resynced(&log);
    tokio::time::timeout(
        s.liveness,
        status.wait_for(|x| *x == RegistrationStatus::Registered),
    )
    .await
    .expect("registration back to Registered")
    .expect("status channel open");
    statuses.assert_recovered();
    // Converge to the truth: `a` is registered again if the registry dropped it meanwhile.
    wait_for_set(
        &mut watch,
        &mut set,
        s.liveness,
        "a listed after resync",
        |x| x.get(&a.id) == Some(&a),
    )
    .await;
    let truth = w.watcher.instances(&svc).await.unwrap();
    assert_eq!(
        InstanceSet::from_snapshot(&truth)
            .iter()
            .collect::<Vec<_>>(),
        set.iter().collect::<Vec<_>>(),
        "resynced set differs from the registry"
    );
    let stale = log
        .iter()
        .filter(|e| matches!(e, WatchEvent::Stale { .. }))
        .count();
    assert_eq!(stale, 1, "exactly one Stale for one outage");
    let b2 = Instance::new(svc.clone(), "b".parse().unwrap(), a.endpoint.clone());
    let _rb = d.registrar.register(b2.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, s.timeout, "b after resync", |x| {
        x.contains(&b2.id)
    })
    .await;
}

/// Dropping a watch stream releases its registry watch: while five service watches (and,
/// where the backend has a configuration store, three key watches) are held the registry
/// serves more watches than before; once they are dropped it is back to at most as many,
/// counted on the registry's side.
pub async fn dropped_watches_are_released(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let ns = Namespace::new();
    let d = b.connect().await;
    let before = f.registry_watches().await;
    let mut streams = Vec::new();
    for i in 0..5 {
        let mut w = d.watcher.watch(&ns.service(&format!("release{i}")));
        let first = next_event(&mut w, s.timeout).await;
        assert!(matches!(first, WatchEvent::Snapshot(_)), "{first:?}");
        streams.push(w);
    }
    let mut config_streams = Vec::new();
    if let Ok(kv) = d.kv() {
        for i in 0..3 {
            let mut w = kv.watch(&ns.config_key(&format!("release{i}")));
            let first = tokio::time::timeout(s.timeout, futures::StreamExt::next(&mut w))
                .await
                .expect("a config watch's snapshot in time");
            assert!(matches!(
                first,
                Some(Ok(waypost_core::backend::watch::Event::Snapshot(..)))
            ));
            config_streams.push(w);
        }
    }
    let during = wait_registry_watches(f, s.timeout, "the held watches to be served", |n| {
        n > before
    })
    .await;
    drop(streams);
    drop(config_streams);
    let after = wait_registry_watches(f, s.timeout, "the dropped watches to be released", |n| {
        n <= before
    })
    .await;
    tracing::info!(
        backend = b.name(),
        before,
        during,
        after,
        "registry watches"
    );
}

async fn wait_registry_watches(
    f: &dyn Faults,
    timeout: std::time::Duration,
    what: &str,
    ok: impl Fn(usize) -> bool,
) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = f.registry_watches().await;
        if ok(n) {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: the registry serves {n} watches"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Ten local watchers of one service on one client open one registry watch between
/// them (counted on the registry's side), all see the same change, and a watcher that
/// joins late starts with a `Snapshot` of the current set.
pub async fn local_watchers_share_one_registry_watch(b: &dyn TestBackend) {
    let s = b.settings();
    let f = faults(b);
    let ns = Namespace::new();
    let svc = ns.service("shared");
    let d = b.connect().await;
    let before = f.registry_watches().await;
    let mut watches = vec![d.watcher.watch(&svc)];
    assert!(matches!(
        next_event(&mut watches[0], s.timeout).await,
        WatchEvent::Snapshot(_)
    ));
    let one =
        wait_registry_watches(f, s.timeout, "the first watch to be served", |n| n > before).await;
    for _ in 1..10 {
        let mut w = d.watcher.watch(&svc);
        let first = next_event(&mut w, s.timeout).await;
        assert!(matches!(first, WatchEvent::Snapshot(_)), "{first:?}");
        watches.push(w);
    }
    let ten = f.registry_watches().await;
    assert!(
        ten <= one,
        "ten local watchers of one service: {ten} registry watches, one watcher alone: {one} (before: {before})"
    );

    let other = b.connect().await;
    let a = ns.instance(&svc, "a", 1);
    let _reg = other.registrar.register(a.clone()).await.unwrap();
    for w in &mut watches {
        let mut set = InstanceSet::new();
        set.apply(&WatchEvent::Snapshot(waypost_core::Snapshot::new(
            svc.clone(),
            Vec::new(),
            0,
        )));
        wait_for_set(w, &mut set, s.timeout, "a seen by every watcher", |x| {
            x.contains(&a.id)
        })
        .await;
    }
    let mut late = d.watcher.watch(&svc);
    match next_event(&mut late, s.timeout).await {
        WatchEvent::Snapshot(snap) => {
            assert!(snap.get(&a.id).is_some(), "the late snapshot lists a")
        }
        other => panic!("a late watcher starts with a Snapshot, got {other:?}"),
    }
}
