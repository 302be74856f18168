#![cfg_attr(not(feature = "zookeeper"), allow(missing_docs))]
#![cfg(feature = "zookeeper")]
//! ZooKeeper in the matrix: every conformance suite against a real ZooKeeper started by
//! the testkit (one server per test: faults pause the whole server), three times: the
//! default layout, protected sequential nodes with the Spring Cloud payload, and the
//! fallback watch for servers older than 3.6. The foreign writer is a raw
//! `zookeeper-client` session; for configuration keys it is ZooKeeper's own CLI,
//! `zkCli.sh` (`$WAYPOST_ZKCLI`, else on `PATH`, else Debian's
//! `/usr/share/zookeeper/bin/zkCli.sh`). Locks and elections run once, on the default
//! layout (their nodes do not depend on it); contenders are counted by a raw client.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::kv::ConfigKey;
use waypost_core::{Discovery, Instance, ServiceName};
use waypost_testkit::conformance::{Faults, Settings, TestBackend};
use waypost_testkit::server::ZooKeeperServer;
use waypost_zookeeper::zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr};
use waypost_zookeeper::{codec, NodeLayout, PayloadFormat, ZkConfig, ZkDiscovery};

/// The session timeout the clients ask for (the server's default cap is 20 ticks = 4 s).
const SESSION: Duration = Duration::from_secs(2);
/// A request against a paused server fails after this, well within the liveness bound;
/// the suites' pauses stay shorter than the session.
const REQUEST: Duration = Duration::from_secs(1);

struct ZkBackend {
    /// Behind a lock only for `restart`, which needs it mutably.
    server: tokio::sync::Mutex<ZooKeeperServer>,
    address: String,
    config: ZkConfig,
    child_watches: bool,
    clients: Mutex<Vec<ZkDiscovery>>,
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = waypost_testkit::server::zookeeper().await?;
    let config = ZkConfig::from_url(&server.url())
        .unwrap()
        .with_session_timeout(SESSION)
        .with_connect_timeout(Duration::from_secs(5))
        .with_request_timeout(REQUEST);
    Some(ZkBackend {
        config: f(config),
        address: server.address(),
        server: tokio::sync::Mutex::new(server),
        child_watches,
        clients: Mutex::new(Vec::new()),
    })
}

/// A suffix that keeps one suite's foreign nodes apart from the next call's.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Waits until `cond` holds (checked every 20 ms), at most `timeout`; whether it held.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// ZooKeeper's CLI.
fn zkcli() -> PathBuf {
    if let Some(p) = std::env::var_os("WAYPOST_ZKCLI").filter(|p| !p.is_empty()) {
        return p.into();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("zkCli.sh"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "/usr/share/zookeeper/bin/zkCli.sh".into())
}

/// What `zkCli.sh` printed.
struct CliOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// The node of configuration key `key` (the default `config_prefix`).
fn config_node(key: &ConfigKey) -> String {
    format!("/config/{key}")
}

/// `create` commands for the nodes above `path` (those that exist answer "Node already
/// exists", which the CLI prints and goes on).
fn create_parents(path: &str) -> Vec<String> {
    path.match_indices('/')
        .skip(1)
        .map(|(i, _)| format!("create \"{}\"", &path[..i]))
        .collect()
}

impl ZkBackend {
    /// Runs `zkCli.sh -server <ours>` with `args` (one command), or with `script` on its
    /// standard input (several commands, one session), in a UTF-8 locale.
    async fn zkcli(&self, args: &[&str], script: Option<Vec<String>>) -> CliOutput {
        use std::process::Stdio;
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(zkcli());
        cmd.arg("-server")
            .arg(&self.address)
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .env(
                "CLIENT_JVMFLAGS",
                "-Dfile.encoding=UTF-8 -Dstdout.encoding=UTF-8",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", zkcli().display()));
        let mut stdin = child.stdin.take().expect("stdin");
        let mut input = script.unwrap_or_default().join("\n");
        input.push_str("\nquit\n");
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("zkCli stdin");
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("zkCli.sh finished within 60 s")
            .expect("zkCli.sh output");
        let out = CliOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        for line in out.stderr.lines().filter(|l| l.contains("Exception")) {
            tracing::warn!("zkCli.sh: {line}");
        }
        out
    }

    /// Runs several CLI commands in one session; panics if one of them failed for
    /// another reason than an existing node.
    async fn zkcli_script(&self, commands: Vec<String>) {
        let out = self.zkcli(&[], Some(commands.clone())).await;
        let failed: Vec<&str> = out
            .stdout
            .lines()
            .chain(out.stderr.lines())
            .filter(|l| {
                (l.contains("Exception") || l.contains("does not exist") || l.contains("rror"))
                    && !l.contains("SLF4J")
            })
            .collect();
        assert!(
            failed.is_empty(),
            "zkCli.sh {commands:?}: {failed:?}\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }

    /// A foreign client: a raw ZooKeeper session of its own.
    async fn raw(&self) -> Client {
        Client::connector()
            .with_session_timeout(SESSION)
            .connect(&self.address)
            .await
            .expect("raw ZooKeeper client")
    }

    fn service_path(instance: &Instance) -> String {
        format!("/services/{}", instance.service)
    }

    /// Whether node `name` is where waypost writes `instance` (either layout:
    /// `{id}`, or `_c_{guid}-{id}NNNNNNNNNN`).
    fn is_ours(name: &str, instance: &Instance) -> bool {
        let id = instance.id.as_str();
        name == id
            || (name.starts_with("_c_")
                && name.len() > 10
                && name[..name.len() - 10].ends_with(&format!("-{id}")))
    }
}

#[async_trait]
impl TestBackend for ZkBackend {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    async fn connect(&self) -> Discovery {
        let d = ZkDiscovery::connect(self.config.clone())
            .await
            .expect("connect");
        if self.child_watches {
            d.use_child_watches();
        }
        self.clients.lock().unwrap().push(d.clone());
        d.into_discovery()
    }

    fn settings(&self) -> Settings {
        Settings {
            timeout: Duration::from_secs(10),
            // Session timeout (2 s) + detection + re-registration margin.
            liveness: SESSION + Duration::from_secs(6),
            concurrency: 32,
        }
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }

    async fn connect_to(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> waypost_core::Result<Discovery> {
        let config = self
            .config
            .clone()
            .with_endpoints([endpoint])
            .with_connect_timeout(connect_timeout);
        Ok(ZkDiscovery::connect(config).await?.into_discovery())
    }
}

#[async_trait]
impl Faults for ZkBackend {
    fn registry_endpoint(&self) -> std::net::SocketAddr {
        self.address.parse().expect("ZooKeeper address")
    }

    async fn registry_watches(&self) -> usize {
        self.server
            .lock()
            .await
            .watch_count()
            .await
            .expect("ZooKeeper's wchs")
    }

    /// The server is stopped until every client has seen its session expire (a client
    /// that cannot reach the server for its session timeout declares the session
    /// expired; the server expires it too when it runs again), then resumed.
    async fn expire_sessions(&self) {
        let clients: Vec<_> = self.clients.lock().unwrap().clone();
        let live: Vec<_> = clients
            .iter()
            .filter_map(|c| Some((c, c.session_generation()?)))
            .collect();
        self.server.lock().await.pause().expect("pause ZooKeeper");
        let lost = wait_until(Duration::from_secs(20), || {
            live.iter()
                .all(|(c, gen)| c.session_lost() || c.session_generation() != Some(*gen))
        })
        .await;
        self.server.lock().await.resume().expect("resume ZooKeeper");
        assert!(lost, "sessions did not expire while the server was stopped");
    }

    async fn make_unreachable(&self) {
        self.server.lock().await.pause().expect("pause ZooKeeper");
    }

    async fn make_reachable(&self) {
        self.server.lock().await.resume().expect("resume ZooKeeper");
    }

    async fn restart(&self) {
        self.server
            .lock()
            .await
            .restart()
            .await
            .expect("restart ZooKeeper");
    }

    /// Persistent nodes a foreign client writes beside the instances: bytes that are not
    /// JSON, JSON of another shape, and a value larger than any instance (500 KiB, under
    /// ZooKeeper's 1 MiB `jute.maxbuffer`).
    async fn write_malformed(&self, service: &ServiceName) {
        let raw = self.raw().await;
        let dir = format!("/services/{service}");
        let mode = CreateMode::Persistent.with_acls(Acls::anyone_all());
        let huge = vec![b'{'; 500 * 1024];
        for (name, data) in [
            ("junk-bytes", &b"\xff\xfe not json"[..]),
            ("junk-shape", &br#"{"hello":"world"}"#[..]),
            ("junk-huge", &huge[..]),
        ] {
            let path = format!("{dir}/{name}-{}", rand_suffix());
            // The service node may not exist yet: create its parents first.
            let mut at = String::new();
            for part in dir.trim_start_matches('/').split('/') {
                at = format!("{at}/{part}");
                match raw.create(&at, b"", &mode).await {
                    Ok(_) | Err(ZkErr::NodeExists) => {}
                    Err(e) => panic!("creating {at}: {e}"),
                }
            }
            raw.create(&path, data, &mode)
                .await
                .unwrap_or_else(|e| panic!("creating {path}: {e}"));
        }
    }

    async fn foreign_delete(&self, instance: &Instance) {
        let raw = self.raw().await;
        let dir = Self::service_path(instance);
        let names = raw.list_children(&dir).await.expect("list the service");
        let ours: Vec<_> = names
            .into_iter()
            .filter(|n| Self::is_ours(n, instance))
            .collect();
        assert!(!ours.is_empty(), "no node of {instance:?} to delete");
        for name in ours {
            match raw.delete(&format!("{dir}/{name}"), None).await {
                Ok(()) | Err(ZkErr::NoNode) => {}
                Err(e) => panic!("deleting {dir}/{name}: {e}"),
            }
        }
    }

    async fn foreign_claim(&self, instance: &Instance) -> String {
        let raw = self.raw().await;
        let path = format!("{}/foreign-{}", Self::service_path(instance), instance.id);
        let data = codec::encode(instance, PayloadFormat::Curator);
        raw.create(
            &path,
            &data,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap_or_else(|e| panic!("creating {path}: {e}"));
        path
    }

    /// `zkCli.sh`: creates the missing parents and the key node, or sets its data.
    async fn kv_foreign_put(&self, key: &ConfigKey, value: &str) {
        assert!(
            !value.contains('"'),
            "the test writes values without quotes"
        );
        let node = config_node(key);
        let exists = self.kv_foreign_get(key).await.is_some();
        let mut script = create_parents(&node);
        script.push(if exists {
            format!("set \"{node}\" \"{value}\"")
        } else {
            format!("create \"{node}\" \"{value}\"")
        });
        self.zkcli_script(script).await;
    }

    /// `zkCli.sh get`: the node's data, `None` when the node does not exist.
    async fn kv_foreign_get(&self, key: &ConfigKey) -> Option<String> {
        let node = config_node(key);
        let out = self.zkcli(&["get", &node], None).await;
        if !out.ok {
            assert!(
                out.stderr.contains("does not exist"),
                "zkCli.sh get {node}: {}\n{}",
                out.stdout,
                out.stderr
            );
            return None;
        }
        // What is not the CLI's own chatter is the value.
        let value: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| {
                !(l.is_empty()
                    || l.starts_with("Connecting to ")
                    || l.starts_with("WATCHER::")
                    || l.starts_with("WatchedEvent "))
            })
            .collect();
        Some(value.join("\n"))
    }

    /// `zkCli.sh delete`.
    async fn kv_foreign_delete(&self, key: &ConfigKey) {
        let node = config_node(key);
        let out = self.zkcli(&["delete", &node], None).await;
        assert!(
            out.ok,
            "zkCli.sh delete {node}: {}\n{}",
            out.stdout, out.stderr
        );
    }

    /// `zkCli.sh` creates nodes below the prefix whose names are not configuration keys:
    /// a space, a colon, non-ASCII letters, a 200-byte segment, and a valid name below an
    /// invalid directory.
    async fn kv_write_malformed(&self, prefix: &ConfigKey) {
        let dir = config_node(prefix);
        let long = "x".repeat(200);
        let mut script = create_parents(&format!("{dir}/x"));
        for name in [
            "bad key",
            "bad:colon",
            "ünïcode",
            &long,
            "bad dir",
            "bad dir/ok",
        ] {
            script.push(format!("create \"{dir}/{name}\" \"v\""));
        }
        self.zkcli_script(script).await;
    }

    /// The contender nodes of lock `name` (Curator's `-lock-`, and our `-semaphore-`)
    /// below the default `coord_prefix`, listed by a raw client.
    async fn coord_contenders(&self, name: &waypost_core::coord::Name) -> usize {
        let raw = self.raw().await;
        match raw.list_children(&format!("/coord/{name}")).await {
            Ok(names) => names
                .iter()
                .filter(|n| {
                    let head = n.trim_end_matches(|c: char| c.is_ascii_digit());
                    head.len() < n.len()
                        && (head.ends_with("-lock-") || head.ends_with("-semaphore-"))
                })
                .count(),
            Err(ZkErr::NoNode) => 0,
            Err(e) => panic!("listing the contenders of {name}: {e}"),
        }
    }

    async fn foreign_remove(&self, _instance: &Instance, key: &str) {
        let raw = self.raw().await;
        raw.delete(key, None)
            .await
            .unwrap_or_else(|e| panic!("deleting {key}: {e}"));
    }
}

waypost_testkit::conformance_tests!(zookeeper; network);
waypost_testkit::kv_conformance_tests!(zookeeper);
waypost_testkit::coord_conformance_tests!(zookeeper);

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
