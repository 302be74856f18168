//! A harness that runs the real registries — ZooKeeper, etcd and Consul — as child
//! processes on free loopback ports, each in its own temp dir, for integration tests.
//!
//! ```no_run
//! # async fn demo() {
//! use waypost_testkit::server::{self, ServerKind};
//!
//! // Skips (loudly) when etcd is not installed, panics instead when `CI` is set.
//! let Some(mut etcd) = server::etcd().await else { return };
//! let url = etcd.url(); // "etcd://127.0.0.1:PORT/services"
//! etcd.pause().unwrap(); // SIGSTOP: the port accepts, nothing answers
//! etcd.resume().unwrap();
//! etcd.kill().unwrap(); // SIGKILL; the data dir stays
//! etcd.restart().await.unwrap(); // same port, same data
//! # let _ = (url, ServerKind::Etcd);
//! # }
//! ```
//!
//! Every server is killed (SIGKILL) and reaped when dropped, and its temp dir removed.
//! The servers are installed by `scripts/install-servers.sh`; the programs can be
//! overridden with the environment variables `WAYPOST_JAVA`, `WAYPOST_ZOOKEEPER_CLASSPATH`,
//! `WAYPOST_ETCD` and `WAYPOST_CONSUL` (or per server through its options).

use std::fmt;
use std::path::{Path, PathBuf};

mod consul;
mod consul_cluster;
mod error;
mod etcd;
mod ports;
mod probe;
mod process;
mod zookeeper;
mod zookeeper_ensemble;

pub use consul::{ConsulOptions, ConsulServer};
pub use consul_cluster::{ConsulAgent, ConsulCluster};
pub use error::HarnessError;
pub use etcd::{EtcdCluster, EtcdOptions, EtcdServer};
pub use zookeeper::{ZooKeeperOptions, ZooKeeperServer};
pub use zookeeper_ensemble::ZooKeeperEnsemble;

/// The hint every missing-server message carries.
pub(crate) const INSTALL_HINT: &str = "run scripts/install-servers.sh";

/// Which registry a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerKind {
    /// Apache ZooKeeper (3.8, standalone or an ensemble).
    ZooKeeper,
    /// etcd (3.4).
    Etcd,
    /// HashiCorp Consul (1.8, `agent -dev`, or a cluster of servers and a client agent).
    Consul,
}

impl ServerKind {
    /// All kinds, in a fixed order.
    pub const ALL: [ServerKind; 3] = [ServerKind::ZooKeeper, ServerKind::Etcd, ServerKind::Consul];

    /// A lowercase name without spaces (`zookeeper`, `etcd`, `consul`).
    pub fn slug(self) -> &'static str {
        match self {
            ServerKind::ZooKeeper => "zookeeper",
            ServerKind::Etcd => "etcd",
            ServerKind::Consul => "consul",
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::ZooKeeper => "ZooKeeper",
            ServerKind::Etcd => "etcd",
            ServerKind::Consul => "Consul",
        })
    }
}

/// Whether the server `kind` can be run here: `Err(HarnessError::MissingBinary)` says
/// what is missing.
pub fn check_installed(kind: ServerKind) -> Result<(), HarnessError> {
    match kind {
        ServerKind::ZooKeeper => zookeeper::locate(&ZooKeeperOptions::default()).map(|_| ()),
        ServerKind::Etcd => etcd::locate(None).map(|_| ()),
        ServerKind::Consul => consul::locate(None).map(|_| ()),
    }
}

/// Gate for tests that need a real server: `Some(())` when `kind` is installed.
///
/// When it is not, the test fails with the install hint (`scripts/install-servers.sh`):
/// a green `cargo test` means every real-server test ran. A developer who wants to run
/// the rest without the servers opts out explicitly with
/// `WAYPOST_SKIP_MISSING_SERVERS=1`: then it prints a loud
/// `SKIPPED <test>: <kind> not installed: <hint>` line to stderr and returns `None`. With
/// `CI` set the opt-out is ignored: CI never skips.
///
/// ```no_run
/// # fn demo() {
/// use waypost_testkit::server::{require, ServerKind};
/// let Some(()) = require(ServerKind::Consul) else { return };
/// # }
/// ```
pub fn require(kind: ServerKind) -> Option<()> {
    match check_installed(kind) {
        Ok(()) => Some(()),
        Err(err) => {
            let test = std::thread::current()
                .name()
                .unwrap_or("<unnamed test>")
                .to_owned();
            let hint = match &err {
                HarnessError::MissingBinary { hint, .. } => hint.clone(),
                other => other.to_string(),
            };
            let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0");
            if set("CI") || !set("WAYPOST_SKIP_MISSING_SERVERS") {
                panic!(
                    "{test}: {kind} is not installed: {hint} (run scripts/install-servers.sh; \
                     outside CI, WAYPOST_SKIP_MISSING_SERVERS=1 skips such tests)"
                );
            }
            eprintln!("SKIPPED {test}: {kind} not installed: {hint}");
            None
        }
    }
}

/// [`require`]s ZooKeeper and starts one with default options; panics if it is
/// installed but does not start.
pub async fn zookeeper() -> Option<ZooKeeperServer> {
    require(ServerKind::ZooKeeper)?;
    Some(
        ZooKeeperServer::start()
            .await
            .unwrap_or_else(|e| panic!("starting ZooKeeper failed: {e}")),
    )
}

/// [`require`]s etcd and starts one with default options; panics if it is installed
/// but does not start.
pub async fn etcd() -> Option<EtcdServer> {
    require(ServerKind::Etcd)?;
    Some(
        EtcdServer::start()
            .await
            .unwrap_or_else(|e| panic!("starting etcd failed: {e}")),
    )
}

/// [`require`]s Consul and starts one with default options (no ACLs); panics if it is
/// installed but does not start.
pub async fn consul() -> Option<ConsulServer> {
    require(ServerKind::Consul)?;
    Some(
        ConsulServer::start()
            .await
            .unwrap_or_else(|e| panic!("starting Consul failed: {e}")),
    )
}

/// Finds a program: the explicit path if given, else the environment variable `env`,
/// else `name` on `PATH`, else the first existing of `fallbacks`.
pub(crate) fn find_program(
    explicit: Option<&Path>,
    env: &str,
    name: &str,
    fallbacks: &[&str],
) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_owned())
        } else {
            Err(format!("{} is not an executable file", path.display()))
        };
    }
    if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "{env}={} is not an executable file",
                path.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join(name))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("`{name}` not found on PATH"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Polls `leader` every 100 ms until it names a member `accept` takes; after `timeout`,
/// [`HarnessError::NotReady`] with the members' log tails. What every cluster's
/// `wait_leader` and `wait_new_leader` run.
pub(crate) async fn wait_leader_where<F, Fut>(
    kind: ServerKind,
    timeout: std::time::Duration,
    leader: F,
    accept: impl Fn(usize) -> bool,
    log_tails: impl Fn() -> String,
) -> Result<usize, HarnessError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(i) = leader().await.filter(|&i| accept(i)) {
            return Ok(i);
        }
        if start.elapsed() >= timeout {
            return Err(HarnessError::NotReady {
                kind,
                waited: start.elapsed(),
                log_tail: log_tails(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
