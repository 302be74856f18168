//! A Consul cluster as in production: several servers (raft) plus one client agent,
//! the agent waypost talks to. Every agent is its own process on 127.0.0.1 with its
//! own data dir and ports.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use super::consul::{agent_ready, get, locate, random_uuid};
use super::process::{common_server_methods, make_dir, ManagedProcess, ServerSpec};
use super::{ports, ConsulOptions, HarnessError, ServerKind};

/// How many times a cluster start is tried again when a port turned out to be taken.
const CLUSTER_ATTEMPTS: usize = 5;

/// Agent settings for a fast test cluster: raft timings of `-dev` (1 s heartbeat and
/// election timeouts), and servers stay raft voters while down (autopilot would remove
/// a failed one, and the cluster would shrink under a fault test).
const CONFIG: &str = r#"{
  "disable_update_check": true,
  "performance": { "raft_multiplier": 1 },
  "autopilot": { "cleanup_dead_servers": false },
  "leave_on_terminate": false,
  "skip_leave_on_interrupt": true
}"#;

/// How one agent of a cluster is run and probed.
#[derive(Debug)]
pub(crate) struct AgentSpec {
    binary: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    node_name: String,
    node_id: String,
    http: u16,
    serf_lan: u16,
    /// `Some((serf_wan, server))` for a server, `None` for the client agent.
    server_ports: Option<(u16, u16)>,
    bootstrap_expect: usize,
    /// The serf LAN addresses of the servers to join.
    join: Vec<String>,
    extra_args: Vec<String>,
    startup_timeout: Duration,
}

impl AgentSpec {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.http)
    }
}

impl ServerSpec for AgentSpec {
    const KIND: ServerKind = ServerKind::Consul;

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("agent")
            .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .arg(format!("-data-dir={}", self.data_dir.display()))
            .arg(format!("-http-port={}", self.http))
            .arg("-dns-port=-1")
            .arg(format!("-serf-lan-port={}", self.serf_lan))
            .arg(format!("-node={}", self.node_name))
            .arg(format!("-node-id={}", self.node_id))
            .arg(format!("-config-file={}", self.config.display()))
            // The default of 30 s between join attempts would stall a start where the
            // other agents are not listening yet.
            .arg("-retry-interval=500ms");
        if let Some((serf_wan, server)) = self.server_ports {
            cmd.arg("-server")
                .arg(format!("-bootstrap-expect={}", self.bootstrap_expect))
                .arg(format!("-serf-wan-port={serf_wan}"))
                .arg(format!("-server-port={server}"));
        }
        for address in &self.join {
            cmd.arg(format!("-retry-join={address}"));
        }
        cmd.args(&self.extra_args);
        cmd
    }

    /// Ready when the agent knows a raft leader, answers `/v1/agent/self`, and its node
    /// is in the catalog (for the client agent: it has joined and synced).
    async fn probe(&self) -> bool {
        agent_ready(&self.address(), None, &self.node_name).await
    }

    fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }
}

/// One agent of a [`ConsulCluster`]: a server, or the client agent.
pub struct ConsulAgent {
    process: ManagedProcess<AgentSpec>,
}

impl fmt::Debug for ConsulAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulAgent")
            .field("node", &self.node_name())
            .field("server", &self.is_server())
            .field("address", &self.address())
            .field("process", &self.process)
            .finish()
    }
}

impl ConsulAgent {
    /// The HTTP API address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.process.spec().address()
    }

    /// The HTTP API port.
    pub fn port(&self) -> u16 {
        self.process.spec().http
    }

    /// A waypost URL for this agent: `consul://127.0.0.1:HTTP_PORT`.
    pub fn url(&self) -> String {
        format!("consul://{}", self.address())
    }

    /// The node name (`waypost-server-0`, ..., `waypost-client` by default).
    pub fn node_name(&self) -> &str {
        &self.process.spec().node_name
    }

    /// Whether this agent is a server (else it is the client agent).
    pub fn is_server(&self) -> bool {
        self.process.spec().server_ports.is_some()
    }

    /// The serf LAN (gossip) address, `127.0.0.1:PORT`.
    pub fn serf_lan_address(&self) -> String {
        format!("127.0.0.1:{}", self.process.spec().serf_lan)
    }

    /// A server's RPC (raft) address, `127.0.0.1:PORT`, as `/v1/status/leader` names
    /// it; `None` for the client agent.
    pub fn server_address(&self) -> Option<String> {
        let (_, server) = self.process.spec().server_ports?;
        Some(format!("127.0.0.1:{server}"))
    }

    /// The raft leader this agent knows of (`/v1/status/leader`), in one short probe;
    /// `None` if it does not answer or knows none.
    pub async fn known_leader(&self) -> Option<String> {
        self.pid()?;
        let reply = get(&self.address(), None, "/v1/status/leader").await?;
        if reply.status != 200 {
            return None;
        }
        let leader: String = serde_json::from_str(reply.body.trim()).ok()?;
        (!leader.is_empty()).then_some(leader)
    }
}

common_server_methods!(ConsulAgent);

/// A Consul cluster on 127.0.0.1: `n` servers (`-server -bootstrap-expect=n`, each
/// joining the others) plus one client agent joined to them, which is what waypost
/// talks to ([`url`](Self::url)). DNS and gRPC are off; ACLs are not supported.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use waypost_testkit::server::ConsulCluster;
///
/// let mut consul = ConsulCluster::start().await.unwrap(); // 3 servers + a client agent
/// let url = consul.url(); // the client agent: "consul://127.0.0.1:PORT"
/// let leader = consul.wait_leader(Duration::from_secs(30)).await.unwrap();
/// consul.member(leader).kill().unwrap();
/// let next = consul.wait_new_leader(leader, Duration::from_secs(30)).await.unwrap();
/// consul.client_mut().restart().await.unwrap();
/// # let _ = (url, next);
/// # }
/// ```
#[derive(Debug)]
pub struct ConsulCluster {
    servers: Vec<ConsulAgent>,
    client: ConsulAgent,
}

impl ConsulCluster {
    /// The number of servers [`start`](Self::start) runs.
    pub const DEFAULT_SERVERS: usize = 3;

    /// Starts 3 servers and a client agent with [`ConsulOptions::default`], and waits
    /// until a leader is elected and the client agent is a member.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(Self::DEFAULT_SERVERS, ConsulOptions::default()).await
    }

    /// Starts `servers` servers and a client agent. From `opts`: `node_name` is the
    /// prefix of the node names (default `waypost`), `extra_args` go to every agent,
    /// `binary` and `startup_timeout` as for a [`ConsulServer`](super::ConsulServer);
    /// `acl_master_token` must be `None`. Every agent must be ready (a leader known, its
    /// node in the catalog) within `startup_timeout`, then a leader confirmed by a
    /// majority within it again. Fails at once if an agent exits; tries again on new
    /// ports if one was taken.
    pub async fn start_with(servers: usize, opts: ConsulOptions) -> Result<Self, HarnessError> {
        if servers == 0 {
            return Err(HarnessError::Invalid(
                "a Consul cluster needs at least one server".into(),
            ));
        }
        if opts.acl_master_token.is_some() {
            return Err(HarnessError::Invalid(
                "ConsulCluster does not support ACLs (acl_master_token); use ConsulServer".into(),
            ));
        }
        let binary = locate(opts.binary.as_deref())?;
        let prefix = opts.node_name.clone().unwrap_or_else(|| "waypost".into());
        let mut attempt = 1;
        loop {
            // Per server: http, serf LAN, serf WAN, server RPC; the client: http, serf LAN.
            let ports = ports::allocate(4 * servers + 2)?;
            let serf: Vec<String> = (0..servers)
                .map(|i| format!("127.0.0.1:{}", ports[4 * i + 1]))
                .collect();
            let agent = |name: String, http, serf_lan, server_ports, join| {
                let dir = make_dir(ServerKind::Consul)?;
                let config = dir.path().join("config.json");
                std::fs::write(&config, CONFIG)
                    .map_err(|e| HarnessError::io(format!("writing {}", config.display()), e))?;
                let spec = AgentSpec {
                    binary: binary.clone(),
                    config,
                    data_dir: dir.path().join("data"),
                    node_name: name,
                    node_id: random_uuid(),
                    http,
                    serf_lan,
                    server_ports,
                    bootstrap_expect: servers,
                    join,
                    extra_args: opts.extra_args.clone(),
                    startup_timeout: opts.startup_timeout,
                };
                let mut process = ManagedProcess::new(spec, dir);
                process.spawn()?;
                Ok::<_, HarnessError>(ConsulAgent { process })
            };
            let mut members = Vec::with_capacity(servers);
            for i in 0..servers {
                let others = (0..servers).filter(|&j| j != i).map(|j| serf[j].clone());
                members.push(agent(
                    format!("{prefix}-server-{i}"),
                    ports[4 * i],
                    ports[4 * i + 1],
                    Some((ports[4 * i + 2], ports[4 * i + 3])),
                    others.collect(),
                )?);
            }
            let client = agent(
                format!("{prefix}-client"),
                ports[4 * servers],
                ports[4 * servers + 1],
                None,
                serf.clone(),
            )?;
            let all = members.iter().chain(std::iter::once(&client));
            let started =
                futures::future::try_join_all(all.map(|a| a.wait_ready(opts.startup_timeout)))
                    .await;
            let port_in_use = members
                .iter()
                .chain(std::iter::once(&client))
                .any(|a| a.process.port_in_use());
            let cluster = ConsulCluster {
                servers: members,
                client,
            };
            match started {
                Ok(_) => {}
                Err(e) if port_in_use && attempt < CLUSTER_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        error = %e,
                        "a port was taken; retrying the Consul cluster with new ports"
                    );
                    attempt += 1;
                    continue;
                }
                Err(HarnessError::NotReady { kind, waited, .. }) => {
                    return Err(HarnessError::NotReady {
                        kind,
                        waited,
                        log_tail: cluster.log_tails(),
                    })
                }
                Err(e) => return Err(e),
            }
            cluster.wait_leader(opts.startup_timeout).await?;
            tracing::info!(url = %cluster.url(), "Consul cluster ready");
            return Ok(cluster);
        }
    }

    /// Every agent's log tail, headed by its node name.
    fn log_tails(&self) -> String {
        self.servers
            .iter()
            .chain(std::iter::once(&self.client))
            .map(|a| format!("== {} ==\n{}", a.node_name(), a.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A waypost URL for the client agent: `consul://127.0.0.1:HTTP_PORT`.
    pub fn url(&self) -> String {
        self.client.url()
    }

    /// The client agent's HTTP address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.client.address()
    }

    /// How many servers the cluster has.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no servers (never true for a started one).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The servers, in start order.
    pub fn servers(&self) -> &[ConsulAgent] {
        &self.servers
    }

    /// Server `i`, to kill, pause, resume or restart. Panics if `i >= len()`.
    pub fn member(&mut self, i: usize) -> &mut ConsulAgent {
        &mut self.servers[i]
    }

    /// The client agent.
    pub fn client(&self) -> &ConsulAgent {
        &self.client
    }

    /// The client agent, to kill, pause, resume or restart.
    pub fn client_mut(&mut self) -> &mut ConsulAgent {
        &mut self.client
    }

    /// Which server leads, as far as can be seen right now (`/v1/status/leader` on every
    /// server): the server that answers and names itself, named by a majority of the
    /// servers. `None` while there is no such server (e.g. during an election).
    pub async fn leader(&self) -> Option<usize> {
        let known =
            futures::future::join_all(self.servers.iter().map(ConsulAgent::known_leader)).await;
        let majority = self.servers.len() / 2 + 1;
        self.servers.iter().enumerate().find_map(|(i, server)| {
            let me = server.server_address()?;
            if known[i].as_deref() != Some(me.as_str()) {
                return None;
            }
            let votes = known.iter().flatten().filter(|l| **l == me).count();
            (votes >= majority).then_some(i)
        })
    }

    /// Waits until [`leader`](Self::leader) names a server, polling every 100 ms.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, HarnessError> {
        self.wait_leader_where(timeout, |_| true).await
    }

    /// Waits until [`leader`](Self::leader) names a server other than `old` (e.g. after
    /// killing or pausing `old`), polling every 100 ms.
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
            ServerKind::Consul,
            timeout,
            || self.leader(),
            accept,
            || self.log_tails(),
        )
        .await
    }

    /// Waits until every server and the client agent are ready (each one's own deadline
    /// is `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let all = self.servers.iter().chain(std::iter::once(&self.client));
        futures::future::try_join_all(all.map(|a| a.wait_ready(timeout)))
            .await
            .map(|_| ())
    }
}
