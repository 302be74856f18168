//! Memory-backend behaviour beyond the conformance suite, on tokio's paused clock.

use std::time::Duration;

use futures::StreamExt;

use super::*;
use crate::{Instance, InstanceSet, Registrar, RegistrationStatus, WatchEvent, Watcher};

fn inst(id: &str) -> Instance {
    Instance::parse("svc", id, "127.0.0.1", 1).unwrap()
}

async fn next(
    w: &mut futures::stream::BoxStream<'static, crate::Result<WatchEvent>>,
) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(60), w.next())
        .await
        .expect("event within deadline")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test(start_paused = true)]
async fn a_killed_client_is_dropped_after_its_ttl_not_before() {
    let r = MemoryRegistry::new("t");
    let victim = r.client(Duration::from_secs(4));
    let watcher = r.client(Duration::from_secs(4));
    let _reg = victim.register(inst("a")).await.unwrap();
    let mut w = watcher.watch(&"svc".parse().unwrap());
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot(s) if s.len() == 1));
    let killed_at = tokio::time::Instant::now();
    victim.kill();
    // Only the watcher runs: its stream reaps expired sessions by itself.
    let ev = next(&mut w).await;
    assert!(matches!(ev, WatchEvent::Removed { .. }), "{ev:?}");
    let after = killed_at.elapsed();
    // The last heartbeat was at most a quarter TTL before the kill.
    assert!(
        after >= Duration::from_secs(3)
            && after <= Duration::from_secs(4) + Duration::from_millis(50),
        "{after:?}"
    );
    assert!(matches!(
        victim.register(inst("b")).await,
        Err(crate::Error::Closed { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn status_goes_suspended_then_registered_across_an_outage() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(4));
    let reg = c.register(inst("a")).await.unwrap();
    assert!(r.is_reachable());
    r.set_reachable(false);
    assert!(!r.is_reachable());
    reg.wait_status(Duration::from_secs(5), |s| {
        *s == RegistrationStatus::Suspended
    })
    .await
    .unwrap();
    assert!(matches!(
        c.instances(&"svc".parse().unwrap()).await,
        Err(crate::Error::Unavailable { .. })
    ));
    // A short outage: the session survives, the instance was never dropped.
    let rev = r.revision();
    r.set_reachable(true);
    reg.wait_status(Duration::from_secs(5), |s| {
        *s == RegistrationStatus::Registered
    })
    .await
    .unwrap();
    assert_eq!(
        r.revision(),
        rev,
        "nothing was rewritten after a short outage"
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_outage_expires_the_session_and_the_instance_comes_back() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(2));
    let reg = c.register(inst("a")).await.unwrap();
    let first_session = c.session().unwrap();
    r.set_reachable(false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.reap_for_tests();
    assert!(
        r.peek(&"svc".parse().unwrap()).is_empty(),
        "the registry dropped it meanwhile"
    );
    r.set_reachable(true);
    reg.wait_status(Duration::from_secs(30), |s| {
        *s == RegistrationStatus::Registered
    })
    .await
    .unwrap();
    assert_eq!(r.peek(&"svc".parse().unwrap()).len(), 1);
    assert_ne!(c.session(), Some(first_session), "a new session holds it");
}

#[tokio::test(start_paused = true)]
async fn re_registration_has_no_retry_cap() {
    // An outage of an hour: hundreds of failed keep-alive and re-registration rounds
    // (backoff capped at 4× the tick). The registration must still come back.
    let r = MemoryRegistry::new("no-cap");
    let c = r.client(Duration::from_secs(2));
    let reg = c.register(inst("a")).await.unwrap();
    r.set_reachable(false);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    r.reap_for_tests();
    assert!(r.peek(&"svc".parse().unwrap()).is_empty());
    assert_ne!(reg.current_status(), RegistrationStatus::Registered);
    r.set_reachable(true);
    reg.wait_status(Duration::from_secs(30), |s| {
        *s == RegistrationStatus::Registered
    })
    .await
    .expect("registered again after an hour-long outage");
    assert_eq!(r.peek(&"svc".parse().unwrap()).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn expiry_is_seen_as_removed_then_added_with_the_same_data() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(2));
    let i = inst("a").with_metadata("k", "v");
    let reg = c.register(i.clone()).await.unwrap();
    let mut status = reg.status();
    let w = r.client(Duration::from_secs(2));
    let mut watch = w.watch(&"svc".parse().unwrap());
    let mut set = InstanceSet::new();
    set.apply(&next(&mut watch).await);
    assert_eq!(r.expire_all_sessions(), 1);
    assert!(matches!(next(&mut watch).await, WatchEvent::Removed { .. }));
    let back = next(&mut watch).await;
    assert!(
        matches!(&back, WatchEvent::Added { instance, .. } if *instance == i),
        "{back:?}"
    );
    status.changed().await.unwrap();
    assert_eq!(*status.borrow(), RegistrationStatus::Registered);
}

#[tokio::test(start_paused = true)]
async fn a_deregistration_during_an_outage_completes_when_reachable() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(60));
    let reg = c.register(inst("a")).await.unwrap();
    r.set_reachable(false);
    let e = reg.deregister().await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert_eq!(r.peek(&"svc".parse().unwrap()).len(), 1);
    r.set_reachable(true);
    let svc = "svc".parse().unwrap();
    let mut w = c.watch(&svc);
    let mut set = InstanceSet::new();
    set.apply(&next(&mut w).await);
    while !set.is_empty() {
        set.apply(&next(&mut w).await);
    }
    assert!(r.peek(&svc).is_empty(), "the deferred deregistration ran");
}

#[tokio::test(start_paused = true)]
async fn a_watch_started_while_unreachable_waits_for_its_snapshot() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(2));
    r.set_reachable(false);
    let mut w = c.watch(&"svc".parse().unwrap());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .is_err(),
        "nothing before the registry is reachable"
    );
    r.set_reachable(true);
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot(_)));
}

#[tokio::test(start_paused = true)]
async fn a_create_whose_reply_was_lost_is_removed_and_a_retry_wins() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(4));
    let svc: crate::ServiceName = "svc".parse().unwrap();
    let _anchor = c.register(inst("anchor")).await.unwrap();
    assert_eq!(c.registry().name(), "t");
    r.lose_replies(1);
    let e = c.register(inst("a")).await.unwrap_err();
    assert!(matches!(e, crate::Error::Timeout { .. }), "{e}");
    assert_eq!(
        c.keeper_pending_removals(),
        1,
        "the keeper has it to remove"
    );
    assert_eq!(
        r.peek(&svc).len(),
        2,
        "the write landed although the caller got an error"
    );
    // The keeper removes it: the caller was told it failed.
    let mut w = c.watch(&svc);
    let mut set = InstanceSet::new();
    set.apply(&next(&mut w).await);
    while set.contains(&"a".parse().unwrap()) {
        set.apply(&next(&mut w).await);
    }
    assert_eq!(r.peek(&svc).len(), 1);
    // Forgotten once the window for a late landing (three TTLs of 4 s) closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(16);
    while c.keeper_pending_removals() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never forgotten");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Lost again, then retried at once by the caller: the retry's entry stays.
    r.lose_replies(1);
    assert!(c.register(inst("b")).await.is_err());
    let rev = r.revision();
    assert!(rev > 0);
    let reg = c.register(inst("b")).await.expect("the retry registers");
    assert_eq!(
        r.revision(),
        rev,
        "the retry found its write: nothing rewritten"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        r.peek(&svc).get(&"b".parse().unwrap()).is_some(),
        "the retry's entry was removed"
    );
    assert_eq!(reg.current_status(), RegistrationStatus::Registered);
}

#[tokio::test(start_paused = true)]
async fn a_delete_whose_reply_was_lost_is_confirmed() {
    let r = MemoryRegistry::new("t");
    let c = r.client(Duration::from_secs(4));
    let svc: crate::ServiceName = "svc".parse().unwrap();
    let reg = c.register(inst("a")).await.unwrap();
    r.lose_replies(1);
    assert!(reg.deregister().await.is_err());
    assert!(r.peek(&svc).is_empty(), "the delete was applied");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(r.peek(&svc).is_empty());
    assert_eq!(
        c.keeper_pending_removals(),
        0,
        "confirmed absent and forgotten"
    );
}

#[tokio::test]
async fn the_same_id_twice_is_already_exists() {
    let r = MemoryRegistry::new("t");
    let a = r.client(Duration::from_secs(10));
    let b = r.client(Duration::from_secs(10));
    let _reg = a.register(inst("x")).await.unwrap();
    assert!(matches!(
        a.register(inst("x")).await,
        Err(crate::Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        b.register(inst("x")).await,
        Err(crate::Error::AlreadyExists { .. })
    ));
}

/// Its entry deleted behind its back, an id is registered by another live client before
/// the keeper heals it: the keeper neither counts that entry as its own (same data) nor
/// overwrites it (other data), and takes the id back once the other client lets it go.
#[tokio::test(start_paused = true)]
async fn an_id_another_live_session_took_is_not_taken_back_until_released() {
    let r = MemoryRegistry::new("t");
    let (a, b) = (
        r.client(Duration::from_secs(4)),
        r.client(Duration::from_secs(4)),
    );
    let svc: crate::ServiceName = "svc".parse().unwrap();
    let same = a.register(inst("same")).await.unwrap();
    let other = a.register(inst("other")).await.unwrap();
    assert!(r.delete_foreign(&svc, "same"));
    assert!(r.delete_foreign(&svc, "other"));
    let theirs_same = b.register(inst("same")).await.unwrap();
    let theirs_other = Instance::parse("svc", "other", "127.0.0.1", 2).unwrap();
    let theirs_other_reg = b.register(theirs_other.clone()).await.unwrap();
    for reg in [&same, &other] {
        reg.wait_status(Duration::from_secs(10), |s| {
            *s == RegistrationStatus::Reregistering
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(same.current_status(), RegistrationStatus::Reregistering);
    assert_eq!(
        r.peek(&svc).get(&"other".parse().unwrap()),
        Some(&theirs_other),
        "the other client's entry was overwritten"
    );
    theirs_same.deregister().await.unwrap();
    theirs_other_reg.deregister().await.unwrap();
    for reg in [&same, &other] {
        reg.wait_status(Duration::from_secs(10), |s| {
            *s == RegistrationStatus::Registered
        })
        .await
        .unwrap();
    }
    assert_eq!(
        r.peek(&svc).get(&"other".parse().unwrap()),
        Some(&inst("other"))
    );
}

#[test]
fn config_from_urls() {
    let c = MemoryConfig::from_url("memory://").unwrap();
    assert_eq!(c, MemoryConfig::default());
    let c = MemoryConfig::from_url("memory://tests?ttl=250ms").unwrap();
    assert_eq!(
        (c.name.as_str(), c.ttl),
        ("tests", Duration::from_millis(250))
    );
    assert!(MemoryConfig::from_url("memory://a,b").is_err());
    assert!(MemoryConfig::from_url("memory://a/path").is_err());
    let e = MemoryConfig::from_url("memory://?nme=x").unwrap_err();
    assert!(e.to_string().contains("nme"), "{e}");
    let c = MemoryConfig::default()
        .with_name("built")
        .with_ttl(Duration::from_millis(750));
    assert_eq!(
        (c.name.as_str(), c.ttl),
        ("built", Duration::from_millis(750))
    );
}

#[tokio::test]
async fn a_named_registry_is_shared_by_its_clients_and_the_connector_is_memory() {
    use crate::config::Connector;
    assert_eq!(MemoryConnector.name(), "memory");
    assert_eq!(MemoryConnector.schemes(), &["memory"]);
    // Two clients of `memory://NAME` (one by URL through the connector) share one registry.
    let name = format!("shared-{}", std::process::id());
    let by_url = MemoryConnector
        .connect(&crate::Config::from_url(format!("memory://{name}")))
        .await
        .unwrap();
    let by_config = MemoryConfig::default().with_name(&name).client();
    let _reg = by_config.register(inst("a")).await.unwrap();
    let seen = by_url
        .watcher
        .instances(&"svc".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(seen.instances, vec![inst("a")]);
    assert_eq!(registry(&name).peek(&"svc".parse().unwrap()).len(), 1);
    assert!(registry(&format!("{name}-other"))
        .peek(&"svc".parse().unwrap())
        .is_empty());
}

mod kv {
    use super::*;
    use crate::kv::{ConfigKey, ConfigStore, Expected};
    use crate::Error;

    fn key(s: &str) -> ConfigKey {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_is_reconciled_not_reported_as_a_conflict() {
        let r = MemoryRegistry::new("kv-lost");
        let c = r.client(Duration::from_secs(10));
        let kv = c.kv();
        let k = key("app/config");

        // Create-only whose reply is lost: the retry meets our own value and succeeds.
        r.lose_replies(1);
        let v1 = kv
            .put_if(&k, b"one".to_vec(), Expected::Absent)
            .await
            .unwrap();
        assert_eq!(r.kv_peek(&k).as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v1);

        // A CAS whose reply is lost: the same.
        r.lose_replies(1);
        let v2 = kv
            .put_if(&k, b"two".to_vec(), Expected::Version(v1))
            .await
            .unwrap();
        assert!(v2 > v1);
        assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v2);

        // A conditional delete whose reply is lost: done, not a conflict.
        r.lose_replies(1);
        kv.delete_if(&k, v2).await.unwrap();
        assert_eq!(r.kv_peek(&k), None);

        // A real conflict is still a conflict, and writes nothing.
        let v3 = kv.put(&k, b"three".to_vec()).await.unwrap();
        let stale = kv
            .put_if(&k, b"mine".to_vec(), Expected::Version(v3 - 1))
            .await;
        assert!(
            matches!(stale, Err(Error::Conflict { current: Some(v), .. }) if v == v3),
            "{stale:?}"
        );
        assert_eq!(
            r.kv_peek(&k).as_deref(),
            Some(&b"three"[..]),
            "nothing written"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_write_that_meets_another_writers_value_is_a_conflict() {
        let r = MemoryRegistry::new("kv-other-value");
        let c = r.client(Duration::from_secs(10));
        let kv = c.kv().clone();
        let k = key("app/flag");
        let v1 = kv.put(&k, b"one".to_vec()).await.unwrap();
        // The first attempt fails (unreachable: its outcome is unknown to the caller), a
        // foreign writer changes the key meanwhile, the retry meets its value.
        r.set_reachable(false);
        let cas = tokio::spawn({
            let (kv, k) = (kv.clone(), k.clone());
            async move { kv.put_if(&k, b"mine".to_vec(), Expected::Version(v1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.kv_put_foreign(&k, b"theirs");
        r.set_reachable(true);
        let got = cas.await.unwrap();
        assert!(matches!(got, Err(Error::Conflict { .. })), "{got:?}");
        assert_eq!(r.kv_peek(&k).as_deref(), Some(&b"theirs"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_during_an_outage_waits_for_the_registry_within_its_budget() {
        let r = MemoryRegistry::new("kv-outage");
        let c = r.client(Duration::from_secs(10));
        let kv = c.kv().clone();
        let k = key("app/flag");

        r.set_reachable(false);
        let started = tokio::time::Instant::now();
        let write = tokio::spawn({
            let kv = kv.clone();
            let k = k.clone();
            async move { kv.put(&k, b"on".to_vec()).await }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            r.kv_peek(&k),
            None,
            "nothing can be written while unreachable"
        );
        r.set_reachable(true);
        write
            .await
            .unwrap()
            .expect("completed once the registry answered");
        assert_eq!(r.kv_peek(&k).as_deref(), Some(&b"on"[..]));

        // Past the budget (10 s) the temporary error is returned: the caller knows the
        // outcome is unknown, the call does not hang.
        r.set_reachable(false);
        let started_again = tokio::time::Instant::now();
        let e = kv.put(&k, b"off".to_vec()).await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        let took = started_again.elapsed();
        assert!(
            took <= Duration::from_secs(11) && took >= Duration::from_secs(5),
            "gave up after {took:?}"
        );
        assert!(started.elapsed() > took);
    }

    #[tokio::test]
    async fn oversized_values_and_bad_keys_write_nothing() {
        let r = MemoryRegistry::new("kv-input");
        let c = r.client(Duration::from_secs(10));
        let kv = c.kv();
        let k = key("big");
        let e = kv.put(&k, vec![0; MAX_VALUE_LEN + 1]).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("{}", MAX_VALUE_LEN + 1)),
            "{e}"
        );
        assert_eq!(r.kv_peek(&k), None);
        assert!("a//b".parse::<ConfigKey>().is_err());
        // The documented limit: 1 MiB, like ZooKeeper's default.
        assert_eq!(MAX_VALUE_LEN, 1 << 20);
    }

    #[tokio::test]
    async fn a_configuration_watch_is_counted_while_held() {
        use futures::StreamExt;
        let r = MemoryRegistry::new("kv-watches");
        let c = r.client(Duration::from_secs(10));
        assert_eq!(r.open_watches(), 0);
        let mut w = ConfigStore::watch(c.kv(), &key("watched"));
        tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the first event")
            .expect("open")
            .expect("no error");
        assert_eq!(r.open_watches(), 1);
        drop(w);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.open_watches() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watch stayed open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
