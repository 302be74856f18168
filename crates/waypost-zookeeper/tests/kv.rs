//! Configuration keys on a real ZooKeeper: the node rule (directories are not keys),
//! the largest value at the deepest key, and a store that outlives its session. The
//! contract itself is tested by the conformance matrix (`tests/tests/zookeeper.rs`).

mod common;

use std::time::Duration;

use futures::StreamExt;
use waypost_core::backend::Event;
use waypost_core::kv::{ConfigKey, ConfigStore};
use waypost_core::Error;
use waypost_zookeeper::zookeeper_client::Client;
use waypost_zookeeper::MAX_VALUE_LEN;

fn key(s: &str) -> ConfigKey {
    s.parse().unwrap()
}

/// A ZooKeeper server and a waypost client of it (`None`: not installed, already said).
async fn started() -> Option<(
    waypost_testkit::server::ZooKeeperServer,
    waypost_zookeeper::ZkDiscovery,
)> {
    common::init_tracing();
    let server = common::server().await?;
    let zk = common::client(&server).await;
    Some((server, zk))
}

async fn raw(server: &waypost_testkit::server::ZooKeeperServer) -> Client {
    Client::connector()
        .with_session_timeout(common::SESSION)
        .connect(&server.address())
        .await
        .expect("raw client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_are_directories_and_go_with_their_last_key() {
    let Some((server, zk)) = started().await else {
        return;
    };
    let kv = zk.kv();
    let raw = raw(&server).await;

    kv.put(&key("app/db/url"), b"postgres://".to_vec())
        .await
        .unwrap();
    assert_eq!(
        raw.get_data("/config/app/db/url").await.unwrap().0,
        b"postgres://"
    );
    assert_eq!(raw.get_data("/config/app").await.unwrap().0, b"");
    assert_eq!(kv.get(&key("app")).await.unwrap(), None, "a parent");
    assert_eq!(kv.get(&key("app/db")).await.unwrap(), None, "a parent");
    let listed = kv.list(&key("app")).await.unwrap();
    let keys: Vec<&str> = listed.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["app/db/url"]);

    assert!(kv.delete(&key("app/db/url")).await.unwrap());
    assert_eq!(
        raw.check_stat("/config/app").await.unwrap(),
        None,
        "the parents left without keys are removed"
    );
    assert!(raw.check_stat("/config").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_keys_below_it() {
    let Some((server, zk)) = started().await else {
        return;
    };
    let kv = zk.kv();
    let raw = raw(&server).await;
    let (a, ab) = (key("a"), key("a/b"));

    kv.put(&a, b"1".to_vec()).await.unwrap();
    kv.put(&ab, b"2".to_vec()).await.unwrap();
    assert_eq!(kv.get(&a).await.unwrap().unwrap().value, b"1");
    assert_eq!(kv.list(&a).await.unwrap().entries.len(), 1);

    // ZooKeeper cannot delete a node with children: it is emptied, a directory now.
    assert!(kv.delete(&a).await.unwrap());
    assert_eq!(kv.get(&a).await.unwrap(), None);
    assert!(!kv.delete(&a).await.unwrap(), "already gone");
    assert_eq!(kv.get(&ab).await.unwrap().unwrap().value, b"2");
    assert_eq!(raw.get_data("/config/a").await.unwrap().0, b"");

    // An empty value there would read as a directory: refused, nothing written.
    let e = kv.put(&a, Vec::new()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let v = kv.put(&a, b"back".to_vec()).await.unwrap();
    assert_eq!(kv.get(&a).await.unwrap().unwrap().version, v);
    kv.delete(&a).await.unwrap();

    // Without its keys the directory goes; an empty value is then a key again.
    kv.delete(&ab).await.unwrap();
    assert_eq!(raw.check_stat("/config/a").await.unwrap(), None);
    kv.put(&ab, b"2".to_vec()).await.unwrap();
    kv.delete(&ab).await.unwrap();
    let v = kv.put(&a, Vec::new()).await.unwrap();
    let got = kv.get(&a).await.unwrap().expect("an empty value");
    assert_eq!((got.value.len(), got.version), (0, v));
}

/// A directory left by a foreign writer (its keys deleted with `zkCli.sh delete`) is
/// not a key, and an empty value written there replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_directory_without_keys() {
    let Some((server, zk)) = started().await else {
        return;
    };
    let kv = zk.kv();
    let raw = raw(&server).await;
    kv.put(&key("d/x"), b"1".to_vec()).await.unwrap();
    raw.delete("/config/d/x", None).await.unwrap();
    assert!(raw.check_stat("/config/d").await.unwrap().is_some());
    assert_eq!(kv.get(&key("d")).await.unwrap(), None);
    assert!(kv.list(&key("d")).await.unwrap().entries.is_empty());
    kv.put(&key("d"), Vec::new()).await.unwrap();
    assert_eq!(kv.get(&key("d")).await.unwrap().unwrap().value, b"");
}

/// An empty value that gets a key below it turns into a directory: a prefix watch and a
/// key watch report it removed, though no event names its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_value_turning_into_a_directory_is_watched() {
    let Some((_server, zk)) = started().await else {
        return;
    };
    let kv = zk.kv();
    let (e, child) = (key("ns/e"), key("ns/e/c"));
    let mut prefix = kv.watch_prefix(&key("ns"));
    let mut one = kv.watch(&e);
    for w in [&mut prefix, &mut one] {
        assert!(matches!(next(w).await, Event::Snapshot(v, _) if v.is_empty()));
    }
    kv.put(&e, Vec::new()).await.unwrap();
    for w in [&mut prefix, &mut one] {
        assert!(matches!(next(w).await, Event::Added(x, _) if x.key == e));
    }
    kv.put(&child, b"x".to_vec()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), prefix.next()).await {
            Ok(Some(Ok(ev))) => seen.push(format!("{ev:?}")),
            other => panic!("prefix watch: {other:?} after {seen:?}"),
        }
    }
    assert!(
        seen.iter().any(|s| s.starts_with("Removed(\"ns/e\"")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|s| s.contains("ns/e/c")), "{seen:?}");
    match tokio::time::timeout(Duration::from_secs(10), one.next()).await {
        Ok(Some(Ok(Event::Removed(k, _)))) => assert_eq!(k, e),
        other => panic!("key watch: {other:?}"),
    }
    assert_eq!(kv.get(&e).await.unwrap(), None);
}

/// The largest value at the longest, deepest key (256 segments, every parent new): the
/// parents do not fit into one request beside the value and are created first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_value_at_the_deepest_key() {
    let Some((_server, zk)) = started().await else {
        return;
    };
    let kv = zk.kv();
    let deep = key(&["a"; 256].join("/"));
    assert_eq!(deep.as_str().len(), 511);
    let value: Vec<u8> = (0..MAX_VALUE_LEN).map(|i| (i % 251) as u8).collect();
    let v = kv.put(&deep, value.clone()).await.unwrap();
    let got = kv.get(&deep).await.unwrap().unwrap();
    assert!(got.value == value && got.version == v);
    // A long (512-byte) key at the top, with the largest value.
    let long = key(&format!(
        "{}/{}",
        "b".repeat(128),
        vec!["c".repeat(127); 3].join("/")
    ));
    assert_eq!(long.as_str().len(), 512);
    kv.put(&long, value.clone()).await.unwrap();
    assert_eq!(
        kv.get(&long).await.unwrap().unwrap().value.len(),
        MAX_VALUE_LEN
    );
}

/// The store and its watches are bound to the client's session: after the session
/// expired (server stopped for longer than the session timeout), a new one is opened and
/// reads, writes and watches go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_outlives_an_expired_session() {
    let Some((server, zk)) = started().await else {
        return;
    };
    let kv: std::sync::Arc<dyn ConfigStore> = zk.clone().into_discovery().kv().unwrap();
    let k = key("live/k");
    kv.put(&k, b"1".to_vec()).await.unwrap();
    let mut w = kv.watch_prefix(&key("live"));
    assert!(matches!(next(&mut w).await, Event::Snapshot(v, _) if v.len() == 1));
    let first = zk.session_id().expect("a session");

    server.pause().unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), w.next()).await,
        Ok(Some(Ok(Event::Stale(_))))
    ));
    tokio::time::sleep(common::SESSION * 3).await;
    server.resume().unwrap();

    let v = kv
        .put(&k, b"2".to_vec())
        .await
        .expect("a write after the expiry");
    assert!(
        common::wait_until(Duration::from_secs(10), || zk
            .session_id()
            .is_some_and(|s| s != first))
        .await
    );
    assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(Event::Resynced(v, _)))) if v.iter().any(|e| e.value == b"2") => break,
            Ok(Some(Ok(Event::Updated(e, _)))) if e.value == b"2" => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("watch after the expiry: {other:?}"),
        }
    }
}

/// The next event of a config watch, failing the test after 10 s, on an error or when
/// the stream ends.
async fn next(
    w: &mut futures::stream::BoxStream<
        'static,
        waypost_core::Result<waypost_core::kv::ConfigEvent>,
    >,
) -> waypost_core::kv::ConfigEvent {
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("no config event within 10 s: {other:?}"),
    }
}
