//! Configuration: `etcd://host:port[,host:port...]/prefix[?options]` or the serde form.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::config::{self, Config};
use waypost_core::{Error, Result};

use crate::SCHEMES;

/// The default client port of etcd.
pub const DEFAULT_PORT: u16 = 2379;

/// How registrations are laid out in etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Layout {
    /// `{prefix}/{service}/{id}` → the instance as JSON (waypost's own format).
    #[default]
    Waypost,
    /// gRPC-Go's etcd naming resolver: `{prefix}/{service}/{host:port}` →
    /// `{"Op":0,"Addr":"host:port","Metadata":{...instance...}}`, so Go gRPC clients
    /// resolving the target `{prefix}/{service}` find our instances. One instance per
    /// address and service.
    Grpc,
}

/// Configuration of the etcd backend.
///
/// From a URL: `etcd://[user:password@]host:port[,host:port...]/prefix?lease_ttl=10s`
/// (default port 2379, default prefix `/services`); every field below except
/// `endpoints`, `prefix`, `user` and `password` is a query option of the same name. In
/// serde form (TOML, JSON...): `backend = "etcd"` and the fields by name. Unknown keys
/// are an error naming them. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// The cluster members' client addresses, `host:port`.
    pub endpoints: Vec<String>,
    /// The key prefix under which services live, `/services` by default.
    pub prefix: String,
    /// The TTL asked for the registration lease (etcd may round it up to its minimum;
    /// the granted TTL is what counts). 10 s by default. A crashed process's instances
    /// disappear within about this long.
    #[serde(with = "waypost_core::config::duration")]
    pub lease_ttl: Duration,
    /// How long connecting (and the first status call) may take. 5 s by default.
    #[serde(with = "waypost_core::config::duration")]
    pub connect_timeout: Duration,
    /// How long any single request (and a keep-alive or watch probe round-trip) may
    /// take before the registry counts as unreachable. 5 s by default.
    #[serde(with = "waypost_core::config::duration")]
    pub request_timeout: Duration,
    /// How often an idle watch checks that its stream is alive (a progress request that
    /// must be answered within `request_timeout`). 5 s by default.
    #[serde(with = "waypost_core::config::duration")]
    pub probe_interval: Duration,
    /// User name, when etcd has authentication enabled.
    pub user: Option<String>,
    /// Password of `user`. Never printed.
    pub password: Option<String>,
    /// PEM file of the CA that signed the servers' certificates; enables TLS.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`); enables TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the endpoint host.
    pub tls_domain: Option<String>,
    /// The key layout; `waypost` by default.
    pub layout: Layout,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec![format!("127.0.0.1:{DEFAULT_PORT}")],
            prefix: "/services".into(),
            lease_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_secs(5),
            user: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
            layout: Layout::Waypost,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("tls_domain", &self.tls_domain)
            .field("layout", &self.layout)
            .finish()
    }
}

impl EtcdConfig {
    /// Parses `etcd://[user:password@]host:port[,host:port...]/prefix[?options]`.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&Config::from_url(url))
    }

    /// Builds from a [`Config`]: its URL (if any), then its options, which win.
    pub fn from_config(config: &Config) -> Result<Self> {
        let (_, options) = config::url_options(
            "etcd",
            SCHEMES,
            config,
            config::UrlParts {
                hosts: Some("endpoints"),
                default_port: DEFAULT_PORT,
                path: Some("prefix"),
                username: Some("user"),
                password: Some("password"),
            },
        )?;
        let c: Self = config::options_into("etcd", options)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the values; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid_config("etcd option `endpoints` is empty"));
        }
        if let Some(e) = self.endpoints.iter().find(|e| e.trim().is_empty()) {
            return Err(Error::invalid_config(format!(
                "etcd option `endpoints` has an empty entry: {e:?}"
            )));
        }
        let prefix = self.prefix.trim_end_matches('/');
        if !prefix.is_empty() && !prefix.starts_with('/') {
            return Err(Error::invalid_config(format!(
                "etcd option `prefix` must start with `/`, got `{}`",
                self.prefix.escape_debug()
            )));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(Error::invalid_config(
                "etcd option `lease_ttl` must be at least 1s (etcd leases count whole seconds)",
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("probe_interval", self.probe_interval),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "etcd option `{name}` must be more than 0"
                )));
            }
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid_config(
                "etcd option `password` is given without `user`",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid_config(
                "etcd options `cert_file` and `key_file` go together",
            ));
        }
        Ok(())
    }

    /// Whether TLS is configured.
    pub fn uses_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The key prefix without a trailing `/` (possibly empty: keys start at `/{service}`).
    pub(crate) fn key_prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// Sets the endpoints (`host:port`).
    pub fn with_endpoints<S: Into<String>>(
        mut self,
        endpoints: impl IntoIterator<Item = S>,
    ) -> Self {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the lease TTL asked for.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how often an idle watch probes its stream.
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Sets user and password.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Enables TLS with this CA file.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Enables mutual TLS with this client certificate and key.
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Sets the key layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_prefix_credentials_and_options() {
        let c = EtcdConfig::from_url(
            "etcd://root:s3cr%40t@10.0.0.1:2379,10.0.0.2/prod/services?lease_ttl=3s&request_timeout=250ms&layout=grpc",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(c.prefix, "/prod/services");
        assert_eq!(c.user.as_deref(), Some("root"));
        assert_eq!(c.password.as_deref(), Some("s3cr@t"));
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.layout, Layout::Grpc);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr"), "{dbg}");
    }

    #[test]
    fn defaults() {
        let c = EtcdConfig::from_url("etcd://h").unwrap();
        assert_eq!(c.endpoints, ["h:2379"]);
        assert_eq!(c.prefix, "/services");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.key_prefix(), "/services");
        assert!(!c.uses_tls());
    }

    #[test]
    fn serde_form_and_overrides() {
        let cfg: Config = serde_json::from_str(
            r#"{"backend":"etcd","endpoints":["a:1","b:2"],"prefix":"/x","lease_ttl":"2s","ca_file":"/ca.pem"}"#,
        )
        .unwrap();
        let c = EtcdConfig::from_config(&cfg).unwrap();
        assert_eq!(c.endpoints, ["a:1", "b:2"]);
        assert_eq!(c.prefix, "/x");
        assert!(c.uses_tls());
        let cfg = Config::from_url("etcd://h:1/p?lease_ttl=5s").with_option("lease_ttl", "7s");
        assert_eq!(
            EtcdConfig::from_config(&cfg).unwrap().lease_ttl,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn bad_configs_name_the_option_and_hide_the_password() {
        for (url, needle) in [
            ("etcd://h/p?bogus=1", "bogus"),
            ("etcd://h/p?lease_ttl=soon", "lease_ttl"),
            ("etcd://h/p?lease_ttl=10ms", "lease_ttl"),
            ("etcd://h/p?layout=zk", "layout"),
            ("etcd://h/p?prefix=/x", "prefix"),
            ("zk://h/p", "zk"),
            ("etcd://h/p?cert_file=/c.pem", "key_file"),
        ] {
            let e = EtcdConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e:?}");
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
        let e = EtcdConfig::from_url("etcd://root:hunter2@h:x/p").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        let cfg = Config::from_url("etcd://h/p").with_option("password", 12345);
        let e = EtcdConfig::from_config(&cfg).unwrap_err();
        assert!(!e.to_string().contains("12345"), "{e}");
    }
}
