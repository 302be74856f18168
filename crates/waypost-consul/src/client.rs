//! A thin typed client of the few Consul agent endpoints waypost needs, and what one
//! client learns about its agent (ACL state, node name).
//!
//! The ACL token travels only in the `X-Consul-Token` header, marked sensitive; it is
//! never put in a URL, a log line, a `Debug` output or an error.

mod blocking;
mod endpoints;
mod http;

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::Method;
use tokio::sync::watch;

use crate::budget::{ConnectionBudget, Lanes};
use waypost_core::Result;

use crate::config::ConsulConfig;
use crate::error::ConsulError;
pub(crate) use blocking::ReadMode;
use http::build_http;

/// What `GET /v1/acl/token/self` says about our token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclState {
    /// The agent has no ACLs: everything is readable.
    Disabled,
    /// ACLs are on and the token is valid.
    Valid,
}

/// One health listing: the answer's body (a JSON array of entries, split and decoded by
/// the caller: `feed/entries.rs`) and the `X-Consul-Index` it was read at.
pub(crate) struct HealthListing {
    pub(crate) body: Vec<u8>,
    pub(crate) index: u64,
}

/// What a client learnt about its agent, shared by its clones.
struct Learnt {
    /// The ACL state found by the first check.
    acl: Mutex<Option<AclState>>,
    /// The agent's node name (`None` inside: the token may not read it).
    node: Mutex<Option<Option<Arc<str>>>>,
    /// Bumped by the `drop_connections` test hook: watches reconnect.
    generation: watch::Sender<u64>,
    /// The last failed liveness ping, sent on every failure (see [`Agent::lost`]).
    outage: watch::Sender<Option<Arc<ConsulError>>>,
    /// Whether the liveness pinger runs.
    pinging: Mutex<bool>,
    /// Held while the ACL state is being checked.
    checking: tokio::sync::Mutex<()>,
}

/// The two HTTP clients of an agent: separate pools, so that the idle connections each
/// keeps are bounded by its own budget.
#[derive(Clone)]
struct Pools {
    control: reqwest::Client,
    watch: reqwest::Client,
}

impl Pools {
    fn new(config: &ConsulConfig, budget: &ConnectionBudget) -> Result<Self> {
        Ok(Self {
            control: build_http(config, budget.control_connections, Duration::from_secs(30))?,
            // Watch reads come in bursts (listings, reads after a change signal); their
            // connections are not kept long against the agent's per-client limit, and
            // dropped watches leave nothing open for long (`dropped_watches_are_released`
            // counts the agent's connections).
            watch: build_http(config, budget.watch_reads, Duration::from_secs(3))?,
        })
    }
}

/// Which pool a request goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    Control,
    Watch,
}

/// Which budget a non-blocking read is made in (see `budget.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Registrations, heartbeats and every request that is not a watch's.
    Control,
    /// A watch's non-blocking read.
    Watch,
    /// A watch that holds a per-service permit (its connection) reads with it.
    Held,
}

/// The agent's HTTP API. Cheap to clone; clones share the connection pool and what was
/// learnt about the agent.
#[derive(Clone)]
pub(crate) struct Agent {
    /// The connection pools: control requests, and watches' (see `budget.rs`).
    http: Arc<RwLock<Pools>>,
    /// To build fresh HTTP clients (sized by the agent's limit; the `drop_connections`
    /// test hook).
    config: Arc<ConsulConfig>,
    base: Arc<str>,
    datacenter: Option<Arc<str>>,
    has_token: bool,
    timeout: Duration,
    connect_timeout: Duration,
    lanes: Arc<Lanes>,
    learnt: Arc<Learnt>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("base", &self.base)
            .field("datacenter", &self.datacenter)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// A client as configured; fails only on bad TLS material.
    pub(crate) fn new(config: &ConsulConfig) -> Result<Self> {
        let lanes = Lanes::new(config.watch_share_percent);
        Ok(Self {
            http: Arc::new(RwLock::new(Pools::new(config, &lanes.budget())?)),
            config: Arc::new(config.clone()),
            base: config.base_url().into(),
            datacenter: config.datacenter.as_deref().map(Arc::from),
            has_token: config.token.is_some(),
            timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            lanes: Arc::new(lanes),
            learnt: Arc::new(Learnt {
                acl: Mutex::new(None),
                node: Mutex::new(None),
                generation: watch::Sender::new(0),
                outage: watch::Sender::new(None),
                pinging: Mutex::new(false),
                checking: tokio::sync::Mutex::new(()),
            }),
        })
    }

    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    /// **Test hook.** Drops the pooled connections (a fresh HTTP client) and makes every
    /// watch of this client reconnect.
    pub(crate) fn drop_connections(&self) {
        match Pools::new(&self.config, &self.budget()) {
            Ok(http) => *self.http.write().unwrap_or_else(|p| p.into_inner()) = http,
            Err(e) => tracing::warn!("consul: cannot rebuild the HTTP client: {e}"),
        }
        self.learnt.generation.send_modify(|g| *g += 1);
    }

    /// Follows [`Agent::drop_connections`].
    pub(crate) fn generation(&self) -> watch::Receiver<u64> {
        self.learnt.generation.subscribe()
    }

    /// The configured retry backoff.
    pub(crate) fn backoff(&self) -> waypost_core::backend::BackoffOptions {
        self.config.backoff()
    }

    /// How this client's connections are split.
    pub(crate) fn budget(&self) -> ConnectionBudget {
        self.lanes.budget()
    }

    /// The client's budget lanes.
    pub(crate) fn lanes(&self) -> &Lanes {
        &self.lanes
    }
}

/// One answer of the agent, whatever its status.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    /// The `X-Consul-Index` header, if the answer has one.
    pub(crate) index: Option<u64>,
}

impl Reply {
    /// The body and the `X-Consul-Index` of a `2xx` answer; any other status is an error.
    fn checked(self, op: &'static str) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
        if !(200..300).contains(&self.status) {
            return Err(ConsulError::status(op, self.status, &self.body));
        }
        Ok((self.body, self.index))
    }
}

impl Agent {
    /// Sends one request; returns the status-checked body and the `X-Consul-Index`.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        pool: Pool,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
        self.request_in(pool, op, method, path, query, body, timeout)
            .await?
            .checked(op)
    }

    #[allow(clippy::too_many_arguments)]
    async fn request_in(
        &self,
        pool: Pool,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Reply, ConsulError> {
        let http = {
            let pools = self.http.read().unwrap_or_else(|p| p.into_inner());
            match pool {
                Pool::Control => pools.control.clone(),
                Pool::Watch => pools.watch.clone(),
            }
        };
        let mut req = http
            .request(method, format!("{}{}", self.base, path))
            .timeout(timeout);
        let mut q: Vec<(&str, String)> = query.to_vec();
        // Which datacenters exist, and whether the agent answers, are the local agent's.
        let local = path == "/v1/catalog/datacenters" || path.starts_with("/v1/status/");
        if let (Some(dc), false) = (&self.datacenter, local) {
            q.push(("dc", dc.to_string()));
        }
        if !q.is_empty() {
            req = req.query(&q);
        }
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let transport = |source: reqwest::Error| ConsulError::Transport {
            op,
            after: if source.is_connect() {
                self.connect_timeout
            } else {
                timeout
            },
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = resp.bytes().await.map_err(transport)?;
        Ok(Reply {
            status: status.as_u16(),
            body: bytes.to_vec(),
            index,
        })
    }

    /// One request within the request timeout and the in-flight limit of the control
    /// lane; returns the answer whatever its status.
    pub(crate) async fn request_limited(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ConsulError> {
        self.request_lane(Lane::Control, op, method, path, query, body)
            .await
    }

    async fn send_limited(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
        self.request_lane(Lane::Control, op, method, path, query, body)
            .await?
            .checked(op)
    }

    /// One request within the request timeout, the budget of `lane` and its pool;
    /// returns the answer whatever its status.
    async fn request_lane(
        &self,
        lane: Lane,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ConsulError> {
        let sem = match lane {
            Lane::Control => Some(&self.lanes.control),
            Lane::Watch => Some(&self.lanes.reads),
            Lane::Held => None,
        };
        let _permit = match sem {
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        let pool = if lane == Lane::Control {
            Pool::Control
        } else {
            Pool::Watch
        };
        self.request_in(pool, op, method, path, query, body, self.timeout)
            .await
    }
}
