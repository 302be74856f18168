//! Foreign writes over a live registration's key: a plain put (as `etcdctl put` does)
//! detaches the key from our lease; the registration takes it back, and nothing is left
//! once its guard is dropped.

mod common;

use std::time::{Duration, Instant};

use waypost_core::{Registrar, RegistrationStatus};
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
