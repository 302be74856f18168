//! Agent-run checks (`http_check`, `tcp_check`) against a real agent: an instance leaves
//! `passing` watches when the agent's check of it fails, and comes back when it passes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::{InstanceSet, Registrar, WatchEvent, Watcher};
use waypost_testkit::conformance::{wait_for_event, wait_for_set, Namespace};
use waypost_testkit::ConsulServer;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;

/// Generous: the agent runs the checks every second (Consul's minimum interval).
const T: Duration = Duration::from_secs(20);

async fn client(server: &ConsulServer, options: &str) -> Arc<ConsulDiscovery> {
    let config = ConsulConfig::from_url(&format!("{}?{options}", server.url()))
        .unwrap()
        .with_request_timeout(Duration::from_secs(3));
    Arc::new(ConsulDiscovery::connect(config).await.expect("connect"))
}

/// A tiny HTTP/1.1 server: `/health` answers 200 while `healthy`, else 503; anything
/// else is 404. Counts the `/health` requests.
struct HealthServer {
    port: u16,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let healthy = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicUsize::new(0));
        let (h, n) = (healthy.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let (h, n) = (h.clone(), n.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => req.extend_from_slice(&buf[..k]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req);
                    let path = line.split_whitespace().nth(1).unwrap_or("");
                    let status = if path == "/health" {
                        n.fetch_add(1, Ordering::SeqCst);
                        if h.load(Ordering::SeqCst) {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        }
                    } else {
                        "404 Not Found"
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self {
            port,
            healthy,
            hits,
            task,
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent's checks of one service ID: check ID → the check as JSON.
async fn agent_checks(
    server: &ConsulServer,
    service_id: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let url = format!("http://{}/v1/agent/checks", server.address());
    let all: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&reqwest::get(url).await.unwrap().bytes().await.unwrap()).unwrap();
    all.into_iter()
        .filter(|(_, c)| c["ServiceID"] == service_id)
        .collect()
}

fn removed(id: &str) -> impl FnMut(&WatchEvent, &InstanceSet) -> bool + '_ {
    move |ev, _| matches!(ev, WatchEvent::Removed { id: i, .. } if i.as_str() == id)
}

fn added(id: &str) -> impl FnMut(&WatchEvent, &InstanceSet) -> bool + '_ {
    move |ev, _| matches!(ev, WatchEvent::Added { instance, .. } if instance.id.as_str() == id)
}

/// `http_check=/health`: listed while `/health` answers 200, removed when it answers 503,
/// back when it answers 200 again. An `update` while it fails keeps it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_health_endpoint() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let web = HealthServer::start().await;
    let ns = Namespace::new();
    let svc = ns.service("http");
    let registrant = client(
        &server,
        "http_check=/health&check_interval=1s&check_timeout=1s",
    )
    .await;
    let watcher = client(&server, "").await;
    let instance = ns.instance(&svc, "web-1", web.port);
    let mut reg = registrant.register(instance.clone()).await.unwrap();

    // Registered beside the TTL check, and listed at once (the check starts passing).
    let sid = format!("{svc}:web-1");
    let checks = agent_checks(&server, &sid).await;
    let http = &checks[&format!("service:{sid}:http")];
    assert_eq!(http["Type"], "http", "{http}");
    assert_eq!(http["Status"], "passing", "{http}");
    assert!(checks.contains_key(&format!("service:{sid}")), "{checks:?}");
    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "the instance", |s| {
        s.contains(&instance.id)
    })
    .await;

    // The agent really polls our /health (its check output names the URL).
    let url = format!("http://127.0.0.1:{}/health", web.port);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let checks = agent_checks(&server, &sid).await;
        let out = checks[&format!("service:{sid}:http")]["Output"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if out.contains(&url) && web.hits.load(Ordering::SeqCst) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never checked {url}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    web.healthy.store(false, Ordering::SeqCst);
    wait_for_event(&mut watch, &mut set, T, "removal on 503", removed("web-1")).await;
    assert!(set.is_empty());

    web.healthy.store(true, Ordering::SeqCst);
    wait_for_event(&mut watch, &mut set, T, "return on 200", added("web-1")).await;

    // Failing again, then an update: the rewrite keeps the agent's critical status
    // instead of listing the failing instance again.
    web.healthy.store(false, Ordering::SeqCst);
    wait_for_event(&mut watch, &mut set, T, "second removal", removed("web-1")).await;
    reg.update(instance.clone().with_tag("v2")).await.unwrap();
    let checks = agent_checks(&server, &sid).await;
    assert_eq!(
        checks[&format!("service:{sid}:http")]["Status"],
        "critical",
        "{checks:?}"
    );
    assert_eq!(checks[&format!("service:{sid}")]["Status"], "passing");
    web.healthy.store(true, Ordering::SeqCst);
    let seen = wait_for_event(
        &mut watch,
        &mut set,
        T,
        "return after update",
        added("web-1"),
    )
    .await;
    match seen.last() {
        Some(WatchEvent::Added { instance: i, .. }) => assert_eq!(i.tags, ["v2"]),
        other => panic!("{other:?}"),
    }

    reg.deregister().await.unwrap();
    assert!(agent_checks(&server, &sid).await.is_empty());
}

/// `tcp_check=true`: listed while a listener accepts on the instance's port, removed when
/// the listener is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_follows_the_listener() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = tokio::spawn(async move {
        loop {
            // Accept and drop: the agent's TCP check only connects.
            let _ = listener.accept().await;
        }
    });
    let ns = Namespace::new();
    let svc = ns.service("tcp");
    let registrant = client(
        &server,
        "tcp_check=true&check_interval=1s&check_timeout=500ms",
    )
    .await;
    let watcher = client(&server, "").await;
    let instance = ns.instance(&svc, "db-1", port);
    let _reg = registrant.register(instance.clone()).await.unwrap();
    let sid = format!("{svc}:db-1");
    let checks = agent_checks(&server, &sid).await;
    let tcp = &checks[&format!("service:{sid}:tcp")];
    assert_eq!(tcp["Type"], "tcp", "{tcp}");

    let mut watch = watcher.watch(&svc);
    let mut set = InstanceSet::new();
    wait_for_set(&mut watch, &mut set, T, "the instance", |s| {
        s.contains(&instance.id)
    })
    .await;
    // Wait until the agent has run the check against the live listener at least once
    // (its output names the address), so the removal below is the listener's doing.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let checks = agent_checks(&server, &sid).await;
        let out = checks[&format!("service:{sid}:tcp")]["Output"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if out.contains(&format!("127.0.0.1:{port}")) && out.contains("Success") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never ran the TCP check: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    accepting.abort();
    let _ = accepting.await;
    wait_for_event(&mut watch, &mut set, T, "removal", removed("db-1")).await;
    assert!(set.is_empty());
}

/// When the agent loses the service (here: deregistered behind the client's back; also an
/// agent restart, or Consul removing it after `deregister_critical_after` of failing), the
/// heartbeat registers it again with the agent-run checks *critical*: an instance whose
/// `/health` fails does not come back into watches before the agent's check passes. (The
/// long interval keeps the agent from running the check before we look.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregistration_starts_agent_checks_critical() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let web = HealthServer::start().await;
    web.healthy.store(false, Ordering::SeqCst);
    let ns = Namespace::new();
    let svc = ns.service("rereg");
    let registrant = client(
        &server,
        "ttl=3s&http_check=/health&check_interval=60s&check_timeout=1s",
    )
    .await;
    let instance = ns.instance(&svc, "web-1", web.port);
    let reg = registrant.register(instance.clone()).await.unwrap();
    let sid = format!("{svc}:web-1");
    let http_id = format!("service:{sid}:http");

    common::agent_put(&server, &format!("service/deregister/{sid}"), None).await;

    // The heartbeat (every second) notices and registers again.
    let deadline = tokio::time::Instant::now() + T;
    let checks = loop {
        let checks = agent_checks(&server, &sid).await;
        if checks.contains_key(&http_id) {
            break checks;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not registered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(checks[&http_id]["Status"], "critical", "{checks:?}");
    assert_eq!(checks[&format!("service:{sid}")]["Status"], "passing");
    let listed: serde_json::Value = serde_json::from_slice(
        &reqwest::get(format!(
            "http://{}/v1/health/service/{svc}?passing=true",
            server.address()
        ))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(listed, serde_json::json!([]));
    reg.deregister().await.unwrap();
}
