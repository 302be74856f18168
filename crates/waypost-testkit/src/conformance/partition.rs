//! A client cut off from its registry by a network partition (a [`Proxy`] between them),
//! for less and for more than its session's bound; the rest of the world keeps reaching
//! the registry.

use std::time::Duration;

use tokio::time::{timeout, Instant};
use waypost_core::{InstanceSet, RegistrationStatus, WatchEvent};

use super::util::{wait_for_set, Namespace, StatusLog};
use super::{Faults, TestBackend};
use crate::proxy::{Mode, Proxy};

fn faults(b: &dyn TestBackend) -> &dyn Faults {
    b.faults().unwrap_or_else(|| {
        panic!(
            "{}: this suite needs fault injection (never skipped silently)",
            b.name()
        )
    })
}

/// A client whose every connection goes through a fresh proxy to the registry.
async fn partitionable(b: &dyn TestBackend) -> (Proxy, waypost_core::Discovery) {
    let target = faults(b).registry_endpoint();
    let proxy = Proxy::start(target).await.expect("start a proxy");
    let d = b
        .connect_to(&proxy.addr().to_string(), b.settings().timeout)
        .await
        .unwrap_or_else(|e| panic!("{}: connect through the proxy: {e}", b.name()));
    (proxy, d)
}

/// A victim client behind a proxy with `p-1` of a fresh service registered, and an observer
/// reaching the registry directly.
struct Setup {
    ns: Namespace,
    svc: waypost_core::ServiceName,
    proxy: Proxy,
    victim: waypost_core::Discovery,
    observer: waypost_core::Discovery,
    inst: waypost_core::Instance,
    reg: waypost_core::Registration,
}

async fn setup(b: &dyn TestBackend, service: &str) -> Setup {
    let ns = Namespace::new();
    let svc = ns.service(service);
    let (proxy, victim) = partitionable(b).await;
    let observer = b.connect().await;
    let inst = ns.instance(&svc, "p-1", 8001);
    let reg = victim
        .registrar
        .register(inst.clone())
        .await
        .expect("register");
    Setup {
        ns,
        svc,
        proxy,
        victim,
        observer,
        inst,
        reg,
    }
}

/// Partitioned for less than the bound (healed as soon as the client reports
/// `Suspended`, which it must do before the bound): its registration goes back to
/// `Registered`; its own watch, if it noticed (`Stale`), resyncs; other clients never see
/// its instance leave.
pub async fn partition_shorter_than_bound(b: &dyn TestBackend) {
    let s = b.settings();
    let Setup {
        ns: _,
        svc,
        proxy,
        victim,
        observer,
        inst,
        reg,
    } = setup(b, "partition-short").await;
    let statuses = StatusLog::start(reg.status());
    let mut status = reg.status();
    let mut victim_watch = victim.watcher.watch(&svc);
    let mut victim_set = InstanceSet::new();
    wait_for_set(
        &mut victim_watch,
        &mut victim_set,
        s.timeout,
        "the victim sees p-1",
        |x| x.contains(&inst.id),
    )
    .await;
    let mut obs = observer.watcher.watch(&svc);
    let mut obs_set = InstanceSet::new();
    wait_for_set(
        &mut obs,
        &mut obs_set,
        s.timeout,
        "the observer sees p-1",
        |x| x.contains(&inst.id),
    )
    .await;

    let cut = Instant::now();
    proxy.set(Mode::Blackhole);
    // The victim notices before its session can run out.
    timeout(
        s.liveness,
        status.wait_for(|x| *x == RegistrationStatus::Suspended),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{}: a partitioned client did not report Suspended within {:?}",
            b.name(),
            s.liveness
        )
    })
    .expect("status channel");
    let noticed = cut.elapsed();
    // Heal at once: the partition stays shorter than the bound.
    proxy.set(Mode::Pass);
    timeout(
        s.liveness,
        status.wait_for(|x| *x == RegistrationStatus::Registered),
    )
    .await
    .expect("Registered again after the heal")
    .expect("status channel");
    statuses.assert_recovered();
    // The victim's own watch kept or recovered the set: a `Stale` (if the watch noticed
    // the partition) is followed by a `Resynced`, and p-1 is there.
    let quiet = Instant::now() + Duration::from_millis(500);
    let mut log = Vec::new();
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout_at(quiet, futures::StreamExt::next(&mut victim_watch)).await
    {
        victim_set.apply(&e);
        log.push(e);
    }
    if log.iter().any(|e| matches!(e, WatchEvent::Stale { .. })) {
        assert!(
            log.iter().any(|e| matches!(e, WatchEvent::Resynced(_))),
            "{}: the victim's watch went Stale and never resynced: {log:?}",
            b.name()
        );
    }
    assert!(
        victim_set.contains(&inst.id),
        "the victim's watch lists p-1"
    );
    // The observer never saw p-1 leave (the partition was shorter than the bound)...
    let quiet = Instant::now() + Duration::from_millis(200);
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout_at(quiet, futures::StreamExt::next(&mut obs)).await
    {
        assert!(
            !matches!(&e, WatchEvent::Removed { id, .. } if *id == inst.id),
            "{}: the observer saw p-1 leave during a partition of {noticed:?} (< the bound)",
            b.name()
        );
        obs_set.apply(&e);
    }
    assert!(obs_set.contains(&inst.id));
    reg.deregister().await.expect("deregister after the heal");
}

/// Partitioned for longer than the bound: other clients see its instance leave within the
/// bound; a lock it held is reported lost locally before another client acquires it; after
/// the heal it registers again by itself and others see the instance come back.
pub async fn partition_longer_than_bound(b: &dyn TestBackend) {
    let s = b.settings();
    let Setup {
        ns,
        svc,
        proxy,
        victim,
        observer,
        inst,
        reg,
    } = setup(b, "partition-long").await;
    let mut status = reg.status();
    let lock = ns.config_key("partition-lock");
    let victim_coord = victim.coordinator().ok();
    let held = match &victim_coord {
        Some(c) => Some(c.lock(&lock).await.expect("lock")),
        None => None,
    };
    let mut obs = observer.watcher.watch(&svc);
    let mut obs_set = InstanceSet::new();
    wait_for_set(
        &mut obs,
        &mut obs_set,
        s.timeout,
        "the observer sees p-1",
        |x| x.contains(&inst.id),
    )
    .await;
    // Another client waits for the victim's lock.
    let waiter = observer.coordinator().ok().filter(|_| held.is_some());
    let waiting = waiter.map(|c| {
        let (lock, limit) = (lock.clone(), s.liveness * 4);
        tokio::spawn(async move {
            let g = timeout(limit, c.lock(&lock)).await;
            (Instant::now(), g)
        })
    });

    // When the victim learns it lost the lock.
    let lost_at = held.as_ref().map(|h| {
        let lost = h.lost();
        tokio::spawn(async move {
            let why = lost.await;
            (Instant::now(), why)
        })
    });

    proxy.set(Mode::Blackhole);
    let cut = Instant::now();
    wait_for_set(
        &mut obs,
        &mut obs_set,
        s.liveness * 2,
        "p-1 leaves the observer's view",
        |x| !x.contains(&inst.id),
    )
    .await;
    let gone_after = cut.elapsed();
    if let (Some(w), Some(lost_at)) = (waiting, lost_at) {
        let (acquired_at, g) = w.await.expect("waiter task");
        let g = g
            .expect("the waiter acquired within the limit")
            .expect("lock");
        let (lost_at, why) = timeout(s.timeout, lost_at)
            .await
            .unwrap_or_else(|_| panic!("{}: the victim never learnt it lost the lock (its instance left after {gone_after:?})", b.name()))
            .expect("lost task");
        assert!(
            lost_at < acquired_at,
            "{}: the victim learnt it lost the lock ({why}) at {:?} after the cut, after the waiter acquired it at {:?}",
            b.name(),
            lost_at - cut,
            acquired_at - cut
        );
        assert!(g.token() > held.as_ref().expect("held").token());
        g.release().await.expect("release");
    }
    proxy.set(Mode::Pass);
    timeout(
        s.liveness * 2,
        status.wait_for(|x| *x == RegistrationStatus::Registered),
    )
    .await
    .expect("Registered again by itself after the heal")
    .expect("status channel");
    wait_for_set(
        &mut obs,
        &mut obs_set,
        s.liveness * 2,
        "p-1 comes back",
        |x| x.get(&inst.id) == Some(&inst),
    )
    .await;
    if let Some(held) = held {
        held.release().await.expect("releasing a lost lock is fine");
    }
    reg.deregister().await.expect("deregister after the heal");
}
