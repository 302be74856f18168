//! The `Watcher` trait: list and watch a service's live instances.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::event::{Snapshot, WatchEvent};
use crate::model::ServiceName;

/// Lists and watches a service's live instances.
///
/// Object-safe: libraries take an `Arc<dyn Watcher>` and leave the choice of registry to
/// the binary.
///
/// # Contract
///
/// - [`instances`](Watcher::instances) returns the authoritative set at one revision. A
///   service nobody registered is an empty snapshot, not an error.
/// - [`watch`](Watcher::watch) yields a [`WatchEvent::Snapshot`] first, always (possibly
///   empty), then `Added` / `Updated` / `Removed` in registry order, each carrying its
///   revision. Applying them in order (see [`InstanceSet`](crate::InstanceSet)) gives
///   exactly the set the registry holds: no change is lost, none is reported twice.
/// - When the connection to the registry is lost, the watch yields
///   [`WatchEvent::Stale`] once; the consumer keeps its last known set. When the registry
///   is reachable again the watch yields [`WatchEvent::Resynced`] with a fresh
///   authoritative set. There is never a silent gap.
/// - The watch retries by itself, with backoff, for as long as the stream is held. An
///   `Err` item is only yielded for errors that retrying cannot fix (an invalid name,
///   missing permissions); the stream ends after it.
/// - Dropping the stream stops the watch and releases its resources.
/// - [`services`](Watcher::services) lists the services that have at least one entry in
///   the registry (on registries that keep empty service paths, such as ZooKeeper, those
///   with no live instance may be listed too), sorted; names that are not valid
///   [`ServiceName`]s are skipped and logged.
#[async_trait]
pub trait Watcher: Debug + Send + Sync {
    /// The services the registry holds, sorted. [`Error::Unsupported`](crate::Error::Unsupported)
    /// where the backend cannot list them.
    async fn services(&self) -> Result<Vec<ServiceName>> {
        Err(crate::Error::unsupported(
            "listing services on this backend",
        ))
    }

    /// The authoritative set of live instances of `service`, read now.
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot>;

    /// Watches `service`: a snapshot, then changes. See the trait's contract.
    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>>;
}

#[async_trait]
impl<T: Watcher + ?Sized> Watcher for Arc<T> {
    async fn services(&self) -> Result<Vec<ServiceName>> {
        (**self).services().await
    }
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        (**self).instances(service).await
    }
    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        (**self).watch(service)
    }
}

#[async_trait]
impl<T: Watcher + ?Sized> Watcher for Box<T> {
    async fn services(&self) -> Result<Vec<ServiceName>> {
        (**self).services().await
    }
    async fn instances(&self, service: &ServiceName) -> Result<Snapshot> {
        (**self).instances(service).await
    }
    fn watch(&self, service: &ServiceName) -> BoxStream<'static, Result<WatchEvent>> {
        (**self).watch(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarding impls of `Arc` and `Box` reach the backend's listing; a backend
    /// without one says so with `Unsupported`.
    #[tokio::test]
    async fn services_are_listed_through_arc_and_box_or_unsupported() {
        use crate::{Registrar, Watcher};
        let r = crate::memory::MemoryRegistry::new("services-forwarding");
        let c = r.client(std::time::Duration::from_secs(10));
        let _reg = c
            .register(crate::Instance::parse("svc", "a", "127.0.0.1", 1).unwrap())
            .await
            .unwrap();
        let want: Vec<crate::ServiceName> = vec!["svc".parse().unwrap()];
        let arc: std::sync::Arc<dyn Watcher> = std::sync::Arc::new(c.clone());
        assert_eq!(Watcher::services(&arc).await.unwrap(), want);
        let boxed: Box<dyn Watcher> = Box::new(c.clone());
        assert_eq!(Watcher::services(&boxed).await.unwrap(), want);

        #[derive(Debug)]
        struct NoListing;
        #[async_trait::async_trait]
        impl Watcher for NoListing {
            async fn instances(
                &self,
                service: &crate::ServiceName,
            ) -> crate::Result<crate::Snapshot> {
                Err(crate::Error::NotFound {
                    what: service.to_string(),
                })
            }
            fn watch(
                &self,
                _service: &crate::ServiceName,
            ) -> futures::stream::BoxStream<'static, crate::Result<crate::WatchEvent>> {
                Box::pin(futures::stream::empty())
            }
        }
        assert!(matches!(
            NoListing.services().await,
            Err(crate::Error::Unsupported { .. })
        ));
    }
}
