//! The agent endpoints waypost calls: registrations, checks, health and catalog reads,
//! the agent's own information, ACL state and transactions.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use waypost_core::{Error, Result, ServiceName};

use super::{AclState, Agent, HealthListing, Lane, Pools};
use crate::codec::{AgentService, Registration};
use crate::error::ConsulError;

impl Agent {
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
        let query = vec![("passing", "true".to_string())];
        let (body, index) = match block {
            Some((index, wait)) => self
                .blocking_query(op, &path, query, index, wait)
                .await?
                .checked(op)?,
            None => self
                .request_lane(lane, op, Method::GET, &path, &query, None)
                .await?
                .checked(op)?,
        };
        let index = index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        Ok(HealthListing { body, index })
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
            // Every waypost client's heartbeat service (`heartbeat.rs`) is bookkeeping.
            .filter(|name| name != crate::codec::HEARTBEAT_SERVICE)
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

    /// `GET /v1/agent/services`: every service of the agent's local state, by ID.
    pub(crate) async fn local_services(
        &self,
    ) -> Result<std::collections::HashMap<String, AgentService>, ConsulError> {
        let op = "read agent services";
        let (body, _) = self
            .send_limited(op, Method::GET, "/v1/agent/services", &[], None)
            .await?;
        serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })
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
