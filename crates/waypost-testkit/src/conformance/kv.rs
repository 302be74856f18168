//! Configuration keys: get / put / compare-and-set / delete / list, watches of a key and of
//! a prefix, [`LiveConfig`], faults and foreign writers (the registry's own CLI).
//!
//! Every suite writes below a fresh random prefix ([`Namespace::config_key`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::stream::StreamExt;
use waypost_core::kv::{ConfigKey, ConfigStore, Expected, LiveConfig, LiveOptions, Version};
use waypost_core::{Error, Result};

use super::kv_view::{first_snapshot, wait_for_config};
use super::{Namespace, TestBackend};

impl Namespace {
    /// A configuration key in this namespace: `{namespace}/{name}`.
    pub fn config_key(&self, name: &str) -> ConfigKey {
        ConfigKey::new(format!("{}/{name}", self.prefix())).expect("valid test config key")
    }
}

async fn store(backend: &dyn TestBackend) -> Arc<dyn ConfigStore> {
    let d = backend.connect().await;
    d.kv()
        .unwrap_or_else(|e| panic!("{}: no configuration store: {e}", backend.name()))
}

fn faults(backend: &dyn TestBackend) -> &dyn super::Faults {
    backend.faults().unwrap_or_else(|| {
        panic!(
            "{}: this suite needs fault injection (never skipped silently)",
            backend.name()
        )
    })
}

fn conflict_version(r: Result<impl std::fmt::Debug>) -> Option<Version> {
    match r {
        Err(Error::Conflict { current, .. }) => current,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// get / put / compare-and-set / delete, and versions that rise across a delete and a
/// re-creation.
pub async fn kv_get_put_cas_delete(backend: &dyn TestBackend) {
    let kv = store(backend).await;
    let ns = Namespace::new();
    let key = ns.config_key("app/config");

    assert_eq!(kv.get(&key).await.unwrap(), None, "a missing key");
    assert!(!kv.delete(&key).await.unwrap(), "deleting a missing key");
    assert_eq!(
        conflict_version(kv.delete_if(&key, 1).await),
        None,
        "a conditional delete of a missing key"
    );
    assert_eq!(
        conflict_version(kv.put_if(&key, b"x".to_vec(), Expected::Version(1)).await),
        None,
        "a CAS on a missing key"
    );
    assert_eq!(
        kv.get(&key).await.unwrap(),
        None,
        "a failed CAS wrote nothing"
    );

    let v1 = kv.put(&key, b"one".to_vec()).await.unwrap();
    let got = kv.get(&key).await.unwrap().expect("written");
    assert_eq!((got.value.as_slice(), got.version), (&b"one"[..], v1));

    assert_eq!(
        conflict_version(kv.put_if(&key, b"two".to_vec(), Expected::Absent).await),
        Some(v1),
        "create-only on an existing key"
    );
    let v2 = kv
        .put_if(&key, b"two".to_vec(), Expected::Version(v1))
        .await
        .unwrap();
    assert!(v2 > v1, "versions rise: {v1} → {v2}");
    assert_eq!(
        conflict_version(
            kv.put_if(&key, b"three".to_vec(), Expected::Version(v1))
                .await
        ),
        Some(v2),
        "a CAS with a stale version"
    );
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, b"two");
    assert_eq!(conflict_version(kv.delete_if(&key, v1).await), Some(v2));
    kv.delete_if(&key, v2).await.unwrap();
    assert_eq!(kv.get(&key).await.unwrap(), None);

    let v3 = kv
        .put_if(&key, b"again".to_vec(), Expected::Absent)
        .await
        .unwrap();
    assert!(
        v3 > v2,
        "a re-created key's version rises past the deleted one's: {v2} → {v3}"
    );
    let v4 = kv.put(&key, b"again".to_vec()).await.unwrap();
    assert!(
        v4 > v3,
        "rewriting the same value is a new version: {v3} → {v4}"
    );
    assert!(kv.delete(&key).await.unwrap());
    assert_eq!(kv.get(&key).await.unwrap(), None);

    // Two writers race a compare-and-set from the same version: exactly one wins.
    let base = kv.put(&key, b"0".to_vec()).await.unwrap();
    let other = store(backend).await;
    let (a, b) = tokio::join!(
        kv.put_if(&key, b"a".to_vec(), Expected::Version(base)),
        other.put_if(&key, b"b".to_vec(), Expected::Version(base)),
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one CAS wins: {a:?} / {b:?}"
    );
    let winner = if a.is_ok() { &b"a"[..] } else { &b"b"[..] };
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, winner);
    kv.delete(&key).await.unwrap();
}

/// Binary, unicode and empty values read back as written; a value at the registry's limit
/// is stored, one byte more is `InvalidInput` and writes nothing; list covers exactly the
/// keys below a prefix.
pub async fn kv_values_round_trip(backend: &dyn TestBackend) {
    let kv = store(backend).await;
    let ns = Namespace::new();
    let key = ns.config_key("value");
    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let unicode = "naïve café – 日本語 – 🚀 \"quoted\" \\ \n tab\t"
        .as_bytes()
        .to_vec();
    for value in [binary, unicode, Vec::new(), b"{\"json\": [1, 2]}".to_vec()] {
        kv.put(&key, value.clone()).await.unwrap();
        assert_eq!(kv.get(&key).await.unwrap().unwrap().value, value);
    }

    let max = kv.max_value_len();
    let big: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    kv.put(&key, big.clone())
        .await
        .unwrap_or_else(|e| panic!("a value of exactly {max} bytes: {e}"));
    assert!(
        kv.get(&key).await.unwrap().unwrap().value == big,
        "the largest value reads back"
    );
    kv.put(&key, b"small".to_vec()).await.unwrap();
    let e = kv.put(&key, vec![b'x'; max + 1]).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    assert!(
        e.to_string().contains(&max.to_string()),
        "the error names the limit: {e}"
    );
    let e = kv
        .put_if(&key, vec![b'x'; max + 1], Expected::Absent)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    assert_eq!(
        kv.get(&key).await.unwrap().unwrap().value,
        b"small",
        "nothing written"
    );

    // list: below the prefix only.
    let prefix = ns.config_key("dir");
    kv.put(&prefix.join("a").unwrap(), b"1".to_vec())
        .await
        .unwrap();
    kv.put(&prefix.join("b/c").unwrap(), b"2".to_vec())
        .await
        .unwrap();
    kv.put(&ns.config_key("dirx"), b"3".to_vec()).await.unwrap();
    let listing = kv.list(&prefix).await.unwrap();
    let keys: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            prefix.join("a").unwrap().as_str(),
            prefix.join("b/c").unwrap().as_str()
        ],
        "list covers exactly the keys below the prefix"
    );
    assert!(kv
        .list(&ns.config_key("nothing"))
        .await
        .unwrap()
        .entries
        .is_empty());
}

/// A key's watch: an empty snapshot for a missing key; rapid writes may coalesce but the
/// last value is never lost; a delete is `Removed`; a re-creation `Added`.
pub async fn kv_watch_key(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let kv = store(backend).await;
    let ns = Namespace::new();
    let key = ns.config_key("flags");
    let sibling = ns.config_key("flags2");
    let child = key.join("child").unwrap();

    let mut w = kv.watch(&key);
    let mut view = first_snapshot(&mut w, t).await;
    assert!(
        view.entries.is_empty(),
        "a missing key is an empty snapshot"
    );

    for i in 0..50 {
        kv.put(&key, format!("v{i}").into_bytes()).await.unwrap();
    }
    kv.put(&sibling, b"not watched".to_vec()).await.unwrap();
    kv.put(&child, b"not watched".to_vec()).await.unwrap();
    wait_for_config(&mut w, &mut view, t, "the last of 50 rapid writes", |v| {
        v.value(&key) == Some(b"v49")
    })
    .await;
    let last = kv.get(&key).await.unwrap().unwrap();
    assert_eq!(
        view.entries[&key].1, last.version,
        "the version the watch reports"
    );

    kv.delete(&key).await.unwrap();
    wait_for_config(&mut w, &mut view, t, "the delete", |v| v.entries.is_empty()).await;
    kv.put(&key, b"back".to_vec()).await.unwrap();
    wait_for_config(&mut w, &mut view, t, "the re-creation", |v| {
        v.value(&key) == Some(b"back")
    })
    .await;
    assert!(
        view.log.iter().any(|e| e.starts_with("Removed")),
        "the delete was reported: {:?}",
        view.log
    );
    assert!(
        view.entries.keys().all(|k| *k == key),
        "only the watched key: {:?}",
        view.entries.keys()
    );

    // A watch started on an existing key lists it.
    let mut w2 = kv.watch(&key);
    let view2 = first_snapshot(&mut w2, t).await;
    assert_eq!(view2.value(&key), Some(&b"back"[..]));
}

/// A prefix watch over 1,000 keys: the snapshot of a fresh watch holds them all; a
/// running watch converges to them; a key deleted and re-created; a fresh watch agrees
/// with `list`.
pub async fn kv_watch_prefix_thousand(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let kv = store(backend).await;
    let ns = Namespace::new();
    let prefix = ns.config_key("many");
    kv.put(&ns.config_key("manyx"), b"outside".to_vec())
        .await
        .unwrap();

    let mut w = kv.watch_prefix(&prefix);
    let mut view = first_snapshot(&mut w, t).await;
    assert!(view.entries.is_empty());

    let keys: Vec<ConfigKey> = (0..1000)
        .map(|i| prefix.join(&format!("k{}/v{i:04}", i % 10)).unwrap())
        .collect();
    let concurrency = backend.settings().concurrency.clamp(1, 32);
    futures::stream::iter(keys.clone())
        .for_each_concurrent(concurrency, |k| {
            let kv = kv.clone();
            async move {
                kv.put(&k, k.as_str().as_bytes().to_vec()).await.unwrap();
            }
        })
        .await;
    wait_for_config(&mut w, &mut view, t * 3, "1,000 keys", |v| {
        v.entries.len() == 1000
    })
    .await;
    for k in &keys {
        assert_eq!(view.value(k), Some(k.as_str().as_bytes()), "value of {k}");
    }

    kv.delete(&keys[7]).await.unwrap();
    kv.put(&keys[7], b"re-created".to_vec()).await.unwrap();
    wait_for_config(&mut w, &mut view, t, "the re-created key", |v| {
        v.value(&keys[7]) == Some(b"re-created")
    })
    .await;

    let listing = kv.list(&prefix).await.unwrap();
    assert_eq!(listing.entries.len(), 1000);
    let mut fresh = kv.watch_prefix(&prefix);
    let fresh = first_snapshot(&mut fresh, t * 3).await;
    assert_eq!(
        fresh.entries.len(),
        1000,
        "a fresh watch's snapshot is complete"
    );
    assert_eq!(
        fresh.entries, view.entries,
        "the fresh snapshot equals the running watch"
    );
    for e in &listing.entries {
        assert_eq!(
            fresh.entries[&e.key],
            (e.value.clone(), e.version),
            "list agrees"
        );
    }
}

/// While the registry is unreachable a watch is `Stale` (once) and the writes made
/// meanwhile or right after are seen after `Resynced`; a write whose caller saw the
/// outage is retried, not lost.
pub async fn kv_unreachable_then_resync(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let f = faults(backend);
    let kv = store(backend).await;
    let writer = store(backend).await;
    let ns = Namespace::new();
    let prefix = ns.config_key("outage");
    let a = prefix.join("a").unwrap();
    let b = prefix.join("b").unwrap();
    kv.put(&a, b"before".to_vec()).await.unwrap();

    let mut w = kv.watch_prefix(&prefix);
    let mut view = first_snapshot(&mut w, t).await;
    assert_eq!(view.value(&a), Some(&b"before"[..]));

    f.make_unreachable().await;
    wait_for_config(&mut w, &mut view, t * 2, "Stale", |v| v.stale == 1).await;
    // A write started during the outage is retried until the registry answers.
    let pending = tokio::spawn({
        let writer = writer.clone();
        let b = b.clone();
        async move { writer.put(&b, b"during".to_vec()).await }
    });
    f.make_reachable().await;
    pending
        .await
        .expect("write task")
        .expect("a write during a short outage completes");
    writer.put(&a, b"after".to_vec()).await.unwrap();
    wait_for_config(
        &mut w,
        &mut view,
        t * 2,
        "the writes made around the outage",
        |v| v.resynced >= 1 && v.value(&a) == Some(b"after") && v.value(&b) == Some(b"during"),
    )
    .await;
    assert_eq!(view.stale, 1, "Stale once: {:?}", view.log);
}

/// The registry restarts (ZooKeeper and etcd keep their data; a Consul `-dev` agent does
/// not): the watch resyncs to what the registry holds, and later writes reach it.
pub async fn kv_server_restart(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let f = faults(backend);
    let kv = store(backend).await;
    let ns = Namespace::new();
    let prefix = ns.config_key("restart");
    let a = prefix.join("a").unwrap();
    kv.put(&a, b"1".to_vec()).await.unwrap();
    let mut w = kv.watch_prefix(&prefix);
    let mut view = first_snapshot(&mut w, t).await;

    f.restart().await;
    let v = kv
        .put(&a, b"2".to_vec())
        .await
        .expect("a write after the restart");
    wait_for_config(
        &mut w,
        &mut view,
        t * 3,
        "the write after the restart",
        |v| v.value(&a) == Some(b"2"),
    )
    .await;
    let truth = kv.list(&prefix).await.unwrap();
    let truth: BTreeMap<_, _> = truth
        .entries
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect();
    assert_eq!(
        view.entries, truth,
        "the watch equals the registry after the restart"
    );
    assert_eq!(view.entries[&a].1, v);
}

/// The registry's own CLI as a second writer: its writes and deletes reach a watcher with
/// the same bytes, and what waypost writes reads back with the CLI; entries under a prefix
/// whose key is not a configuration key are skipped.
pub async fn kv_foreign_writer(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let f = faults(backend);
    let kv = store(backend).await;
    let ns = Namespace::new();
    let prefix = ns.config_key("foreign");
    let theirs = prefix.join("theirs").unwrap();
    let ours = prefix.join("ours").unwrap();

    let mut w = kv.watch_prefix(&prefix);
    let mut view = first_snapshot(&mut w, t).await;

    let text = "from the CLI: café ✓";
    f.kv_foreign_put(&theirs, text).await;
    wait_for_config(&mut w, &mut view, t, "the CLI's write", |v| {
        v.value(&theirs) == Some(text.as_bytes())
    })
    .await;
    assert_eq!(
        kv.get(&theirs).await.unwrap().unwrap().value,
        text.as_bytes()
    );

    let written = "written by waypost: 日本";
    kv.put(&ours, written.as_bytes().to_vec()).await.unwrap();
    assert_eq!(
        f.kv_foreign_get(&ours).await.as_deref(),
        Some(written),
        "the CLI reads our bytes"
    );

    f.kv_write_malformed(&prefix).await;
    f.kv_foreign_put(&theirs, "second").await;
    wait_for_config(
        &mut w,
        &mut view,
        t,
        "a write after malformed entries",
        |v| v.value(&theirs) == Some(b"second"),
    )
    .await;
    f.kv_foreign_delete(&theirs).await;
    wait_for_config(&mut w, &mut view, t, "the CLI's delete", |v| {
        !v.entries.contains_key(&theirs)
    })
    .await;
    assert_eq!(f.kv_foreign_get(&theirs).await, None);
    let keys: Vec<&ConfigKey> = view.entries.keys().collect();
    assert_eq!(keys, vec![&ours], "only valid keys are listed");
    let listing = kv.list(&prefix).await.unwrap();
    assert_eq!(listing.entries.len(), 1, "list skips malformed keys too");
    let mut fresh = kv.watch_prefix(&prefix);
    let fresh = first_snapshot(&mut fresh, t).await;
    assert_eq!(fresh.entries.len(), 1, "a fresh watch skips them too");
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Pool {
    size: u32,
}

/// [`LiveConfig`]: decodes JSON, keeps the last good value when a new one is malformed or
/// fails validation (reporting it), serves it while the registry is unreachable, reports a
/// deletion with the default.
pub async fn kv_live_config(backend: &dyn TestBackend) {
    let t = backend.settings().timeout;
    let f = faults(backend);
    let kv = store(backend).await;
    let ns = Namespace::new();
    let key = ns.config_key("pool");

    let options = LiveOptions::<Pool>::json()
        .validate(|p| {
            if p.size > 0 {
                Ok(())
            } else {
                Err("size must be positive".into())
            }
        })
        .default_value(Pool { size: 1 });
    let live = LiveConfig::new(kv.clone(), key.clone(), options);
    let st = live.wait_for(t, |s| s.ready).await.unwrap();
    assert!(st.deleted, "a missing key is reported deleted");
    assert_eq!(
        live.get().as_deref(),
        Some(&Pool { size: 1 }),
        "the default"
    );

    let v1 = kv.put(&key, br#"{"size": 8}"#.to_vec()).await.unwrap();
    live.wait_for(t, |s| s.version == Some(v1)).await.unwrap();
    assert_eq!(live.get().unwrap().size, 8);

    let bad = kv.put(&key, b"{not json".to_vec()).await.unwrap();
    let st = live
        .wait_for(t, |s| s.rejected.as_ref().is_some_and(|r| r.version == bad))
        .await
        .unwrap();
    assert_eq!(st.version, Some(v1), "the last good value stays");
    assert_eq!(live.get().unwrap().size, 8);
    assert!(
        st.rejected.as_ref().unwrap().reason.contains("JSON"),
        "{:?}",
        st.rejected
    );

    let invalid = kv.put(&key, br#"{"size": 0}"#.to_vec()).await.unwrap();
    let st = live
        .wait_for(t, |s| {
            s.rejected.as_ref().is_some_and(|r| r.version == invalid)
        })
        .await
        .unwrap();
    assert!(st.rejected.as_ref().unwrap().reason.contains("positive"));
    assert_eq!(live.get().unwrap().size, 8);

    let v2 = kv.put(&key, br#"{"size": 16}"#.to_vec()).await.unwrap();
    let st = live.wait_for(t, |s| s.version == Some(v2)).await.unwrap();
    assert!(st.rejected.is_none(), "a good value clears the rejection");
    assert_eq!(live.get().unwrap().size, 16);

    f.make_unreachable().await;
    let st = live
        .wait_for(t * 2, |s| s.stale_since.is_some())
        .await
        .unwrap();
    assert_eq!(
        live.get().unwrap().size,
        16,
        "served while the registry is down"
    );
    assert!(st.stale_for().is_some());
    f.make_reachable().await;
    live.wait_for(t * 2, |s| s.stale_since.is_none())
        .await
        .unwrap();

    kv.delete(&key).await.unwrap();
    let st = live.wait_for(t, |s| s.deleted).await.unwrap();
    assert_eq!(st.version, None);
    assert_eq!(live.get().unwrap().size, 1, "the default after a delete");
}
