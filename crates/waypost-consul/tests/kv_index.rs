//! Configuration watches when Consul's index goes backwards: a restarted `-dev` agent
//! (which keeps no state) that then sees fewer writes than before, and a restored
//! snapshot (the agent keeps running: blocking queries answer with a lower index on the
//! same connection). In both the watch converges on what the agent holds, through
//! `Stale` / `Resynced`, and is not stuck waiting past an index the agent no longer
//! reaches.

use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::kv::{ConfigEvent, ConfigKey, ConfigStore};
use waypost_core::Result;
use waypost_testkit::conformance::{first_snapshot, wait_for_config, ConfigView, Namespace};
use waypost_testkit::ConsulServer;

const T: Duration = Duration::from_secs(15);

async fn client(server: &ConsulServer, wait: Duration) -> ConsulDiscovery {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_wait(wait)
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1));
    ConsulDiscovery::connect(config).await.expect("connect")
}

type Events = BoxStream<'static, Result<ConfigEvent>>;

/// The `X-Consul-Index` of a prefix, read as a raw client.
async fn raw_index(server: &ConsulServer, prefix: &ConfigKey) -> u64 {
    let url = format!("http://{}/v1/kv/config/{prefix}/?recurse", server.address());
    let resp = reqwest::get(url).await.unwrap();
    resp.headers()["X-Consul-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Restart, then fewer writes than before: the agent's index after the restart stays far
/// below the one the watch last saw. With a 30 s blocking wait, a watch that kept waiting
/// past its old index would hear nothing for 30 s; this one converges within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_converges_after_a_restart_with_fewer_writes() {
    let Some(mut server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let prefix = ns.config_key("restart");
    let a = prefix.join("a").unwrap();
    let b = prefix.join("b").unwrap();
    let consul = client(&server, Duration::from_secs(30)).await;
    let kv = consul.kv();
    for i in 0..60 {
        kv.put(&a, format!("before {i}").into_bytes())
            .await
            .unwrap();
    }
    kv.put(&b, b"before".to_vec()).await.unwrap();
    let mut prefix_watch: Events = kv.watch_prefix(&prefix);
    let mut key_watch: Events = kv.watch(&a);
    let mut pv = first_snapshot(&mut prefix_watch, T).await;
    let mut kv_view = first_snapshot(&mut key_watch, T).await;
    assert_eq!(pv.entries.len(), 2);
    let old_index = raw_index(&server, &prefix).await;

    server.restart().await.expect("restart consul");
    let started = Instant::now();
    let v = kv
        .put(&a, b"after".to_vec())
        .await
        .expect("a write after the restart");
    assert!(
        v < old_index,
        "the agent's index went backwards: {v} after {old_index}"
    );
    wait_for_config(
        &mut prefix_watch,
        &mut pv,
        T,
        "the prefix after the restart",
        |w| w.resynced >= 1 && w.value(&a) == Some(b"after") && w.value(&b).is_none(),
    )
    .await;
    wait_for_config(
        &mut key_watch,
        &mut kv_view,
        T,
        "the key after the restart",
        |w| w.resynced >= 1 && w.value(&a) == Some(b"after"),
    )
    .await;
    assert_eq!(pv.entries[&a].1, v, "the version is the new agent's");
    assert_eq!(kv_view.entries[&a].1, v);

    // Later writes (still below the old index) arrive too: the watches block on the new
    // index.
    let v2 = kv.put(&b, b"again".to_vec()).await.unwrap();
    let v3 = kv.put(&a, b"last".to_vec()).await.unwrap();
    assert!(v3 < old_index, "{v3} < {old_index}");
    wait_for_config(&mut prefix_watch, &mut pv, T, "later writes", |w| {
        w.value(&a) == Some(b"last") && w.value(&b) == Some(b"again")
    })
    .await;
    wait_for_config(&mut key_watch, &mut kv_view, T, "a later write", |w| {
        w.value(&a) == Some(b"last")
    })
    .await;
    assert_eq!((pv.entries[&a].1, pv.entries[&b].1), (v3, v2));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "converged well within the 30 s wait: {:?}",
        started.elapsed()
    );
    assert_eq!(pv.stale, 1, "one outage: {:?}", pv.log);
}

/// A restored snapshot replaces the agent's state while it keeps running: the blocking
/// query answers on the same connection, with a lower index and older versions. The watch
/// resyncs to the restored state and follows the writes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_converges_after_a_snapshot_restore() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let prefix = ns.config_key("restore");
    let a = prefix.join("a").unwrap();
    let b = prefix.join("b").unwrap();
    let consul = client(&server, Duration::from_secs(2)).await;
    let kv = consul.kv();
    let v1 = kv.put(&a, b"saved".to_vec()).await.unwrap();

    let http = reqwest::Client::new();
    let snapshot_url = format!("http://{}/v1/snapshot", server.address());
    let snapshot = http.get(&snapshot_url).send().await.unwrap();
    assert!(snapshot.status().is_success(), "{snapshot:?}");
    let snapshot = snapshot.bytes().await.unwrap();

    for i in 0..30 {
        kv.put(&a, format!("later {i}").into_bytes()).await.unwrap();
    }
    kv.put(&b, b"later".to_vec()).await.unwrap();
    let mut w: Events = kv.watch_prefix(&prefix);
    let mut view: ConfigView = first_snapshot(&mut w, T).await;
    assert_eq!(view.value(&a), Some(&b"later 29"[..]));

    let restored = http.put(&snapshot_url).body(snapshot).send().await.unwrap();
    assert!(restored.status().is_success(), "{restored:?}");
    wait_for_config(&mut w, &mut view, T, "the restored state", |w| {
        w.resynced >= 1 && w.value(&a) == Some(b"saved") && w.value(&b).is_none()
    })
    .await;
    assert_eq!(view.entries[&a].1, v1, "the restored version");
    assert_eq!(kv.get(&a).await.unwrap().unwrap().version, v1);

    let v = kv.put(&b, b"after restore".to_vec()).await.unwrap();
    wait_for_config(&mut w, &mut view, T, "a write after the restore", |w| {
        w.value(&b) == Some(b"after restore")
    })
    .await;
    assert_eq!(view.entries[&b].1, v);
    assert_eq!(view.stale, 1, "resynced once: {:?}", view.log);
}
