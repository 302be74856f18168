//! Locks, semaphores and elections against a real ZooKeeper: Curator's node layout,
//! FIFO and semaphore queues, foreign nodes, lost signals (deleted node, paused server,
//! crashed holder), and the leader watch.

mod common;

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use waypost_core::backend::watch::Event;
use waypost_core::backend::TestHooks;
use waypost_core::coord::Wait;
use waypost_core::coord::{Lost, Name};
use waypost_core::Error;
use waypost_testkit::conformance::Namespace;
use waypost_testkit::server::ZooKeeperServer;
use waypost_zookeeper::ZkDiscovery;
use zookeeper_client::{Acls, Client, CreateMode};

const T: Duration = Duration::from_secs(10);

async fn raw(server: &ZooKeeperServer) -> Client {
    Client::connector()
        .with_session_timeout(common::SESSION)
        .connect(&server.address())
        .await
        .expect("raw client")
}

fn name(ns: &Namespace, n: &str) -> Name {
    format!("{}/{n}", ns.prefix()).parse().unwrap()
}

/// The children of `name`'s node under the default prefix, sorted.
async fn children(raw: &Client, name: &Name) -> Vec<String> {
    let mut c = raw
        .list_children(&format!("/coord/{name}"))
        .await
        .unwrap_or_default();
    c.sort();
    c
}

/// Waits until `name` has `n` contender nodes.
async fn wait_children(raw: &Client, name: &Name, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let now = children(raw, name).await;
        if now.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} contenders of {name}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what} within {T:?}"))
}

async fn started() -> Option<(ZooKeeperServer, Namespace)> {
    common::init_tracing();
    Some((common::server().await?, Namespace::new()))
}

/// The node of a lock is Curator's `_c_{uuid}-lock-{%010d}`, ephemeral, owned by the
/// client's session; the token is its `czxid`; release deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_a_curator_mutex_node() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let (a, b) = (common::client(&server).await, common::client(&server).await);
    let raw = raw(&server).await;
    let x = name(&ns, "x");
    let held = within("lock", a.coordinator().lock(&x)).await.unwrap();
    let nodes = children(&raw, &x).await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = &nodes[0];
    assert!(
        node.starts_with("_c_") && node.len() == 3 + 36 + 6 + 10,
        "{node}"
    );
    assert_eq!(&node[39..45], "-lock-", "{node}");
    let (_, stat) = raw
        .get_data(&format!("/coord/{x}/{node}"))
        .await
        .expect("our node");
    assert_eq!(stat.ephemeral_owner, a.session_id().unwrap());
    assert_eq!(held.token().0, stat.czxid as u64);
    let busy = b.coordinator().try_lock(&x).await.unwrap_err();
    assert!(matches!(busy, Error::Busy { .. }), "{busy:?}");
    assert_eq!(children(&raw, &x).await.len(), 1, "try_lock left no node");
    let first = held.token();
    held.release().await.unwrap();
    assert!(children(&raw, &x).await.is_empty());
    let again = b.coordinator().try_lock(&x).await.unwrap();
    assert!(again.token() > first);
}

/// Waiters are served in the order they queued; a timeout leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_order() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let raw = raw(&server).await;
    let x = name(&ns, "fifo");
    let clients = [
        common::client(&server).await,
        common::client(&server).await,
        common::client(&server).await,
    ];
    let first = clients[0].coordinator().lock(&x).await.unwrap();
    let late = clients[1]
        .coordinator()
        .lock_for(&x, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(late, Error::Timeout { .. }), "{late:?}");
    wait_children(&raw, &x, 1).await; // the timed-out waiter leaves
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, c) in clients.iter().enumerate().skip(1) {
        let (c, name, tx) = (c.clone(), x.clone(), tx.clone());
        tokio::spawn(async move {
            let g = c.coordinator().lock(&name).await.unwrap();
            tx.send((i, g.token())).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            g.release().await.unwrap();
        });
        // Queue in order: wait until this waiter's node exists.
        let want = i + 1;
        wait_children(&raw, &x, want).await;
    }
    let mut last = first.token();
    first.release().await.unwrap();
    for want in 1..=2 {
        let (i, token) = within("the next waiter", rx.recv()).await.unwrap();
        assert_eq!(i, want, "served out of order");
        assert!(token > last);
        last = token;
    }
}

/// A semaphore of two: the third waits, and holds when either holder leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_admits_its_permits() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let raw = raw(&server).await;
    let s = name(&ns, "pool");
    let c: Vec<ZkDiscovery> = vec![
        common::client(&server).await,
        common::client(&server).await,
        common::client(&server).await,
    ];
    for release_first in [0, 1] {
        let a = c[0].coordinator().acquire(&s, 2, Wait::No);
        let a = a.await.unwrap();
        let b = c[1].coordinator().acquire(&s, 2, Wait::No);
        let b = b.await.unwrap();
        let busy = c[2]
            .coordinator()
            .acquire(&s, 2, Wait::No)
            .await
            .unwrap_err();
        assert!(matches!(busy, Error::Busy { .. }), "{busy:?}");
        assert!(children(&raw, &s).await[0].contains("-semaphore-"));
        let third = {
            let (c, s) = (c[2].clone(), s.clone());
            tokio::spawn(async move { c.coordinator().acquire(&s, 2, Wait::Forever).await })
        };
        wait_children(&raw, &s, 3).await;
        let (gone, stays) = if release_first == 0 { (a, b) } else { (b, a) };
        gone.release().await.unwrap();
        let g = within("the third permit", third).await.unwrap().unwrap();
        assert!(g.token() > stays.token());
        g.release().await.unwrap();
        stays.release().await.unwrap();
    }
}

/// A node deleted behind the holder's back: the guard reports `Deleted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_is_a_lost_lock() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let raw = raw(&server).await;
    let a = common::client(&server).await;
    let x = name(&ns, "deleted");
    let g = a.coordinator().lock(&x).await.unwrap();
    let node = children(&raw, &x).await.remove(0);
    raw.delete(&format!("/coord/{x}/{node}"), None)
        .await
        .unwrap();
    assert_eq!(within("lost", g.lost()).await, Lost::Deleted);
    g.release().await.unwrap();
}

/// Foreign children (no contender, a Curator `lease-`) are skipped; a custom
/// `coord_prefix` is where the nodes go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_children_and_the_prefix() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let raw = raw(&server).await;
    let d = ZkDiscovery::connect(common::config(&server).with_coord_prefix("/my/locks"))
        .await
        .unwrap();
    let x = name(&ns, "foreign");
    let parent = format!("/my/locks/{x}");
    let mode = CreateMode::Persistent.with_acls(Acls::anyone_all());
    raw.mkdir(&parent, &mode).await.unwrap();
    for junk in ["junk", "_c_x-lease-0000000000", "lock-"] {
        raw.create(&format!("{parent}/{junk}"), b"?", &mode)
            .await
            .unwrap();
    }
    let g = d.coordinator().try_lock(&x).await.unwrap();
    let l = d.coordinator().campaign(&x, b"me".to_vec()).await.unwrap();
    let leader = d.coordinator().leader(&x).await.unwrap().unwrap();
    assert_eq!(
        (leader.value.as_slice(), leader.token),
        (&b"me"[..], l.token())
    );
    let names = raw.list_children(&parent).await.unwrap();
    assert_eq!(names.len(), 5, "{names:?}");
    g.release().await.unwrap();
    l.resign().await.unwrap();
    assert_eq!(d.coordinator().leader(&x).await.unwrap(), None);
}

/// An election: latch nodes holding the value; proclaim, resign and a crashed leader
/// are seen by `observe`, with rising tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_is_observed() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let raw = raw(&server).await;
    let c: Vec<ZkDiscovery> = vec![
        common::client(&server).await,
        common::client(&server).await,
        common::client(&server).await,
    ];
    let e = name(&ns, "leader");
    let mut w = c[2].coordinator().observe(&e);
    let first = within("snapshot", w.next()).await.unwrap().unwrap();
    assert!(
        matches!(&first, Event::Snapshot(l, _) if l.is_empty()),
        "{first:?}"
    );
    let a = c[0]
        .coordinator()
        .campaign(&e, b"a".to_vec())
        .await
        .unwrap();
    let nodes = children(&raw, &e).await;
    assert!(nodes[0].contains("-latch-"), "{nodes:?}");
    let ev = within("a elected", w.next()).await.unwrap().unwrap();
    assert!(
        matches!(&ev, Event::Added(l, _) if l.value == b"a" && l.token == a.token()),
        "{ev:?}"
    );
    a.proclaim(b"a2".to_vec()).await.unwrap();
    let ev = within("a proclaims", w.next()).await.unwrap().unwrap();
    assert!(
        matches!(&ev, Event::Updated(l, _) if l.value == b"a2"),
        "{ev:?}"
    );
    let b = {
        let c = c[1].clone();
        let e = e.clone();
        tokio::spawn(async move { c.coordinator().campaign(&e, b"b".to_vec()).await })
    };
    wait_children(&raw, &e, 2).await;
    let resigned = Instant::now();
    a.resign().await.unwrap();
    let b = within("b elected", b).await.unwrap().unwrap();
    assert!(
        resigned.elapsed() < Duration::from_secs(2),
        "resign hands over at once"
    );
    let ev = within("b elected", w.next()).await.unwrap().unwrap();
    assert!(
        matches!(&ev, Event::Updated(l, _) if l.value == b"b" && l.token == b.token()),
        "{ev:?}"
    );
    // The leader crashes: its session times out, and the election has no leader.
    let crashed = Instant::now();
    c[1].crash();
    let ev = within("b gone", w.next()).await.unwrap().unwrap();
    assert!(matches!(&ev, Event::Removed(..)), "{ev:?}");
    assert!(
        crashed.elapsed() < common::SESSION * 3,
        "{:?}",
        crashed.elapsed()
    );
    drop(b);
}

/// The server pauses past the session timeout: the holder's guard reports the lock lost
/// (locally, from the last confirmed keep-alive) before the waiter acquires it, and the
/// waiter's token is greater. A crashed holder's lock passes within the session bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_before_anyone_else_acquires() {
    let Some((server, ns)) = started().await else {
        return;
    };
    let (a, b) = (common::client(&server).await, common::client(&server).await);
    let raw = raw(&server).await;
    let x = name(&ns, "paused");
    let held = a.coordinator().lock(&x).await.unwrap();
    let token = held.token();
    let lost_at = {
        let lost = held.lost();
        tokio::spawn(async move { (lost.await, Instant::now()) })
    };
    let waiter = {
        let (b, x) = (b.clone(), x.clone());
        tokio::spawn(async move {
            // A waiter through an outage longer than the session sees its error (core
            // does not open a new session for it): it asks again, as an application would.
            loop {
                match b.coordinator().lock(&x).await {
                    Err(e) if e.is_temporary() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    g => return (g, Instant::now()),
                }
            }
        })
    };
    wait_children(&raw, &x, 2).await;
    drop(raw);
    let paused = Instant::now();
    server.pause().unwrap();
    let (why, lost) = within("lost while paused", lost_at).await.unwrap();
    assert!(
        matches!(why, Lost::Unconfirmed | Lost::SessionExpired),
        "{why:?}"
    );
    assert!(
        lost - paused < common::SESSION,
        "lost after {:?}",
        lost - paused
    );
    tokio::time::sleep(common::SESSION * 2).await; // the pause outlasts the session
    server.resume().unwrap();
    let (g, acquired) = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter acquires after the holder's session expired")
        .unwrap();
    let g = g.unwrap();
    assert!(lost < acquired);
    assert!(g.token() > token);
    held.release().await.unwrap(); // a lost guard releases without error
                                   // A crashed holder: the next waiter acquires within the session bound.
    let waiter = {
        let (a, x) = (a.clone(), x.clone());
        tokio::spawn(async move { a.coordinator().lock(&x).await.map(|g| (g, Instant::now())) })
    };
    let raw = self::raw(&server).await;
    wait_children(&raw, &x, 2).await;
    let crashed = Instant::now();
    b.crash();
    let (_g, at) = within("the crashed holder's lock", waiter)
        .await
        .unwrap()
        .unwrap();
    let bound = common::SESSION + Duration::from_millis(1500);
    assert!(at - crashed < bound, "took over after {:?}", at - crashed);
    drop(g);
}
