//! Configuration watches across an etcd compaction: a watch whose stream dropped while
//! changes it had not read yet were compacted (`etcdctl compact`) cannot resume from its
//! revision; it reports `Stale`, lists again and resyncs to exactly what etcd holds.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use waypost_core::backend::TestHooks;
use waypost_core::kv::ConfigKey;
use waypost_testkit::conformance::{first_snapshot, wait_for_config, Namespace};

const T: Duration = Duration::from_secs(20);

async fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .output()
        .await
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watch_disconnected_across_a_compaction_resyncs_to_the_truth() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let prefix = ns.config_key("compact");
    let key = |name: &str| -> ConfigKey { prefix.join(name).unwrap() };
    let writer = common::connect(&server.url()).await.kv();
    let watcher = common::connect(&server.url()).await;
    let kv = watcher.kv();

    writer.put(&key("a"), b"1".to_vec()).await.unwrap();
    writer.put(&key("gone"), b"x".to_vec()).await.unwrap();
    let mut w = kv.watch_prefix(&prefix);
    let mut view = first_snapshot(&mut w, T).await;
    assert_eq!(view.entries.len(), 2, "{:?}", view.log);

    // The watch's stream stalls (etcd keeps the events, the client does not read them).
    watcher.stall_watches(true);

    // Changes the watch has not read, then a compaction past all of them, then its
    // stream drops: it cannot resume from the revision it holds.
    writer.put(&key("a"), b"2".to_vec()).await.unwrap();
    writer.delete(&key("gone")).await.unwrap();
    writer.put(&key("b"), b"new".to_vec()).await.unwrap();
    let revision = writer.list(&prefix).await.unwrap().revision;
    let compacted = etcdctl(&server.endpoint(), &["compact", &revision.to_string()]).await;
    assert!(
        compacted.contains("compacted"),
        "etcdctl said {compacted:?}"
    );
    watcher.drop_connections();
    watcher.stall_watches(false);

    wait_for_config(&mut w, &mut view, T, "Resynced after the compaction", |v| {
        v.resynced == 1
    })
    .await;
    assert_eq!(view.stale, 1, "Stale once, then Resynced: {:?}", view.log);
    assert!(
        view.log
            .iter()
            .any(|e| e.starts_with("Stale") && e.contains("compacted")),
        "the outage is the compaction: {:?}",
        view.log.iter().rev().take(5).collect::<Vec<_>>()
    );
    let truth: BTreeMap<_, _> = writer
        .list(&prefix)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect();
    assert_eq!(truth.len(), 2, "a and b");
    assert!(
        view.entries == truth,
        "the resynced watch holds exactly what etcd holds ({} keys, etcd {})",
        view.entries.len(),
        truth.len()
    );
    assert_eq!(view.value(&key("a")), Some(&b"2"[..]));
    assert_eq!(view.value(&key("gone")), None);

    // And the watch goes on from there.
    writer.put(&key("c"), b"after".to_vec()).await.unwrap();
    wait_for_config(&mut w, &mut view, T, "a write after the resync", |v| {
        v.value(&key("c")) == Some(b"after")
    })
    .await;
    assert_eq!(view.stale, 1, "no further outage: {:?}", view.log);
    // Nothing left unread before `c` was delivered.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err(),
        "no event after the last write"
    );
}
