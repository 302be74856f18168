//! A thin typed client of the few Consul agent endpoints waypost needs.
//!
//! The ACL token travels only in the `X-Consul-Token` header, marked sensitive; it is
//! never put in a URL, a log line, a `Debug` output or an error.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;
use waypost_core::{Error, Result, ServiceName};

use crate::codec::{HealthEntry, Registration};
use crate::config::ConsulConfig;
use crate::error::ConsulError;

/// At most this many non-blocking requests of one client are in flight at once: the agent
/// limits connections per client address (`http_max_conns_per_client`, 200 by default).
const MAX_IN_FLIGHT: usize = 32;

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
pub(crate) struct Listing {
    pub(crate) entries: Vec<serde_json::Value>,
    pub(crate) index: u64,
}

/// The agent's HTTP API.
#[derive(Clone)]
pub(crate) struct Agent {
    http: reqwest::Client,
    base: Arc<str>,
    datacenter: Option<Arc<str>>,
    timeout: Duration,
    connect_timeout: Duration,
    limit: Arc<Semaphore>,
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
        let mut headers = HeaderMap::new();
        if let Some(token) = &config.token {
            let mut v = HeaderValue::from_str(token).map_err(|_| {
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
        let http = b.build().map_err(|e| Error::InvalidConfig {
            message: format!("consul: cannot build the HTTP client: {e}"),
        })?;
        Ok(Self {
            http,
            base: config.base_url().into(),
            datacenter: config.datacenter.as_deref().map(Arc::from),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            limit: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Sends one request; returns the status-checked body and the `X-Consul-Index`.
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
        let mut req = self
            .http
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
        if !status.is_success() {
            return Err(ConsulError::status(op, status.as_u16(), &bytes));
        }
        Ok((bytes.to_vec(), index))
    }

    async fn send_limited(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Option<u64>), ConsulError> {
        let _permit = self.limit.acquire().await.ok();
        self.send(op, method, path, query, body, self.timeout).await
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
        self.send_limited(
            "deregister",
            Method::PUT,
            &format!("/v1/agent/service/deregister/{service_id}"),
            &[],
            None,
        )
        .await
        .map(|_| ())
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
    /// `Some((index, wait))`.
    pub(crate) async fn health(
        &self,
        service: &ServiceName,
        block: Option<(u64, Duration)>,
    ) -> Result<Listing, ConsulError> {
        let op = "health query";
        let path = format!("/v1/health/service/{service}");
        let mut query = vec![("passing", "true".to_string())];
        let (body, index) = match block {
            Some((index, wait)) => {
                query.push(("index", index.to_string()));
                query.push(("wait", format!("{}ms", wait.as_millis())));
                // Consul adds up to wait/16 of its own jitter.
                let timeout = wait + wait / 16 + self.timeout;
                self.send(op, Method::GET, &path, &query, None, timeout)
                    .await?
            }
            None => {
                self.send_limited(op, Method::GET, &path, &query, None)
                    .await?
            }
        };
        let index = index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })?;
        Ok(Listing { entries, index })
    }

    /// Decodes the entries of a listing, skipping (with a warning) what is not a valid
    /// instance of `service`.
    pub(crate) fn decode(
        service: &ServiceName,
        entries: Vec<serde_json::Value>,
    ) -> Vec<waypost_core::Instance> {
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
                match crate::codec::decode(entry, service) {
                    Ok(i) => Some(i),
                    Err(why) => {
                        tracing::warn!(%service, service_id = %sid.escape_debug(), "consul: skipping an entry that is not a valid instance: {why}");
                        None
                    }
                }
            })
            .collect()
    }

    /// `GET /v1/status/leader`: is the agent alive and serving? Needs no ACL.
    pub(crate) async fn ping(&self) -> Result<(), ConsulError> {
        self.send(
            "ping",
            Method::GET,
            "/v1/status/leader",
            &[],
            None,
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    /// `GET /v1/catalog/datacenters`: the datacenters the agent knows. Needs no ACL.
    pub(crate) async fn datacenters(&self) -> Result<Vec<String>, ConsulError> {
        let op = "list datacenters";
        let (body, _) = self
            .send(
                op,
                Method::GET,
                "/v1/catalog/datacenters",
                &[],
                None,
                self.timeout,
            )
            .await?;
        serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { op, source })
    }

    /// `GET /v1/acl/token/self`: whether ACLs are on and our token valid. The body (which
    /// echoes the secret) is dropped unread.
    pub(crate) async fn acl_state(&self) -> Result<AclState, ConsulError> {
        match self
            .send(
                "ACL token check",
                Method::GET,
                "/v1/acl/token/self",
                &[],
                None,
                self.timeout,
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
