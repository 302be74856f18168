//! A thin typed client of the few Consul agent endpoints waypost needs, and what one
//! client learns about its agent (ACL state, node name).
//!
//! The ACL token travels only in the `X-Consul-Token` header, marked sensitive; it is
//! never put in a URL, a log line, a `Debug` output or an error.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::watch;

use crate::budget::{ConnectionBudget, Lanes};
use waypost_core::backend::Entry;
use waypost_core::{Error, Instance, Result, ServiceName};

use crate::codec::{AgentService, HealthEntry, Registration};
use crate::config::ConsulConfig;
use crate::error::ConsulError;

/// What `GET /v1/acl/token/self` says about our token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclState {
    /// The agent has no ACLs: everything is readable.
    Disabled,
    /// ACLs are on and the token is valid.
    Valid,
}

/// One health listing: the entries (raw, decoded one by one by the caller) and the
/// `X-Consul-Index` they were read at.
pub(crate) struct HealthListing {
    pub(crate) entries: Vec<serde_json::Value>,
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
            control: build_http(config, budget.control_connections)?,
            watch: build_http(config, budget.watch_reads)?,
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
    /// To build a fresh HTTP client (the `drop_connections` test hook).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
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

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidConfig {
        message: format!(
            "consul option `{what}`: cannot read {}: {e}",
            path.display()
        ),
    })
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

    /// The request timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How this client's connections are split.
    pub(crate) fn budget(&self) -> ConnectionBudget {
        self.lanes.budget()
    }

    /// The client's budget lanes.
    pub(crate) fn lanes(&self) -> &Lanes {
        &self.lanes
    }

    /// Resolves when the agent stops answering: a paused agent accepts connections and
    /// never answers, so a blocking query alone would only notice after its whole wait.
    /// One pinger per client (every `request_timeout`, at least 500 ms) serves every
    /// waiter, in the watch budget; it stops when nobody waits.
    pub(crate) async fn lost(&self) -> Error {
        let mut rx = self.learnt.outage.subscribe();
        rx.borrow_and_update();
        self.start_pinger();
        loop {
            if rx.changed().await.is_err() {
                return Error::unavailable("consul: the client is gone");
            }
            if let Some(e) = rx.borrow_and_update().clone() {
                return Error::Unavailable {
                    message: "consul agent does not answer".into(),
                    source: Some(Box::new(e)),
                };
            }
        }
    }

    fn start_pinger(&self) {
        let mut running = self
            .learnt
            .pinging
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *running {
            return;
        }
        *running = true;
        let agent = self.clone();
        let every = self.timeout.max(Duration::from_millis(500));
        tokio::spawn(async move {
            let outage = &agent.learnt.outage;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = outage.closed() => {}
                }
                if outage.receiver_count() == 0 {
                    let mut running = agent
                        .learnt
                        .pinging
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if outage.receiver_count() == 0 {
                        *running = false;
                        return;
                    }
                    continue;
                }
                // Outside the control budget: one of the watch share's reserved connections.
                let r = agent
                    .send(
                        Pool::Watch,
                        "ping",
                        Method::GET,
                        "/v1/status/leader",
                        &[],
                        None,
                        agent.timeout,
                    )
                    .await;
                match r {
                    Ok(_) => {
                        outage.send_if_modified(|o| o.take().is_some());
                    }
                    Err(e) => {
                        outage.send_replace(Some(Arc::new(e)));
                    }
                }
            }
        });
    }
}

/// The HTTP client of `config`, keeping at most `max_idle` idle connections (more are
/// closed as they come back); fails only on bad TLS material.
fn build_http(config: &ConsulConfig, max_idle: usize) -> Result<reqwest::Client> {
    let mut headers = HeaderMap::new();
    if let Some(token) = &config.token {
        let mut v = HeaderValue::from_str(token.expose()).map_err(|_| {
            Error::invalid_config("consul option `token` is not a valid header value")
        })?;
        v.set_sensitive(true);
        headers.insert("X-Consul-Token", v);
    }
    let mut b = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(config.connect_timeout)
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle)
        .tcp_nodelay(true)
        .user_agent(concat!("waypost-consul/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &config.ca_file {
        let pem = read_pem("ca_file", ca)?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::invalid_config(format!(
                "consul option `ca_file`: not PEM certificates: {e}"
            ))
        })? {
            b = b.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        let mut pem = read_pem("cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read_pem("key_file", key)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Error::invalid_config(format!(
                "consul options `cert_file`/`key_file`: not a PEM certificate and key: {e}"
            ))
        })?;
        b = b.identity(id);
    }
    b.build().map_err(|e| Error::InvalidConfig {
        message: format!("consul: cannot build the HTTP client: {e}"),
    })
}

/// One answer of the agent, whatever its status.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    /// The `X-Consul-Index` header, if the answer has one.
    pub(crate) index: Option<u64>,
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
        let reply = self
            .request_in(pool, op, method, path, query, body, timeout)
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(ConsulError::status(op, reply.status, &reply.body));
        }
        Ok((reply.body, reply.index))
    }

    /// Sends one request within `timeout` (outside the in-flight limit: for blocking
    /// queries); returns the answer whatever its status.
    pub(crate) async fn request(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Reply, ConsulError> {
        self.request_in(Pool::Control, op, method, path, query, body, timeout)
            .await
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

    /// Runs one `PUT /v1/txn` of `body` (a JSON array of operations): `Ok(Ok(kvs))` with
    /// the `KV` of each result when applied, `Ok(Err(why))` when a check failed (`409`:
    /// nothing was written). A refused ACL token is [`Error::Unauthorized`] naming `what`
    /// was written (a KV write, a lock).
    pub(crate) async fn txn<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        body: Vec<u8>,
        what: &str,
    ) -> Result<std::result::Result<Vec<T>, String>> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct TxnReply<T> {
            #[serde(default = "Option::default")]
            results: Option<Vec<TxnResult<T>>>,
            #[serde(default)]
            errors: Option<Vec<TxnError>>,
        }
        #[derive(serde::Deserialize)]
        struct TxnResult<T> {
            #[serde(rename = "KV", default = "Option::default")]
            kv: Option<T>,
        }
        #[derive(serde::Deserialize)]
        struct TxnError {
            #[serde(rename = "What", default)]
            what: String,
        }
        let reply = self
            .request_limited(op, Method::PUT, "/v1/txn", &[], Some(body))
            .await?;
        if !matches!(reply.status, 200 | 409) {
            return Err(ConsulError::status(op, reply.status, &reply.body).into());
        }
        let parsed: TxnReply<T> = serde_json::from_slice(&reply.body)
            .map_err(|source| ConsulError::Decode { op, source })?;
        if reply.status == 200 {
            return Ok(Ok(parsed
                .results
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.kv)
                .collect()));
        }
        let why: Vec<String> = parsed
            .errors
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.what)
            .collect();
        let why = why.join("; ");
        if why.contains("Permission denied") {
            return Err(Error::Unauthorized {
                message: format!("the consul agent refused the ACL token for {what}: {why}"),
                source: None,
            });
        }
        Ok(Err(why))
    }

    /// `GET path` with `query`. With `block = Some((index, wait))`, a blocking query past
    /// `index` for up to `wait`, under its own deadline (the wait, Consul's jitter of up to
    /// wait/16, and the request timeout); else a plain read within the request timeout and
    /// the in-flight limit.
    pub(crate) async fn get_blocking(
        &self,
        op: &'static str,
        path: &str,
        mut query: Vec<(&'static str, String)>,
        block: Option<(u64, Duration)>,
    ) -> Result<Reply, ConsulError> {
        match block {
            Some((index, wait)) => {
                query.push(("index", index.to_string()));
                query.push(("wait", format!("{}ms", wait.as_millis())));
                let timeout = wait + wait / 16 + self.timeout();
                self.request(op, Method::GET, path, &query, None, timeout)
                    .await
            }
            None => {
                self.request_limited(op, Method::GET, path, &query, None)
                    .await
            }
        }
    }

    /// [`Agent::request`] within the request timeout and the in-flight limit.
    pub(crate) async fn request_limited(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ConsulError> {
        let _permit = self.lanes.control.acquire().await.ok();
        self.request(op, method, path, query, body, self.timeout)
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
        self.send_in(Lane::Control, op, method, path, query, body)
            .await
    }

    /// [`Agent::send`] within the request timeout and the budget of `lane`.
    async fn send_in(
        &self,
        lane: Lane,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
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
        self.send(pool, op, method, path, query, body, self.timeout)
            .await
    }

    /// A blocking `GET path?index=..&wait=..` (the change signal of shared watches), in
    /// the watch share's reserved connections: the body and the `X-Consul-Index`.
    pub(crate) async fn blocking_get(
        &self,
        op: &'static str,
        path: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<u8>, u64), ConsulError> {
        let query = [
            ("index", index.to_string()),
            ("wait", format!("{}ms", wait.as_millis())),
        ];
        let timeout = wait + wait / 16 + self.timeout;
        let (body, index) = self
            .send(Pool::Watch, op, Method::GET, path, &query, None, timeout)
            .await?;
        let index = index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        Ok((body, index))
    }

    /// `PUT /v1/agent/service/register`. The agent syncs it to the catalog before it
    /// answers (Consul's agent endpoints call `syncChanges`).
    pub(crate) async fn register(&self, reg: &Registration) -> Result<(), ConsulError> {
        let body = serde_json::to_vec(reg).map_err(|source| ConsulError::Decode {
            op: "register",
            source,
        })?;
        self.send_limited(
            "register",
            Method::PUT,
            "/v1/agent/service/register",
            &[],
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// `PUT /v1/agent/service/deregister/{id}`; an unknown id is fine.
    pub(crate) async fn deregister(&self, service_id: &str) -> Result<(), ConsulError> {
        match self
            .send_limited(
                "deregister",
                Method::PUT,
                &format!("/v1/agent/service/deregister/{service_id}"),
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_unknown_check() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/agent/check/pass/{check_id}`.
    pub(crate) async fn pass(&self, check_id: &str) -> Result<(), ConsulError> {
        self.send_limited(
            "heartbeat",
            Method::PUT,
            &format!("/v1/agent/check/pass/{check_id}"),
            &[],
            None,
        )
        .await
        .map(|_| ())
    }

    /// `GET /v1/health/service/{name}?passing=true`, blocking when `block` is
    /// `Some((index, wait))` (outside the lanes: the caller holds a dedicated watch
    /// permit), else a read in `lane`.
    pub(crate) async fn health(
        &self,
        service: &ServiceName,
        block: Option<(u64, Duration)>,
        lane: Lane,
    ) -> Result<HealthListing, ConsulError> {
        let op = "health query";
        let path = format!("/v1/health/service/{service}");
        let mut query = vec![("passing", "true".to_string())];
        let (body, index) = match block {
            Some((index, wait)) => {
                query.push(("index", index.to_string()));
                query.push(("wait", format!("{}ms", wait.as_millis())));
                // Consul adds up to wait/16 of its own jitter.
                let timeout = wait + wait / 16 + self.timeout;
                self.send(Pool::Watch, op, Method::GET, &path, &query, None, timeout)
                    .await?
            }
            None => {
                self.send_in(lane, op, Method::GET, &path, &query, None)
                    .await?
            }
        };
        let index = index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })?;
        Ok(HealthListing { entries, index })
    }

    /// `GET /v1/catalog/services`: the names of every service in the catalog of the
    /// configured datacenter (sorted), read like the health queries (the token, the `dc`,
    /// Consul's default consistency), within the request timeout. Names that are not valid
    /// [`ServiceName`]s (Consul accepts spaces, `:`, `/`, 200 bytes...) are skipped with a
    /// debug line. Consul's own `consul` service (the servers) is listed: it is a valid
    /// name, and a watcher can watch it like any other.
    pub(crate) async fn services(&self) -> Result<Vec<ServiceName>, ConsulError> {
        let op = "list services";
        let (body, _) = self
            .send_limited(op, Method::GET, "/v1/catalog/services", &[], None)
            .await?;
        // `{"name": ["tag", ...], ...}`: only the names matter.
        let listed: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })?;
        let mut names: Vec<ServiceName> = listed
            .into_keys()
            .filter_map(|name| match ServiceName::new(&name) {
                Ok(n) => Some(n),
                Err(why) => {
                    tracing::debug!(service = %name.escape_debug(), "consul: skipping a catalog service whose name is not a service name: {why}");
                    None
                }
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Decodes the entries of a listing, keyed `{node}/{service id}`, skipping (with a
    /// warning) what is not a valid instance of `service`.
    pub(crate) fn decode(
        service: &ServiceName,
        entries: Vec<serde_json::Value>,
    ) -> Vec<Entry<Instance>> {
        entries
            .into_iter()
            .filter_map(|v| {
                let entry: HealthEntry = match serde_json::from_value(v) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(%service, "consul: skipping a malformed health entry: {e}");
                        return None;
                    }
                };
                let sid = entry.service.id.clone();
                let key = crate::codec::entry_key(entry.node.as_ref().map_or("", |n| &n.name), &sid);
                match crate::codec::decode(entry, service) {
                    Ok(item) => Some(Entry { key, item }),
                    Err(why) => {
                        tracing::warn!(%service, service_id = %sid.escape_debug(), "consul: skipping an entry that is not a valid instance: {why}");
                        None
                    }
                }
            })
            .collect()
    }

    /// `GET /v1/agent/service/{id}`: the agent's local service, `None` if it has none.
    pub(crate) async fn service(
        &self,
        service_id: &str,
    ) -> Result<Option<AgentService>, ConsulError> {
        let op = "read agent service";
        match self
            .send_limited(
                op,
                Method::GET,
                &format!("/v1/agent/service/{service_id}"),
                &[],
                None,
            )
            .await
        {
            Ok((body, _)) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|source| ConsulError::Decode { op, source }),
            Err(ConsulError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The agent's node name (`GET /v1/agent/self`, once), or `None` when the agent does
    /// not say (a token without `agent:read`). The same read sizes the connection budget
    /// by the agent's `http_max_conns_per_client` (`DebugConfig`).
    pub(crate) async fn node_name(&self) -> Option<Arc<str>> {
        if let Some(known) = self
            .learnt
            .node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return known;
        }
        #[derive(serde::Deserialize)]
        struct SelfInfo {
            #[serde(rename = "Config")]
            config: SelfConfig,
            #[serde(rename = "DebugConfig", default)]
            debug: Option<DebugConfig>,
        }
        #[derive(serde::Deserialize)]
        struct SelfConfig {
            #[serde(rename = "NodeName")]
            node_name: String,
        }
        #[derive(serde::Deserialize)]
        struct DebugConfig {
            #[serde(rename = "HTTPMaxConnsPerClient", default)]
            max_conns: Option<usize>,
        }
        let op = "read agent self";
        let found = match self
            .send_limited(op, Method::GET, "/v1/agent/self", &[], None)
            .await
        {
            Ok((body, _)) => match serde_json::from_slice::<SelfInfo>(&body) {
                Ok(info) => {
                    match info.debug.and_then(|d| d.max_conns) {
                        Some(limit) => {
                            self.lanes.resize(limit);
                            match Pools::new(&self.config, &self.budget()) {
                                Ok(p) => *self.http.write().unwrap_or_else(|p| p.into_inner()) = p,
                                Err(e) => tracing::warn!("consul: cannot rebuild the HTTP clients: {e}"),
                            }
                        }
                        None => tracing::debug!(
                            "consul: the agent does not say its http_max_conns_per_client; assuming {}",
                            crate::budget::DEFAULT_AGENT_LIMIT
                        ),
                    }
                    Some(Arc::from(info.config.node_name))
                }
                Err(e) => {
                    tracing::debug!("consul: the agent's node name is unknown: {e}");
                    None
                }
            },
            // Unreachable now: ask again next time.
            Err(e) if e.is_transport() => return None,
            Err(e) => {
                tracing::debug!("consul: the agent's node name is unknown: {e}");
                None
            }
        };
        *self.learnt.node.lock().unwrap_or_else(|p| p.into_inner()) = Some(found.clone());
        found
    }

    /// Makes sure reads are authorized before trusting an answer: with ACLs on, an
    /// unauthorized health query answers `200 []`, which must not pass for "no instances".
    /// `fresh` re-checks instead of using the cached result.
    pub(crate) async fn check_read_access(&self, fresh: bool) -> Result<AclState> {
        let cached = || *self.learnt.acl.lock().unwrap_or_else(|p| p.into_inner());
        if !fresh {
            if let Some(s) = cached() {
                return Ok(s);
            }
        }
        // One check at a time: hundreds of watches starting together make one request.
        let _one = self.learnt.checking.lock().await;
        if !fresh {
            if let Some(s) = cached() {
                return Ok(s);
            }
        }
        match self.acl_state().await {
            Ok(s) => {
                *self.learnt.acl.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                Ok(s)
            }
            Err(ConsulError::Status { status: 403, .. }) if !self.has_token => {
                Err(Error::Unauthorized {
                    message: "the consul agent has ACLs enabled and no `token` is configured: \
                              it would answer every health query with an empty list"
                        .into(),
                    source: None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `GET /v1/status/leader`: is the agent alive and serving? Needs no ACL.
    pub(crate) async fn ping(&self) -> Result<(), ConsulError> {
        self.send_limited("ping", Method::GET, "/v1/status/leader", &[], None)
            .await
            .map(|_| ())
    }

    /// `GET /v1/catalog/datacenters`: the datacenters the agent knows. Needs no ACL.
    pub(crate) async fn datacenters(&self) -> Result<Vec<String>, ConsulError> {
        let op = "list datacenters";
        let (body, _) = self
            .send_limited(op, Method::GET, "/v1/catalog/datacenters", &[], None)
            .await?;
        serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })
    }

    /// `GET /v1/acl/token/self`: whether ACLs are on and our token valid. The body (which
    /// echoes the secret) is dropped unread.
    pub(crate) async fn acl_state(&self) -> Result<AclState, ConsulError> {
        match self
            .send_limited(
                "ACL token check",
                Method::GET,
                "/v1/acl/token/self",
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(AclState::Valid),
            Err(ConsulError::Status { status, body, .. })
                if status == StatusCode::UNAUTHORIZED.as_u16()
                    && body.contains("ACL support disabled") =>
            {
                Ok(AclState::Disabled)
            }
            Err(e) => Err(e),
        }
    }
}
