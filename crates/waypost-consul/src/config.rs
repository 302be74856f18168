//! [`ConsulConfig`]: the agent's address, datacenter, ACL token, TLS, TTL and timeouts, from
//! a `consul://` URL or a serde config.

mod builder;
mod validate;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::backend::BackoffOptions;
use waypost_core::config::{self, de, Config, UrlParts};
use waypost_core::kv::ConfigKey;
use waypost_core::{Error, Result, Secret};

/// The default agent port.
pub const DEFAULT_PORT: u16 = 8500;
/// Consul's floor for `DeregisterCriticalServiceAfter`: smaller values are raised to it by
/// the agent.
pub const MIN_DEREGISTER_CRITICAL_AFTER: Duration = Duration::from_secs(60);
/// The longest blocking-query wait Consul honours.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// How to reach a Consul agent and how to register with it.
///
/// From a URL, `consul://HOST[:PORT][?OPTION=VALUE&...]` (`consuls://` for HTTPS), or from
/// a serde config with the same option names beside `backend = "consul"`:
///
/// | option | default | meaning |
/// | --- | --- | --- |
/// | `address` (or `endpoints`) | `127.0.0.1:8500` | the agent's HTTP(S) address (the URL's host and port); `endpoints` takes one `host:port` or a list of one |
/// | `tls` | `false` (`true` for `consuls://`) | HTTPS |
/// | `datacenter` (or `dc`) | the agent's | `dc` of every query and registration |
/// | `token` | none | ACL token, sent as `X-Consul-Token`; never logged or shown |
/// | `ca_file` | OS trust store | PEM CA certificate(s) trusted for the agent |
/// | `cert_file`, `key_file` | none | PEM client certificate and key (both or neither) |
/// | `ttl` | `10s` | TTL of each instance's check; heartbeats every third of it |
/// | `deregister_critical_after` | `1m` | `DeregisterCriticalServiceAfter` (Consul's floor is 1m) |
/// | `wait` | `60s` | blocking-query wait (at most 10m), jittered down by up to 10 % |
/// | `request_timeout` (or `timeout`) | `10s` | every non-blocking request; also how often a blocking watch checks the agent is alive |
/// | `connect_timeout` | `5s` | TCP/TLS connect |
/// | `backoff_initial` | `100ms` | first delay before a retry (heartbeat, re-registration, watch) |
/// | `backoff_max` | a third of `ttl`, at most `5s` | longest delay between two retries (jittered, doubling, no cap on attempts) |
/// | `http_check` | none | an HTTP check the agent runs beside the TTL check: a path (`/health`, checked at `http://{host}:{port}{path}` of the instance) or an `http(s)://` URL template (`{host}`, `{port}` are replaced) |
/// | `tcp_check` | `false` | a TCP check the agent runs beside the TTL check: connects to the instance's `host:port` |
/// | `check_interval` | `10s` | how often the agent runs `http_check` / `tcp_check` |
/// | `check_timeout` | `5s` | timeout of each agent-run check (at most `check_interval`) |
/// | `config_prefix` | `config` | KV prefix of configuration keys: key `a/b` is KV key `config/a/b` (a configuration key itself: no leading or trailing `/`) |
/// | `coord_prefix` | `coord` | KV prefix of locks and elections: name `a/b` is the lock key `coord/a/b/.lock` (`consul lock coord/a/b` takes the same lock); validated like `config_prefix` |
/// | `lock_delay` | `1s` | `LockDelay` of the coordination session (0 to 60s): how long Consul refuses to hand a lock on after the session was invalidated |
/// | `read_back_every` | `1` | the client reads its registrations back from the agent (`GET /v1/agent/services`, which costs the agent in proportion to its services) every this many keep-alive rounds (1 to 10), and at once when the agent lost the heartbeat; a registration deleted behind the client's back comes back within this many rounds |
/// | `watch_share_percent` | `50` | share (1 to 90 %) of the agent's `http_max_conns_per_client` that watches may use; registrations and heartbeats keep their own connections (see the crate docs, "Many watched services") |
///
/// Agent-run checks start **passing** when an instance is registered (so `register`
/// returning still means a watcher lists it) and leave watches at the first failing run,
/// within `check_interval` + `check_timeout`; see the crate docs for the trade-off.
///
/// The options every backend shares have the same names on every registry: `endpoints`
/// (here: the one agent), `connect_timeout`, `request_timeout`, `backoff_initial`,
/// `backoff_max`, `tls`, `ca_file`, `cert_file`, `key_file`. The old names `timeout` and
/// `dc` are still accepted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsulConfig {
    /// The agent's `host:port`. Also read from the key `endpoints` (one `host:port`, or a
    /// list of one: a client talks to one agent).
    #[serde(alias = "endpoints", deserialize_with = "de_address")]
    pub address: String,
    /// HTTPS instead of HTTP.
    #[serde(deserialize_with = "de::boolean")]
    pub tls: bool,
    /// The datacenter; the agent's own when `None`.
    #[serde(alias = "dc")]
    pub datacenter: Option<String>,
    /// The ACL token. Never shown by `Debug`, logs or errors, and never serialized.
    #[serde(skip_serializing)]
    pub token: Option<Secret>,
    /// PEM file of CA certificates to trust (besides the OS store).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for agents with `verify_incoming`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// TTL of each instance's health check.
    #[serde(with = "waypost_core::config::duration")]
    pub ttl: Duration,
    /// `DeregisterCriticalServiceAfter`: how long Consul keeps a crashed instance (not
    /// passing, so not watched) before removing it.
    #[serde(with = "waypost_core::config::duration")]
    pub deregister_critical_after: Duration,
    /// Blocking-query wait.
    #[serde(with = "waypost_core::config::duration")]
    pub wait: Duration,
    /// Timeout of every non-blocking request. Also read from the old key `timeout`.
    #[serde(alias = "timeout", with = "waypost_core::config::duration")]
    pub request_timeout: Duration,
    /// Connect timeout.
    #[serde(with = "waypost_core::config::duration")]
    pub connect_timeout: Duration,
    /// The first delay before retrying after a failure (a heartbeat, re-registration,
    /// reconnecting a watch). 100 ms by default.
    #[serde(with = "waypost_core::config::duration")]
    pub backoff_initial: Duration,
    /// The longest delay between two retries (jittered, doubling, no cap on attempts).
    /// When unset: a third of `ttl`, at most 5 s.
    #[serde(
        with = "waypost_core::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_max: Option<Duration>,
    /// An HTTP check the agent runs on each instance, beside the TTL check: a path such
    /// as `/health` (the agent requests `http://{host}:{port}{path}` of the instance) or
    /// a full `http://`/`https://` URL in which `{host}` and `{port}` are replaced by the
    /// instance's. 2xx passes; anything else (429 is a warning) takes the instance out of
    /// watches, which list only instances whose checks all pass.
    pub http_check: Option<String>,
    /// A TCP check the agent runs on each instance, beside the TTL check: it passes while
    /// the agent can connect to the instance's `host:port`.
    #[serde(deserialize_with = "de::boolean")]
    pub tcp_check: bool,
    /// How often the agent runs `http_check` / `tcp_check`.
    #[serde(with = "waypost_core::config::duration")]
    pub check_interval: Duration,
    /// The timeout of each run of `http_check` / `tcp_check`; at most `check_interval`.
    #[serde(with = "waypost_core::config::duration")]
    pub check_timeout: Duration,
    /// Where configuration keys live in the KV store: key `a/b` is the KV key
    /// `{config_prefix}/a/b`. See the crate docs, "Configuration keys".
    pub config_prefix: ConfigKey,
    /// Where locks and elections live in the KV store: name `a/b` is the lock key
    /// `{coord_prefix}/a/b/.lock`. See the crate docs, "Locks and elections".
    pub coord_prefix: ConfigKey,
    /// The `LockDelay` of the session locks and leaderships are bound to: after Consul
    /// invalidated it (not after a release), nobody acquires its locks for this long.
    #[serde(with = "waypost_core::config::duration")]
    pub lock_delay: Duration,
    /// The share, in percent (1 to 90), of the agent's per-client connection limit
    /// (`http_max_conns_per_client`, read at connect; 200 when the agent does not say)
    /// that watches may use. See the crate docs, "Many watched services".
    #[serde(deserialize_with = "de::number")]
    pub watch_share_percent: u8,
    /// Read the client's registrations back from the agent every this many keep-alive
    /// rounds (1 to 10; 1 by default), and at once after the agent lost the client's
    /// heartbeat. See the crate docs, "At 1,000 instances".
    #[serde(deserialize_with = "de::number")]
    pub read_back_every: u8,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            address: format!("127.0.0.1:{DEFAULT_PORT}"),
            tls: false,
            datacenter: None,
            token: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            ttl: Duration::from_secs(10),
            deregister_critical_after: MIN_DEREGISTER_CRITICAL_AFTER,
            wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: None,
            http_check: None,
            tcp_check: false,
            check_interval: Duration::from_secs(10),
            check_timeout: Duration::from_secs(5),
            config_prefix: crate::kv::default_config_prefix(),
            coord_prefix: crate::coord::default_coord_prefix(),
            lock_delay: crate::coord::DEFAULT_LOCK_DELAY,
            watch_share_percent: 50,
            read_back_every: 1,
        }
    }
}

// Hand-written only to redact credentials inside `http_check` URLs; the token is a
// `Secret`.
impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ttl", &self.ttl)
            .field("deregister_critical_after", &self.deregister_critical_after)
            .field("wait", &self.wait)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field(
                "http_check",
                &self.http_check.as_deref().map(config::redact_url),
            )
            .field("tcp_check", &self.tcp_check)
            .field("check_interval", &self.check_interval)
            .field("check_timeout", &self.check_timeout)
            .field("config_prefix", &self.config_prefix)
            .field("coord_prefix", &self.coord_prefix)
            .field("lock_delay", &self.lock_delay)
            .field("watch_share_percent", &self.watch_share_percent)
            .field("read_back_every", &self.read_back_every)
            .finish()
    }
}

/// The schemes: `consul://` (HTTP) and `consuls://` (HTTPS).
pub const SCHEMES: &[&str] = &["consul", "consuls"];

impl ConsulConfig {
    /// Parses `consul://HOST[:PORT][?options]` or `consuls://...`.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&Config::from_url(url))
    }

    /// Builds from a [`Config`]: a URL and/or options (options win over the URL's).
    pub fn from_config(config: &Config) -> Result<Self> {
        let (url, mut options) = config::url_options(
            "consul",
            SCHEMES,
            config,
            UrlParts {
                renamed: RENAMED,
                ..UrlParts::default()
            },
        )?;
        if let Some(u) = &url {
            if u.hosts.len() > 1 {
                return Err(Error::invalid_config(
                    "consul URL takes one agent address: consul://HOST:PORT (talk to your local agent)",
                ));
            }
            if !u.path.is_empty() {
                return Err(Error::invalid_config(format!(
                    "consul URL takes no path, got `{}`",
                    u.path
                )));
            }
            if u.username.is_some() || u.password.is_some() {
                return Err(Error::invalid_config(
                    "consul URL takes no user info; pass the ACL token as the `token` option",
                ));
            }
            if let Some(addr) = u.endpoints(DEFAULT_PORT).into_iter().next() {
                options
                    .entry("address")
                    .or_insert(serde_json::Value::String(addr));
            }
            if u.scheme == "consuls" {
                options
                    .entry("tls")
                    .or_insert(serde_json::Value::Bool(true));
            }
        }
        let c: Self = config::options_into("consul", options)?;
        c.validate()?;
        Ok(c)
    }

    /// The retry backoff of heartbeats, re-registrations and watches: `backoff_initial`
    /// up to `backoff_max`, or up to a third of `ttl` (at most 5 s) when that is unset.
    pub fn backoff(&self) -> BackoffOptions {
        BackoffOptions::new(
            self.backoff_initial,
            self.backoff_max
                .unwrap_or((self.ttl / 3).min(Duration::from_secs(5))),
        )
    }

    /// Whether the agent runs checks of its own (`http_check`, `tcp_check`) on each
    /// instance, beside the TTL check.
    pub fn has_agent_checks(&self) -> bool {
        self.http_check.is_some() || self.tcp_check
    }

    /// The agent's base URL, `http://host:port` or `https://host:port`.
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.address
        )
    }
}

/// Other option names accepted, `(other, ours)`: old names, and shared names of ours.
const RENAMED: &[(&str, &str)] = &[
    ("endpoints", "address"),
    ("timeout", "request_timeout"),
    ("dc", "datacenter"),
];

#[derive(Deserialize)]
#[serde(untagged)]
enum AddressRepr {
    One(String),
    Many(Vec<String>),
}

/// The agent's address: `host:port`, or (as `endpoints`, shared with the other backends)
/// a list of one.
fn de_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let all: Vec<String> = match AddressRepr::deserialize(d)? {
        AddressRepr::One(s) => s
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        AddressRepr::Many(v) => v,
    };
    match <[String; 1]>::try_from(all) {
        Ok([one]) => Ok(one),
        Err(all) => Err(serde::de::Error::custom(format!(
            "a Consul client talks to one agent: give one `host:port` as `address` or `endpoints`, got {}",
            all.len()
        ))),
    }
}

#[cfg(test)]
mod tests;
