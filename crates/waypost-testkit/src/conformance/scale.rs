//! Size and concurrency: many instances, many registrants.

use futures::stream::{self, StreamExt, TryStreamExt};
use waypost_core::{InstanceSet, WatchEvent};

use super::util::{next_event, wait_for_set, Namespace};
use super::TestBackend;

/// 1,000 instances in one service: all listed, all watched, then all gone.
pub async fn thousand_instances(b: &dyn TestBackend) {
    let settings = b.settings();
    let t = settings.timeout * 3;
    let ns = Namespace::new();
    let svc = ns.service("big");
    let d = b.connect().await;
    let w = b.connect().await;
    let mut watch = w.watcher.watch(&svc);
    let WatchEvent::Snapshot(s) = next_event(&mut watch, t).await else {
        panic!("first event must be Snapshot");
    };
    let mut set = InstanceSet::from_snapshot(&s);
    assert!(set.is_empty());

    let registrar = d.registrar.clone();
    let regs: Vec<_> = stream::iter(0..1000u16)
        .map(|n| {
            let r = registrar.clone();
            let i = ns.instance(&svc, &format!("n{n:04}"), 10_000 + n);
            async move { r.register(i).await }
        })
        .buffer_unordered(settings.concurrency)
        .try_collect()
        .await
        .expect("register 1000");
    assert_eq!(regs.len(), 1000);
    wait_for_set(&mut watch, &mut set, t, "1000 watched", |s| s.len() == 1000).await;
    let listed = w.watcher.instances(&svc).await.unwrap();
    assert_eq!(listed.len(), 1000, "listing");
    assert!(
        listed.instances.windows(2).all(|p| p[0].id < p[1].id),
        "snapshot not sorted by id"
    );

    stream::iter(regs)
        .map(|r| r.deregister())
        .buffer_unordered(settings.concurrency)
        .try_collect::<Vec<()>>()
        .await
        .expect("deregister 1000");
    wait_for_set(&mut watch, &mut set, t, "all gone", |s| s.is_empty()).await;
}

/// 50 registrars (each its own client and session) register at once; a watcher sees all
/// 50, and each registrar's removal.
pub async fn concurrent_registrars(b: &dyn TestBackend) {
    let t = b.settings().timeout * 2;
    let ns = Namespace::new();
    let svc = ns.service("crowd");
    let w = b.connect().await;
    let mut watch = w.watcher.watch(&svc);
    let WatchEvent::Snapshot(s) = next_event(&mut watch, t).await else {
        panic!("first event must be Snapshot");
    };
    let mut set = InstanceSet::from_snapshot(&s);
    let clients = futures::future::join_all((0..50).map(|_| b.connect())).await;
    let regs = futures::future::try_join_all(clients.iter().enumerate().map(|(n, c)| {
        c.registrar
            .register(ns.instance(&svc, &format!("c{n:02}"), 20_000 + n as u16))
    }))
    .await
    .expect("50 concurrent registrations");
    wait_for_set(&mut watch, &mut set, t, "50 watched", |s| s.len() == 50).await;
    futures::future::try_join_all(regs.into_iter().map(|r| r.deregister()))
        .await
        .expect("50 deregistrations");
    wait_for_set(&mut watch, &mut set, t, "none left", |s| s.is_empty()).await;
}
