//! ACLs (default deny) and bad input: an unreachable or paused agent, a wrong datacenter,
//! a server that does not speak Consul's JSON.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{Error, Instance, InstanceSet, Registrar, WatchEvent, Watcher};
use waypost_testkit::conformance::{wait_for_set, Namespace};
use waypost_testkit::{ConsulOptions, ConsulServer};

const MASTER: &str = "master-s3cret-token-0042";
const T: Duration = Duration::from_secs(15);

fn config(url: &str) -> ConsulConfig {
    ConsulConfig::from_url(url)
        .unwrap()
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1))
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(MASTER), "{what} shows the token: {text}");
}

async fn acl_server() -> Option<ConsulServer> {
    waypost_testkit::server::require(waypost_testkit::server::ServerKind::Consul)?;
    Some(
        ConsulServer::start_with(ConsulOptions {
            acl_master_token: Some(MASTER.into()),
            ..ConsulOptions::default()
        })
        .await
        .expect("start consul with ACLs"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_default_deny_needs_a_token() {
    let Some(server) = acl_server().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("acl");
    let inst = ns.instance(&svc, "a", 1);

    let with = ConsulDiscovery::connect(config(&server.url()).with_token(MASTER))
        .await
        .unwrap();
    assert_no_secret("Debug", &format!("{with:?}"));
    let reg = with.register(inst.clone()).await.expect("with a token");

    for (what, cfg) in [
        ("no token", config(&server.url())),
        (
            "a wrong token",
            config(&server.url()).with_token("not-a-token"),
        ),
    ] {
        let d = ConsulDiscovery::connect(cfg)
            .await
            .expect("connect needs no ACL");
        let e = d.register(ns.instance(&svc, "b", 2)).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{what}: {e:?}");
        assert_no_secret("error", &format!("{e} {e:?}"));
        // A health query would answer `200 []`: it must not pass for "no instances".
        let e = d.instances(&svc).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{what}: {e:?}");
        // So would the catalog's service listing (`200 {}`).
        let e = d.services().await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{what}: {e:?}");
        let mut w = d.watch(&svc);
        let first = tokio::time::timeout(T, w.next()).await.expect("an answer");
        assert!(
            matches!(first, Some(Err(Error::Unauthorized { .. }))),
            "{what}: {first:?}"
        );
        assert!(
            tokio::time::timeout(T, w.next())
                .await
                .expect("the stream ends in time")
                .is_none(),
            "the watch ends after the error"
        );
    }
    let listed = with.instances(&svc).await.unwrap();
    assert_eq!(listed.instances, vec![inst]);
    let services = with.services().await.unwrap();
    assert!(services.contains(&svc), "{services:?}");
    reg.deregister().await.unwrap();
}

/// A watch whose token is deleted while it runs ends with `Unauthorized` instead of
/// reporting every instance gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_ends_the_watch_with_unauthorized() {
    let Some(server) = acl_server().await else {
        return;
    };
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.address());
    let put = |path: &str, body: serde_json::Value| {
        http.put(format!("{base}{path}"))
            .header("X-Consul-Token", MASTER)
            .body(body.to_string())
            .send()
    };
    let policy = put(
        "/v1/acl/policy",
        serde_json::json!({"Name": "read-all", "Rules": "service_prefix \"\" { policy = \"read\" } node_prefix \"\" { policy = \"read\" }"}),
    )
    .await
    .unwrap();
    assert!(policy.status().is_success(), "{policy:?}");
    let token: serde_json::Value = serde_json::from_slice(
        &put(
            "/v1/acl/token",
            serde_json::json!({"Policies": [{"Name": "read-all"}]}),
        )
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap(),
    )
    .unwrap();
    let secret = token["SecretID"].as_str().unwrap().to_string();
    let accessor = token["AccessorID"].as_str().unwrap().to_string();

    let ns = Namespace::new();
    let svc = ns.service("revoke");
    let writer = ConsulDiscovery::connect(config(&server.url()).with_token(MASTER))
        .await
        .unwrap();
    let reader = ConsulDiscovery::connect(config(&server.url()).with_token(&secret))
        .await
        .unwrap();
    let _reg = writer.register(ns.instance(&svc, "a", 1)).await.unwrap();
    let mut watch = reader.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "a", |s| s.len() == 1).await;

    let del = http
        .delete(format!("{base}/v1/acl/token/{accessor}"))
        .header("X-Consul-Token", MASTER)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{del:?}");
    // Nudge the blocking query (any change of the service) so the watch asks again.
    let _b = writer.register(ns.instance(&svc, "b", 2)).await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("the watch noticed")
        {
            Some(Ok(WatchEvent::Removed { .. })) => {
                panic!("a revoked token was reported as instances leaving")
            }
            Some(Ok(ev)) => set.apply(&ev),
            Some(Err(e)) => {
                assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
                break;
            }
            None => panic!("the watch ended without an error"),
        }
    }
    assert!(tokio::time::timeout(T, watch.next())
        .await
        .expect("the stream ends in time")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agent_fails_within_the_connect_timeout() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let e = ConsulDiscovery::connect(config(&format!("consul://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(e, Error::Unavailable { .. } | Error::Timeout { .. }) && e.is_temporary(),
        "{e:?}"
    );
    // Without the connect-time probe, calls fail the same way, and do not hang.
    let d = ConsulDiscovery::new(config(&format!("consul://127.0.0.1:{port}"))).unwrap();
    let e = d
        .register(Instance::parse("s", "i", "h", 1).unwrap())
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_agent_times_out_instead_of_hanging() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let connected = ConsulDiscovery::connect(config(&server.url()))
        .await
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let e = ConsulDiscovery::connect(config(&server.url()))
        .await
        .unwrap_err();
    let took = started.elapsed();
    // Listing services is one request within `request_timeout` (2 s) too.
    let listing = Instant::now();
    let listed = connected.services().await;
    let listing = listing.elapsed();
    server.resume().unwrap();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        matches!(listed, Err(Error::Timeout { .. })),
        "services() on a paused agent: {listed:?}"
    );
    assert!(listing < Duration::from_secs(4), "{listing:?}");
    assert!(connected.services().await.is_ok(), "answers once resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_datacenter_is_a_clear_error() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let e = ConsulDiscovery::connect(config(&server.url()).with_datacenter("dc9"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(
        e.to_string().contains("dc9") && e.to_string().contains("dc1"),
        "{e}"
    );
    // Skipping the connect-time check: the queries say so, and a watch ends.
    let d = ConsulDiscovery::new(config(&server.url()).with_datacenter("dc9")).unwrap();
    let svc = "svc".parse().unwrap();
    let e = d.instances(&svc).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let mut w = d.watch(&svc);
    let first = tokio::time::timeout(T, w.next()).await.expect("an answer");
    assert!(
        matches!(first, Some(Err(Error::NotFound { .. }))),
        "{first:?}"
    );
    // The right one works.
    let ok = ConsulDiscovery::connect(config(&server.url()).with_datacenter(server.datacenter()))
        .await
        .unwrap();
    assert!(ok.instances(&svc).await.unwrap().is_empty());
}

/// A stand-in "agent" that answers every request with `200` and `body`.
async fn fake_agent(body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("consul://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_answers_are_errors_and_bad_entries_are_skipped() {
    let url = fake_agent("<html>not consul</html>").await;
    let d = ConsulDiscovery::connect(config(&url)).await.unwrap();
    let svc = "svc".parse().unwrap();
    let e = d.instances(&svc).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Backend {
                temporary: false,
                ..
            }
        ),
        "{e:?}"
    );
    let mut w = d.watch(&svc);
    let first = tokio::time::timeout(T, w.next()).await.expect("an answer");
    assert!(
        matches!(first, Some(Err(Error::Backend { .. }))),
        "{first:?}"
    );
    assert!(tokio::time::timeout(T, w.next())
        .await
        .expect("the stream ends in time")
        .is_none());

    let url = fake_agent(
        r#"[{"Service": 5},
            {"Node": {"Address": "10.0.0.1"},
             "Service": {"ID": "svc:ok", "Service": "svc", "Address": "", "Port": 1, "New": true}},
            {"Service": {"ID": "svc:bad/id", "Service": "svc", "Port": 2}},
            {"Service": {"ID": "svc:other", "Service": "other", "Port": 3}}]"#,
    )
    .await;
    let d = ConsulDiscovery::connect(config(&url)).await.unwrap();
    let snap = d.instances(&svc).await.unwrap();
    assert_eq!(snap.revision, 7);
    let ids: Vec<&str> = snap.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["ok"]);
    assert_eq!(snap.instances[0].endpoint.host, "10.0.0.1");
}

/// `consuls://` with a CA file: an agent serving HTTPS with a certificate from its own CA
/// (made by `consul tls`) is reached; without the CA the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_file() {
    if waypost_testkit::server::require(waypost_testkit::server::ServerKind::Consul).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "waypost-consul-tls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for args in [
        &["tls", "ca", "create"][..],
        &["tls", "cert", "create", "-server", "-dc", "dc1"][..],
    ] {
        let out = tokio::process::Command::new("consul")
            .args(args)
            .current_dir(&dir)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "consul {args:?}: {out:?}");
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let f = |name: &str| dir.join(name).display().to_string();
    let server = ConsulServer::start_with(ConsulOptions {
        extra_args: vec![
            format!("-https-port={port}"),
            "-hcl".into(),
            format!(
                "ca_file = \"{}\" cert_file = \"{}\" key_file = \"{}\"",
                f("consul-agent-ca.pem"),
                f("dc1-server-consul-0.pem"),
                f("dc1-server-consul-0-key.pem")
            ),
        ],
        ..ConsulOptions::default()
    })
    .await
    .expect("start consul with HTTPS");
    let url = format!("consuls://127.0.0.1:{port}");
    let d = ConsulDiscovery::connect(config(&url).with_ca_file(f("consul-agent-ca.pem")))
        .await
        .expect("HTTPS with the agent's CA");
    let inst = Instance::parse("tls-svc", "a", "127.0.0.1", 1).unwrap();
    let reg = d.register(inst.clone()).await.unwrap();
    assert_eq!(
        d.instances(&inst.service).await.unwrap().instances,
        vec![inst]
    );
    reg.deregister().await.unwrap();
    let started = Instant::now();
    let e = tokio::time::timeout(T, ConsulDiscovery::connect(config(&url)))
        .await
        .expect("refused in time")
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an untrusted certificate is refused at once, not timed out: {e:?}"
    );
    // The cause is named somewhere in the chain: the certificate, not a timeout.
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    let lower = chain.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("tls"),
        "an untrusted certificate must be named as the cause: {chain}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
