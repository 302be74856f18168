#![cfg_attr(not(feature = "etcd"), allow(missing_docs))]
#![cfg(feature = "etcd")]
//! etcd in the matrix: every conformance suite against a real etcd started by the
//! testkit (one server per test, so faults injected by one suite never reach another);
//! the foreign writer is `etcdctl`.

use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use waypost_core::kv::ConfigKey;
use waypost_core::{Discovery, Instance, ServiceName};
use waypost_etcd::{EtcdConfig, EtcdDiscovery, CLAIM_SEPARATOR, MAX_VALUE_LEN};
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::EtcdServer;

/// Lease TTL 2 s; a request against a paused server fails after 1 s, well within the
/// liveness bound, and the suites' pauses stay shorter than the lease.
const LEASE_TTL: Duration = Duration::from_secs(2);

struct EtcdBackend {
    /// Locked only to restart it.
    server: Mutex<EtcdServer>,
    /// `http://127.0.0.1:PORT`, the same after a restart.
    endpoint: String,
    /// `etcd://127.0.0.1:PORT/services`.
    url: String,
}

async fn etcd() -> Option<EtcdBackend> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "waypost_etcd=info,waypost_core=info".into()),
        )
        .with_test_writer()
        .try_init();
    let server = waypost_testkit::server::etcd().await?;
    Some(EtcdBackend {
        endpoint: server.endpoint(),
        url: server.url(),
        server: Mutex::new(server),
    })
}

impl EtcdBackend {
    /// Runs `etcdctl` (API v3) against the server, with `stdin` as its standard input;
    /// returns its standard output.
    async fn etcdctl_with(&self, args: &[&str], stdin: &[u8]) -> String {
        let mut child = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        let mut input = child.stdin.take().expect("etcdctl stdin");
        input.write_all(stdin).await.expect("write to etcdctl");
        drop(input);
        let out = child.wait_with_output().await.expect("etcdctl ran");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn etcdctl(&self, args: &[&str]) -> String {
        self.etcdctl_with(args, b"").await
    }

    /// The key waypost writes `instance` at (the default layout and prefix).
    fn key(instance: &Instance) -> String {
        format!("/services/{}/{}", instance.service, instance.id)
    }

    /// The etcd key of configuration key `key` (the default `config_prefix`).
    fn config_key(key: &ConfigKey) -> String {
        format!("/config/{key}")
    }
}

/// Short lease and timeouts, so fault suites run in seconds.
fn config(url: &str) -> EtcdConfig {
    EtcdConfig::from_url(url)
        .unwrap()
        .with_lease_ttl(LEASE_TTL)
        .with_request_timeout(Duration::from_secs(1))
        .with_probe_interval(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(5))
}

#[async_trait]
impl TestBackend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn connect(&self) -> Discovery {
        EtcdDiscovery::connect(config(&self.url))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
            .into_discovery()
    }

    async fn connect_to(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> waypost_core::Result<Discovery> {
        let config = config(&self.url)
            .with_endpoints([endpoint])
            .with_connect_timeout(connect_timeout);
        Ok(EtcdDiscovery::connect(config).await?.into_discovery())
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
    fn registry_endpoint(&self) -> std::net::SocketAddr {
        self.endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("etcd endpoint")
    }

    async fn registry_watches(&self) -> usize {
        self.server
            .lock()
            .await
            .watcher_count()
            .await
            .expect("etcd's watcher metric")
    }

    async fn expire_sessions(&self) {
        // `lease list` prints a header line, then one hex id per line.
        let listed = self.etcdctl(&["lease", "list"]).await;
        for id in listed
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            // A lease may go between listing and revoking.
            let _ = tokio::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(&self.endpoint)
                .args(["lease", "revoke", id])
                .output()
                .await;
        }
    }

    async fn make_unreachable(&self) {
        self.server.lock().await.pause().expect("pause etcd");
    }

    async fn make_reachable(&self) {
        self.server.lock().await.resume().expect("resume etcd");
    }

    async fn restart(&self) {
        self.server
            .lock()
            .await
            .restart()
            .await
            .expect("restart etcd");
    }

    async fn write_malformed(&self, service: &ServiceName) {
        let p = format!("/services/{service}");
        let huge = vec![b'{'; MAX_VALUE_LEN + 1];
        for (key, value) in [
            (format!("{p}/junk-bytes"), &b"\xff\xfe not json"[..]),
            (format!("{p}/junk-shape"), &br#"{"hello":"world"}"#[..]),
            (format!("{p}/junk-huge"), &huge[..]),
        ] {
            // The value on standard input: a huge one does not fit an argument.
            self.etcdctl_with(&["put", &key], value).await;
        }
    }

    async fn foreign_delete(&self, instance: &Instance) {
        let deleted = self.etcdctl(&["del", &Self::key(instance)]).await;
        assert_eq!(deleted.trim(), "1", "etcdctl deleted {deleted:?}");
    }

    async fn foreign_claim(&self, instance: &Instance) -> String {
        let key = format!("{}{CLAIM_SEPARATOR}foreign", Self::key(instance));
        let value = serde_json::to_string(instance).unwrap();
        self.etcdctl(&["put", &key, &value]).await;
        key
    }

    async fn foreign_remove(&self, _instance: &Instance, key: &str) {
        let deleted = self.etcdctl(&["del", key]).await;
        assert_eq!(deleted.trim(), "1", "etcdctl deleted {deleted:?}");
    }

    async fn kv_foreign_put(&self, key: &ConfigKey, value: &str) {
        // The value on standard input, as is.
        self.etcdctl_with(&["put", &Self::config_key(key)], value.as_bytes())
            .await;
    }

    async fn kv_foreign_get(&self, key: &ConfigKey) -> Option<String> {
        // `get` prints the key's line, then the value and a newline; nothing if absent.
        let out = self.etcdctl(&["get", &Self::config_key(key)]).await;
        let (_key, value) = out.split_once('\n')?;
        Some(value.strip_suffix('\n').unwrap_or(value).to_string())
    }

    async fn kv_foreign_delete(&self, key: &ConfigKey) {
        let deleted = self.etcdctl(&["del", &Self::config_key(key)]).await;
        assert_eq!(deleted.trim(), "1", "etcdctl deleted {deleted:?}");
    }

    async fn coord_contenders(&self, name: &waypost_core::coord::Name) -> usize {
        // Every key under the lock's prefix (the default `coord_prefix`), one per line.
        let out = self
            .etcdctl(&["get", "--prefix", "--keys-only", &format!("/coord/{name}/")])
            .await;
        out.lines().filter(|l| !l.trim().is_empty()).count()
    }

    async fn kv_write_malformed(&self, prefix: &ConfigKey) {
        let p = Self::config_key(prefix);
        for key in [
            format!("{p}/with space"),
            format!("{p}//empty-segment"),
            format!("{p}/folder/"),
            format!("{p}/caf\u{e9}"),
        ] {
            self.etcdctl_with(&["put", &key], b"not a configuration key")
                .await;
        }
    }
}

waypost_testkit::conformance_tests!(etcd; network);
waypost_testkit::kv_conformance_tests!(etcd);
waypost_testkit::coord_conformance_tests!(etcd);
