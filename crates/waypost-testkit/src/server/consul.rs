//! A Consul 1.8 agent in `-dev` mode (a one-node server cluster, state in memory).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use tokio::process::Command;

use super::process::{common_server_methods, launch, ManagedProcess, ServerSpec};
use super::{find_program, probe, HarnessError, ServerKind, INSTALL_HINT};

/// How a [`ConsulServer`] is configured.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    /// With `Some(token)`, ACLs are enabled with `default_policy = "deny"` and `token` as
    /// the master (bootstrap) token; the agent's own token is set to it as well, so the
    /// agent can still register its node and sync services. Default: `None`, no ACLs.
    pub acl_master_token: Option<String>,
    /// The node name (`-node`). Default: `waypost`.
    pub node_name: Option<String>,
    /// More command-line arguments for `consul agent`.
    pub extra_args: Vec<String>,
    /// The `consul` binary; default: `$WAYPOST_CONSUL`, else `consul` on `PATH`.
    pub binary: Option<PathBuf>,
    /// How long a start or restart may take. Default: 30 s (measured: about 0.3 s).
    pub startup_timeout: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            acl_master_token: None,
            node_name: None,
            extra_args: Vec::new(),
            binary: None,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// Finds the `consul` binary, or says it is missing.
pub(crate) fn locate(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    find_program(explicit, "WAYPOST_CONSUL", "consul", &["/usr/bin/consul"]).map_err(|what| {
        HarnessError::MissingBinary {
            kind: ServerKind::Consul,
            hint: format!("{what}; {INSTALL_HINT} (Debian bullseye package `consul`)"),
        }
    })
}

/// The ports a dev agent listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    dns: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
    grpc: u16,
}

/// How one Consul agent is run and probed.
#[derive(Debug)]
pub(crate) struct ConsulSpec {
    binary: PathBuf,
    config: PathBuf,
    node_name: String,
    node_id: String,
    ports: Ports,
    token: Option<String>,
    extra_args: Vec<String>,
    startup_timeout: Duration,
}

impl ConsulSpec {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }
}

/// One bounded `GET` of an agent's HTTP API, with the ACL token if there is one.
pub(crate) async fn get(
    address: &str,
    token: Option<&str>,
    path: &str,
) -> Option<probe::HttpResponse> {
    let mut headers = Vec::new();
    if let Some(token) = token {
        headers.push(("X-Consul-Token", token));
    }
    probe::http(address, "GET", path, &headers, "", probe::PROBE_TIMEOUT)
        .await
        .ok()
}

/// Whether the agent at `address` is ready: there is a raft leader, the agent answers
/// `/v1/agent/self`, and its node `node` is in the catalog (so registrations through the
/// agent sync at once).
pub(crate) async fn agent_ready(address: &str, token: Option<&str>, node: &str) -> bool {
    let leader = match get(address, token, "/v1/status/leader").await {
        Some(r) if r.status == 200 => r.body,
        _ => return false,
    };
    let leader = leader.trim();
    if leader.len() <= 2 || !leader.starts_with('"') {
        return false;
    }
    if get(address, token, "/v1/agent/self")
        .await
        .is_none_or(|r| r.status != 200)
    {
        return false;
    }
    get(address, token, &format!("/v1/catalog/node/{node}"))
        .await
        .is_some_and(|r| r.status == 200 && r.body.trim() != "null")
}

impl ServerSpec for ConsulSpec {
    const KIND: ServerKind = ServerKind::Consul;

    fn command(&self) -> Command {
        let p = self.ports;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("agent")
            .arg("-dev")
            .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .arg(format!("-http-port={}", p.http))
            .arg(format!("-dns-port={}", p.dns))
            .arg(format!("-serf-lan-port={}", p.serf_lan))
            .arg(format!("-serf-wan-port={}", p.serf_wan))
            .arg(format!("-server-port={}", p.server))
            .arg(format!("-grpc-port={}", p.grpc))
            .arg(format!("-node={}", self.node_name))
            .arg(format!("-node-id={}", self.node_id))
            .arg(format!("-config-file={}", self.config.display()))
            .args(&self.extra_args);
        cmd
    }

    /// Ready when there is a raft leader, the agent answers `/v1/agent/self`, and the
    /// node is in the catalog (so registrations through the agent sync at once).
    async fn probe(&self) -> bool {
        agent_ready(&self.address(), self.token.as_deref(), &self.node_name).await
    }

    fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }
}

pub(crate) fn random_uuid() -> String {
    let mut rng = rand::thread_rng();
    let b: [u8; 16] = rng.gen();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A Consul dev agent on 127.0.0.1 (see the [module docs](super)). Its state lives in
/// memory: a restart comes back empty (but on the same ports, with the same ACL token).
pub struct ConsulServer {
    process: ManagedProcess<ConsulSpec>,
}

impl fmt::Debug for ConsulServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulServer")
            .field("address", &self.address())
            .field("dns", &self.dns_address())
            .field("acl", &self.process.spec().token.is_some())
            .field("process", &self.process)
            .finish()
    }
}

impl ConsulServer {
    /// Starts a dev agent with [`ConsulOptions::default`] (no ACLs) and waits until it
    /// is ready.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(ConsulOptions::default()).await
    }

    /// Starts a dev agent with `opts` and waits until it is ready.
    pub async fn start_with(opts: ConsulOptions) -> Result<Self, HarnessError> {
        let binary = locate(opts.binary.as_deref())?;
        let node_name = opts.node_name.clone().unwrap_or_else(|| "waypost".into());
        let node_id = random_uuid();
        let process = launch(6, |dir, ports| {
            let mut config = serde_json::json!({ "disable_update_check": true });
            if let Some(token) = &opts.acl_master_token {
                config["acl"] = serde_json::json!({
                    "enabled": true,
                    "default_policy": "deny",
                    "down_policy": "extend-cache",
                    "tokens": { "master": token, "agent": token },
                });
            }
            let path = dir.join("config.json");
            std::fs::write(&path, config.to_string())
                .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
            Ok(ConsulSpec {
                binary: binary.clone(),
                config: path,
                node_name: node_name.clone(),
                node_id: node_id.clone(),
                ports: Ports {
                    http: ports[0],
                    dns: ports[1],
                    serf_lan: ports[2],
                    serf_wan: ports[3],
                    server: ports[4],
                    grpc: ports[5],
                },
                token: opts.acl_master_token.clone(),
                extra_args: opts.extra_args.clone(),
                startup_timeout: opts.startup_timeout,
            })
        })
        .await?;
        tracing::info!(address = %process.spec().address(), "Consul ready");
        Ok(ConsulServer { process })
    }

    /// The HTTP API address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.process.spec().address()
    }

    /// The HTTP API port.
    pub fn port(&self) -> u16 {
        self.process.spec().ports.http
    }

    /// A waypost URL for this agent: `consul://127.0.0.1:HTTP_PORT`.
    pub fn url(&self) -> String {
        format!("consul://{}", self.address())
    }

    /// The DNS interface (UDP and TCP).
    pub fn dns_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.process.spec().ports.dns))
    }

    /// The gRPC (xDS) address, `127.0.0.1:PORT`.
    pub fn grpc_address(&self) -> String {
        format!("127.0.0.1:{}", self.process.spec().ports.grpc)
    }

    /// The ACL master token, when the agent was started with ACLs.
    pub fn acl_master_token(&self) -> Option<&str> {
        self.process.spec().token.as_deref()
    }

    /// The agent's node name.
    pub fn node_name(&self) -> &str {
        &self.process.spec().node_name
    }

    /// The datacenter, always `dc1` (the dev default).
    pub fn datacenter(&self) -> &str {
        "dc1"
    }
}

common_server_methods!(ConsulServer);
