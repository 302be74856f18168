//! Foreign writes over a live registration's key: a plain put (as `etcdctl put` does)
//! detaches the key from our lease; the registration takes it back, and nothing is left
//! once its guard is dropped. Keys whose service segment is no valid service name are
//! skipped by `services()`.

mod common;

use std::time::{Duration, Instant};

use waypost_core::{Error, Registrar, RegistrationStatus, ServiceName, Watcher};
use waypost_etcd::EtcdDiscovery;
use waypost_testkit::conformance::Namespace;

const T: Duration = Duration::from_secs(10);

/// Polls the key until `ok` holds for (lease, value), or panics after `T`.
async fn wait_key(
    admin: &mut etcd_client::Client,
    key: &str,
    what: &str,
    ok: impl Fn(Option<(i64, Vec<u8>)>) -> bool,
) {
    let deadline = Instant::now() + T;
    loop {
        let got = admin.get(key, None).await.unwrap();
        let kv = got
            .kvs()
            .first()
            .map(|kv| (kv.lease(), kv.value().to_vec()));
        if ok(kv.clone()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: key is {kv:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_key_is_taken_back_and_removed_with_the_guard() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let ns = Namespace::new();
    let svc = ns.service("detached");
    let d = common::connect(&server.url()).await;
    let a = ns.instance(&svc, "a", 1);
    let reg = d.register(a.clone()).await.unwrap();
    let lease = d.lease_id().expect("a lease is granted");
    let key = format!("/services/{svc}/{}", a.id);
    let ours = serde_json::to_vec(&a).unwrap();

    // A foreign put without a lease: the key would outlive us.
    admin.put(key.as_str(), "foreign", None).await.unwrap();
    wait_key(&mut admin, &key, "taken back onto our lease", |kv| {
        kv == Some((lease, ours.clone()))
    })
    .await;
    reg.wait_status(T, |s| *s == RegistrationStatus::Registered)
        .await
        .expect("Registered after the takeover");

    drop(reg);
    wait_key(&mut admin, &key, "gone with the guard", |kv| kv.is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_skip_foreign_names_and_other_prefixes() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let admin = common::admin(&[server.endpoint()]).await;
    let ns = Namespace::new();
    let svc = ns.service("listed");
    let d = common::connect(&server.url()).await;
    let _reg = d.register(ns.instance(&svc, "a", 1)).await.unwrap();
    // A foreign writer's keys: a valid name with a value that is no instance is a service
    // (its watch skips the value); segments that are no service names are skipped, as are
    // keys under no service's prefix.
    let foreign = ns.service("foreign");
    let mut kv = admin.kv_client();
    let keys: Vec<Vec<u8>> = vec![
        format!("/services/{foreign}/x").into_bytes(),
        b"/services/with space/x".to_vec(),
        "/services/caf\u{e9}/x".as_bytes().to_vec(),
        b"/services/\xff\xfe/x".to_vec(),
        b"/services//x".to_vec(),
        b"/services/../x".to_vec(),
        format!("/services/{}/x", "n".repeat(129)).into_bytes(),
        b"/services/bare".to_vec(),
        b"/servicesx/lookalike/x".to_vec(),
    ];
    for key in keys {
        kv.put(key, "not an instance", None).await.unwrap();
    }
    let mut want = vec![svc.clone(), foreign.clone()];
    want.sort();
    assert_eq!(d.services().await.unwrap(), want);

    // The root as service prefix: every first segment is a service, apart from the
    // configuration and coordination prefixes (`/config`, `/coord`) in the same range.
    let root = EtcdDiscovery::connect(common::config(&server.url()).with_prefix(""))
        .await
        .unwrap();
    root.kv()
        .put(&"app/db".parse().unwrap(), b"x".to_vec())
        .await
        .unwrap();
    let lock = root
        .coordinator()
        .lock(&"jobs/nightly".parse().unwrap())
        .await
        .unwrap();
    let _root_svc = root.register(ns.instance(&svc, "r", 2)).await.unwrap();
    let listed = root.services().await.unwrap();
    let names: Vec<&str> = listed.iter().map(ServiceName::as_str).collect();
    let mut want = vec!["services", "servicesx", svc.as_str()];
    want.sort();
    assert_eq!(names, want, "no `config` or `coord`");
    lock.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_fail_within_the_request_timeout() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let d = common::connect(&server.url()).await;
    server.pause().unwrap();
    let started = Instant::now();
    let err = d.services().await.expect_err("a paused server");
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        took < Duration::from_secs(3),
        "request timeout 1 s, took {took:?}"
    );
    d.shutdown().await.unwrap();
    assert!(matches!(d.services().await, Err(Error::Closed { .. })));
}
