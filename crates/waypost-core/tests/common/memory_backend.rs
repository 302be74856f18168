// The memory backend as a conformance `TestBackend`: one fresh registry per test, fault
// injection through `MemoryRegistry`. Included by `conformance.rs` here and by the
// top-level `tests/` matrix.

use std::time::Duration;

use async_trait::async_trait;
use waypost_core::kv::ConfigKey;
use waypost_core::memory::MemoryRegistry;
use waypost_core::{Discovery, Instance, ServiceName};
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

    async fn restart(&self) {
        self.registry.restart();
    }

    async fn write_malformed(&self, _service: &ServiceName) {
        // The memory registry holds typed instances: nothing malformed can be written to
        // it, so the suite checks only that listings and watches work.
    }

    async fn foreign_delete(&self, instance: &Instance) {
        assert!(self
            .registry
            .delete_foreign(&instance.service, instance.id.as_str()));
    }

    async fn foreign_claim(&self, instance: &Instance) -> String {
        // A key that sorts before the owner's (its id): ours must win by being canonical,
        // not by its key's order.
        let key = format!("!foreign/{}", instance.id);
        self.registry.put_foreign(&key, instance);
        key
    }

    async fn foreign_remove(&self, instance: &Instance, key: &str) {
        assert!(self.registry.delete_foreign(&instance.service, key));
    }

    async fn registry_watches(&self) -> usize {
        self.registry.open_watches()
    }

    async fn coord_contenders(&self, name: &waypost_core::coord::Name) -> usize {
        self.registry.contenders(name, false)
    }

    async fn kv_foreign_put(&self, key: &ConfigKey, value: &str) {
        self.registry.kv_put_foreign(key, value.as_bytes());
    }

    async fn kv_foreign_get(&self, key: &ConfigKey) -> Option<String> {
        self.registry
            .kv_peek(key)
            .map(|v| String::from_utf8(v).expect("UTF-8 value"))
    }

    async fn kv_foreign_delete(&self, key: &ConfigKey) {
        self.registry.kv_delete_foreign(key);
    }

    async fn kv_write_malformed(&self, _prefix: &ConfigKey) {
        // The memory registry holds validated keys only: nothing malformed can be
        // written to it.
    }
}

waypost_testkit::conformance_tests!(memory);
waypost_testkit::kv_conformance_tests!(memory);
waypost_testkit::coord_conformance_tests!(memory);
