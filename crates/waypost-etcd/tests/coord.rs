//! etcd specifics of locks and elections, beyond the conformance suites: the
//! `coord_prefix` option, keys under a name that are no contenders, a lock and an
//! election of one name in one client, and a key reused right after an abandoned
//! acquisition.

mod common;

use std::time::Duration;

use tokio::time::{timeout, Instant};
use waypost_core::coord::Name;
use waypost_core::Error;
use waypost_testkit::conformance::Namespace;

const T: Duration = Duration::from_secs(10);

async fn keys(admin: &mut etcd_client::Client, prefix: &str) -> Vec<(String, i64)> {
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let r = admin.get(prefix, Some(opts)).await.expect("list keys");
    r.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.create_revision()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_prefix_places_the_keys() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let config = common::config(&server.url()).with_coord_prefix("/my/locks");
    let d = waypost_etcd::EtcdDiscovery::connect(config).await.unwrap();
    let name: Name = Namespace::new().config_key("placed");
    let g = d.coordinator().lock(&name).await.unwrap();
    let lease = d.lease_id().unwrap();
    assert_eq!(
        keys(&mut admin, "/my/locks/").await,
        [(format!("/my/locks/{name}/{lease:x}"), g.token().0 as i64)]
    );
    assert!(keys(&mut admin, "/coord/").await.is_empty());
    g.release().await.unwrap();
    assert!(keys(&mut admin, "/my/locks/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_are_no_contenders_are_skipped() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let d = common::connect(&server.url()).await;
    let coord = d.coordinator();
    let ns = Namespace::new();
    let parent: Name = ns.config_key("parent");
    let nested: Name = format!("{parent}/child").parse().unwrap();
    // A holder of a nested name, and a foreign key that is no contender, both older
    // than ours: neither holds `parent`.
    let child = coord.lock(&nested).await.unwrap();
    admin
        .put(format!("/coord/{parent}/not a contender"), "x", None)
        .await
        .unwrap();
    let g = timeout(T, coord.try_lock(&parent))
        .await
        .unwrap()
        .expect("the nested name's holder and a foreign key do not hold the parent");
    assert!(g.token() > child.token());
    // Nor do they lead an election of that name.
    assert_eq!(
        coord.leader(&parent).await.unwrap().map(|l| l.token),
        Some(g.token())
    );
    g.release().await.unwrap();
    assert_eq!(coord.leader(&parent).await.unwrap(), None);
    child.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_and_an_election_of_one_name_in_one_client_are_refused() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let d = common::connect(&server.url()).await;
    let coord = d.coordinator();
    let name: Name = Namespace::new().config_key("both");
    let g = coord.lock(&name).await.unwrap();
    match timeout(T, coord.campaign(&name, b"v".to_vec()))
        .await
        .unwrap()
    {
        Err(Error::Busy { what }) => assert!(what.contains("one queue"), "{what}"),
        other => panic!("campaigning on a name this client locks: {other:?}"),
    }
    assert!(!g.is_lost(), "the refused campaign touched the lock");
    g.release().await.unwrap();
    let l = coord.campaign(&name, b"v".to_vec()).await.unwrap();
    l.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_after_a_timed_out_acquisition_stays_held() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let (a, b) = (
        common::connect(&server.url()).await,
        common::connect(&server.url()).await,
    );
    let name: Name = Namespace::new().config_key("reused");
    let prefix = format!("/coord/{name}/");
    let held = a.coordinator().lock(&name).await.unwrap();
    for _ in 0..3 {
        // The timed-out acquisition's cleanup runs in the background while the next
        // acquisition writes the same key (one per lease and name).
        match b
            .coordinator()
            .lock_for(&name, Duration::from_millis(50))
            .await
        {
            Err(Error::Timeout { .. }) => {}
            other => panic!("lock_for while held: {other:?}"),
        }
    }
    let waiter = tokio::spawn({
        let (coord, name) = (b.coordinator(), name.clone());
        async move { coord.lock(&name).await }
    });
    let deadline = Instant::now() + T;
    while keys(&mut admin, &prefix).await.len() != 2 {
        assert!(Instant::now() < deadline, "b queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held.release().await.unwrap();
    let g = timeout(T, waiter).await.unwrap().unwrap().expect("b holds");
    let lease = b.lease_id().unwrap();
    // A last round trip through b's client, then the key is b's, at b's token.
    let _ = b.coordinator().leader(&name).await.unwrap();
    assert_eq!(
        keys(&mut admin, &prefix).await,
        [(format!("{prefix}{lease:x}"), g.token().0 as i64)]
    );
    assert!(!g.is_lost());
    g.release().await.unwrap();
}
