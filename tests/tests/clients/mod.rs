//! The clients of the cluster tests: a backend's client for a URL, with its bound (session
//! timeout, lease or check TTL) and request timeout set.
#![allow(dead_code)]

use std::time::Duration;

use waypost_core::Discovery;

/// A ZooKeeper client with session timeout `session`.
#[cfg(feature = "zookeeper")]
pub(crate) async fn zookeeper(url: &str, session: Duration, request: Duration) -> Discovery {
    use waypost_zookeeper::{ZkConfig, ZkDiscovery};
    let config = ZkConfig::from_url(url)
        .unwrap()
        .with_session_timeout(session)
        .with_request_timeout(request);
    ZkDiscovery::connect(config)
        .await
        .expect("connect")
        .into_discovery()
}

/// An etcd client with lease TTL `ttl` (the backend's own type, for its raw client).
#[cfg(feature = "etcd")]
pub(crate) async fn etcd(
    url: &str,
    ttl: Duration,
    request: Duration,
) -> waypost_etcd::EtcdDiscovery {
    use waypost_etcd::{EtcdConfig, EtcdDiscovery};
    let config = EtcdConfig::from_url(url)
        .unwrap()
        .with_lease_ttl(ttl)
        .with_request_timeout(request);
    EtcdDiscovery::connect(config).await.expect("connect")
}

/// A Consul client with check TTL `ttl`.
#[cfg(feature = "consul")]
pub(crate) async fn consul(url: &str, ttl: Duration, request: Duration) -> Discovery {
    use waypost_consul::{ConsulConfig, ConsulDiscovery};
    let config = ConsulConfig::from_url(url)
        .unwrap()
        .with_ttl(ttl)
        .with_request_timeout(request);
    ConsulDiscovery::connect(config)
        .await
        .expect("connect")
        .into_discovery()
}
