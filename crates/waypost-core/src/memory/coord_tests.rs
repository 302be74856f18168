//! Coordination on the memory backend beyond the conformance suites: lost replies, lost
//! signals and the local deadline, on tokio's paused clock where timing matters.

use std::time::Duration;

use super::MemoryRegistry;
use crate::coord::{Lost, Name, Wait};
use crate::Error;

fn name(n: &str) -> Name {
    n.parse().unwrap()
}

/// Waits until lock `n` has `want` contenders, failing with `what` after `within`.
async fn contenders_become(
    r: &MemoryRegistry,
    n: &Name,
    want: usize,
    within: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    while r.contenders(n, false) != want {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_enqueue_whose_reply_is_lost_is_found_again_not_written_twice() {
    let r = MemoryRegistry::new("coord-lost-reply");
    let c = r.client(Duration::from_secs(10));
    let n = name("jobs/a");
    // The enqueue is applied but answered with a timeout: the retry must find it.
    r.lose_replies(1);
    let g = c.coordinator().lock(&n).await.expect("lock");
    assert_eq!(r.contenders(&n, false), 1, "one entry, not two");
    // The release's reply is lost too: it is retried until confirmed.
    r.lose_replies(1);
    g.release().await.expect("release");
    assert_eq!(r.contenders(&n, false), 0);
    let other = r.client(Duration::from_secs(10));
    let _free = other.coordinator().try_lock(&n).await.expect("free");
}

#[tokio::test]
async fn a_busy_try_lock_leaves_nothing_even_when_its_dequeue_reply_is_lost() {
    let r = MemoryRegistry::new("coord-busy");
    let (a, b) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(10)),
    );
    let n = name("jobs/b");
    let _held = a.coordinator().lock(&n).await.unwrap();
    r.lose_replies(2); // b's enqueue reply (found again) and its dequeue reply (retried)
    let e = b.coordinator().try_lock(&n).await.unwrap_err();
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    contenders_become(
        &r,
        &n,
        1,
        Duration::from_secs(5),
        "the busy contender stayed queued",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_registry_makes_the_holder_lost_at_ninety_percent_of_its_ttl() {
    let r = MemoryRegistry::new("coord-deadline");
    let ttl = Duration::from_secs(10);
    let c = r.client(ttl);
    let g = c.coordinator().lock(&name("jobs/c")).await.unwrap();
    let cut = tokio::time::Instant::now();
    r.set_reachable(false);
    let why = tokio::time::timeout(ttl * 2, g.lost()).await.expect("lost");
    assert_eq!(why, Lost::Unconfirmed);
    let after = cut.elapsed();
    // The last keep-alive was sent at most one interval (ttl/4) before the cut.
    assert!(
        after <= ttl * 9 / 10,
        "lost {after:?} after the cut, past 90% of {ttl:?}"
    );
    assert!(after >= ttl * 9 / 10 - ttl / 4, "lost too early: {after:?}");
    assert!(g.is_lost());
}

#[tokio::test]
async fn leadership_lost_refuses_proclaim_and_release_reports_released_to_signals() {
    let r = MemoryRegistry::new("coord-proclaim");
    let c = r.client(Duration::from_secs(10));
    let e = name("elections/x");
    let l = c.coordinator().campaign(&e, b"v1".to_vec()).await.unwrap();
    l.proclaim(b"v2".to_vec()).await.unwrap();
    let now = c.coordinator().leader(&e).await.unwrap().unwrap();
    assert_eq!((now.value.as_slice(), now.token), (&b"v2"[..], l.token()));
    let signal = l.lost_signal();
    l.resign().await.unwrap();
    assert_eq!(*signal.borrow(), Some(Lost::Released));
    assert_eq!(c.coordinator().leader(&e).await.unwrap(), None);

    let l = c.coordinator().campaign(&e, b"v3".to_vec()).await.unwrap();
    r.expire_all_sessions();
    let why = tokio::time::timeout(Duration::from_secs(10), l.lost())
        .await
        .unwrap();
    assert!(
        matches!(why, Lost::SessionExpired | Lost::Deleted),
        "{why:?}"
    );
    assert!(matches!(
        l.proclaim(b"v4".to_vec()).await,
        Err(Error::Closed { .. })
    ));
}

#[tokio::test]
async fn local_contenders_of_one_client_queue_in_order() {
    let r = MemoryRegistry::new("coord-local");
    let c = r.client(Duration::from_secs(10));
    let n = name("jobs/local");
    let first = c.coordinator().lock(&n).await.unwrap();
    assert!(matches!(
        c.coordinator().try_lock(&n).await,
        Err(Error::Busy { .. })
    ));
    let c2 = c.clone();
    let n2 = n.clone();
    let waiting =
        tokio::spawn(async move { c2.coordinator().acquire(&n2, 1, Wait::Forever).await });
    // Only one contender per client reaches the registry.
    tokio::task::yield_now().await;
    assert_eq!(r.contenders(&n, false), 1);
    let t1 = first.token();
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(second.token() > t1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_release_returns_the_same_client_can_try_lock_at_once() {
    let r = MemoryRegistry::new("coord-relock");
    let c = r.client(Duration::from_secs(10));
    let n = name("jobs/relock");
    let mut g = c.coordinator().try_lock(&n).await.unwrap();
    for round in 0..200 {
        g.release().await.unwrap();
        g = c
            .coordinator()
            .try_lock(&n)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

#[tokio::test(start_paused = true)]
async fn an_enqueue_given_up_with_its_outcome_unknown_is_forgotten() {
    let r = MemoryRegistry::new("coord-forget");
    let (a, b) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(10)),
    );
    let n = name("jobs/forget");
    // Every reply is lost: b's enqueue is applied, and each retry finds it but hears
    // nothing back; b gives up at its deadline, not knowing.
    r.lose_replies(usize::MAX / 2);
    let e = b
        .coordinator()
        .lock_for(&n, Duration::from_millis(300))
        .await;
    assert!(matches!(e, Err(Error::Timeout { .. })), "{e:?}");
    contenders_become(
        &r,
        &n,
        0,
        Duration::from_secs(5),
        "the abandoned contender stayed",
    )
    .await;
    r.lose_replies(0);
    let _held = a.coordinator().try_lock(&n).await.expect("nobody in front");
}

#[tokio::test]
async fn shutdown_reports_closed_and_one_session_expiring_spares_the_others() {
    let r = MemoryRegistry::new("coord-closed");
    let (a, b) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(10)),
    );
    let ga = a.coordinator().lock(&name("jobs/a")).await.unwrap();
    let gb = b.coordinator().lock(&name("jobs/b")).await.unwrap();
    r.expire_session(b.session().unwrap());
    let why = tokio::time::timeout(Duration::from_secs(5), gb.lost())
        .await
        .unwrap();
    assert_eq!(why, Lost::SessionExpired);
    assert!(
        !ga.is_lost(),
        "another session's expiry leaves a's lock alone"
    );
    assert_eq!(r.contenders(&name("jobs/a"), false), 1);
    a.into_discovery().shutdown().await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), ga.lost())
        .await
        .unwrap();
    assert_eq!(why, Lost::Closed);
}

#[tokio::test]
async fn semaphore_permits_of_one_client_hold_together_and_values_up_to_the_limit() {
    let r = MemoryRegistry::new("coord-permits");
    let c = r.client(Duration::from_secs(10));
    let n = name("pool/x");
    let g1 = c.coordinator().acquire(&n, 2, Wait::No).await.unwrap();
    // The second permit's enqueue is answered with a timeout: its retry must find its own
    // entry, not the first permit's (same client, same session, same queue).
    r.lose_replies(1);
    let g2 = c.coordinator().acquire(&n, 2, Wait::No).await.unwrap();
    assert!(g2.token() > g1.token());
    assert_eq!(r.contenders(&n, false), 2);
    assert!(matches!(
        c.coordinator().acquire(&n, 2, Wait::No).await,
        Err(Error::Busy { .. })
    ));
    let e = name("elections/big");
    let max = super::MAX_VALUE_LEN;
    let l = c
        .coordinator()
        .campaign(&e, vec![b'x'; max])
        .await
        .expect("a value of the limit");
    assert!(!l.is_lost());
    let too_big = c.coordinator().campaign(&e, vec![b'x'; max + 1]).await;
    assert!(
        matches!(too_big, Err(Error::InvalidInput { .. })),
        "{too_big:?}"
    );
    r.expire_all_sessions();
    tokio::time::timeout(Duration::from_secs(5), l.lost())
        .await
        .unwrap();
    assert!(l.is_lost());
}

#[test]
fn tokens_and_reasons_print_for_people() {
    assert_eq!(crate::coord::FencingToken(42).to_string(), "42");
    assert_eq!(
        Lost::Unconfirmed.to_string(),
        "the registry did not confirm the session within its bound"
    );
    assert_eq!(Lost::Released.to_string(), "released by its holder");
}

#[tokio::test(start_paused = true)]
async fn a_lock_waits_for_its_first_session_while_the_registry_is_unreachable() {
    let r = MemoryRegistry::new("coord-no-session");
    let (waiter, trier) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(10)),
    );
    let n = name("jobs/no-session");
    // Neither client has a session yet, and none can be opened.
    r.set_reachable(false);
    let e = tokio::time::timeout(Duration::from_secs(30), trier.coordinator().try_lock(&n))
        .await
        .expect("try_lock answers while no session can be opened")
        .unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    let n2 = n.clone();
    let lock = tokio::spawn(async move { waiter.coordinator().lock(&n2).await.map(|g| g.token()) });
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!lock.is_finished(), "lock gave up: {:?}", lock.await);
    r.set_reachable(true);
    tokio::time::timeout(Duration::from_secs(30), lock)
        .await
        .expect("held once the registry answers")
        .unwrap()
        .expect("held");
}

#[tokio::test(start_paused = true)]
async fn an_enqueue_the_registry_does_not_answer_gives_up_only_for_try_lock() {
    let r = MemoryRegistry::new("coord-enqueue-budget");
    let c = r.client(Duration::from_secs(120));
    let n = name("jobs/budget");
    // Open the session, then cut the registry: the session stays (suspended).
    drop(c.coordinator().try_lock(&name("jobs/other")).await.unwrap());
    r.set_reachable(false);
    let started = tokio::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(60), c.coordinator().try_lock(&n))
        .await
        .expect("try_lock gives up within its retry budget")
        .unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    assert!(
        started.elapsed() <= crate::backend::CoordOptions::default().retry_for,
        "gave up after {:?}",
        started.elapsed()
    );
    // A waiting lock keeps retrying past that budget, and holds once answered.
    let c = std::sync::Arc::new(c);
    let c2 = c.clone();
    let n2 = n.clone();
    let lock = tokio::spawn(async move { c2.coordinator().lock(&n2).await.map(|g| g.token()) });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!lock.is_finished(), "lock gave up: {:?}", lock.await);
    r.set_reachable(true);
    tokio::time::timeout(Duration::from_secs(30), lock)
        .await
        .expect("held once the registry answers")
        .unwrap()
        .expect("held");
}

/// An error retrying cannot fix ends the acquisition at whichever step it comes, and the
/// contender it may have queued is removed.
#[tokio::test(start_paused = true)]
async fn a_refused_request_ends_the_acquisition_and_leaves_nothing() {
    let r = MemoryRegistry::new("coord-refused");
    let (a, b) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(10)),
    );
    let n = name("jobs/refused");
    let within = Duration::from_secs(30);
    // (requests let through first, who contends, the contenders left after the refusal)
    let mut held = None;
    for (after, step, left) in [(0, "enqueue", 0), (1, "position", 0), (2, "wait", 1)] {
        let who = if step == "wait" {
            // Queued behind a holder, then the wait refused.
            held = Some(a.coordinator().lock(&n).await.unwrap());
            &b
        } else {
            &a
        };
        r.refuse_coordination(after, 1);
        let res = tokio::time::timeout(within, who.coordinator().lock(&n))
            .await
            .expect("answers");
        assert!(
            matches!(res, Err(Error::Unauthorized { .. })),
            "{step}: {:?}",
            res.map(|g| g.token())
        );
        contenders_become(&r, &n, left, Duration::from_secs(5), step).await;
    }
    let held = held.expect("held");
    // A refused release is reported, not retried for ever (the entry goes with the session).
    r.refuse_coordination(0, 1);
    let e = tokio::time::timeout(within, held.release())
        .await
        .expect("answers");
    assert!(matches!(e, Err(Error::Unauthorized { .. })), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_clients_holds_are_lost_as_closed() {
    let r = MemoryRegistry::new("coord-crash");
    let c = r.client(Duration::from_secs(10));
    let g = c.coordinator().lock(&name("jobs/crash")).await.unwrap();
    c.kill();
    let why = tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("lost at once, not when the TTL runs out");
    assert_eq!(why, Lost::Closed);
}

/// A contender abandoned while the registry does not answer is removed once it answers
/// (the removal is retried in the background, not given up at the first failure).
#[tokio::test(start_paused = true)]
async fn an_abandoned_contender_is_removed_after_an_outage() {
    let r = MemoryRegistry::new("coord-abandon-outage");
    let (a, b) = (
        r.client(Duration::from_secs(60)),
        r.client(Duration::from_secs(60)),
    );
    let n = name("jobs/abandon");
    let _held = a.coordinator().lock(&n).await.unwrap();
    let waiting = {
        let n = n.clone();
        tokio::spawn(async move { b.coordinator().lock(&n).await.map(|g| g.token()) })
    };
    contenders_become(&r, &n, 2, Duration::from_secs(5), "b never queued").await;
    r.set_reachable(false);
    waiting.abort();
    let _ = waiting.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        r.contenders(&n, false),
        2,
        "nothing can be removed meanwhile"
    );
    r.set_reachable(true);
    contenders_become(
        &r,
        &n,
        1,
        Duration::from_secs(30),
        "the abandoned contender stayed queued",
    )
    .await;
}

/// A lock taken right after the registry dropped the client's session (before the client
/// heard of it) is bound to the new session, not to the dead one.
#[tokio::test(start_paused = true)]
async fn a_lock_taken_just_after_an_expiry_binds_to_the_new_session() {
    let r = MemoryRegistry::new("coord-after-expiry");
    let c = r.client(Duration::from_secs(4));
    drop(c.coordinator().try_lock(&name("jobs/warm")).await.unwrap());
    let old = c.session().expect("a session");
    r.expire_all_sessions();
    let g = c.coordinator().lock(&name("jobs/after")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!g.is_lost(), "bound to the expired session");
    assert_ne!(c.session(), Some(old));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_session_is_unconfirmed_holds_only_once_it_is_confirmed() {
    let r = MemoryRegistry::new("coord-unconfirmed-waiter");
    // The waiter's shorter TTL makes its session unconfirmed before the holder is lost.
    let (a, b) = (
        r.client(Duration::from_secs(10)),
        r.client(Duration::from_secs(5)),
    );
    let n = name("jobs/unconfirmed");
    let held = a.coordinator().lock(&n).await.unwrap();
    let waiting = tokio::spawn({
        let n = n.clone();
        async move { b.coordinator().lock(&n).await }
    });
    contenders_become(&r, &n, 2, Duration::from_secs(5), "the waiter queued").await;
    // Both sessions stay alive in the registry, but neither client hears so.
    r.lose_heartbeat_replies(true);
    let why = tokio::time::timeout(Duration::from_secs(20), held.lost())
        .await
        .expect("the holder is lost once unconfirmed");
    assert_eq!(why, Lost::Unconfirmed);
    contenders_become(&r, &n, 1, Duration::from_secs(5), "the lost holder left").await;
    // The waiter's entry is first now, its session alive there but unconfirmed here: it
    // must not be handed a hold it would lose at once. Nothing to wait on but time: the
    // acquisition must not finish within three of its TTLs (paused clock).
    let window = tokio::time::timeout(Duration::from_secs(15), async {
        while !waiting.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        window.is_err(),
        "the waiter was handed the lock while its session was unconfirmed"
    );
    let lifted = tokio::time::Instant::now();
    r.lose_heartbeat_replies(false);
    let next = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter holds once its session is confirmed")
        .unwrap()
        .expect("lock");
    assert!(tokio::time::Instant::now() >= lifted);
    assert!(!next.is_lost(), "the new holder's session is confirmed");
    assert!(next.token() > held.token());
    assert_eq!(r.contenders(&n, false), 1, "the waiter kept its entry");
}

#[tokio::test(start_paused = true)]
async fn try_lock_under_an_unconfirmed_session_times_out_and_leaves_nothing() {
    let r = MemoryRegistry::new("coord-unconfirmed-try");
    let c = r.client(Duration::from_secs(5));
    let n = name("jobs/unconfirmed-try");
    // Open the session, then let its confirmation run out.
    drop(c.coordinator().lock(&n).await.unwrap());
    contenders_become(&r, &n, 0, Duration::from_secs(5), "released").await;
    r.lose_heartbeat_replies(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let e = c.coordinator().try_lock(&n).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    contenders_become(
        &r,
        &n,
        0,
        Duration::from_secs(5),
        "the entry was left behind",
    )
    .await;
    r.lose_heartbeat_replies(false);
    let g = c
        .coordinator()
        .try_lock(&n)
        .await
        .expect("free once confirmed");
    assert!(!g.is_lost());
}
