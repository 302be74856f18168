//! The whole conformance suite against a real ZooKeeper, one server per suite (faults
//! pause the whole server), with fault injection.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::Discovery;
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::server::ZooKeeperServer;
use waypost_zookeeper::{NodeLayout, PayloadFormat, ZkConfig, ZkDiscovery};

struct ZkBackend {
    server: ZooKeeperServer,
    config: waypost_zookeeper::ZkConfig,
    child_watches: bool,
    clients: Mutex<Vec<Arc<ZkDiscovery>>>,
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
    common::init_tracing();
    let server = common::server().await?;
    Some(ZkBackend {
        config: f(common::config(&server)),
        server,
        child_watches,
        clients: Mutex::new(Vec::new()),
    })
}

#[async_trait]
impl TestBackend for ZkBackend {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    async fn connect(&self) -> Discovery {
        let d = Arc::new(
            ZkDiscovery::connect(self.config.clone())
                .await
                .expect("connect"),
        );
        if self.child_watches {
            d.use_child_watches();
        }
        self.clients.lock().unwrap().push(d.clone());
        Discovery::new(d.clone(), d)
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            // Session timeout (2 s) + detection + re-registration margin.
            liveness: common::SESSION + Duration::from_secs(6),
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
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
        self.server.pause().expect("pause ZooKeeper");
        let lost = common::wait_until(Duration::from_secs(20), || {
            live.iter()
                .all(|(c, gen)| c.session_lost() || c.session_generation() != Some(*gen))
        })
        .await;
        self.server.resume().expect("resume ZooKeeper");
        assert!(lost, "sessions did not expire while the server was stopped");
    }

    async fn make_unreachable(&self) {
        self.server.pause().expect("pause ZooKeeper");
    }

    async fn make_reachable(&self) {
        self.server.resume().expect("resume ZooKeeper");
    }

    async fn crash(&self, discovery: &Discovery) -> bool {
        let target = Arc::as_ptr(&discovery.registrar) as *const ();
        let clients = self.clients.lock().unwrap();
        match clients
            .iter()
            .find(|c| Arc::as_ptr(c) as *const () == target)
        {
            Some(c) => {
                c.simulate_crash();
                true
            }
            None => false,
        }
    }
}

waypost_testkit::conformance_tests!(zookeeper);

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
