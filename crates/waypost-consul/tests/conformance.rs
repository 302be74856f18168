//! The whole conformance suite against a real Consul agent (`consul agent -dev`), one
//! agent per test so that faults (pause, restart) never reach another test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::Discovery;
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::ConsulServer;

/// The check TTL of the test clients: short, so crashes show quickly.
const TTL: Duration = Duration::from_secs(10);
/// The TTL of the 1,000-instance suite. A Consul 1.8 agent does work proportional to its
/// number of local services on every check update (it re-syncs its local state): with
/// 1,000 services one heartbeat costs ~11 ms of agent time here against ~1 ms with 10, so
/// 1,000 instances heartbeating every 3.3 s (TTL 10 s) need more than the agent has, and
/// checks flap. A longer TTL is what such deployments use (see the README).
const SCALE_TTL: Duration = Duration::from_secs(60);

struct ConsulBackend {
    ttl: Duration,
    server: tokio::sync::Mutex<ConsulServer>,
    url: String,
    clients: Mutex<Vec<Arc<ConsulDiscovery>>>,
}

async fn consul(suite: &'static str) -> Option<ConsulBackend> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let scale = suite == "thousand_instances";
    let server = waypost_testkit::server::consul().await?;
    Some(ConsulBackend {
        ttl: if scale { SCALE_TTL } else { TTL },
        url: server.url(),
        server: tokio::sync::Mutex::new(server),
        clients: Mutex::new(Vec::new()),
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
            .with_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2));
        let client = Arc::new(ConsulDiscovery::connect(config).await.expect("connect"));
        self.clients.lock().unwrap().push(client.clone());
        Discovery::new(client.clone(), client)
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            // The TTL check goes critical after TTL; Consul's TTL timer is exact, plus the
            // watch's round trip.
            liveness: self.ttl + Duration::from_secs(8),
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

#[async_trait]
impl Faults for ConsulBackend {
    /// Restarts the dev agent, which comes back empty: every service and check is gone,
    /// as when a real agent loses its state.
    async fn expire_sessions(&self) {
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

    async fn crash(&self, discovery: &Discovery) -> bool {
        let target = Arc::as_ptr(&discovery.registrar) as *const ();
        let clients = self.clients.lock().unwrap();
        match clients
            .iter()
            .find(|c| Arc::as_ptr(c) as *const () == target)
        {
            Some(c) => {
                c.crash_for_tests();
                true
            }
            None => false,
        }
    }
}

waypost_testkit::conformance_tests!(named: consul);
