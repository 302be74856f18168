//! Interoperability with Curator's format, foreign and malformed nodes, and digest ACLs,
//! against a real ZooKeeper.

mod common;

use std::time::Duration;

use futures::StreamExt;
use waypost_core::{Endpoint, InstanceSet, Registrar, WatchEvent, Watcher};
use waypost_testkit::conformance::{next_event, wait_for_set, Namespace};
use waypost_zookeeper::{PayloadFormat, ZkDiscovery};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr, Permission};

const T: Duration = Duration::from_secs(10);

async fn raw(server: &waypost_testkit::server::ZooKeeperServer) -> Client {
    Client::connector()
        .with_session_timeout(common::SESSION)
        .connect(&server.address())
        .await
        .expect("raw client")
}

const CURATOR: &str = r#"{"name":"greeter","id":"g-1","address":"127.0.0.1","port":8001,"sslPort":null,"payload":{"@class":"java.util.HashMap","zone":"z1"},"registrationTimeUTC":1795304580073,"serviceType":"DYNAMIC","uriSpec":null}"#;

/// A node written exactly as Curator writes it is listed and watched; what we write
/// parses back as Curator's fields, in both payload formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_json_both_ways() {
    common::init_tracing();
    let Some(server) = common::server().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("greeter");
    let path = format!("/services/{svc}");
    let java = raw(&server).await;
    java.mkdir(&path, &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
        .unwrap();
    let d = common::client(&server).await;
    let mut w = d.watch(&svc);
    let mut set = InstanceSet::new();
    let first = next_event(&mut w, T).await;
    assert!(
        matches!(&first, WatchEvent::Snapshot(s) if s.is_empty()),
        "an empty snapshot first: {first:?}"
    );
    set.apply(&first);
    let data = CURATOR.replace("\"greeter\"", &format!("\"{svc}\""));
    java.create(
        &format!("{path}/g-1"),
        data.as_bytes(),
        &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
    )
    .await
    .unwrap();
    let id = "g-1".parse().unwrap();
    wait_for_set(&mut w, &mut set, T, "the Curator instance", |s| {
        s.contains(&id)
    })
    .await;
    let i = set.get(&id).unwrap();
    assert_eq!(i.endpoint, Endpoint::new("127.0.0.1", 8001));
    assert_eq!(i.zone.as_deref(), Some("z1"));
    assert_eq!(d.instances(&svc).await.unwrap().get(&id), Some(i));

    for format in [PayloadFormat::Curator, PayloadFormat::SpringCloud] {
        let ours = ZkDiscovery::connect(common::config(&server).with_payload(format))
            .await
            .unwrap();
        let inst = ns
            .instance(&svc, &format!("rs-{format:?}").to_lowercase(), 9000)
            .with_metadata("version", "1.2")
            .with_zone("eu-1a");
        let _reg = ours.register(inst.clone()).await.unwrap();
        let (bytes, stat) = java.get_data(&format!("{path}/{}", inst.id)).await.unwrap();
        assert_eq!(
            stat.ephemeral_owner,
            ours.session_id().unwrap(),
            "ephemeral"
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["name"], svc.as_str());
        assert_eq!(v["id"], inst.id.as_str());
        assert_eq!(v["address"], "127.0.0.1");
        assert_eq!(v["port"], 9000);
        assert!(v["sslPort"].is_null());
        assert_eq!(v["serviceType"], "DYNAMIC");
        assert!(v["registrationTimeUTC"].is_u64());
        let meta = match format {
            PayloadFormat::Curator => {
                assert_eq!(v["payload"]["@class"], "java.util.HashMap");
                &v["payload"]
            }
            _ => {
                assert_eq!(
                    v["payload"]["@class"],
                    "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance"
                );
                assert_eq!(v["payload"]["name"], svc.as_str());
                &v["payload"]["metadata"]
            }
        };
        assert_eq!(meta["version"], "1.2");
        // The zone where each reader looks: Spring Cloud's load balancer reads `zone`.
        let zone_key = match format {
            PayloadFormat::Curator => "waypost-zone",
            _ => "zone",
        };
        assert_eq!(meta[zone_key], "eu-1a", "{format:?}: {meta}");
        wait_for_set(&mut w, &mut set, T, "ours", |s| {
            s.get(&inst.id) == Some(&inst)
        })
        .await;
    }
}

/// Non-JSON, truncated JSON, a foreign node type (a persistent node with children, a
/// JSON array) and a ~1 MB node are skipped with a warning: listing and watching keep
/// working and show the valid instances only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_nodes_are_skipped() {
    common::init_tracing();
    let Some(server) = common::server().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("messy");
    let path = format!("/services/{svc}");
    let other = raw(&server).await;
    other
        .mkdir(&path, &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
        .unwrap();
    let d = common::client(&server).await;
    let good = ns.instance(&svc, "good", 1);
    let _reg = d.register(good.clone()).await.unwrap();
    let mut w = d.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut w, &mut set, T, "good", |s| s.contains(&good.id)).await;

    let big = format!(
        r#"{{"id":"big","address":"h","port":1,"payload":{{"@class":"x","blob":"{}"}}}}"#,
        "x".repeat(1_000_000)
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xffnot json".to_vec()),
        (
            "truncated",
            br#"{"name":"s","id":"t","address":"h","po"#.to_vec(),
        ),
        ("array", b"[1,2,3]".to_vec()),
        ("empty", Vec::new()),
        ("big", big.into_bytes()),
    ];
    for (name, data) in &bad {
        other
            .create(
                &format!("{path}/{name}"),
                data,
                &CreateMode::Persistent.with_acls(Acls::anyone_all()),
            )
            .await
            .unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }
    // A foreign node type: a directory with a child.
    other
        .create(
            &format!("{path}/dir"),
            b"",
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap();
    other
        .create(
            &format!("{path}/dir/child"),
            br#"{"id":"deep","address":"h","port":2}"#,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap();
    // The big node is an instance with an oversized value: kept, the value dropped.
    let big_id = "big".parse().unwrap();
    wait_for_set(&mut w, &mut set, T, "big", |s| s.contains(&big_id)).await;
    assert!(set.get(&big_id).unwrap().metadata.is_empty());
    // Then a valid change still flows through the same watch.
    let later = ns.instance(&svc, "later", 3);
    let _r2 = d.register(later.clone()).await.unwrap();
    wait_for_set(&mut w, &mut set, T, "later", |s| s.contains(&later.id)).await;
    let ids: Vec<_> = set.ids().map(|i| i.to_string()).collect();
    assert_eq!(ids, ["big", "good", "later"]);
    let listed = d.instances(&svc).await.unwrap();
    assert_eq!(
        listed
            .instances
            .iter()
            .map(|i| i.id.to_string())
            .collect::<Vec<_>>(),
        ids
    );
    // A fresh watch over the mess starts with the same snapshot.
    let mut w2 = d.watch(&svc);
    match tokio::time::timeout(T, w2.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Snapshot(s) => assert_eq!(s.len(), 3),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// With digest credentials our nodes let everyone read but only us write or delete;
/// another client cannot delete them, and we still can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_acl_protects_our_nodes() {
    common::init_tracing();
    let Some(server) = common::server().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("secure");
    let ours = ZkDiscovery::connect(common::config(&server).with_digest("app", "s3cret"))
        .await
        .unwrap();
    assert!(!format!("{ours:?}").contains("s3cret"));
    let inst = ns.instance(&svc, "a", 1);
    let reg = ours.register(inst.clone()).await.unwrap();
    let node = format!("/services/{svc}/a");

    let (acls, _) = raw(&server).await.get_acl(&node).await.unwrap();
    assert!(acls
        .iter()
        .any(|a| a.scheme() == "world" && a.permission() == Permission::READ));
    assert!(acls.iter().any(|a| a.scheme() == "digest"
        && a.id().starts_with("app:")
        && a.permission() == Permission::ALL));

    for (who, stranger) in [
        ("anonymous", raw(&server).await),
        (
            "another user",
            Client::connector()
                .with_auth("digest", b"mallory:guess")
                .connect(&server.address())
                .await
                .unwrap(),
        ),
    ] {
        assert!(stranger.get_data(&node).await.is_ok(), "{who} can read");
        assert_eq!(
            stranger.delete(&node, None).await,
            Err(ZkErr::NoAuth),
            "{who} deletes"
        );
        assert_eq!(
            stranger.set_data(&node, b"x", None).await.map(|_| ()),
            Err(ZkErr::NoAuth),
            "{who} overwrites"
        );
    }
    // A reader without credentials lists it.
    let reader = common::client(&server).await;
    assert_eq!(
        reader.instances(&svc).await.unwrap().instances,
        vec![inst.clone()]
    );
    reg.deregister().await.unwrap();
    assert!(reader.instances(&svc).await.unwrap().is_empty());
}

/// An unreachable endpoint fails within the connect timeout, with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_within_connect_timeout() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let started = std::time::Instant::now();
    let e = ZkDiscovery::from_url(&format!(
        "zk://127.0.0.1:{port}/services?connect_timeout=500ms&session_timeout=2s"
    ))
    .await
    .unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // A listener that accepts and never answers (a hung server): the timeout applies.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        ZkDiscovery::from_url(&format!("zk://{addr}/services?connect_timeout=500ms")),
    )
    .await
    .expect("a hung server fails the connect within its timeout, not never")
    .unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    drop(hung);
}

/// `services()` lists the root's children that are service names, sorted: nodes a
/// foreign client created below the root with other names, and the nodes holding this
/// client's configuration keys and locks when their prefixes are configured below the
/// root, are skipped; a foreign service node with no instance is listed. Against a
/// paused server it fails with a temporary error within the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_skip_foreign_names_and_own_prefixes() {
    common::init_tracing();
    let Some(server) = common::server().await else {
        return;
    };
    let request = Duration::from_secs(1);
    let d = ZkDiscovery::connect(
        common::config(&server)
            .with_config_prefix("/services/cfg")
            .with_coord_prefix("/services/locks/app")
            .with_request_timeout(request),
    )
    .await
    .unwrap();
    let mut regs = Vec::new();
    for (service, port) in [("zeta", 8001), ("alpha", 8002)] {
        let i = waypost_core::Instance::parse(service, "i-1", "127.0.0.1", port).unwrap();
        regs.push(d.register(i).await.unwrap());
    }
    waypost_core::kv::ConfigStore::put(d.kv(), &"app/x".parse().unwrap(), b"1".to_vec())
        .await
        .unwrap();
    let guard = d.coordinator().lock(&"job".parse().unwrap()).await.unwrap();

    let java = raw(&server).await;
    let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let long = "x".repeat(200);
    let foreign = ["bad name", "bad:colon", "ünïcode", &long, "Mid"];
    for name in foreign {
        java.create(&format!("/services/{name}"), b"", &opts)
            .await
            .unwrap_or_else(|e| panic!("creating /services/{name}: {e}"));
    }
    let mut raw_listing = java.list_children("/services").await.unwrap();
    raw_listing.sort();
    let mut expected_raw: Vec<String> = ["zeta", "alpha", "cfg", "locks"]
        .into_iter()
        .chain(foreign)
        .map(String::from)
        .collect();
    expected_raw.sort();
    assert_eq!(raw_listing, expected_raw, "every node is below the root");

    let listed: Vec<String> = d
        .services()
        .await
        .unwrap()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(listed, ["Mid", "alpha", "zeta"]);
    assert!(d
        .instances(&"Mid".parse().unwrap())
        .await
        .unwrap()
        .is_empty());

    server.pause().unwrap();
    let started = tokio::time::Instant::now();
    let r = tokio::time::timeout(request * 5, d.services()).await;
    let elapsed = started.elapsed();
    server.resume().unwrap();
    let e = r
        .expect("services() against a paused server ends")
        .expect_err("services() against a paused server fails");
    assert!(e.is_temporary(), "{e}");
    assert!(elapsed < request * 2, "failed after {elapsed:?}: {e}");

    // Back: listed again once the client has reconnected.
    let deadline = tokio::time::Instant::now() + T;
    let listed = loop {
        match d.services().await {
            Ok(l) => break l,
            Err(e) if e.is_temporary() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("services() after the server came back: {e}"),
        }
    };
    assert_eq!(listed.len(), 3, "{listed:?}");
    guard.release().await.unwrap();
}
