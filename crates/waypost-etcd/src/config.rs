//! Configuration: `etcd://host:port[,host:port...]/prefix[?options]` or the serde form.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::backend::BackoffOptions;
use waypost_core::config::{self, de, Config, UrlParts};
use waypost_core::{Error, Result, Secret};

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
/// `endpoints`, `prefix`, `username` and `password` is a query option of the same name. In
/// serde form (TOML, JSON...): `backend = "etcd"` and the fields by name. Unknown keys
/// are an error naming them. `Debug` never shows the password.
///
/// The options every backend shares have the same names on every registry: `endpoints`,
/// `username`, `password`, `connect_timeout`, `request_timeout`, `backoff_initial`,
/// `backoff_max`, and the TLS options `tls`, `ca_file`, `cert_file`, `key_file`,
/// `tls_domain`. The old name `user` is still accepted for `username`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The first delay before retrying after a failure (a new lease, re-registration,
    /// reconnecting a watch). 100 ms by default.
    #[serde(with = "waypost_core::config::duration")]
    pub backoff_initial: Duration,
    /// The longest delay between two retries (jittered, doubling, no cap on attempts).
    /// When unset: half of `lease_ttl` for the lease and re-registrations, and
    /// `request_timeout` for watches, each within 500 ms..10 s (5 s with the defaults).
    #[serde(
        with = "waypost_core::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_max: Option<Duration>,
    /// User name, when etcd has authentication enabled. Also read from the old key
    /// `user`.
    #[serde(alias = "user")]
    pub username: Option<String>,
    /// Password of `username`. Never shown by `Debug` or errors, and serialized as
    /// `<redacted>`.
    pub password: Option<Secret>,
    /// TLS (needs `ca_file`: this client does not read the OS trust store). Also
    /// enabled by `ca_file` or `cert_file` alone.
    #[serde(deserialize_with = "de::boolean")]
    pub tls: bool,
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
    /// The key prefix under which configuration keys live, `/config` by default:
    /// configuration key `app/db` is the etcd key `/config/app/db`. Empty: keys start at
    /// `/` (`/app/db`).
    pub config_prefix: String,
    /// The key prefix under which locks, semaphores and elections live, `/coord` by
    /// default: lock `jobs/x` is the etcd prefix `/coord/jobs/x/`, the name to give
    /// `etcdctl lock /coord/jobs/x` or `etcdctl elect /coord/jobs/x`. Empty: names start
    /// at `/`. The same rules as `config_prefix`, and apart from both other prefixes.
    pub coord_prefix: String,
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
            backoff_initial: Duration::from_millis(100),
            backoff_max: None,
            username: None,
            password: None,
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
            layout: Layout::Waypost,
            config_prefix: "/config".into(),
            coord_prefix: "/coord".into(),
        }
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
            UrlParts {
                hosts: Some("endpoints"),
                default_port: DEFAULT_PORT,
                path: Some("prefix"),
                username: Some("username"),
                password: Some("password"),
                renamed: RENAMED,
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
        self.validate_config_prefix()?;
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
        if self.backoff_initial.is_zero()
            || self.backoff_max.is_some_and(|m| m < self.backoff_initial)
        {
            return Err(Error::invalid_config(
                "etcd options `backoff_initial` (more than 0) and `backoff_max` (at least `backoff_initial`)",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(Error::invalid_config(
                "etcd option `password` is given without `username`",
            ));
        }
        if self.tls && self.ca_file.is_none() {
            return Err(Error::invalid_config(
                "etcd option `tls` needs `ca_file` (the CA of the servers' certificates): this client does not read the OS trust store",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid_config(
                "etcd options `cert_file` and `key_file` go together",
            ));
        }
        Ok(())
    }

    fn validate_config_prefix(&self) -> Result<()> {
        self.validate_prefix(
            "config_prefix",
            &self.config_prefix,
            &[("service prefix", &self.prefix)],
        )?;
        self.validate_prefix(
            "coord_prefix",
            &self.coord_prefix,
            &[
                ("service prefix", &self.prefix),
                ("configuration prefix", &self.config_prefix),
            ],
        )
    }

    /// Checks a prefix option: starts with `/` (or is empty), no empty segment, no space,
    /// at most 1 KiB, and apart from each of `others` (neither within the other).
    fn validate_prefix(&self, option: &str, value: &str, others: &[(&str, &str)]) -> Result<()> {
        let cp = value.trim_end_matches('/');
        let bad = |why: &str| {
            Err(Error::invalid_config(format!(
                "etcd option `{option}` {why}, got `{}`",
                value.escape_debug()
            )))
        };
        if !cp.is_empty() && !cp.starts_with('/') {
            return bad("must start with `/`");
        }
        if cp.len() > 1024 {
            return bad(
                "must be at most 1024 bytes long (the value size limit leaves room for that)",
            );
        }
        if cp.contains("//") {
            return bad("must not contain an empty segment (`//`)");
        }
        if cp.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("must not contain spaces or control characters");
        }
        // Services, configuration and coordination must not share keys: the prefixes
        // differ, and neither lies within the other. (An empty prefix is the root; beside
        // it the other prefix is allowed, and naming nothing like its first segment is the
        // user's part.)
        let within = |inner: &str, outer: &str| inner.starts_with(&format!("{outer}/"));
        for (what, other) in others {
            let sp = other.trim_end_matches('/');
            if cp == sp || (!cp.is_empty() && !sp.is_empty() && (within(cp, sp) || within(sp, cp)))
            {
                return bad(&format!(
                    "must differ from the {what} `{other}` and neither may lie within the other"
                ));
            }
        }
        Ok(())
    }

    /// The configuration key prefix without a trailing `/` (possibly empty).
    pub(crate) fn config_key_prefix(&self) -> &str {
        self.config_prefix.trim_end_matches('/')
    }

    /// The coordination key prefix without a trailing `/` (possibly empty).
    pub(crate) fn coord_key_prefix(&self) -> &str {
        self.coord_prefix.trim_end_matches('/')
    }

    /// Whether TLS is configured.
    pub fn uses_tls(&self) -> bool {
        self.tls || self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The retry backoff of the lease's keep-alive, new leases and re-registrations:
    /// `backoff_max`, or half of `lease_ttl` within 500 ms..10 s when unset.
    pub fn backoff(&self) -> BackoffOptions {
        BackoffOptions::new(
            self.backoff_initial,
            self.backoff_max.unwrap_or(
                (self.lease_ttl / 2).clamp(Duration::from_millis(500), Duration::from_secs(10)),
            ),
        )
    }

    /// The retry backoff of watches: `backoff_max`, or `request_timeout` within
    /// 500 ms..10 s when unset.
    pub fn watch_backoff(&self) -> BackoffOptions {
        BackoffOptions::new(
            self.backoff_initial,
            self.backoff_max.unwrap_or(
                self.request_timeout
                    .clamp(Duration::from_millis(500), Duration::from_secs(10)),
            ),
        )
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

    /// Sets the retry backoff bounds (`backoff_initial`, `backoff_max`).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = Some(max.max(initial));
        self
    }

    /// Sets user name and password.
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.username = Some(username.into());
        self.password = Some(Secret::new(password));
        self
    }

    /// Sets user name and password: the old name of
    /// [`with_credentials`](Self::with_credentials).
    pub fn with_user(self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.with_credentials(user, password)
    }

    /// Enables TLS (give the CA with [`with_ca_file`](Self::with_ca_file)).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
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

    /// Sets the TLS server name to verify.
    pub fn with_tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }

    /// Sets the key layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the prefix of configuration keys (`/config` by default).
    pub fn with_config_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config_prefix = prefix.into();
        self
    }

    /// Sets the prefix of locks, semaphores and elections (`/coord` by default).
    pub fn with_coord_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.coord_prefix = prefix.into();
        self
    }
}

/// Other option names accepted, `(other, ours)`: old names, and shared names of ours.
const RENAMED: &[(&str, &str)] = &[("user", "username")];

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
        assert_eq!(c.username.as_deref(), Some("root"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s3cr@t"));
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

    fn options(json: serde_json::Value) -> Config {
        Config::for_backend("etcd").with_options(json.as_object().unwrap().clone())
    }

    #[test]
    fn shared_names_and_old_names_both_parse() {
        let shared = serde_json::json!({
            "endpoints": ["a:1"], "username": "u", "password": "p",
            "connect_timeout": "1s", "request_timeout": "2s",
            "backoff_initial": "10ms", "backoff_max": "3s",
            "tls": true, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
            "tls_domain": "etcd.local",
        });
        let new = EtcdConfig::from_config(&options(shared.clone())).unwrap();
        assert_eq!(new.username.as_deref(), Some("u"));
        assert_eq!(new.password.as_ref().map(Secret::expose), Some("p"));
        assert_eq!(new.request_timeout, Duration::from_secs(2));
        assert!(new.tls && new.uses_tls());
        assert_eq!(new.tls_domain.as_deref(), Some("etcd.local"));
        let want = BackoffOptions::new(Duration::from_millis(10), Duration::from_secs(3));
        assert_eq!((new.backoff(), new.watch_backoff()), (want, want));
        let mut old = shared;
        let user = old.as_object_mut().unwrap().remove("username").unwrap();
        old.as_object_mut().unwrap().insert("user".into(), user);
        assert_eq!(EtcdConfig::from_config(&options(old)).unwrap(), new);
        let direct: EtcdConfig = serde_json::from_str(r#"{"user":"x"}"#).unwrap();
        assert_eq!(direct.username.as_deref(), Some("x"));
        // The URL's user info fills `username`; an explicit old name wins over it.
        let c = EtcdConfig::from_url("etcd://a:b@h/p").unwrap();
        assert_eq!(c.username.as_deref(), Some("a"));
        let c =
            EtcdConfig::from_config(&Config::from_url("etcd://a:b@h/p").with_option("user", "o"))
                .unwrap();
        assert_eq!(c.username.as_deref(), Some("o"));
        assert_eq!(
            EtcdConfig::default().with_user("u", "p"),
            EtcdConfig::default().with_credentials("u", "p")
        );
    }

    #[test]
    fn backoff_defaults_follow_lease_ttl_and_request_timeout_unless_given() {
        let c = EtcdConfig::default();
        let five = BackoffOptions::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!((c.backoff(), c.watch_backoff()), (five, five));
        let c = EtcdConfig::from_url("etcd://h/p?lease_ttl=3s&request_timeout=200ms").unwrap();
        assert_eq!(c.backoff().backoff_max, Duration::from_millis(1500));
        assert_eq!(c.watch_backoff().backoff_max, Duration::from_millis(500));
        let c = EtcdConfig::from_url("etcd://h/p?lease_ttl=60s&backoff_max=2s").unwrap();
        assert_eq!(c.backoff().backoff_max, Duration::from_secs(2));
        assert_eq!(c.watch_backoff().backoff_max, Duration::from_secs(2));
        let back: EtcdConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        for (url, needle) in [
            ("etcd://h/p?backoff_initial=0s", "backoff_initial"),
            (
                "etcd://h/p?backoff_initial=2s&backoff_max=1s",
                "backoff_max",
            ),
            ("etcd://h/p?backoff_max=soon", "backoff_max"),
            ("etcd://h/p?tls=true", "ca_file"),
            ("etcd://h/p?user=u", "belongs in the URL"),
            ("etcd://h/p?username=u", "belongs in the URL"),
        ] {
            let e = EtcdConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e:?}");
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
        let e =
            EtcdConfig::from_config(&options(serde_json::json!({"user": "a", "username": "b"})))
                .unwrap_err();
        assert!(e.to_string().contains("`user`"), "{e}");
    }

    #[test]
    fn config_prefix_default_url_serde_and_validation() {
        let c = EtcdConfig::from_url("etcd://h").unwrap();
        assert_eq!(c.config_prefix, "/config");
        assert_eq!(c.config_key_prefix(), "/config");
        let c = EtcdConfig::from_url("etcd://h/svc?config_prefix=/prod/config/").unwrap();
        assert_eq!(c.config_key_prefix(), "/prod/config");
        let c = EtcdConfig::from_url("etcd://h/svc?config_prefix=").unwrap();
        assert_eq!(c.config_key_prefix(), "", "empty: keys at the root");
        let cfg: Config =
            serde_json::from_str(r#"{"backend":"etcd","config_prefix":"/cfg"}"#).unwrap();
        assert_eq!(EtcdConfig::from_config(&cfg).unwrap().config_prefix, "/cfg");
        assert_eq!(
            EtcdConfig::default().with_config_prefix("/x").config_prefix,
            "/x"
        );
        let long = format!("/{}", "a".repeat(1024));
        for (url, needle) in [
            ("etcd://h/svc?config_prefix=cfg", "start with `/`"),
            ("etcd://h/svc?config_prefix=/a//b", "empty segment"),
            ("etcd://h/svc?config_prefix=/a%20b", "spaces"),
            ("etcd://h/svc?config_prefix=/svc", "service prefix"),
            ("etcd://h/svc?config_prefix=/svc/", "service prefix"),
            ("etcd://h/svc?config_prefix=/svc/cfg", "service prefix"),
            ("etcd://h/svc/x?config_prefix=/svc", "service prefix"),
            (&format!("etcd://h/svc?config_prefix={long}"), "1024"),
        ] {
            let e = EtcdConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e:?}");
            assert!(
                e.to_string().contains("config_prefix") && e.to_string().contains(needle),
                "{url}: {e}"
            );
        }
        // Beside services at the root, or a sibling of the service prefix: allowed.
        EtcdConfig::from_url("etcd://h/svc?config_prefix=/svc-config").unwrap();
        EtcdConfig::from_config(&Config::from_url("etcd://h").with_option("prefix", "")).unwrap();
    }

    #[test]
    fn coord_prefix_default_url_serde_and_validation() {
        let c = EtcdConfig::from_url("etcd://h").unwrap();
        assert_eq!(c.coord_key_prefix(), "/coord");
        let c = EtcdConfig::from_url("etcd://h/svc?coord_prefix=/prod/locks/").unwrap();
        assert_eq!(c.coord_key_prefix(), "/prod/locks");
        let c = EtcdConfig::from_url("etcd://h/svc?coord_prefix=").unwrap();
        assert_eq!(c.coord_key_prefix(), "", "empty: names at the root");
        let cfg: Config =
            serde_json::from_str(r#"{"backend":"etcd","coord_prefix":"/locks"}"#).unwrap();
        assert_eq!(
            EtcdConfig::from_config(&cfg).unwrap().coord_prefix,
            "/locks"
        );
        assert_eq!(
            EtcdConfig::default().with_coord_prefix("/x").coord_prefix,
            "/x"
        );
        for (url, needle) in [
            ("etcd://h/svc?coord_prefix=locks", "start with `/`"),
            ("etcd://h/svc?coord_prefix=/a//b", "empty segment"),
            ("etcd://h/svc?coord_prefix=/a%20b", "spaces"),
            ("etcd://h/svc?coord_prefix=/svc", "service prefix"),
            ("etcd://h/svc?coord_prefix=/svc/locks", "service prefix"),
            ("etcd://h/svc?coord_prefix=/config", "configuration prefix"),
            (
                "etcd://h/svc?coord_prefix=/config/locks",
                "configuration prefix",
            ),
            (
                "etcd://h/svc?config_prefix=/cfg&coord_prefix=/cfg/",
                "configuration prefix",
            ),
        ] {
            let e = EtcdConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e:?}");
            assert!(
                e.to_string().contains("coord_prefix") && e.to_string().contains(needle),
                "{url}: {e}"
            );
        }
        EtcdConfig::from_url("etcd://h/svc?coord_prefix=/svc-locks").unwrap();
    }

    #[test]
    fn the_password_never_shows() {
        let c = EtcdConfig::default().with_credentials("root", "hunter2");
        for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
            assert!(
                !shown.contains("hunter2") && shown.contains("<redacted>"),
                "{shown}"
            );
        }
        let e = EtcdConfig::from_config(&options(serde_json::json!({"password": "hunter2"})))
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }
}
