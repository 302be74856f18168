#![cfg_attr(not(feature = "consul"), allow(missing_docs))]
#![cfg(feature = "consul")]
//! The conformance matrix's Consul column: every suite against a real agent
//! (`consul agent -dev`), one agent per test so that faults (pause, restart) never reach
//! another test. The foreign writer is the `consul` CLI (`consul kv` for configuration
//! keys) and raw HTTP to the agent.

use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypost_consul::{
    ConsulConfig, ConsulDiscovery, ContenderProbe, DEFAULT_CONFIG_PREFIX, DEFAULT_COORD_PREFIX,
    LOCK_RETRY,
};
use waypost_core::kv::ConfigKey;
use waypost_core::{Discovery, Instance, ServiceName};
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::ConsulServer;

/// The check TTL of the test clients: short, so crashes show quickly.
const TTL: Duration = Duration::from_secs(10);
/// The TTL of the 1,000-instance suite. A Consul 1.8 agent does work proportional to its
/// number of local services on every check update (it re-syncs its local state): with
/// 1,000 services one heartbeat costs ~11 ms of agent time here against ~1 ms with 10, so
/// 1,000 instances heartbeating every 3.3 s (TTL 10 s) need more than the agent has, and
/// checks flap. A longer TTL is what such deployments use (see the crate's README).
const SCALE_TTL: Duration = Duration::from_secs(60);
/// The request timeout: a `register` against a paused agent fails after it, well within
/// the liveness bound, and a pause that lasts one timeout is far shorter than the TTL.
const TIMEOUT: Duration = Duration::from_secs(3);
/// The 1,000-instance and 50-client suites pause nothing and load the agent: more room
/// (50 clients connecting at once on a busy 2-core machine have missed a 3 s ping).
const SCALE_TIMEOUT: Duration = Duration::from_secs(5);
/// The node name of the foreign writer's catalog entries.
const FOREIGN_NODE: &str = "foreign-node";

struct ConsulBackend {
    ttl: Duration,
    timeout: Duration,
    /// A coordination suite: clients' contenders are counted, sessions expire by
    /// destruction (see [`Faults::expire_sessions`]).
    coord: bool,
    probes: std::sync::Mutex<Vec<ContenderProbe>>,
    server: tokio::sync::Mutex<ConsulServer>,
    url: String,
    address: String,
}

async fn consul(suite: &'static str) -> Option<ConsulBackend> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let scale = matches!(suite, "thousand_instances" | "concurrent_registrars");
    let server = waypost_testkit::server::consul().await?;
    Some(ConsulBackend {
        ttl: if scale { SCALE_TTL } else { TTL },
        timeout: if scale { SCALE_TIMEOUT } else { TIMEOUT },
        coord: suite.starts_with("coord_"),
        probes: std::sync::Mutex::default(),
        url: server.url(),
        address: server.address(),
        server: tokio::sync::Mutex::new(server),
    })
}

#[async_trait]
impl TestBackend for ConsulBackend {
    fn name(&self) -> &'static str {
        "consul"
    }

    async fn connect(&self) -> Discovery {
        let config = ConsulConfig::from_url(&self.url)
            .unwrap()
            .with_ttl(self.ttl)
            .with_request_timeout(self.timeout)
            .with_connect_timeout(Duration::from_secs(2));
        // With its test hooks, its configuration store and its coordinator.
        let d = ConsulDiscovery::connect(config).await.expect("connect");
        if self.coord {
            self.probes.lock().unwrap().push(d.coord_contenders());
        }
        d.into_discovery()
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            liveness: if self.coord {
                // A crashed holder's Consul session is invalidated up to twice its TTL
                // after its last renewal (Consul's timer), then its lock-delay runs, and
                // a waiter tries again every `LOCK_RETRY`.
                2 * self.ttl
                    + ConsulConfig::default().lock_delay
                    + LOCK_RETRY
                    + Duration::from_secs(4)
            } else {
                // The TTL check goes critical after TTL; Consul's TTL timer is exact, plus
                // the watch's round trip.
                self.ttl + Duration::from_secs(8)
            },
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }

    /// A second registrant of an id on one agent replaces the first (agent services).
    fn exclusive_ids(&self) -> bool {
        false
    }

    async fn connect_to(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> waypost_core::Result<Discovery> {
        // The same client as `connect` (its TTL and request timeout), elsewhere.
        let config = ConsulConfig::from_url(&format!("consul://{endpoint}"))?
            .with_ttl(self.ttl)
            .with_request_timeout(self.timeout.min(connect_timeout))
            .with_connect_timeout(connect_timeout);
        Ok(ConsulDiscovery::connect(config).await?.into_discovery())
    }
}

impl ConsulBackend {
    /// One request to the agent's HTTP API, as a raw client (not waypost); returns the
    /// status code and the body.
    async fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut sock = tokio::net::TcpStream::connect(&self.address)
            .await
            .expect("connect to the agent");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(10), sock.read_to_string(&mut resp))
            .await
            .expect("the agent answered")
            .unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_string())
    }

    async fn http_ok(&self, method: &str, path: &str, body: &str) {
        let (status, text) = self.http(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: HTTP {status}: {text}"
        );
    }
}

/// The KV key of configuration key `key` (the default `config_prefix`).
fn kv_key(key: &ConfigKey) -> String {
    format!("{DEFAULT_CONFIG_PREFIX}/{key}")
}

impl ConsulBackend {
    /// Runs `consul kv ARGS` against the agent; returns whether it succeeded and stdout.
    async fn consul_kv(&self, args: &[&str]) -> (bool, String) {
        let http_addr = format!("-http-addr={}", self.address);
        let mut all = vec!["kv", args[0], &http_addr];
        all.extend(&args[1..]);
        let out = tokio::process::Command::new("consul")
            .args(&all)
            .output()
            .await
            .expect("run consul kv");
        let stdout = String::from_utf8(out.stdout).expect("UTF-8 from consul kv");
        (out.status.success(), stdout)
    }
}

/// The Consul service ID waypost gives `instance`.
fn service_id(instance: &Instance) -> String {
    format!("{}:{}", instance.service, instance.id)
}

/// The Consul session of every session entry in `body` (`/v1/session/list`).
fn session_ids(body: &str) -> Vec<String> {
    let list: Vec<serde_json::Value> = serde_json::from_str(body).expect("a session list");
    list.iter()
        .filter_map(|s| s["ID"].as_str().map(str::to_string))
        .collect()
}

#[async_trait]
impl Faults for ConsulBackend {
    fn registry_endpoint(&self) -> std::net::SocketAddr {
        self.address.parse().expect("Consul agent address")
    }

    /// Restarts the dev agent, which comes back empty: every service and check is gone,
    /// as when a real agent loses its state. In the coordination suites, destroys every
    /// Consul session instead (what Consul does when a session's TTL runs out): the agent
    /// keeps its indexes, so fencing tokens keep rising (a restarted `-dev` agent starts
    /// its indexes over).
    async fn expire_sessions(&self) {
        if self.coord {
            let (status, body) = self.http("GET", "/v1/session/list", "").await;
            assert_eq!(status, 200, "session list: {body}");
            for id in session_ids(&body) {
                self.http_ok("PUT", &format!("/v1/session/destroy/{id}"), "")
                    .await;
            }
            return;
        }
        self.server
            .lock()
            .await
            .restart()
            .await
            .expect("restart consul");
    }

    async fn make_unreachable(&self) {
        self.server.lock().await.pause().expect("pause consul");
    }

    async fn make_reachable(&self) {
        self.server.lock().await.resume().expect("resume consul");
    }

    /// Restarts the dev agent (it comes back empty, as for `expire_sessions`).
    async fn restart(&self) {
        self.expire_sessions().await;
    }

    /// Catalog entries of the service on a foreign node whose service IDs are no valid
    /// instance ids (a space, an empty id, 200 bytes): they are listed by the agent and
    /// must be skipped.
    async fn write_malformed(&self, service: &ServiceName) {
        let long = "x".repeat(200);
        for (n, id) in [
            format!("{service}:not an id"),
            format!("{service}:"),
            format!("{service}:{long}"),
            "bad id!".to_string(),
        ]
        .into_iter()
        .enumerate()
        {
            let body = serde_json::json!({
                "Node": format!("{FOREIGN_NODE}-junk-{n}"),
                "Address": "127.0.0.3",
                "Service": {"ID": id, "Service": service.as_str(), "Port": 1},
            });
            self.http_ok("PUT", "/v1/catalog/register", &body.to_string())
                .await;
        }
    }

    /// `consul services deregister -id=…`: the CLI removes the agent service.
    async fn foreign_delete(&self, instance: &Instance) {
        let out = tokio::process::Command::new("consul")
            .args([
                "services",
                "deregister",
                &format!("-http-addr={}", self.address),
                &format!("-id={}", service_id(instance)),
            ])
            .output()
            .await
            .expect("run consul services deregister");
        assert!(out.status.success(), "consul services deregister: {out:?}");
    }

    /// A catalog entry on another node (`PUT /v1/catalog/register`), with the service ID
    /// waypost would write and exactly `instance`'s fields.
    async fn foreign_claim(&self, instance: &Instance) -> String {
        let mut meta = serde_json::Map::new();
        for (k, v) in &instance.metadata {
            meta.insert(k.clone(), v.clone().into());
        }
        if let Some(zone) = &instance.zone {
            meta.insert("waypost-zone".into(), zone.clone().into());
        }
        if instance.weight == 0 {
            meta.insert("waypost-weight".into(), "0".into());
        }
        let body = serde_json::json!({
            "Node": FOREIGN_NODE,
            "Address": "127.0.0.2",
            "Service": {
                "ID": service_id(instance),
                "Service": instance.service.as_str(),
                "Address": instance.endpoint.host,
                "Port": instance.endpoint.port,
                "Tags": instance.tags,
                "Meta": meta,
                "Weights": {"Passing": instance.weight.max(1), "Warning": 1},
            },
        });
        self.http_ok("PUT", "/v1/catalog/register", &body.to_string())
            .await;
        format!("{FOREIGN_NODE}/{}", service_id(instance))
    }

    /// `consul kv put config/KEY VALUE`.
    async fn kv_foreign_put(&self, key: &ConfigKey, value: &str) {
        let (ok, out) = self.consul_kv(&["put", &kv_key(key), value]).await;
        assert!(ok, "consul kv put {key}: {out}");
    }

    /// `consul kv get config/KEY` (it prints the value and a newline; exits 1 when absent).
    async fn kv_foreign_get(&self, key: &ConfigKey) -> Option<String> {
        let (ok, out) = self.consul_kv(&["get", &kv_key(key)]).await;
        ok.then(|| out.strip_suffix('\n').unwrap_or(&out).to_string())
    }

    /// `consul kv delete config/KEY`.
    async fn kv_foreign_delete(&self, key: &ConfigKey) {
        let (ok, out) = self.consul_kv(&["delete", &kv_key(key)]).await;
        assert!(ok, "consul kv delete {key}: {out}");
    }

    /// Keys below the prefix that are no configuration keys: with `consul kv put`, a
    /// space, a non-ASCII letter and a folder (a key ending in `/`); with a raw
    /// transaction, an empty segment (the CLI's path-based write cannot: the agent's HTTP
    /// router answers `404` for `//`).
    async fn kv_write_malformed(&self, prefix: &ConfigKey) {
        let root = kv_key(prefix);
        for key in [
            format!("{root}/bad key"),
            format!("{root}/caf\u{e9}"),
            format!("{root}/folder/"),
        ] {
            let (ok, out) = self.consul_kv(&["put", &key, "junk"]).await;
            assert!(ok, "consul kv put {key:?}: {out}");
        }
        let txn = serde_json::json!([
            {"KV": {"Verb": "set", "Key": format!("{root}//empty-segment"), "Value": "anVuaw=="}}
        ]);
        self.http_ok("PUT", "/v1/txn", &txn.to_string()).await;
    }

    /// Connections the agent serves on its HTTP port (ESTABLISHED sockets whose local
    /// port is the agent's, from `/proc/net/tcp{,6}`): one per blocking query in flight,
    /// plus idle pooled connections of the test's clients.
    async fn registry_watches(&self) -> usize {
        let port = self.address.rsplit_once(':').expect("host:port").1;
        let port = format!("{:04X}", port.parse::<u16>().expect("a port"));
        let mut n = 0;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            n += text
                .lines()
                .skip(1)
                .filter(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    cols.len() > 3
                        && cols[1].rsplit(':').next() == Some(port.as_str())
                        && cols[3] == "01"
                })
                .count();
        }
        n
    }

    /// Consul keeps no queue (a waiter is a blocking read): the contenders the test's
    /// clients hold between enqueue and dequeue whose Consul session is alive, or 1 when
    /// none is known and the lock key has a holder (a native one, say).
    async fn coord_contenders(&self, name: &waypost_core::coord::Name) -> usize {
        let (status, body) = self.http("GET", "/v1/session/list", "").await;
        assert_eq!(status, 200, "session list: {body}");
        let live = session_ids(&body);
        let ours = self
            .probes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.sessions(DEFAULT_COORD_PREFIX, name))
            .filter(|s| live.contains(s))
            .count();
        let (status, body) = self
            .http(
                "GET",
                &format!("/v1/kv/{DEFAULT_COORD_PREFIX}/{name}/.lock"),
                "",
            )
            .await;
        let held = status == 200
            && serde_json::from_str::<Vec<serde_json::Value>>(&body)
                .ok()
                .and_then(|l| l.first().and_then(|p| p["Session"].as_str().map(str::len)))
                .is_some_and(|n| n > 0);
        ours.max(usize::from(held))
    }

    /// `PUT /v1/catalog/deregister` of the entry [`Faults::foreign_claim`] wrote.
    async fn foreign_remove(&self, _instance: &Instance, key: &str) {
        let (node, sid) = key.split_once('/').expect("a node/service key");
        let body = serde_json::json!({"Node": node, "ServiceID": sid});
        self.http_ok("PUT", "/v1/catalog/deregister", &body.to_string())
            .await;
    }
}

waypost_testkit::conformance_tests!(named: consul; network);
waypost_testkit::kv_conformance_tests!(named: consul);
waypost_testkit::coord_conformance_tests!(named: consul; unqueued);
