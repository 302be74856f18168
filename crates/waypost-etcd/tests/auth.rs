//! etcd with authentication enabled: a wrong password is a clear `Unauthorized` at
//! connect (that never shows the password); the right one works end to end.

mod common;

use std::time::Duration;

use waypost_core::{Error, InstanceSet, Registrar, Watcher};
use waypost_etcd::EtcdDiscovery;
use waypost_testkit::conformance::{wait_for_set, Namespace};

const PASSWORD: &str = "pa55-w0rd-xyzzy";

async fn enable_auth(endpoint: String) {
    let mut admin = common::admin(&[endpoint]).await;
    admin
        .user_add("root", PASSWORD, None)
        .await
        .expect("user add");
    let _ = admin.role_add("root").await; // built in on some versions
    admin
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    admin.auth_enable().await.expect("auth enable");
}

fn url_with(user: &str, password: &str, server: &waypost_testkit::EtcdServer) -> String {
    format!("etcd://{user}:{password}@{}/services", server.address())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_right_one_works() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    enable_auth(server.endpoint()).await;

    let wrong =
        EtcdDiscovery::connect(common::config(&url_with("root", "not-it-42", &server))).await;
    let err = wrong.expect_err("a wrong password must be refused");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("not-it-42"), "password leaked: {shown}");
    assert!(!err.is_temporary());

    let cfg = common::config(&url_with("root", PASSWORD, &server));
    assert!(
        !format!("{cfg:?}").contains(PASSWORD),
        "Debug shows the password"
    );
    let d = EtcdDiscovery::connect(cfg).await.expect("right password");
    let ns = Namespace::new();
    let svc = ns.service("auth");
    let a = ns.instance(&svc, "a", 1);
    let reg = d.register(a.clone()).await.expect("register with auth");
    let mut watch = d.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(
        &mut watch,
        &mut set,
        Duration::from_secs(10),
        "a listed",
        |s| s.contains(&a.id),
    )
    .await;
    assert!(!format!("{d:?}").contains(PASSWORD));
    reg.deregister().await.unwrap();
    wait_for_set(
        &mut watch,
        &mut set,
        Duration::from_secs(10),
        "a gone",
        |s| s.is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_unauthorized_not_retried_forever() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    enable_auth(server.endpoint()).await;
    let ns = Namespace::new();
    let svc = ns.service("noauth");
    // The status call needs no credentials, so connecting works; the first call does not.
    let outcome = match EtcdDiscovery::connect(common::config(&server.url())).await {
        Err(e) => e,
        Ok(d) => {
            let e = d
                .register(ns.instance(&svc, "a", 1))
                .await
                .expect_err("register without credentials");
            // A watch ends with the error rather than retrying what cannot work.
            let mut watch = d.watch(&svc);
            let first = tokio::time::timeout(
                Duration::from_secs(10),
                futures::StreamExt::next(&mut watch),
            )
            .await
            .expect("watch answers")
            .expect("one item");
            assert!(
                matches!(first, Err(Error::Unauthorized { .. })),
                "{first:?}"
            );
            e
        }
    };
    assert!(matches!(outcome, Error::Unauthorized { .. }), "{outcome:?}");
}
