//! Registration, listing and watching: the everyday contract.

use std::time::Duration;

use waypost_core::{InstanceSet, RegistrationStatus, WatchEvent};

use super::util::{describe, next_event, wait_for_set, Namespace};
use super::TestBackend;

/// A registered instance is listed by `instances()` and seen by a watch started before
/// and one started after.
pub async fn register_then_listed_and_watched(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("greeter");
    let reg_side = b.connect().await;
    let watch_side = b.connect().await;

    let mut early = watch_side.watcher.watch(&svc);
    let first = next_event(&mut early, t).await;
    let WatchEvent::Snapshot(s) = &first else {
        panic!("first event must be a Snapshot, got {}", describe(&first));
    };
    assert!(s.is_empty(), "fresh service must be empty, got {}", s.len());

    let inst = ns.instance(&svc, "g-1", 8001);
    let reg = reg_side
        .registrar
        .register(inst.clone())
        .await
        .expect("register");
    assert_eq!(reg.current_status(), RegistrationStatus::Registered);
    assert_eq!(reg.instance(), &inst);

    let mut set = InstanceSet::from_snapshot(s);
    wait_for_set(&mut early, &mut set, t, "g-1 to be watched", |s| {
        s.contains(&inst.id)
    })
    .await;
    assert_eq!(set.get(&inst.id), Some(&inst), "watched instance differs");

    // `register` returned, so a listing now includes it (read-your-writes on one client).
    let listed = reg_side.watcher.instances(&svc).await.expect("instances");
    assert_eq!(listed.get(&inst.id), Some(&inst), "listed instance differs");

    let mut late = watch_side.watcher.watch(&svc);
    let mut late_set = InstanceSet::new();
    wait_for_set(&mut late, &mut late_set, t, "late watch to list g-1", |s| {
        s.contains(&inst.id)
    })
    .await;
    drop(reg);
}

/// `deregister()` removes the instance before it returns (listings) and watchers see
/// `Removed`; the status ends `Deregistered`.
pub async fn deregister_removes(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("dereg");
    let d = b.connect().await;
    let w = b.connect().await;
    let a = ns.instance(&svc, "a", 1);
    let keep = ns.instance(&svc, "keep", 2);
    let reg_a = d.registrar.register(a.clone()).await.unwrap();
    let _reg_keep = d.registrar.register(keep.clone()).await.unwrap();
    let mut watch = w.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, t, "both listed", |s| s.len() == 2).await;

    let status = reg_a.status();
    reg_a.deregister().await.expect("deregister");
    assert_eq!(*status.borrow(), RegistrationStatus::Deregistered);
    let listed = d.watcher.instances(&svc).await.unwrap();
    assert!(
        listed.get(&a.id).is_none(),
        "deregistered instance still listed"
    );
    assert!(
        listed.get(&keep.id).is_some(),
        "the other instance went too"
    );

    let events = wait_for_set(&mut watch, &mut set, t, "a removed", |s| !s.contains(&a.id)).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, WatchEvent::Removed { id, .. } if *id == a.id)),
        "expected Removed(a), got {:?}",
        events.iter().map(describe).collect::<Vec<_>>()
    );
    assert!(set.contains(&keep.id));
}

/// Dropping the guard deregisters in the background: watchers see the instance go well
/// before any session/TTL would run out.
pub async fn dropped_guard_removes(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("dropped");
    let d = b.connect().await;
    let inst = ns.instance(&svc, "x", 1);
    let reg = d.registrar.register(inst.clone()).await.unwrap();
    let mut watch = d.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, t, "x listed", |s| {
        s.contains(&inst.id)
    })
    .await;
    drop(reg);
    wait_for_set(&mut watch, &mut set, t, "x gone after drop", |s| {
        s.is_empty()
    })
    .await;
    // The client is still alive: the removal came from the guard, not from the session.
    let again = d
        .registrar
        .register(inst.clone())
        .await
        .expect("register again");
    wait_for_set(&mut watch, &mut set, t, "x back", |s| s.contains(&inst.id)).await;
    again.deregister().await.unwrap();
}

/// The first event is an authoritative snapshot: empty for an empty service, complete for
/// a populated one, matching `instances()`.
pub async fn initial_snapshot_empty_and_non_empty(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let d = b.connect().await;
    let empty = ns.service("empty");
    let mut w = d.watcher.watch(&empty);
    match next_event(&mut w, t).await {
        WatchEvent::Snapshot(s) => assert!(s.is_empty(), "expected empty snapshot"),
        other => panic!("first event must be Snapshot, got {}", describe(&other)),
    }

    let full = ns.service("full");
    let mut regs = Vec::new();
    for n in 0..5u16 {
        let i = ns.instance(&full, &format!("i{n}"), 9000 + n);
        regs.push(d.registrar.register(i).await.unwrap());
    }
    let other = b.connect().await;
    // Another client may lag slightly behind the registrant on some registries: wait until
    // its listing has all five, with a deadline.
    let deadline = tokio::time::Instant::now() + t;
    let listed = loop {
        let listed = other.watcher.instances(&full).await.unwrap();
        if listed.len() == 5 {
            break listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instances() listed {} of 5 after {t:?}",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A watch started after that listing begins with a snapshot at least as complete: all
    // five in its first event, not delivered later as `Added`.
    let mut w = other.watcher.watch(&full);
    let first = next_event(&mut w, t).await;
    let WatchEvent::Snapshot(s) = first else {
        panic!("first event must be Snapshot, got {}", describe(&first));
    };
    assert_eq!(
        s.len(),
        5,
        "the first snapshot must be complete: {:?}",
        s.instances
    );
    assert_eq!(
        s.instances, listed.instances,
        "snapshot and instances() disagree"
    );
    for r in &regs {
        assert_eq!(s.get(&r.instance().id), Some(r.instance()));
    }
}

/// Add, update and remove reach a watcher in the order they were made, each as its one
/// event, with strictly rising revisions (each write waits for the previous one to be
/// seen), and applying them yields exactly what `instances()` lists.
pub async fn changes_in_order_with_revisions(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("ordered");
    let d = b.connect().await;
    let w = b.connect().await;
    let mut watch = w.watcher.watch(&svc);
    let WatchEvent::Snapshot(snap) = next_event(&mut watch, t).await else {
        panic!("first event must be Snapshot");
    };
    let mut set = InstanceSet::from_snapshot(&snap);
    let mut log = Vec::new();
    let mut revisions = vec![snap.revision];

    // Each step: one write, then exactly the event it must cause.
    let a = ns.instance(&svc, "a", 1);
    let mut reg_a = d.registrar.register(a.clone()).await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, t, "a added", |s| s.contains(&a.id)).await;
    step(
        &mut log,
        &mut revisions,
        events,
        "Added(a)",
        |e| matches!(e, WatchEvent::Added { instance, .. } if *instance == a),
    );

    let b_inst = ns.instance(&svc, "b", 2);
    let reg_b = d.registrar.register(b_inst.clone()).await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, t, "b added", |s| {
        s.contains(&b_inst.id)
    })
    .await;
    step(
        &mut log,
        &mut revisions,
        events,
        "Added(b)",
        |e| matches!(e, WatchEvent::Added { instance, .. } if *instance == b_inst),
    );

    let updated = a.clone().with_metadata("version", "2").with_weight(50);
    reg_a.update(updated.clone()).await.expect("update");
    let events = wait_for_set(&mut watch, &mut set, t, "a updated", |s| {
        s.get(&a.id) == Some(&updated)
    })
    .await;
    step(
        &mut log,
        &mut revisions,
        events,
        "Updated(a)",
        |e| matches!(e, WatchEvent::Updated { instance, .. } if *instance == updated),
    );

    reg_b.deregister().await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, t, "b removed", |s| {
        !s.contains(&b_inst.id)
    })
    .await;
    step(
        &mut log,
        &mut revisions,
        events,
        "Removed(b)",
        |e| matches!(e, WatchEvent::Removed { id, .. } if *id == b_inst.id),
    );

    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions of successive writes must rise strictly: {revisions:?}; events: {:?}",
        log.iter().map(describe).collect::<Vec<_>>()
    );
    let truth = d.watcher.instances(&svc).await.unwrap();
    assert_eq!(
        InstanceSet::from_snapshot(&truth)
            .iter()
            .collect::<Vec<_>>(),
        set.iter().collect::<Vec<_>>(),
        "applied events differ from the registry"
    );
}

/// One step of [`changes_in_order_with_revisions`]: the events it waited for are exactly
/// one, the expected one; its revision is recorded.
fn step(
    log: &mut Vec<WatchEvent>,
    revisions: &mut Vec<waypost_core::Revision>,
    events: Vec<WatchEvent>,
    what: &str,
    expected: impl Fn(&WatchEvent) -> bool,
) {
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        events.len() == 1 && expected(&events[0]),
        "expected exactly {what}, got {described:?} (before: {:?})",
        log.iter().map(describe).collect::<Vec<_>>()
    );
    revisions.push(events[0].revision().expect("a change has a revision"));
    log.extend(events);
}

/// Metadata (64 keys, unicode values), tags, weight and zone come back exactly.
pub async fn fields_round_trip(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("fields");
    let d = b.connect().await;
    let mut inst = ns
        .instance(&svc, "rich", 4242)
        .with_tag("primary")
        .with_tag("ünïcødé-tag ✓")
        .with_weight(7)
        .with_zone("eu-west-1a");
    for k in 0..waypost_core::model::MAX_METADATA_ENTRIES {
        inst = inst.with_metadata(format!("key_{k:02}"), format!("välue {k} — 日本語 ✓"));
    }
    let _reg = d
        .registrar
        .register(inst.clone())
        .await
        .expect("register 64 metadata keys");
    let w = b.connect().await;
    let mut watch = w.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, t, "rich listed", |s| {
        s.contains(&inst.id)
    })
    .await;
    assert_eq!(set.get(&inst.id), Some(&inst), "watched instance differs");
    let listed = w.watcher.instances(&svc).await.unwrap();
    assert_eq!(listed.get(&inst.id), Some(&inst), "listed instance differs");

    let drained = ns.instance(&svc, "drained", 4243).with_weight(0);
    let _r2 = d.registrar.register(drained.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, t, "drained listed", |s| {
        s.contains(&drained.id)
    })
    .await;
    assert_eq!(
        set.get(&drained.id).map(|i| i.weight),
        Some(0),
        "weight 0 must survive"
    );
}

/// Two services never see each other's instances, even with the same instance ids.
pub async fn services_are_isolated(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let one = ns.service("one");
    let two = ns.service("two");
    let d = b.connect().await;
    let _r1 = d
        .registrar
        .register(ns.instance(&one, "same", 1))
        .await
        .unwrap();
    let _r2 = d
        .registrar
        .register(ns.instance(&two, "same", 2))
        .await
        .unwrap();
    let _r3 = d
        .registrar
        .register(ns.instance(&two, "other", 3))
        .await
        .unwrap();
    let mut w1 = d.watcher.watch(&one);
    let mut s1 = InstanceSet::new();
    wait_for_set(&mut w1, &mut s1, t, "service one", |s| s.len() == 1).await;
    let mut w2 = d.watcher.watch(&two);
    let mut s2 = InstanceSet::new();
    wait_for_set(&mut w2, &mut s2, t, "service two", |s| s.len() == 2).await;
    assert_eq!(s1.iter().next().unwrap().endpoint.port, 1);
    assert!(s1.iter().all(|i| i.service == one) && s2.iter().all(|i| i.service == two));
    // A service whose name extends another's is still another service.
    let prefix = waypost_core::ServiceName::new(format!("{one}x")).unwrap();
    assert!(d.watcher.instances(&prefix).await.unwrap().is_empty());
    // A change in two does not reach one's watch.
    let _r4 = d
        .registrar
        .register(ns.instance(&two, "third", 4))
        .await
        .unwrap();
    wait_for_set(&mut w2, &mut s2, t, "third in two", |s| s.len() == 3).await;
    if let Ok(Some(Ok(ev))) = tokio::time::timeout(
        Duration::from_millis(200),
        futures::StreamExt::next(&mut w1),
    )
    .await
    {
        s1.apply(&ev);
    }
    assert_eq!(s1.len(), 1, "service one changed when two did");
}

/// Watching a service nobody registered yields an empty snapshot (not an error), then the
/// first instance when it arrives.
pub async fn watch_of_unregistered_service(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("nobody");
    let d = b.connect().await;
    assert!(d
        .watcher
        .instances(&svc)
        .await
        .expect("listing an unknown service")
        .is_empty());
    let mut w = d.watcher.watch(&svc);
    let WatchEvent::Snapshot(s) = next_event(&mut w, t).await else {
        panic!("first event must be Snapshot");
    };
    assert!(s.is_empty());
    let other = b.connect().await;
    let inst = ns.instance(&svc, "first", 1);
    let _r = other.registrar.register(inst.clone()).await.unwrap();
    let mut set = InstanceSet::from_snapshot(&s);
    wait_for_set(&mut w, &mut set, t, "first instance", |s| {
        s.contains(&inst.id)
    })
    .await;
}

/// `update()` replaces the instance for watchers; `drain()` sets weight 0, waits, then
/// removes.
pub async fn update_and_drain(b: &dyn TestBackend) {
    let t = b.settings().timeout;
    let ns = Namespace::new();
    let svc = ns.service("drain");
    let d = b.connect().await;
    let inst = ns.instance(&svc, "d", 1);
    let mut reg = d.registrar.register(inst.clone()).await.unwrap();
    let mut w = d.watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut w, &mut set, t, "listed", |s| s.contains(&inst.id)).await;

    // Metadata-, weight- and tag-only changes are each one `Updated` (never a removal
    // and a re-addition).
    let mut current = inst.clone();
    for (what, next) in [
        ("metadata", inst.clone().with_metadata("moved", "yes")),
        (
            "weight",
            inst.clone().with_metadata("moved", "yes").with_weight(7),
        ),
        (
            "tags",
            inst.clone()
                .with_metadata("moved", "yes")
                .with_weight(7)
                .with_tag("blue"),
        ),
    ] {
        reg.update(next.clone()).await.expect("update");
        let events = wait_for_set(&mut w, &mut set, t, what, |s| {
            s.get(&inst.id) == Some(&next)
        })
        .await;
        assert!(
            events.iter().all(
                |e| matches!(e, WatchEvent::Updated { instance, .. } if instance.id == inst.id)
            ),
            "a {what}-only change is reported as Updated only: {:?}",
            events.iter().map(describe).collect::<Vec<_>>()
        );
        assert_ne!(current, next);
        current = next;
    }
    let moved = current;
    assert_eq!(reg.instance(), &moved);

    let mut other_id = moved.clone();
    other_id.id = "other".parse().unwrap();
    assert!(
        matches!(
            reg.update(other_id).await,
            Err(waypost_core::Error::InvalidInput { .. })
        ),
        "update may not change the id"
    );

    let grace = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let drain = tokio::spawn(reg.drain(grace));
    wait_for_set(&mut w, &mut set, t, "weight 0", |s| {
        s.get(&inst.id).is_some_and(|i| i.weight == 0)
    })
    .await;
    wait_for_set(&mut w, &mut set, t, "drained instance removed", |s| {
        s.is_empty()
    })
    .await;
    let took = started.elapsed();
    assert!(
        took >= grace,
        "drain removed the instance after {took:?}, before its grace of {grace:?}"
    );
    drain.await.unwrap().expect("drain");
}

/// `services()` lists every service with a live instance, sorted, from any client; a
/// service whose last instance left is no longer listed (registries that keep empty
/// service paths, like ZooKeeper, may list it until the path is removed: then it must be
/// listed with no instances).
pub async fn services_are_listed(b: &dyn TestBackend) {
    let ns = Namespace::new();
    let (a, z) = (ns.service("alpha"), ns.service("zulu"));
    let reg_side = b.connect().await;
    let other = b.connect().await;
    let ra = reg_side
        .registrar
        .register(ns.instance(&a, "a-1", 8001))
        .await
        .expect("register");
    let _rz = reg_side
        .registrar
        .register(ns.instance(&z, "z-1", 8002))
        .await
        .expect("register");
    let listed = other.watcher.services().await.expect("services");
    let pos = |s| listed.iter().position(|x| *x == s);
    let (pa, pz) = (pos(a.clone()), pos(z.clone()));
    assert!(
        pa.is_some() && pz.is_some(),
        "{}: both services listed, got {listed:?}",
        b.name()
    );
    assert!(pa < pz, "services are sorted: {listed:?}");
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "the whole listing is sorted");

    ra.deregister().await.expect("deregister");
    let listed = other.watcher.services().await.expect("services");
    if listed.contains(&a) {
        let left = other.watcher.instances(&a).await.expect("instances");
        assert!(
            left.is_empty(),
            "{}: a service listed after its last instance left must be empty",
            b.name()
        );
    }
    assert!(listed.contains(&z), "the other service is still listed");
}
