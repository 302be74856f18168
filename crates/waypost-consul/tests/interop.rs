//! Native visibility: what waypost registers is an ordinary Consul service that
//! `consul catalog services` and the DNS interface list; and what other tools registered
//! is read (or skipped with a warning when it is not a valid instance).

use std::sync::Arc;
use std::time::Duration;

use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{InstanceSet, Registrar, WatchEvent, Watcher};
use waypost_testkit::conformance::{next_event, wait_for_set, Namespace};
use waypost_testkit::ConsulServer;

const T: Duration = Duration::from_secs(15);

async fn client(server: &ConsulServer) -> Arc<ConsulDiscovery> {
    let config = ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_request_timeout(Duration::from_secs(3));
    Arc::new(ConsulDiscovery::connect(config).await.expect("connect"))
}

/// A DNS query for `name` of type SRV; returns `(weight, port, target)` of each answer.
async fn srv(dns: std::net::SocketAddr, name: &str) -> Vec<(u16, u16, String)> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 33, 0, 1]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("DNS answer")
        .unwrap();
    let m = &buf[..n];
    assert_eq!(&m[..2], &[0x12, 0x34], "DNS id");
    let answers = u16::from_be_bytes([m[6], m[7]]);
    fn skip_name(m: &[u8], mut i: usize) -> usize {
        loop {
            let len = m[i] as usize;
            if len == 0 {
                return i + 1;
            }
            if len & 0xc0 == 0xc0 {
                return i + 2;
            }
            i += 1 + len;
        }
    }
    fn read_name(m: &[u8], mut i: usize) -> String {
        let mut labels = Vec::new();
        loop {
            let len = m[i] as usize;
            if len == 0 {
                return labels.join(".");
            }
            if len & 0xc0 == 0xc0 {
                i = ((len & 0x3f) << 8) | m[i + 1] as usize;
                continue;
            }
            labels.push(String::from_utf8_lossy(&m[i + 1..i + 1 + len]).to_string());
            i += 1 + len;
        }
    }
    let mut i = skip_name(m, 12) + 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        i = skip_name(m, i);
        let ty = u16::from_be_bytes([m[i], m[i + 1]]);
        let rdlen = u16::from_be_bytes([m[i + 8], m[i + 9]]) as usize;
        let rd = i + 10;
        if ty == 33 {
            let weight = u16::from_be_bytes([m[rd + 2], m[rd + 3]]);
            let port = u16::from_be_bytes([m[rd + 4], m[rd + 5]]);
            out.push((weight, port, read_name(m, rd + 6)));
        }
        i = rd + rdlen;
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_visible_to_the_consul_cli_and_dns() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("native");
    let c = client(&server).await;
    let _a = c
        .register(
            ns.instance(&svc, "a", 4100)
                .with_tag("primary")
                .with_weight(7),
        )
        .await
        .unwrap();
    let _b = c
        .register(ns.instance(&svc, "b", 4101).with_weight(0))
        .await
        .unwrap();

    let out = tokio::process::Command::new("consul")
        .args([
            "catalog",
            "services",
            "-tags",
            &format!("-http-addr={}", server.address()),
        ])
        .output()
        .await
        .expect("run consul catalog services");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(svc.as_str()))
        .unwrap_or_else(|| panic!("{svc} not in `consul catalog services`:\n{text}"));
    assert!(line.contains("primary"), "{line}");

    // Consul's DNS: SRV weights are Weights.Passing (weight 0 travels as 1 + metadata).
    let answers = srv(server.dns_address(), &format!("{svc}.service.consul")).await;
    let ports: Vec<(u16, u16)> = answers.iter().map(|(w, p, _)| (*w, *p)).collect();
    assert_eq!(ports, [(1, 4101), (7, 4100)], "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_registrations_are_read_or_skipped_never_fatal() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let svc = ns.service("foreign");
    let c = client(&server).await;
    let mut watch = c.watch(&svc);
    let mut set = InstanceSet::new();
    let first = next_event(&mut watch, T).await;
    assert!(
        matches!(&first, WatchEvent::Snapshot(s) if s.is_empty()),
        "an empty snapshot first: {first:?}"
    );
    set.apply(&first);
    let http = reqwest::Client::new();
    for body in [
        // Another tool: plain ID, no address (the node's is used).
        serde_json::json!({"ID": "web1", "Name": svc.as_str(), "Port": 80,
                           "Meta": {"team": "a"}}),
        // Not a valid waypost instance id: skipped with a warning.
        serde_json::json!({"ID": "has space", "Name": svc.as_str(), "Port": 81}),
        // A malformed waypost weight: skipped with a warning.
        serde_json::json!({"ID": "w", "Name": svc.as_str(), "Port": 82, "Address": "h",
                           "Meta": {"waypost-weight": "heavy"}}),
    ] {
        let resp = http
            .put(format!(
                "http://{}/v1/agent/service/register",
                server.address()
            ))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
    }
    let ours = ns.instance(&svc, "ours", 83);
    let _r = c.register(ours.clone()).await.unwrap();
    wait_for_set(&mut watch, &mut set, T, "web1 and ours", |s| {
        s.len() == 2 && s.contains(&ours.id)
    })
    .await;
    let web1 = set.get(&"web1".parse().unwrap()).unwrap();
    assert_eq!(web1.endpoint.host, "127.0.0.1", "the node's address");
    assert_eq!(web1.metadata.len(), 1);
    assert_eq!(c.instances(&svc).await.unwrap().len(), 2);
}

/// `services()` is the catalog's listing: waypost's services and other tools' ones,
/// Consul's own `consul` service, sorted; names that are no valid service names (written
/// with `consul services register` and raw catalog registrations) are skipped, never an
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_lists_the_catalog_and_skips_foreign_names() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let ns = Namespace::new();
    let ours = ns.service("listed");
    let c = client(&server).await;
    let _r = c.register(ns.instance(&ours, "a", 4200)).await.unwrap();

    // The Consul CLI registers an agent service whose name has a space.
    let bad_cli = format!("{ours} with space");
    let out = tokio::process::Command::new("consul")
        .args([
            "services",
            "register",
            &format!("-http-addr={}", server.address()),
            &format!("-name={bad_cli}"),
            "-id=cli-1",
            "-port=4201",
        ])
        .output()
        .await
        .expect("run consul services register");
    assert!(out.status.success(), "consul services register: {out:?}");
    // Raw catalog registrations on a foreign node: a valid foreign name, and names
    // waypost cannot hold (a colon, a slash-free but non-ASCII name, 200 bytes).
    let foreign = ns.service("native-tool");
    let long = "x".repeat(200);
    let http = reqwest::Client::new();
    let mut written = Vec::new();
    for name in [
        foreign.to_string(),
        format!("{ours}:colon"),
        format!("{ours}-caf\u{e9}"),
        long.clone(),
    ] {
        let body = serde_json::json!({
            "Node": "foreign-node",
            "Address": "127.0.0.2",
            "Service": {"ID": format!("id-{}", written.len()), "Service": name, "Port": 1},
        });
        let resp = http
            .put(format!("http://{}/v1/catalog/register", server.address()))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
        written.push(name);
    }
    // The foreign names really are in the catalog, as Consul's own CLI lists it.
    let out = tokio::process::Command::new("consul")
        .args([
            "catalog",
            "services",
            &format!("-http-addr={}", server.address()),
        ])
        .output()
        .await
        .expect("run consul catalog services");
    let native: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for name in written.iter().chain([&bad_cli]) {
        assert!(native.contains(name), "{name:?} not in {native:?}");
    }

    let listed = c.services().await.expect("services");
    let names: Vec<&str> = listed.iter().map(|s| s.as_str()).collect();
    assert!(names.contains(&ours.as_str()), "{names:?}");
    assert!(names.contains(&foreign.as_str()), "{names:?}");
    assert!(names.contains(&"consul"), "Consul's own service: {names:?}");
    // Exactly the catalog's valid names: nothing skipped that was valid, but for the
    // clients' heartbeat services (hidden).
    assert!(
        native.iter().any(|n| n == "waypost-heartbeat"),
        "{native:?}"
    );
    let mut valid: Vec<&str> = native
        .iter()
        .map(String::as_str)
        .filter(|n| waypost_core::ServiceName::new(n).is_ok() && *n != "waypost-heartbeat")
        .collect();
    valid.sort();
    assert_eq!(names, valid, "sorted, invalid names skipped");
    for bad in written[1..].iter().chain([&bad_cli]) {
        assert!(!names.contains(&bad.as_str()), "{bad:?} listed");
    }
}
