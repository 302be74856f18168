//! [`ConsulConfig`]: the agent's address, datacenter, ACL token, TLS, TTL and timeouts, from
//! a `consul://` URL or a serde config.

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

    /// Checks the values; every message names the option.
    pub fn validate(&self) -> Result<()> {
        if self.address.trim().is_empty() || self.address.contains('/') {
            return Err(Error::invalid_config(format!(
                "consul option `address`: `{}` is not host:port",
                self.address.escape_debug()
            )));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid_config(
                "consul options `cert_file` and `key_file` go together",
            ));
        }
        if !self.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err(Error::invalid_config(
                "consul options `ca_file`/`cert_file` need TLS: use consuls:// or `tls = true`",
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(Error::invalid_config(
                "consul option `ttl` must be at least 1s",
            ));
        }
        if self.wait < Duration::from_secs(1) || self.wait > MAX_WAIT {
            return Err(Error::invalid_config(
                "consul option `wait` must be from 1s to 10m",
            ));
        }
        for (k, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("backoff_initial", self.backoff_initial),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "consul option `{k}` may not be zero"
                )));
            }
        }
        if self.backoff_max.is_some_and(|m| m < self.backoff_initial) {
            return Err(Error::invalid_config(
                "consul option `backoff_max` must be at least `backoff_initial`",
            ));
        }
        self.validate_checks()?;
        if self.lock_delay > crate::coord::MAX_LOCK_DELAY {
            return Err(Error::invalid_config(
                "consul option `lock_delay` must be at most 60s (Consul's limit)",
            ));
        }
        if !(1..=90).contains(&self.watch_share_percent) {
            return Err(Error::invalid_config(
                "consul option `watch_share_percent` must be from 1 to 90",
            ));
        }
        if let Some(dc) = &self.datacenter {
            if dc.is_empty()
                || !dc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(Error::invalid_config(format!(
                    "consul option `datacenter`: `{}` is not a datacenter name",
                    dc.escape_debug()
                )));
            }
        }
        if let Some(t) = self.token.as_ref().map(Secret::expose) {
            if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
                // Never echo the token.
                return Err(Error::invalid_config(
                    "consul option `token` is empty or contains whitespace",
                ));
            }
        }
        Ok(())
    }

    fn validate_checks(&self) -> Result<()> {
        if let Some(h) = &self.http_check {
            let bad = |why: &str| {
                Error::invalid_config(format!(
                    "consul option `http_check`: `{}` {why}",
                    config::redact_url(h).escape_debug()
                ))
            };
            if h.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(bad("contains whitespace or control characters"));
            }
            if let Some((scheme, rest)) = h.split_once("://") {
                if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
                    return Err(bad("is not an http:// or https:// URL"));
                }
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(bad("has no host"));
                }
            } else if !h.starts_with('/') {
                return Err(bad(
                    "is neither a path starting with `/` nor an http(s):// URL",
                ));
            }
        }
        for (k, d) in [
            ("check_interval", self.check_interval),
            ("check_timeout", self.check_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "consul option `{k}` may not be zero"
                )));
            }
        }
        if self.check_timeout > self.check_interval {
            return Err(Error::invalid_config(format!(
                "consul option `check_timeout` ({:?}) may not exceed `check_interval` ({:?})",
                self.check_timeout, self.check_interval
            )));
        }
        Ok(())
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

    /// Sets the agent address (`host:port`).
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// Sets HTTPS.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the datacenter.
    pub fn with_datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Sets the ACL token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
        self
    }

    /// Trusts the CA certificates in this PEM file.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this client certificate and key (PEM files).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Sets the check TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets `DeregisterCriticalServiceAfter`.
    pub fn with_deregister_critical_after(mut self, d: Duration) -> Self {
        self.deregister_critical_after = d;
        self
    }

    /// Sets the blocking-query wait.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the timeout of every non-blocking request.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the request timeout: the old name of
    /// [`with_request_timeout`](Self::with_request_timeout).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_request_timeout(timeout)
    }

    /// Sets the retry backoff bounds (`backoff_initial`, `backoff_max`).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = Some(max.max(initial));
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Adds an HTTP check run by the agent: a path such as `/health`, or an
    /// `http(s)://` URL template with `{host}` and `{port}`.
    pub fn with_http_check(mut self, path_or_url: impl Into<String>) -> Self {
        self.http_check = Some(path_or_url.into());
        self
    }

    /// Adds (or removes) a TCP check run by the agent on the instance's `host:port`.
    pub fn with_tcp_check(mut self, on: bool) -> Self {
        self.tcp_check = on;
        self
    }

    /// Sets how often the agent runs its checks.
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// Sets the timeout of each agent-run check.
    pub fn with_check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// Sets the KV prefix of configuration keys.
    pub fn with_config_prefix(mut self, prefix: ConfigKey) -> Self {
        self.config_prefix = prefix;
        self
    }

    /// Sets the KV prefix of locks and elections.
    pub fn with_coord_prefix(mut self, prefix: ConfigKey) -> Self {
        self.coord_prefix = prefix;
        self
    }

    /// Sets the `LockDelay` of the coordination session.
    pub fn with_lock_delay(mut self, delay: Duration) -> Self {
        self.lock_delay = delay;
        self
    }

    /// Sets the share (percent) of the agent's per-client connection limit that watches
    /// may use.
    pub fn with_watch_share_percent(mut self, percent: u8) -> Self {
        self.watch_share_percent = percent;
        self
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
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_tls_urls() {
        let c = ConsulConfig::from_url("consul://10.0.0.1:8501").unwrap();
        assert_eq!(c.base_url(), "http://10.0.0.1:8501");
        let c = ConsulConfig::from_url("consul://agent").unwrap();
        assert_eq!(c.address, "agent:8500");
        let c =
            ConsulConfig::from_url("consuls://[::1]:8501?datacenter=dc2&ttl=3s&wait=30s").unwrap();
        assert_eq!(c.base_url(), "https://[::1]:8501");
        assert_eq!(c.datacenter.as_deref(), Some("dc2"));
        assert_eq!(c.ttl, Duration::from_secs(3));
        assert_eq!(c.wait, Duration::from_secs(30));
        let c = ConsulConfig::from_url("consul://h:1?dc=east").unwrap();
        assert_eq!(c.datacenter.as_deref(), Some("east"));
        assert_eq!(c.watch_share_percent, 50);
        let c = ConsulConfig::from_url("consul://h:1?watch_share_percent=30").unwrap();
        assert_eq!(c.watch_share_percent, 30);
    }

    #[test]
    fn config_options_override_the_url() {
        let c = ConsulConfig::from_config(
            &Config::from_url("consul://h:1?ttl=3s")
                .with_option("ttl", "5s")
                .with_option("timeout", 250),
        )
        .unwrap();
        assert_eq!(c.ttl, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        let c: Config =
            serde_json::from_str(r#"{"backend":"consul","address":"h:2","token":"t"}"#).unwrap();
        let c = ConsulConfig::from_config(&c).unwrap();
        assert_eq!(c.address, "h:2");
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("t"));
    }

    #[test]
    fn bad_urls_and_options_name_the_key() {
        for (url, part) in [
            ("consul://h:1?bogus=1", "bogus"),
            ("consul://a:1,b:2", "one agent"),
            ("consul://h:1/services", "no path"),
            ("consul://h:1?ttl=soon", "ttl"),
            ("consul://h:1?ttl=100ms", "ttl"),
            ("consul://h:1?wait=1h", "wait"),
            ("consul://h:1?dc=a%20b", "datacenter"),
            ("consul://h:1?ca_file=/x", "TLS"),
            ("consuls://h:1?cert_file=/x", "key_file"),
            ("etcd://h:1", "consul://"),
            ("consul://h:1?timeout=0s", "timeout"),
            ("consul://h:1?watch_share_percent=0", "watch_share_percent"),
            ("consul://h:1?watch_share_percent=95", "watch_share_percent"),
            (
                "consul://h:1?watch_share_percent=half",
                "watch_share_percent",
            ),
        ] {
            let e = ConsulConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
            assert!(e.to_string().contains(part), "{url}: {e}");
        }
    }

    #[test]
    fn agent_check_options_from_urls_and_serde() {
        let c = ConsulConfig::from_url("consul://h:1").unwrap();
        assert_eq!(c.http_check, None);
        assert!(!c.tcp_check && !c.has_agent_checks());
        assert_eq!(c.check_interval, Duration::from_secs(10));
        assert_eq!(c.check_timeout, Duration::from_secs(5));
        let c = ConsulConfig::from_url(
            "consul://h:1?http_check=/health&tcp_check=true&check_interval=2s&check_timeout=500ms",
        )
        .unwrap();
        assert_eq!(c.http_check.as_deref(), Some("/health"));
        assert!(c.tcp_check && c.has_agent_checks());
        assert_eq!(c.check_interval, Duration::from_secs(2));
        assert_eq!(c.check_timeout, Duration::from_millis(500));
        let c = ConsulConfig::from_url(
            "consul://h:1?http_check=https%3A%2F%2F%7Bhost%7D%3A9000%2Fready%3Fdeep%3D1",
        )
        .unwrap();
        assert_eq!(
            c.http_check.as_deref(),
            Some("https://{host}:9000/ready?deep=1")
        );
        let c: Config = serde_json::from_str(
            r#"{"backend":"consul","http_check":"http://{host}:{port}/live",
                "tcp_check":true,"check_interval":"3s","check_timeout":1000}"#,
        )
        .unwrap();
        let c = ConsulConfig::from_config(&c).unwrap();
        assert_eq!(c.http_check.as_deref(), Some("http://{host}:{port}/live"));
        assert!(c.tcp_check);
        assert_eq!(c.check_interval, Duration::from_secs(3));
        assert_eq!(c.check_timeout, Duration::from_secs(1));
        let c = ConsulConfig::default()
            .with_http_check("/h")
            .with_tcp_check(true)
            .with_check_interval(Duration::from_secs(1))
            .with_check_timeout(Duration::from_secs(1));
        c.validate().unwrap();
        let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_agent_check_options_name_the_key() {
        for (url, part) in [
            ("consul://h:1?http_check=health", "`http_check`"),
            ("consul://h:1?http_check=", "`http_check`"),
            ("consul://h:1?http_check=ftp%3A%2F%2Fh%2Fx", "`http_check`"),
            ("consul://h:1?http_check=http%3A%2F%2F", "`http_check`"),
            ("consul://h:1?http_check=%2Fa%20b", "`http_check`"),
            ("consul://h:1?tcp_check=maybe", "tcp_check"),
            ("consul://h:1?check_interval=0s", "`check_interval`"),
            ("consul://h:1?check_interval=often", "check_interval"),
            ("consul://h:1?check_timeout=0ms", "`check_timeout`"),
            (
                "consul://h:1?check_interval=1s&check_timeout=2s",
                "`check_timeout`",
            ),
            ("consul://h:1?check_timeout=11s", "`check_timeout`"),
        ] {
            let e = ConsulConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
            assert!(e.to_string().contains(part), "{url}: {e}");
        }
        let c: Config =
            serde_json::from_str(r#"{"backend":"consul","http_check":"health"}"#).unwrap();
        let e = ConsulConfig::from_config(&c).unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { .. }) && e.to_string().contains("`http_check`"),
            "{e}"
        );
    }

    #[test]
    fn the_token_never_shows() {
        let c = ConsulConfig::from_url("consul://h:1?token=hunter2").unwrap();
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("hunter2"));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("redacted"),
            "{dbg}"
        );
        let with_creds =
            ConsulConfig::default().with_http_check("http://probe:s3cret@{host}:{port}/health");
        let dbg = format!("{with_creds:?}");
        assert!(!dbg.contains("s3cret") && dbg.contains("probe"), "{dbg}");
        let e = ConsulConfig::from_url("consul://h:1?token=hun%20ter2").unwrap_err();
        assert!(!e.to_string().contains("hun"), "{e}");
        let e = ConsulConfig::from_url("consul://user:hunter2@h:1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    fn options(json: serde_json::Value) -> Config {
        Config::for_backend("consul").with_options(json.as_object().unwrap().clone())
    }

    #[test]
    fn shared_names_and_old_names_both_parse() {
        let new = ConsulConfig::from_config(&options(serde_json::json!({
            "endpoints": ["h:2"], "token": "t", "datacenter": "dc1",
            "connect_timeout": "1s", "request_timeout": "2s",
            "backoff_initial": "10ms", "backoff_max": "3s",
            "tls": true, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
        })))
        .unwrap();
        assert_eq!(new.address, "h:2");
        assert_eq!(new.request_timeout, Duration::from_secs(2));
        assert_eq!(
            new.backoff(),
            BackoffOptions::new(Duration::from_millis(10), Duration::from_secs(3))
        );
        let old = ConsulConfig::from_config(&options(serde_json::json!({
            "address": "h:2", "token": "t", "dc": "dc1",
            "connect_timeout": "1s", "timeout": "2s",
            "backoff_initial": "10ms", "backoff_max": "3s",
            "tls": true, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
        })))
        .unwrap();
        assert_eq!(old, new);
        for one in [r#""h:3""#, r#"["h:3"]"#] {
            let c: ConsulConfig =
                serde_json::from_str(&format!(r#"{{"endpoints":{one}}}"#)).unwrap();
            assert_eq!(c.address, "h:3");
        }
        let c = ConsulConfig::from_url("consul://h:1?endpoints=o:2&timeout=3s").unwrap();
        assert_eq!(
            (c.address.as_str(), c.request_timeout),
            ("o:2", Duration::from_secs(3))
        );
        // Explicit options win over the query, whichever name each uses.
        let c = ConsulConfig::from_config(
            &Config::from_url("consul://h:1?timeout=3s")
                .with_option("request_timeout", "4s")
                .with_option("endpoints", "x:9"),
        )
        .unwrap();
        assert_eq!(
            (c.address.as_str(), c.request_timeout),
            ("x:9", Duration::from_secs(4))
        );
        assert_eq!(
            ConsulConfig::default().with_timeout(Duration::from_secs(1)),
            ConsulConfig::default().with_request_timeout(Duration::from_secs(1))
        );
    }

    #[test]
    fn backoff_default_follows_ttl_unless_given() {
        let c = ConsulConfig::default();
        assert_eq!(
            c.backoff(),
            BackoffOptions::new(Duration::from_millis(100), Duration::from_secs(10) / 3)
        );
        let c = ConsulConfig::from_url("consul://h:1?ttl=60s").unwrap();
        assert_eq!(c.backoff().backoff_max, Duration::from_secs(5));
        let c = ConsulConfig::from_url("consul://h:1?ttl=60s&backoff_max=20s").unwrap();
        assert_eq!(c.backoff().backoff_max, Duration::from_secs(20));
        let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_shared_options_name_the_key() {
        for (cfg, part) in [
            (
                serde_json::json!({"endpoints": ["a:1", "b:1"]}),
                "`address`",
            ),
            (serde_json::json!({"endpoints": "a:1,b:1"}), "one agent"),
            (
                serde_json::json!({"endpoints": "a:1", "address": "b:1"}),
                "`endpoints`",
            ),
            (
                serde_json::json!({"timeout": "1s", "request_timeout": "1s"}),
                "`timeout`",
            ),
            (
                serde_json::json!({"request_timeout": "0s"}),
                "`request_timeout`",
            ),
            (
                serde_json::json!({"backoff_initial": "0s"}),
                "`backoff_initial`",
            ),
            (
                serde_json::json!({"backoff_initial": "2s", "backoff_max": "1s"}),
                "`backoff_max`",
            ),
            (serde_json::json!({"tls_domain": "x"}), "tls_domain"),
        ] {
            let e = ConsulConfig::from_config(&options(cfg.clone())).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{cfg}: {e:?}");
            assert!(e.to_string().contains(part), "{cfg}: {e}");
        }
        let e = ConsulConfig::from_url("consul://h:1?timeout=1s&request_timeout=2s").unwrap_err();
        assert!(e.to_string().contains("`timeout`"), "{e}");
        let e =
            ConsulConfig::from_config(&options(serde_json::json!({"token": 12345}))).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("12345"), "{e:?}");
    }
}
