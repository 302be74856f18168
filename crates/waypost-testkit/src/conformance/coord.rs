//! Locks, semaphores and elections: mutual exclusion under contention, fencing tokens,
//! `try_lock` and timeouts, FIFO order, crashed and expired holders, cleanup of abandoned
//! acquisitions, elections observed through faults.
//!
//! Every suite uses fresh random names ([`Namespace::config_key`]), one client per
//! contender (each its own session, a separate "process").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::StreamExt;
use tokio::time::{timeout, Instant};
use waypost_core::backend::Event;
use waypost_core::coord::{Coordinator, FencingToken, Leader, LeaderEvent, Lost, Name, Wait};
use waypost_core::{Discovery, Error};

use super::{Faults, Namespace, TestBackend};

/// One client and its coordinator.
struct Client {
    discovery: Discovery,
    coord: Arc<dyn Coordinator>,
}

async fn client(backend: &dyn TestBackend) -> Client {
    let discovery = backend.connect().await;
    let coord = discovery
        .coordinator()
        .unwrap_or_else(|e| panic!("{}: no coordinator: {e}", backend.name()));
    Client { discovery, coord }
}

fn faults(backend: &dyn TestBackend) -> &dyn Faults {
    backend.faults().unwrap_or_else(|| {
        panic!(
            "{}: this suite needs fault injection (never skipped silently)",
            backend.name()
        )
    })
}

/// Waits until `cond` holds, polling, or panics with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn contenders_become(backend: &dyn TestBackend, name: &Name, n: usize) {
    let f = faults(backend);
    let limit = backend.settings().timeout;
    eventually(
        limit,
        &format!("{name}: {n} contenders in the registry"),
        || async { f.coord_contenders(name).await == n },
    )
    .await;
}

fn assert_busy<T: std::fmt::Debug>(r: waypost_core::Result<T>, what: &str) {
    match r {
        Err(Error::Busy { .. }) => {}
        other => panic!("{what}: expected Error::Busy, got {other:?}"),
    }
}

/// Several clients × several rounds on one lock: holder intervals never overlap, tokens
/// strictly rise from one holder to the next, and no guard reports itself lost.
pub async fn coord_mutual_exclusion(backend: &dyn TestBackend) {
    const CLIENTS: usize = 3;
    const ROUNDS: usize = 5;
    let ns = Namespace::new();
    let name = ns.config_key("mutex");
    // (start, end, token, client)
    type Interval = (Instant, Instant, FencingToken, usize);
    let log: Arc<Mutex<Vec<Interval>>> = Arc::default();
    let limit = backend.settings().timeout * 3;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let cl = client(backend).await;
        let (name, log) = (name.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let g = timeout(limit, cl.coord.lock(&name))
                    .await
                    .expect("lock within the limit")
                    .expect("lock");
                let start = Instant::now();
                // The protected work.
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert!(
                    !g.is_lost(),
                    "a holder lost its lock under plain contention"
                );
                let end = Instant::now();
                let token = g.token();
                g.release().await.expect("release");
                log.lock().unwrap().push((start, end, token, c));
            }
            drop(cl.discovery);
        }));
    }
    for t in tasks {
        t.await.expect("a contender panicked");
    }
    let mut log = log.lock().unwrap().clone();
    assert_eq!(log.len(), CLIENTS * ROUNDS, "every round held the lock");
    log.sort_by_key(|e| e.0);
    for w in log.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.1 <= b.0,
            "{}: two holders at once: client {} held until {:?} after client {} started at {:?}",
            backend.name(),
            a.3,
            a.1,
            b.3,
            b.0
        );
        assert!(
            a.2 < b.2,
            "{}: fencing tokens must strictly rise: {} then {}",
            backend.name(),
            a.2,
            b.2
        );
    }
}

/// `try_lock` on a held lock is `Busy` at once; `lock_for` times out; neither leaves a
/// contender behind; after the release the next holder's token is greater. Invalid
/// input is refused.
pub async fn coord_try_lock_and_timeout(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("try");
    let (a, b) = (client(backend).await, client(backend).await);
    let held = a.coord.try_lock(&name).await.expect("a free lock");
    contenders_become(backend, &name, 1).await;

    let started = Instant::now();
    assert_busy(b.coord.try_lock(&name).await, "try_lock on a held lock");
    assert!(
        started.elapsed() < backend.settings().timeout,
        "try_lock answered at once"
    );
    match b.coord.lock_for(&name, Duration::from_millis(300)).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("lock_for on a held lock: expected a timeout, got {other:?}"),
    }
    // Neither left anything in the queue.
    contenders_become(backend, &name, 1).await;
    assert!(!held.is_lost());

    let first = held.token();
    held.release().await.expect("release");
    let next = b
        .coord
        .try_lock(&name)
        .await
        .expect("free after the release");
    assert!(
        next.token() > first,
        "tokens rise: {first} then {}",
        next.token()
    );
    next.release().await.expect("release");

    match a.coord.acquire(&name, 0, Wait::No).await {
        Err(Error::InvalidInput { .. }) => {}
        other => panic!("zero permits: expected InvalidInput, got {other:?}"),
    }
    let huge = vec![b'x'; 8 * 1024 * 1024];
    match timeout(
        backend.settings().timeout,
        a.coord.campaign(&ns.config_key("huge"), huge),
    )
    .await
    {
        Ok(Err(Error::InvalidInput { .. })) => {}
        other => panic!("an 8 MiB campaign value: expected InvalidInput, got {other:?}"),
    }
}

/// Waiters acquire in the order they queued.
pub async fn coord_fifo(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("fifo");
    let holder = client(backend).await;
    let first = holder.coord.lock(&name).await.expect("lock");
    let order: Arc<Mutex<Vec<usize>>> = Arc::default();
    let limit = backend.settings().timeout * 2;
    let mut tasks = Vec::new();
    for i in 0..3 {
        let cl = client(backend).await;
        let (n, order) = (name.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let g = timeout(limit, cl.coord.lock(&n))
                .await
                .expect("acquired within the limit")
                .expect("lock");
            order.lock().unwrap().push(i);
            g.release().await.expect("release");
            drop(cl.discovery);
        }));
        // The next waiter queues only once this one did.
        contenders_become(backend, &name, i + 2).await;
    }
    first.release().await.expect("release");
    for t in tasks {
        t.await.expect("a waiter panicked");
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![0, 1, 2],
        "waiters served in order"
    );
}

/// A counting semaphore of 2: two hold at once, the third waits for a release.
pub async fn coord_semaphore(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("pool");
    let (a, b, c) = (
        client(backend).await,
        client(backend).await,
        client(backend).await,
    );
    let ga = a.coord.acquire(&name, 2, Wait::No).await.expect("permit 1");
    let gb = b.coord.acquire(&name, 2, Wait::No).await.expect("permit 2");
    assert_ne!(ga.token(), gb.token());
    assert_busy(c.coord.acquire(&name, 2, Wait::No).await, "a third permit");
    let limit = backend.settings().timeout;
    let waiting = tokio::spawn({
        let (coord, name) = (c.coord.clone(), name.clone());
        async move { coord.acquire(&name, 2, Wait::For(limit * 2)).await }
    });
    contenders_become(backend, &name, 3).await;
    assert!(!waiting.is_finished(), "the third waits while two hold");
    let freed = ga.token();
    ga.release().await.expect("release");
    let gc = waiting
        .await
        .unwrap()
        .expect("the third gets the freed permit");
    assert!(gc.token() > freed);
    assert!(!gb.is_lost());
}

/// A crashed holder (no release) is replaced by the waiter within the session's bound;
/// the new token is greater.
pub async fn coord_holder_crash(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("crash");
    let (a, b) = (client(backend).await, client(backend).await);
    let held = a.coord.lock(&name).await.expect("lock");
    let liveness = backend.settings().liveness;
    let waiting = tokio::spawn({
        let (coord, name) = (b.coord.clone(), name.clone());
        async move { timeout(liveness * 2, coord.lock(&name)).await }
    });
    contenders_become(backend, &name, 2).await;
    let crashed_at = Instant::now();
    assert!(
        faults(backend).crash(&a.discovery).await,
        "{}: the client cannot be crashed",
        backend.name()
    );
    let next = waiting
        .await
        .unwrap()
        .expect("the waiter acquired within the bound")
        .expect("lock");
    let took = crashed_at.elapsed();
    assert!(
        took <= liveness,
        "{}: the next holder acquired {took:?} after the crash (bound {liveness:?})",
        backend.name()
    );
    assert!(next.token() > held.token());
    assert!(held.is_lost(), "the crashed client's guard reports lost");
}

/// The registry becomes unreachable past the session's bound: the holder learns it lost
/// the lock before any other client acquires it, and the next token is greater. The
/// waiter's own session may expire meanwhile: it queues again by itself.
pub async fn coord_lost_before_next_holder(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("partition");
    let (a, b) = (client(backend).await, client(backend).await);
    let held = a.coord.lock(&name).await.expect("lock");
    let liveness = backend.settings().liveness;
    let waiting = tokio::spawn({
        let (coord, name) = (b.coord.clone(), name.clone());
        async move {
            let g = timeout(liveness * 4, coord.lock(&name)).await;
            (Instant::now(), g)
        }
    });
    contenders_become(backend, &name, 2).await;
    let f = faults(backend);
    let cut = Instant::now();
    f.make_unreachable().await;
    let why = timeout(liveness, held.lost()).await.unwrap_or_else(|_| {
        panic!(
            "{}: the holder was not told within {liveness:?} that it cannot keep the lock",
            backend.name()
        )
    });
    let lost_at = Instant::now();
    assert!(
        matches!(why, Lost::Unconfirmed | Lost::SessionExpired),
        "lost because {why:?}"
    );
    // Keep the registry away until the holder's session is surely gone there.
    tokio::time::sleep_until(cut + liveness).await;
    f.make_reachable().await;
    let (acquired_at, next) = waiting.await.unwrap();
    let next = next
        .expect("the waiter acquired after the outage")
        .expect("lock");
    assert!(
        lost_at < acquired_at,
        "{}: the old holder learnt of its loss at {lost_at:?}, after the new one acquired at {acquired_at:?}",
        backend.name()
    );
    assert!(next.token() > held.token());
    // Handed out under a session the registry confirmed, not one it is about to expire.
    assert!(
        !next.is_lost(),
        "{}: the new holder was handed a lock already lost",
        backend.name()
    );
    held.release().await.expect("releasing a lost lock is fine");
    assert!(
        !next.is_lost(),
        "the old holder's release spared the new holder"
    );
    next.release().await.expect("release");
}

/// Sessions expire: the holder is told (`SessionExpired`), a new client acquires, and the
/// old holder's release does not touch the new holder's entry.
pub async fn coord_release_after_expiry_spares_new_holder(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("expiry");
    let a = client(backend).await;
    let held = a.coord.lock(&name).await.expect("lock");
    let liveness = backend.settings().liveness;
    faults(backend).expire_sessions().await;
    let why = timeout(liveness, held.lost())
        .await
        .expect("the holder was told");
    assert!(
        matches!(
            why,
            Lost::SessionExpired | Lost::Deleted | Lost::Unconfirmed
        ),
        "lost because {why:?}"
    );
    let b = client(backend).await;
    let next = timeout(liveness, b.coord.lock(&name))
        .await
        .expect("a new client acquires after the expiry")
        .expect("lock");
    assert!(next.token() > held.token());
    held.release().await.expect("releasing a lost lock is fine");
    let c = client(backend).await;
    assert_busy(
        c.coord.try_lock(&name).await,
        "the new holder still holds after the old one's release",
    );
    assert!(!next.is_lost());
}

/// An acquisition whose future is dropped while it waits leaves nothing behind; a
/// dropped guard releases.
pub async fn coord_dropped_acquisition_cleans_up(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("dropped");
    let (a, b, c) = (
        client(backend).await,
        client(backend).await,
        client(backend).await,
    );
    let held = a.coord.lock(&name).await.expect("lock");
    {
        let waiting = b.coord.lock(&name);
        tokio::pin!(waiting);
        // Let it queue, then drop it.
        let limit = backend.settings().timeout;
        let f = faults(backend);
        let deadline = Instant::now() + limit;
        loop {
            tokio::select! {
                r = &mut waiting => panic!("acquired a held lock: {r:?}"),
                n = f.coord_contenders(&name) => if n == 2 { break },
            }
            assert!(Instant::now() < deadline, "the waiter never queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    contenders_become(backend, &name, 1).await;
    held.release().await.expect("release");
    let g = c
        .coord
        .try_lock(&name)
        .await
        .expect("nobody is left in front");
    drop(g);
    let limit = backend.settings().timeout;
    let again = timeout(limit, a.coord.lock(&name))
        .await
        .expect("a dropped guard releases in the background")
        .expect("lock");
    again.release().await.expect("release");
}

/// Shutting a client down releases what it holds at once (its session is closed), not
/// after the session's bound: a waiter acquires within the suite's timeout.
pub async fn coord_shutdown_releases_at_once(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let name = ns.config_key("shutdown");
    let (a, b) = (client(backend).await, client(backend).await);
    let held = a.coord.lock(&name).await.expect("lock");
    let t = backend.settings().timeout;
    let waiting = tokio::spawn({
        let (coord, name) = (b.coord.clone(), name.clone());
        async move { coord.lock_for(&name, t * 2).await }
    });
    contenders_become(backend, &name, 2).await;
    let started = Instant::now();
    a.discovery.shutdown().await.expect("shutdown");
    let next = waiting
        .await
        .unwrap()
        .expect("acquired after the holder shut down");
    assert!(
        started.elapsed() < t,
        "{}: acquired {:?} after the holder's shutdown",
        backend.name(),
        started.elapsed()
    );
    assert!(next.token() > held.token());
    assert!(held.is_lost(), "the shut-down holder's guard reports lost");
    assert!(matches!(
        a.coord.try_lock(&name).await,
        Err(Error::Closed { .. })
    ));
}

/// The leader of an observed election, as far as the events told.
fn apply(current: &mut Option<Leader>, event: &LeaderEvent) {
    match event {
        Event::Snapshot(l, _) | Event::Resynced(l, _) => *current = l.first().cloned(),
        Event::Added(l, _) | Event::Updated(l, _) => *current = Some(l.clone()),
        Event::Removed(_, _) => *current = None,
        Event::Stale(_) => {}
    }
}

/// Reads events until the observed leader satisfies `pred`. With no outage going on, a
/// `Stale` is a failure (a feed that reports outages that are none).
async fn observe_until(
    events: &mut futures::stream::BoxStream<'static, waypost_core::Result<LeaderEvent>>,
    current: &mut Option<Leader>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Option<Leader>) -> bool,
) -> Vec<LeaderEvent> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while !pred(current) {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: not observed within {limit:?}; saw {seen:?}"))
            .expect("the observe stream ended")
            .expect("an observe error");
        assert!(
            !matches!(e, Event::Stale(_)),
            "{what}: Stale while the registry is reachable; saw {seen:?}"
        );
        apply(current, &e);
        seen.push(e);
    }
    seen
}

/// One leader at a time: campaign, observe, proclaim, resign (hands over at once), leader
/// crash (a new leader within the bound); tokens rise; `leader()` agrees with `observe`.
pub async fn coord_election(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let election = ns.config_key("election");
    let observer = client(backend).await;
    let mut events = observer.coord.observe(&election);
    let t = backend.settings().timeout;
    let mut got = None;
    let snap = timeout(t, events.next())
        .await
        .expect("a snapshot")
        .expect("stream open")
        .expect("no error");
    assert!(
        matches!(&snap, Event::Snapshot(l, _) if l.is_empty()),
        "a fresh election has no leader: {snap:?}"
    );
    apply(&mut got, &snap);

    let clients = [
        client(backend).await,
        client(backend).await,
        client(backend).await,
    ];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, cl) in clients.iter().enumerate() {
        let (coord, election, tx) = (cl.coord.clone(), election.clone(), tx.clone());
        tokio::spawn(async move {
            let r = coord
                .campaign(&election, format!("candidate-{i}").into_bytes())
                .await;
            let _ = tx.send((i, r));
        });
    }
    let liveness = backend.settings().liveness;
    let (i1, l1) = timeout(t, rx.recv())
        .await
        .expect("a leader is elected")
        .unwrap();
    let l1 = l1.expect("campaign");
    let value1 = format!("candidate-{i1}").into_bytes();
    observe_until(&mut events, &mut got, t, "the first leader", |l| {
        l.as_ref().is_some_and(|l| l.value == value1)
    })
    .await;
    let now = observer
        .coord
        .leader(&election)
        .await
        .expect("leader()")
        .expect("a leader");
    assert_eq!((now.value.clone(), now.token), (value1.clone(), l1.token()));
    assert!(
        rx.try_recv().is_err(),
        "{}: two leaders at once",
        backend.name()
    );

    // Proclaim: observers see the new value.
    l1.proclaim(b"proclaimed".to_vec()).await.expect("proclaim");
    observe_until(&mut events, &mut got, t, "the proclaimed value", |l| {
        l.as_ref().is_some_and(|l| l.value == b"proclaimed")
    })
    .await;

    // Resign: the next candidate leads at once.
    let resigned = Instant::now();
    let token1 = l1.token();
    l1.resign().await.expect("resign");
    let (i2, l2) = timeout(t, rx.recv())
        .await
        .expect("a second leader")
        .unwrap();
    let l2 = l2.expect("campaign");
    assert_ne!(i2, i1);
    assert!(l2.token() > token1, "tokens rise across terms");
    assert!(resigned.elapsed() < t);
    let value2 = format!("candidate-{i2}").into_bytes();
    observe_until(&mut events, &mut got, t, "the second leader", |l| {
        l.as_ref().is_some_and(|l| l.value == value2)
    })
    .await;

    // The leader crashes: the last candidate leads within the bound.
    let crashed_at = Instant::now();
    assert!(faults(backend).crash(&clients[i2].discovery).await);
    let (i3, l3) = timeout(liveness, rx.recv())
        .await
        .expect("a third leader within the bound")
        .unwrap();
    let l3 = l3.expect("campaign");
    assert!(
        crashed_at.elapsed() <= liveness,
        "{}: a new leader {:?} after the crash (bound {liveness:?})",
        backend.name(),
        crashed_at.elapsed()
    );
    assert!(l3.token() > l2.token());
    let value3 = format!("candidate-{i3}").into_bytes();
    observe_until(&mut events, &mut got, t, "the third leader", |l| {
        l.as_ref().is_some_and(|l| l.value == value3)
    })
    .await;
    l3.resign().await.expect("resign");
    observe_until(&mut events, &mut got, t, "no leader", Option::is_none).await;
    assert_eq!(observer.coord.leader(&election).await.unwrap(), None);
}

/// An observer of an election through an outage: `Stale` once, then `Resynced` to the
/// leader the registry holds.
pub async fn coord_observe_resyncs(backend: &dyn TestBackend) {
    let ns = Namespace::new();
    let election = ns.config_key("observed");
    let (observer, candidate) = (client(backend).await, client(backend).await);
    let t = backend.settings().timeout;
    let leadership = candidate
        .coord
        .campaign(&election, b"before".to_vec())
        .await
        .expect("campaign");
    let mut events = observer.coord.observe(&election);
    let mut got = None;
    observe_until(&mut events, &mut got, t, "the leader", |l| {
        l.as_ref().is_some_and(|l| l.value == b"before")
    })
    .await;
    let f = faults(backend);
    f.make_unreachable().await;
    let deadline = Instant::now() + t * 2;
    loop {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("Stale during the outage")
            .expect("stream open")
            .expect("no error");
        apply(&mut got, &e);
        if matches!(e, Event::Stale(_)) {
            break;
        }
    }
    f.make_reachable().await;
    let mut stale = 0;
    let deadline = Instant::now() + t * 2;
    loop {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("Resynced after the outage")
            .expect("stream open")
            .expect("no error");
        apply(&mut got, &e);
        match e {
            Event::Stale(_) => stale += 1,
            Event::Resynced(..) => break,
            _ => {}
        }
    }
    assert_eq!(stale, 0, "Stale once per outage");
    let truth = observer.coord.leader(&election).await.expect("leader()");
    assert_eq!(
        got.as_ref().map(|l| (&l.value, l.token)),
        truth.as_ref().map(|l| (&l.value, l.token)),
        "the resynced leader is the registry's"
    );
    drop(leadership);
    observe_until(
        &mut events,
        &mut got,
        t,
        "no leader after the resignation",
        |l| l.as_ref().is_none_or(|l| l.value != b"before"),
    )
    .await;
}
