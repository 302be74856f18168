//! Shared test support: connect to a harness server with short timeouts, admin calls.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use waypost_etcd::{EtcdConfig, EtcdDiscovery};

/// Short lease and timeouts so fault tests run in seconds.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

pub fn config(url: &str) -> EtcdConfig {
    EtcdConfig::from_url(url)
        .unwrap()
        .with_lease_ttl(LEASE_TTL)
        .with_request_timeout(Duration::from_secs(1))
        .with_probe_interval(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(5))
}

pub async fn connect(url: &str) -> EtcdDiscovery {
    EtcdDiscovery::connect(config(url))
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A raw etcd client for fault injection and foreign writes.
pub async fn admin(endpoints: &[String]) -> etcd_client::Client {
    etcd_client::Client::connect(endpoints, None)
        .await
        .expect("admin client")
}

/// Revokes every lease the server holds: every registration is dropped at once.
pub async fn revoke_all_leases(admin: &etcd_client::Client) {
    let mut c = admin.clone();
    let leases = c.leases().await.expect("list leases");
    for l in leases.leases() {
        // A lease may go between listing and revoking.
        let _ = c.lease_revoke(l.id()).await;
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "waypost_etcd=info".into()),
        )
        .with_test_writer()
        .try_init();
}
