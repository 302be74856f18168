//! [`ConsulConfig`]: the agent's address, datacenter, ACL token, TLS, TTL and timeouts, from
//! a `consul://` URL or a serde config.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::config::{self, de, Config};
use waypost_core::{Error, Result};

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
/// | `address` | `127.0.0.1:8500` | the agent's HTTP(S) address (the URL's host and port) |
/// | `tls` | `false` (`true` for `consuls://`) | HTTPS |
/// | `datacenter` | the agent's | `dc` of every query and registration |
/// | `token` | none | ACL token, sent as `X-Consul-Token`; never logged or shown |
/// | `ca_file` | OS trust store | PEM CA certificate(s) trusted for the agent |
/// | `cert_file`, `key_file` | none | PEM client certificate and key (both or neither) |
/// | `ttl` | `10s` | TTL of each instance's check; heartbeats every third of it |
/// | `deregister_critical_after` | `1m` | `DeregisterCriticalServiceAfter` (Consul's floor is 1m) |
/// | `wait` | `60s` | blocking-query wait (at most 10m), jittered down by up to 10 % |
/// | `timeout` | `10s` | every non-blocking request; also how often a blocking watch checks the agent is alive |
/// | `connect_timeout` | `5s` | TCP/TLS connect |
/// | `http_check` | none | an HTTP check the agent runs beside the TTL check: a path (`/health`, checked at `http://{host}:{port}{path}` of the instance) or an `http(s)://` URL template (`{host}`, `{port}` are replaced) |
/// | `tcp_check` | `false` | a TCP check the agent runs beside the TTL check: connects to the instance's `host:port` |
/// | `check_interval` | `10s` | how often the agent runs `http_check` / `tcp_check` |
/// | `check_timeout` | `5s` | timeout of each agent-run check (at most `check_interval`) |
///
/// Agent-run checks start **passing** when an instance is registered (so `register`
/// returning still means a watcher lists it) and leave watches at the first failing run,
/// within `check_interval` + `check_timeout`; see the crate docs for the trade-off.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsulConfig {
    /// The agent's `host:port`.
    pub address: String,
    /// HTTPS instead of HTTP.
    #[serde(deserialize_with = "de::boolean")]
    pub tls: bool,
    /// The datacenter; the agent's own when `None`.
    #[serde(alias = "dc")]
    pub datacenter: Option<String>,
    /// The ACL token. Never shown by `Debug`, logs or errors.
    #[serde(skip_serializing)]
    pub token: Option<String>,
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
    /// Timeout of every non-blocking request.
    #[serde(with = "waypost_core::config::duration")]
    pub timeout: Duration,
    /// Connect timeout.
    #[serde(with = "waypost_core::config::duration")]
    pub connect_timeout: Duration,
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
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            http_check: None,
            tcp_check: false,
            check_interval: Duration::from_secs(10),
            check_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ttl", &self.ttl)
            .field("deregister_critical_after", &self.deregister_critical_after)
            .field("wait", &self.wait)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "http_check",
                &self.http_check.as_deref().map(config::redact_url),
            )
            .field("tcp_check", &self.tcp_check)
            .field("check_interval", &self.check_interval)
            .field("check_timeout", &self.check_timeout)
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
        let (url, mut options) =
            config::url_options("consul", SCHEMES, config, config::UrlParts::default())?;
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
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "consul option `{k}` may not be zero"
                )));
            }
        }
        self.validate_checks()?;
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
        if let Some(t) = &self.token {
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
        self.token = Some(token.into());
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

    /// Sets the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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
        assert_eq!(c.timeout, Duration::from_millis(250));
        let c: Config =
            serde_json::from_str(r#"{"backend":"consul","address":"h:2","token":"t"}"#).unwrap();
        let c = ConsulConfig::from_config(&c).unwrap();
        assert_eq!(c.address, "h:2");
        assert_eq!(c.token.as_deref(), Some("t"));
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
        assert_eq!(c.token.as_deref(), Some("hunter2"));
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
}
