//! etcd 3.4: a single server, and a cluster of several members on loopback.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::process::Command;

use super::process::{common_server_methods, launch, make_dir, ManagedProcess, ServerSpec};
use super::{find_program, ports, probe, HarnessError, ServerKind, INSTALL_HINT};

/// How many times a cluster start is tried again when a port turned out to be taken.
const CLUSTER_ATTEMPTS: usize = 5;

/// How an [`EtcdServer`] (or every member of an [`EtcdCluster`]) is configured.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `--heartbeat-interval`. Default: 100 ms (etcd's default).
    pub heartbeat_interval: Duration,
    /// `--election-timeout`: how long followers wait for a dead leader before they
    /// elect another. Default: 1 s (etcd's default).
    pub election_timeout: Duration,
    /// More command-line arguments for `etcd`.
    pub extra_args: Vec<String>,
    /// The `etcd` binary; default: `$WAYPOST_ETCD`, else `etcd` on `PATH`, else
    /// `/usr/bin/etcd`.
    pub binary: Option<PathBuf>,
    /// How long a start or restart may take. Default: 30 s (measured: under 1 s).
    pub startup_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_secs(1),
            extra_args: Vec::new(),
            binary: None,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// Finds the `etcd` binary, or says it is missing.
pub(crate) fn locate(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    find_program(explicit, "WAYPOST_ETCD", "etcd", &["/usr/bin/etcd"]).map_err(|what| {
        HarnessError::MissingBinary {
            kind: ServerKind::Etcd,
            hint: format!("{what}; {INSTALL_HINT} (Debian package `etcd-server`)"),
        }
    })
}

/// How one etcd member is run and probed.
#[derive(Debug)]
pub(crate) struct EtcdSpec {
    binary: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    initial_cluster: String,
    cluster_token: String,
    opts: EtcdOptions,
}

impl EtcdSpec {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

impl ServerSpec for EtcdSpec {
    const KIND: ServerKind = ServerKind::Etcd;

    fn command(&self) -> Command {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg("--heartbeat-interval")
            .arg(self.opts.heartbeat_interval.as_millis().max(1).to_string())
            .arg("--election-timeout")
            .arg(self.opts.election_timeout.as_millis().max(1).to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .args(&self.opts.extra_args);
        cmd
    }

    async fn probe(&self) -> bool {
        probe::http(
            &self.address(),
            "GET",
            "/health",
            &[],
            "",
            probe::PROBE_TIMEOUT,
        )
        .await
        .is_ok_and(|r| r.status == 200 && r.body.contains(r#""health":"true""#))
    }

    fn startup_timeout(&self) -> Duration {
        self.opts.startup_timeout
    }
}

/// What `/v3/maintenance/status` says about one member.
#[derive(Debug, Clone, Copy)]
struct Status {
    member_id: u64,
    leader: u64,
}

/// etcd's JSON gateway writes 64-bit numbers as strings.
fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// An etcd server (a single-member cluster, or one member of an [`EtcdCluster`]) on
/// 127.0.0.1 (see the [module docs](super)).
pub struct EtcdServer {
    process: ManagedProcess<EtcdSpec>,
}

impl fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdServer")
            .field("name", &self.process.spec().name)
            .field("address", &self.address())
            .field("process", &self.process)
            .finish()
    }
}

impl EtcdServer {
    /// Starts a single-member etcd with [`EtcdOptions::default`] and waits until it is
    /// ready.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(EtcdOptions::default()).await
    }

    /// Starts a single-member etcd with `opts` and waits until it is ready (`GET
    /// /health` answers `"health":"true"`).
    pub async fn start_with(opts: EtcdOptions) -> Result<Self, HarnessError> {
        let binary = locate(opts.binary.as_deref())?;
        let process = launch(2, |dir, ports| {
            let name = "waypost0".to_owned();
            Ok(EtcdSpec {
                binary: binary.clone(),
                initial_cluster: format!("{name}=http://127.0.0.1:{}", ports[1]),
                name,
                client_port: ports[0],
                peer_port: ports[1],
                data_dir: dir.join("data"),
                cluster_token: random_token(),
                opts: opts.clone(),
            })
        })
        .await?;
        tracing::info!(address = %process.spec().address(), "etcd ready");
        Ok(EtcdServer { process })
    }

    /// How many watchers the server serves now, over all clients (its metric
    /// `etcd_debugging_mvcc_watcher_total`).
    pub async fn watcher_count(&self) -> std::io::Result<usize> {
        let reply = super::probe::http(
            &self.address(),
            "GET",
            "/metrics",
            &[],
            "",
            std::time::Duration::from_secs(5),
        )
        .await?;
        reply
            .body
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .map(|n| n as usize)
            .ok_or_else(|| std::io::Error::other("no etcd_debugging_mvcc_watcher_total metric"))
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.process.spec().address()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.process.spec().client_port
    }

    /// The client URL as etcd itself writes it: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address())
    }

    /// The peer (raft) address, `127.0.0.1:PEER_PORT`.
    pub fn peer_address(&self) -> String {
        format!("127.0.0.1:{}", self.process.spec().peer_port)
    }

    /// The member's name (`--name`).
    pub fn name(&self) -> &str {
        &self.process.spec().name
    }

    /// A waypost URL for this server alone: `etcd://127.0.0.1:PORT/services`.
    pub fn url(&self) -> String {
        format!("etcd://{}/services", self.address())
    }

    /// Asks the member for its status (one short probe); `None` if it does not answer.
    async fn status(&self) -> Option<Status> {
        self.pid()?;
        let response = probe::http(
            &self.address(),
            "POST",
            "/v3/maintenance/status",
            &[],
            "{}",
            probe::PROBE_TIMEOUT,
        )
        .await
        .ok()?;
        if response.status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&response.body).ok()?;
        Some(Status {
            member_id: json_u64(&json["header"]["member_id"])?,
            leader: json_u64(&json["leader"]).unwrap_or(0),
        })
    }
}

common_server_methods!(EtcdServer);

fn random_token() -> String {
    format!("waypost-{:016x}", rand::thread_rng().gen::<u64>())
}

/// An etcd cluster of several members, all on 127.0.0.1, for leader-failure tests.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
    /// Each member's raft id, learnt at start (it survives restarts).
    ids: Vec<u64>,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster with [`EtcdOptions::default`] and waits until every
    /// member is ready and they agree on a leader.
    pub async fn start(n: usize) -> Result<Self, HarnessError> {
        Self::start_with(n, EtcdOptions::default()).await
    }

    /// Starts an `n`-member cluster with `opts` for every member.
    pub async fn start_with(n: usize, opts: EtcdOptions) -> Result<Self, HarnessError> {
        if n == 0 {
            return Err(HarnessError::Invalid(
                "an etcd cluster needs at least one member".into(),
            ));
        }
        let binary = locate(opts.binary.as_deref())?;
        let mut attempt = 1;
        loop {
            let ports = ports::allocate(2 * n)?;
            let token = random_token();
            let names: Vec<String> = (0..n).map(|i| format!("waypost{i}")).collect();
            let initial_cluster = names
                .iter()
                .enumerate()
                .map(|(i, name)| format!("{name}=http://127.0.0.1:{}", ports[2 * i + 1]))
                .collect::<Vec<_>>()
                .join(",");
            let mut members = Vec::with_capacity(n);
            for (i, name) in names.into_iter().enumerate() {
                let dir = make_dir(ServerKind::Etcd)?;
                let spec = EtcdSpec {
                    binary: binary.clone(),
                    name,
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    data_dir: dir.path().join("data"),
                    initial_cluster: initial_cluster.clone(),
                    cluster_token: token.clone(),
                    opts: opts.clone(),
                };
                let mut process = ManagedProcess::new(spec, dir);
                process.spawn()?;
                members.push(EtcdServer { process });
            }
            // Fails as soon as one member fails (e.g. exits on a taken port), rather
            // than after the others have waited out the deadline for a quorum.
            let started = futures::future::try_join_all(
                members.iter().map(|m| m.wait_ready(opts.startup_timeout)),
            )
            .await;
            let port_in_use = members.iter().any(|m| m.process.port_in_use());
            match started {
                Ok(_) => {}
                Err(e) if port_in_use && attempt < CLUSTER_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        error = %e,
                        "a port was taken; retrying the etcd cluster with new ports"
                    );
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut cluster = EtcdCluster {
                members,
                ids: Vec::new(),
            };
            cluster.learn_ids(opts.startup_timeout).await?;
            cluster.wait_leader(opts.startup_timeout).await?;
            tracing::info!(url = %cluster.url(), "etcd cluster ready");
            return Ok(cluster);
        }
    }

    async fn learn_ids(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            let statuses =
                futures::future::join_all(self.members.iter().map(EtcdServer::status)).await;
            if let Some(ids) = statuses
                .iter()
                .map(|s| s.map(|s| s.member_id))
                .collect::<Option<Vec<u64>>>()
            {
                self.ids = ids;
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(HarnessError::NotReady {
                    kind: ServerKind::Etcd,
                    waited: start.elapsed(),
                    log_tail: self.log_tails(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("== {} ==\n{}", m.name(), m.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members, in start order.
    pub fn members(&self) -> &[EtcdServer] {
        &self.members
    }

    /// Member `i`, to kill, pause, resume or restart. Panics if `i >= len()`.
    pub fn member(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// Every member's client address, `127.0.0.1:PORT`.
    pub fn addresses(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::address).collect()
    }

    /// Every member's client URL, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// A waypost URL naming every member: `etcd://127.0.0.1:A,127.0.0.1:B,.../services`.
    pub fn url(&self) -> String {
        format!("etcd://{}/services", self.addresses().join(","))
    }

    /// Which member leads, as far as can be seen right now: the member that answers and
    /// names itself leader, confirmed by a majority of the cluster. `None` while there
    /// is no such member (e.g. during an election).
    pub async fn leader(&self) -> Option<usize> {
        let statuses = futures::future::join_all(self.members.iter().map(EtcdServer::status)).await;
        let majority = self.members.len() / 2 + 1;
        statuses.iter().enumerate().find_map(|(i, status)| {
            let status = (*status)?;
            if status.leader == 0
                || status.leader != status.member_id
                || self.ids.get(i) != Some(&status.member_id)
            {
                return None;
            }
            let votes = statuses
                .iter()
                .flatten()
                .filter(|s| s.leader == status.member_id)
                .count();
            (votes >= majority).then_some(i)
        })
    }

    /// Waits until [`leader`](Self::leader) names a member, polling every 100 ms.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, HarnessError> {
        self.wait_leader_where(timeout, |_| true).await
    }

    /// Waits until [`leader`](Self::leader) names a member other than `old` (e.g. after
    /// killing `old`), polling every 100 ms.
    pub async fn wait_new_leader(
        &self,
        old: usize,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        self.wait_leader_where(timeout, |i| i != old).await
    }

    async fn wait_leader_where(
        &self,
        timeout: Duration,
        accept: impl Fn(usize) -> bool,
    ) -> Result<usize, HarnessError> {
        super::wait_leader_where(
            ServerKind::Etcd,
            timeout,
            || self.leader(),
            accept,
            || self.log_tails(),
        )
        .await
    }

    /// Waits until every member is ready (each one's own deadline is `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        futures::future::join_all(self.members.iter().map(|m| m.wait_ready(timeout)))
            .await
            .into_iter()
            .collect()
    }
}
