//! Bad input: unreachable endpoints fail within the connect timeout; foreign, malformed
//! and oversized values in etcd are skipped (never a crash or a failed watch); two
//! registrants cannot take one id; the gRPC-Go layout interoperates.

mod common;

use std::time::{Duration, Instant};

use waypost_core::{Error, InstanceSet, Registrar, WatchEvent, Watcher};
use waypost_etcd::{EtcdDiscovery, Layout};
use waypost_testkit::conformance::{next_event, wait_for_set, Namespace};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_fail_within_the_connect_timeout() {
    common::init_tracing();
    let connect_timeout = Duration::from_secs(2);
    // A closed port: refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = common::config(&format!("etcd://127.0.0.1:{port}/services"))
        .with_connect_timeout(connect_timeout);
    let started = Instant::now();
    let err = EtcdDiscovery::connect(cfg).await.expect_err("closed port");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&port.to_string()),
        "names the endpoint: {err}"
    );
    assert!(started.elapsed() < connect_timeout + Duration::from_secs(3));

    // A hung server (accepts, never answers): fails when the connect timeout runs out.
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    server.pause().unwrap();
    let cfg = common::config(&server.url()).with_connect_timeout(connect_timeout);
    let started = Instant::now();
    let err = EtcdDiscovery::connect(cfg)
        .await
        .expect_err("paused server");
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(err.is_temporary(), "{err:?}");
    assert!(
        took < connect_timeout + Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_values_are_skipped() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let ns = Namespace::new();
    let svc = ns.service("junk");
    let d = common::connect(&server.url()).await;
    let p = format!("/services/{svc}");
    let good = ns.instance(&svc, "good", 1);
    let _rg = d.register(good.clone()).await.unwrap();
    let other = ns.instance(&ns.service("elsewhere"), "x", 1);
    let too_many_tags = (0..100).fold(ns.instance(&svc, "tags", 1), |i, n| {
        i.with_tag(format!("t{n}"))
    });
    for (k, v) in [
        (format!("{p}/notjson"), b"hello".to_vec()),
        (format!("{p}/empty"), Vec::new()),
        (format!("{p}/x"), serde_json::to_vec(&other).unwrap()),
        (
            format!("{p}/tags"),
            serde_json::to_vec(&too_many_tags).unwrap(),
        ),
        (format!("{p}/deep/er"), b"{}".to_vec()),
        (format!("{p}/huge"), vec![b'{'; 1024 * 1024]),
    ] {
        admin.put(k, v, None).await.unwrap();
    }
    let listed = d.instances(&svc).await.expect("listing with junk");
    assert_eq!(listed.instances, vec![good.clone()]);

    let mut watch = d.watch(&svc);
    let WatchEvent::Snapshot(s) = next_event(&mut watch, T).await else {
        panic!("first event must be a Snapshot")
    };
    assert_eq!(s.instances, vec![good.clone()]);
    let mut set = InstanceSet::from_snapshot(&s);
    // Junk written while watching is skipped; junk over a good key removes it; the
    // watch goes on.
    admin
        .put(format!("{p}/late"), b"\xff\xfe", None)
        .await
        .unwrap();
    admin
        .put(format!("{p}/good"), b"broken", None)
        .await
        .unwrap();
    wait_for_set(&mut watch, &mut set, T, "good removed by junk", |s| {
        s.is_empty()
    })
    .await;
    let b = ns.instance(&svc, "b", 2);
    let _rb = d.register(b.clone()).await.unwrap();
    let events = wait_for_set(&mut watch, &mut set, T, "b listed", |s| s.contains(&b.id)).await;
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, WatchEvent::Stale { .. })),
        "{events:?}"
    );
    assert_eq!(set.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_instance_is_invalid_input_and_nothing_written() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let d = common::connect(&server.url()).await;
    let ns = Namespace::new();
    let svc = ns.service("big");
    let big = ns
        .instance(&svc, "big", 1)
        .with_metadata("v", "x".repeat(1024 * 1024));
    assert!(matches!(
        d.register(big).await,
        Err(Error::InvalidInput { .. })
    ));
    let keys = admin
        .get(
            format!("/services/{svc}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(keys.kvs().is_empty(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrants_cannot_take_one_id() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("dup");
    let one = common::connect(&server.url()).await;
    let two = common::connect(&server.url()).await;
    let first = ns.instance(&svc, "same", 1);
    let _r = one.register(first.clone()).await.unwrap();
    let mut second = ns.instance(&svc, "same", 2);
    second.endpoint.host = "10.9.9.9".into();
    let err = two.register(second).await.expect_err("second registrant");
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let err = one
        .register(first.clone())
        .await
        .expect_err("same client twice");
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let listed = two.instances(&svc).await.unwrap();
    assert_eq!(
        listed.instances,
        vec![first],
        "the first registration is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_layout_interoperates() {
    common::init_tracing();
    let Some(server) = waypost_testkit::server::etcd().await else {
        return;
    };
    let mut admin = common::admin(&[server.endpoint()]).await;
    let ns = Namespace::new();
    let svc = ns.service("grpc");
    let d = EtcdDiscovery::connect(common::config(&server.url()).with_layout(Layout::Grpc))
        .await
        .unwrap();
    let a = ns.instance(&svc, "a", 5001).with_metadata("k", "v");
    let _ra = d.register(a.clone()).await.unwrap();
    // What a Go gRPC client's etcd resolver reads (target `/services/<svc>`).
    let kv = admin
        .get(format!("/services/{svc}/127.0.0.1:5001"), None)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(v["Op"], 0);
    assert_eq!(v["Addr"], "127.0.0.1:5001");
    // What a Go program registers with `endpoints.Manager.AddEndpoint`.
    let mut watch = d.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a listed", |s| s.contains(&a.id)).await;
    admin
        .put(
            format!("/services/{svc}/127.0.0.1:6001"),
            r#"{"Addr":"127.0.0.1:6001","Metadata":null}"#,
            None,
        )
        .await
        .unwrap();
    wait_for_set(&mut watch, &mut set, T, "the Go instance listed", |s| {
        s.len() == 2
    })
    .await;
    let go = set.iter().find(|i| i.id != a.id).unwrap();
    assert_eq!(go.endpoint.port, 6001);
    assert_eq!(set.get(&a.id), Some(&a), "our metadata round-trips");
    admin
        .delete(format!("/services/{svc}/127.0.0.1:6001"), None)
        .await
        .unwrap();
    wait_for_set(&mut watch, &mut set, T, "the Go instance gone", |s| {
        s.len() == 1
    })
    .await;
}
