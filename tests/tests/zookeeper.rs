#![cfg_attr(not(feature = "zookeeper"), allow(missing_docs))]
#![cfg(feature = "zookeeper")]
//! ZooKeeper in the matrix: every conformance suite against a real ZooKeeper started by
//! the testkit (one server per test: faults pause the whole server), three times: the
//! default layout, protected sequential nodes with the Spring Cloud payload, and the
//! fallback watch for servers older than 3.6. The foreign writer is a raw
//! `zookeeper-client` session.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::{Discovery, Instance, ServiceName};
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::server::ZooKeeperServer;
use waypost_zookeeper::zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr};
use waypost_zookeeper::{codec, NodeLayout, PayloadFormat, ZkConfig, ZkDiscovery};

/// The session timeout the clients ask for (the server's default cap is 20 ticks = 4 s).
const SESSION: Duration = Duration::from_secs(2);
/// A request against a paused server fails after this, well within the liveness bound;
/// the suites' pauses stay shorter than the session.
const REQUEST: Duration = Duration::from_secs(1);

struct ZkBackend {
    /// Behind a lock only for `restart`, which needs it mutably.
    server: tokio::sync::Mutex<ZooKeeperServer>,
    address: String,
    config: ZkConfig,
    child_watches: bool,
    clients: Mutex<Vec<ZkDiscovery>>,
}

async fn zookeeper() -> Option<ZkBackend> {
    backend(|c| c, false).await
}

/// The fallback for ZooKeeper < 3.6 (child and data watches), forced on 3.8.
async fn zookeeper_child_watches() -> Option<ZkBackend> {
    backend(|c| c, true).await
}

/// The other layout and payload format: protected sequential nodes, Spring Cloud payload.
async fn zookeeper_sequential_spring() -> Option<ZkBackend> {
    backend(
        |c| {
            c.with_layout(NodeLayout::ProtectedSequential)
                .with_payload(PayloadFormat::SpringCloud)
        },
        false,
    )
    .await
}

async fn backend(f: impl FnOnce(ZkConfig) -> ZkConfig, child_watches: bool) -> Option<ZkBackend> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = waypost_testkit::server::zookeeper().await?;
    let config = ZkConfig::from_url(&server.url())
        .unwrap()
        .with_session_timeout(SESSION)
        .with_connect_timeout(Duration::from_secs(5))
        .with_request_timeout(REQUEST);
    Some(ZkBackend {
        config: f(config),
        address: server.address(),
        server: tokio::sync::Mutex::new(server),
        child_watches,
        clients: Mutex::new(Vec::new()),
    })
}

/// A suffix that keeps one suite's foreign nodes apart from the next call's.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Waits until `cond` holds (checked every 20 ms), at most `timeout`; whether it held.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl ZkBackend {
    /// A foreign client: a raw ZooKeeper session of its own.
    async fn raw(&self) -> Client {
        Client::connector()
            .with_session_timeout(SESSION)
            .connect(&self.address)
            .await
            .expect("raw ZooKeeper client")
    }

    fn service_path(instance: &Instance) -> String {
        format!("/services/{}", instance.service)
    }

    /// Whether node `name` is where waypost writes `instance` (either layout:
    /// `{id}`, or `_c_{guid}-{id}NNNNNNNNNN`).
    fn is_ours(name: &str, instance: &Instance) -> bool {
        let id = instance.id.as_str();
        name == id
            || (name.starts_with("_c_")
                && name.len() > 10
                && name[..name.len() - 10].ends_with(&format!("-{id}")))
    }
}

#[async_trait]
impl TestBackend for ZkBackend {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    async fn connect(&self) -> Discovery {
        let d = ZkDiscovery::connect(self.config.clone())
            .await
            .expect("connect");
        if self.child_watches {
            d.use_child_watches();
        }
        self.clients.lock().unwrap().push(d.clone());
        d.into_discovery()
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            // Session timeout (2 s) + detection + re-registration margin.
            liveness: SESSION + Duration::from_secs(6),
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }

    async fn connect_to(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> waypost_core::Result<Discovery> {
        let config = self
            .config
            .clone()
            .with_endpoints([endpoint])
            .with_connect_timeout(connect_timeout);
        Ok(ZkDiscovery::connect(config).await?.into_discovery())
    }
}

#[async_trait]
impl Faults for ZkBackend {
    /// The server is stopped until every client has seen its session expire (a client
    /// that cannot reach the server for its session timeout declares the session
    /// expired; the server expires it too when it runs again), then resumed.
    async fn expire_sessions(&self) {
        let clients: Vec<_> = self.clients.lock().unwrap().clone();
        let live: Vec<_> = clients
            .iter()
            .filter_map(|c| Some((c, c.session_generation()?)))
            .collect();
        self.server.lock().await.pause().expect("pause ZooKeeper");
        let lost = wait_until(Duration::from_secs(20), || {
            live.iter()
                .all(|(c, gen)| c.session_lost() || c.session_generation() != Some(*gen))
        })
        .await;
        self.server.lock().await.resume().expect("resume ZooKeeper");
        assert!(lost, "sessions did not expire while the server was stopped");
    }

    async fn make_unreachable(&self) {
        self.server.lock().await.pause().expect("pause ZooKeeper");
    }

    async fn make_reachable(&self) {
        self.server.lock().await.resume().expect("resume ZooKeeper");
    }

    async fn restart(&self) {
        self.server
            .lock()
            .await
            .restart()
            .await
            .expect("restart ZooKeeper");
    }

    /// Persistent nodes a foreign client writes beside the instances: bytes that are not
    /// JSON, JSON of another shape, and a value larger than any instance (500 KiB, under
    /// ZooKeeper's 1 MiB `jute.maxbuffer`).
    async fn write_malformed(&self, service: &ServiceName) {
        let raw = self.raw().await;
        let dir = format!("/services/{service}");
        let mode = CreateMode::Persistent.with_acls(Acls::anyone_all());
        let huge = vec![b'{'; 500 * 1024];
        for (name, data) in [
            ("junk-bytes", &b"\xff\xfe not json"[..]),
            ("junk-shape", &br#"{"hello":"world"}"#[..]),
            ("junk-huge", &huge[..]),
        ] {
            let path = format!("{dir}/{name}-{}", rand_suffix());
            // The service node may not exist yet: create its parents first.
            let mut at = String::new();
            for part in dir.trim_start_matches('/').split('/') {
                at = format!("{at}/{part}");
                match raw.create(&at, b"", &mode).await {
                    Ok(_) | Err(ZkErr::NodeExists) => {}
                    Err(e) => panic!("creating {at}: {e}"),
                }
            }
            raw.create(&path, data, &mode)
                .await
                .unwrap_or_else(|e| panic!("creating {path}: {e}"));
        }
    }

    async fn foreign_delete(&self, instance: &Instance) {
        let raw = self.raw().await;
        let dir = Self::service_path(instance);
        let names = raw.list_children(&dir).await.expect("list the service");
        let ours: Vec<_> = names
            .into_iter()
            .filter(|n| Self::is_ours(n, instance))
            .collect();
        assert!(!ours.is_empty(), "no node of {instance:?} to delete");
        for name in ours {
            match raw.delete(&format!("{dir}/{name}"), None).await {
                Ok(()) | Err(ZkErr::NoNode) => {}
                Err(e) => panic!("deleting {dir}/{name}: {e}"),
            }
        }
    }

    async fn foreign_claim(&self, instance: &Instance) -> String {
        let raw = self.raw().await;
        let path = format!("{}/foreign-{}", Self::service_path(instance), instance.id);
        let data = codec::encode(instance, PayloadFormat::Curator);
        raw.create(
            &path,
            &data,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap_or_else(|e| panic!("creating {path}: {e}"));
        path
    }

    async fn foreign_remove(&self, _instance: &Instance, key: &str) {
        let raw = self.raw().await;
        raw.delete(key, None)
            .await
            .unwrap_or_else(|e| panic!("deleting {key}: {e}"));
    }
}

waypost_testkit::conformance_tests!(zookeeper; network);

/// The whole suite again with the optional layout and payload format.
mod sequential_spring {
    use super::*;
    waypost_testkit::conformance_tests!(zookeeper_sequential_spring);
}

/// The whole suite again on the fallback watch for servers older than 3.6.
mod child_watches {
    use super::*;
    waypost_testkit::conformance_tests!(zookeeper_child_watches);
}
