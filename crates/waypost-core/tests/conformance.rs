//! The whole conformance suite on the memory backend, so the suite itself is always
//! tested, with fault injection through `MemoryRegistry`.

use std::time::Duration;

use async_trait::async_trait;
use waypost_core::memory::MemoryRegistry;
use waypost_core::Discovery;
use waypost_testkit::conformance::{Faults, Settings, TestBackend};

/// One fresh registry per test, so faults injected by one suite never reach another.
struct MemoryBackend {
    registry: MemoryRegistry,
    ttl: Duration,
}

async fn memory() -> Option<MemoryBackend> {
    Some(MemoryBackend {
        registry: MemoryRegistry::new("conformance"),
        ttl: Duration::from_millis(400),
    })
}

#[async_trait]
impl TestBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self) -> Discovery {
        self.registry.client(self.ttl).into_discovery()
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(5),
            liveness: Duration::from_secs(3),
            concurrency: 64,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

#[async_trait]
impl Faults for MemoryBackend {
    async fn expire_sessions(&self) {
        self.registry.expire_all_sessions();
    }

    async fn make_unreachable(&self) {
        self.registry.set_reachable(false);
    }

    async fn make_reachable(&self) {
        self.registry.set_reachable(true);
    }

    async fn crash(&self, discovery: &Discovery) -> bool {
        match &discovery.hooks {
            Some(h) => {
                h.crash();
                true
            }
            None => false,
        }
    }
}

waypost_testkit::conformance_tests!(memory);
