//! The whole conformance suite against a real etcd started by the testkit harness (one
//! server per test, so faults injected by one suite never reach another).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::Discovery;
use waypost_etcd::EtcdDiscovery;
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::EtcdServer;

struct EtcdBackend {
    server: EtcdServer,
    admin: etcd_client::Client,
    clients: Mutex<Vec<Arc<EtcdDiscovery>>>,
}

async fn etcd() -> Option<EtcdBackend> {
    common::init_tracing();
    let server = waypost_testkit::server::etcd().await?;
    let admin = common::admin(&[server.endpoint()]).await;
    Some(EtcdBackend {
        server,
        admin,
        clients: Mutex::new(Vec::new()),
    })
}

#[async_trait]
impl TestBackend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn connect(&self) -> Discovery {
        let d = Arc::new(common::connect(&self.server.url()).await);
        self.clients.lock().unwrap().push(d.clone());
        Discovery::new(d.clone(), d)
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            // Lease TTL 2 s, plus etcd's expiry sweep and a margin.
            liveness: Duration::from_secs(8),
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

#[async_trait]
impl Faults for EtcdBackend {
    async fn expire_sessions(&self) {
        common::revoke_all_leases(&self.admin).await;
    }

    async fn make_unreachable(&self) {
        self.server.pause().expect("pause etcd");
    }

    async fn make_reachable(&self) {
        self.server.resume().expect("resume etcd");
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

waypost_testkit::conformance_tests!(etcd);
