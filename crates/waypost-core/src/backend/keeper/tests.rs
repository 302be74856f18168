//! The keeper's read-back budget, over the memory registry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{BackoffOptions, Keeper, Presence, RegistryStore, Session};
use crate::memory::backend::{Driver, Store};
use crate::memory::MemoryRegistry;
use crate::{Instance, Registrar, Result, ServiceName};

/// The memory store with a read-back budget of 2, recording each round's batch size.
#[derive(Debug)]
struct Budgeted {
    inner: Store,
    batches: Arc<Mutex<Vec<usize>>>,
}

#[async_trait]
impl RegistryStore for Budgeted {
    type Handle = u64;

    async fn write(&self, s: &u64, i: &Instance, takeover: bool) -> Result<()> {
        self.inner.write(s, i, takeover).await
    }

    async fn inspect(&self, s: &u64, i: &Instance) -> Result<Presence> {
        self.inner.inspect(s, i).await
    }

    async fn delete(&self, s: &u64, i: &Instance) -> Result<()> {
        self.inner.delete(s, i).await
    }

    fn inspect_per_round(&self) -> usize {
        2
    }

    async fn inspect_many(&self, s: &u64, instances: &[Instance]) -> Result<Vec<Presence>> {
        self.batches.lock().unwrap().push(instances.len());
        let mut out = Vec::new();
        for i in instances {
            out.push(self.inner.inspect(s, i).await?);
        }
        Ok(out)
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_reads_back_in_rotation_and_heals_every_entry() {
    let registry = MemoryRegistry::new("budget");
    let ttl = Duration::from_secs(4);
    let session = Session::new(
        Driver {
            registry: registry.clone(),
            ttl,
        },
        BackoffOptions::default(),
    );
    let batches = Arc::new(Mutex::new(Vec::new()));
    let keeper = Keeper::new(
        "memory",
        session,
        Budgeted {
            inner: Store {
                registry: registry.clone(),
            },
            batches: batches.clone(),
        },
    );
    let svc: ServiceName = "svc".parse().unwrap();
    let mut regs = Vec::new();
    for n in 0..5 {
        let i = Instance::parse("svc", &format!("i{n}"), "h", 1).unwrap();
        regs.push(keeper.register(i).await.unwrap());
    }
    for r in &regs {
        assert!(registry.delete_foreign(&svc, r.instance().id.as_str()));
    }
    assert!(registry.peek(&svc).is_empty());
    // Every entry is read back within ceil(5 / 2) = 3 rounds of a quarter TTL, and healed.
    let deadline = tokio::time::Instant::now() + ttl * 2;
    while registry.peek(&svc).len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "healed {} of 5 in time",
            registry.peek(&svc).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batches = batches.lock().unwrap();
    assert!(!batches.is_empty());
    assert!(
        batches.iter().all(|b| *b <= 2),
        "read back more than the budget: {batches:?}"
    );
}
