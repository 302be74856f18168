//! Configuration: `zk://[user:password@]host:port[,host:port...]/root[?options]` or the
//! same as a serde [`ZkConfig`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::backend::BackoffOptions;
use waypost_core::config::{self, Config, UrlParts};
use waypost_core::{Error, Result, Secret};

use crate::SCHEMES;

/// The default client port of ZooKeeper.
pub const DEFAULT_PORT: u16 = 2181;
/// The default root node under which services live.
pub const DEFAULT_ROOT: &str = "/services";
/// The default node under which configuration keys live.
pub const DEFAULT_CONFIG_PREFIX: &str = "/config";
/// The default node under which locks and elections live.
pub const DEFAULT_COORD_PREFIX: &str = "/coord";

/// How the instance data is written: which `payload` the Curator JSON carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PayloadFormat {
    /// Apache Curator x-discovery with a `java.util.HashMap` payload (the default).
    #[default]
    Curator,
    /// Spring Cloud Zookeeper: payload class
    /// `org.springframework.cloud.zookeeper.discovery.ZookeeperInstance` with `id`, `name`
    /// and `metadata`.
    SpringCloud,
}

/// Where an instance's node lives under `{root}/{service}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum NodeLayout {
    /// `{root}/{service}/{id}`, as Curator x-discovery writes it (the default).
    #[default]
    Plain,
    /// Protected ephemeral sequential nodes `{root}/{service}/_c_{guid}-{id}NNNNNNNNNN`, as
    /// most ZooKeeper tutorials do; after a connection loss during `create` the node is
    /// found again by its guid.
    ProtectedSequential,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HostsRepr {
    One(String),
    Many(Vec<String>),
}

fn de_hosts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match HostsRepr::deserialize(d)? {
        HostsRepr::One(s) => s
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        HostsRepr::Many(v) => v,
    })
}

/// Configuration of the ZooKeeper backend.
///
/// As a URL: `zk://[user:password@]h1:2181[,h2:2181...][/root][?session_timeout=10s&...]`
/// (scheme `zk` or `zookeeper`; the root defaults to `/services`; user and password are
/// digest credentials). As a serde config: `backend = "zookeeper"`,
/// `endpoints = "h1:2181,h2"` (or a list), and the options below by name. Unknown options
/// are an error naming them. `Debug` never shows the password.
///
/// The options every backend shares have the same names on every registry: `endpoints`,
/// `username`, `password`, `connect_timeout`, `request_timeout`, `backoff_initial`,
/// `backoff_max`. The old name `hosts` is still accepted for `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ZkConfig {
    /// The servers, `host:port` (port 2181 when omitted). Also read from the old key
    /// `hosts`.
    #[serde(alias = "hosts", deserialize_with = "de_hosts")]
    pub endpoints: Vec<String>,
    /// The node under which services live, e.g. `/services` (also a way to chroot).
    pub root: String,
    /// The node under which configuration keys live: key `a/b` is the node
    /// `{config_prefix}/a/b`. Default `/config`.
    pub config_prefix: String,
    /// The node under which locks, semaphores and elections live: name `jobs/x` is the
    /// parent node `{coord_prefix}/jobs/x` of its contenders' nodes. Default `/coord`.
    pub coord_prefix: String,
    /// The session timeout asked of the server (it clamps it to its
    /// `minSessionTimeout..maxSessionTimeout`). A crashed process's instances vanish this
    /// long after it died. Default 10 s.
    #[serde(with = "waypost_core::config::duration")]
    pub session_timeout: Duration,
    /// How long connecting may take before it fails with `Timeout`. Default 5 s.
    #[serde(with = "waypost_core::config::duration")]
    pub connect_timeout: Duration,
    /// How long one operation (a registration's write, a deletion, a listing) may wait for
    /// the server before it fails with `Timeout`, e.g. while the server is paused or
    /// partitioned. A write that timed out may still land: the client removes it again.
    /// Default 5 s.
    #[serde(with = "waypost_core::config::duration")]
    pub request_timeout: Duration,
    /// The first delay before retrying after a failure (re-registration, reconnecting a
    /// watch, opening a new session). Default 50 ms.
    #[serde(with = "waypost_core::config::duration")]
    pub backoff_initial: Duration,
    /// The longest delay between two retries (jittered, doubling, no cap on attempts).
    /// Default 2 s.
    #[serde(with = "waypost_core::config::duration")]
    pub backoff_max: Duration,
    /// Digest user name; with [`password`](Self::password), the session authenticates
    /// with scheme `digest` and our nodes get the ACL "everyone reads, only this user
    /// writes and deletes".
    pub username: Option<String>,
    /// Digest password. Never shown by `Debug` or errors, and serialized as `<redacted>`.
    pub password: Option<Secret>,
    /// The payload format of the node data.
    pub payload: PayloadFormat,
    /// The node layout.
    pub layout: NodeLayout,
    /// Allow read-only sessions (to a server partitioned from its quorum).
    #[serde(deserialize_with = "config::de::boolean")]
    pub readonly: bool,
}

impl Default for ZkConfig {
    fn default() -> Self {
        Self {
            endpoints: vec![format!("127.0.0.1:{DEFAULT_PORT}")],
            root: DEFAULT_ROOT.into(),
            config_prefix: DEFAULT_CONFIG_PREFIX.into(),
            coord_prefix: DEFAULT_COORD_PREFIX.into(),
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            username: None,
            password: None,
            payload: PayloadFormat::Curator,
            layout: NodeLayout::Plain,
            readonly: false,
        }
    }
}

impl ZkConfig {
    /// Parses a `zk://` or `zookeeper://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&Config::from_url(url))
    }

    /// Builds from a [`Config`]: its URL (if any) and its options, which win over the
    /// URL's query options.
    pub fn from_config(config: &Config) -> Result<Self> {
        let (_, options) = config::url_options(
            "zookeeper",
            SCHEMES,
            config,
            UrlParts {
                hosts: Some("endpoints"),
                default_port: DEFAULT_PORT,
                path: Some("root"),
                username: Some("username"),
                password: Some("password"),
                renamed: RENAMED,
            },
        )?;
        let mut c: Self = config::options_into("zookeeper", options)?;
        c.endpoints = c
            .endpoints
            .iter()
            .map(|h| {
                if h.rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                {
                    h.clone()
                } else {
                    format!("{h}:{DEFAULT_PORT}")
                }
            })
            .collect();
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid_config(
                "zookeeper option `endpoints` is empty",
            ));
        }
        if let Some(h) = self
            .endpoints
            .iter()
            .find(|h| h.is_empty() || h.contains(['/', ' ', '@']))
        {
            return Err(Error::invalid_config(format!(
                "zookeeper option `endpoints`: `{}` is not host:port",
                h.escape_debug()
            )));
        }
        for (option, path, example) in [
            ("root", &self.root, DEFAULT_ROOT),
            ("config_prefix", &self.config_prefix, DEFAULT_CONFIG_PREFIX),
            ("coord_prefix", &self.coord_prefix, DEFAULT_COORD_PREFIX),
        ] {
            if !is_node_path(path) {
                return Err(Error::invalid_config(format!(
                    "zookeeper option `{option}`: `{}` must be an absolute node path like `{example}`",
                    path.escape_debug()
                )));
            }
        }
        if self.session_timeout < Duration::from_millis(100) {
            return Err(Error::invalid_config(
                "zookeeper option `session_timeout` must be at least 100ms",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid_config(
                "zookeeper option `connect_timeout` must be more than 0",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid_config(
                "zookeeper option `request_timeout` must be more than 0",
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(Error::invalid_config(
                "zookeeper options `backoff_initial` (more than 0) and `backoff_max` (at least `backoff_initial`)",
            ));
        }
        if self.password.is_some() != self.username.is_some() {
            return Err(Error::invalid_config(
                "zookeeper options `username` and `password` go together",
            ));
        }
        if self.username.as_deref().is_some_and(|u| u.contains(':')) {
            return Err(Error::invalid_config(
                "zookeeper option `username` may not contain `:`",
            ));
        }
        Ok(())
    }

    /// The connection string the client is given: `h1:2181,h2:2181`.
    pub fn connect_string(&self) -> String {
        self.endpoints.join(",")
    }

    /// Sets the servers (`host:port`).
    pub fn with_endpoints(
        mut self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the servers: the old name of [`with_endpoints`](Self::with_endpoints).
    pub fn with_hosts(self, hosts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.with_endpoints(hosts)
    }

    /// Sets the root node.
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    /// Sets the node under which configuration keys live.
    pub fn with_config_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config_prefix = prefix.into();
        self
    }

    /// Sets the node under which locks and elections live.
    pub fn with_coord_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.coord_prefix = prefix.into();
        self
    }

    /// Sets the session timeout.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the retry backoff bounds.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// The retry backoff bounds, for core's retry loops.
    pub fn backoff(&self) -> BackoffOptions {
        BackoffOptions::new(self.backoff_initial, self.backoff_max)
    }

    /// Sets digest credentials (the same as [`with_digest`](Self::with_digest); the
    /// name every backend shares).
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.username = Some(username.into());
        self.password = Some(Secret::new(password));
        self
    }

    /// Sets digest credentials.
    pub fn with_digest(self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.with_credentials(username, password)
    }

    /// Sets the payload format.
    pub fn with_payload(mut self, payload: PayloadFormat) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the node layout.
    pub fn with_layout(mut self, layout: NodeLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Allows read-only sessions.
    pub fn with_readonly(mut self, readonly: bool) -> Self {
        self.readonly = readonly;
        self
    }
}

/// Whether `path` is an absolute node path below `/`: `/a`, `/a/b` (no empty, `.` or `..`
/// segment, no control character, no trailing `/`).
fn is_node_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() >= 2
        && !path.ends_with('/')
        && !path.contains("//")
        && !path
            .split('/')
            .skip(1)
            .any(|s| s == "." || s == ".." || s.chars().any(char::is_control))
}

/// Other option names accepted, `(other, ours)`: old names, and shared names of ours.
const RENAMED: &[(&str, &str)] = &[("hosts", "endpoints")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_host_url_with_root_and_options() {
        let c = ZkConfig::from_url(
            "zk://10.0.0.1:2181,10.0.0.2,[::1]:2182/disco/svc?session_timeout=3s&connect_timeout=250ms&request_timeout=750ms&backoff_max=1s&payload=spring-cloud&layout=protected-sequential&readonly=true",
        )
        .unwrap();
        assert_eq!(
            c.endpoints,
            ["10.0.0.1:2181", "10.0.0.2:2181", "[::1]:2182"]
        );
        assert_eq!(c.root, "/disco/svc");
        assert_eq!(c.session_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.request_timeout, Duration::from_millis(750));
        assert_eq!(
            c.backoff(),
            BackoffOptions::new(Duration::from_millis(50), Duration::from_secs(1))
        );
        assert_eq!(c.payload, PayloadFormat::SpringCloud);
        assert_eq!(c.layout, NodeLayout::ProtectedSequential);
        assert!(c.readonly);
        assert_eq!(c.connect_string(), "10.0.0.1:2181,10.0.0.2:2181,[::1]:2182");
    }

    #[test]
    fn defaults_and_scheme_alias() {
        let c = ZkConfig::from_url("zookeeper://h").unwrap();
        assert_eq!(c.endpoints, ["h:2181"]);
        assert_eq!(c.root, "/services");
        assert_eq!(c.config_prefix, "/config");
        assert_eq!(c.coord_prefix, "/coord");
        assert_eq!(c.session_timeout, Duration::from_secs(10));
    }

    #[test]
    fn config_prefix_from_url_and_options_is_validated() {
        let c = ZkConfig::from_url("zk://h/services?config_prefix=/my_app/config").unwrap();
        assert_eq!(c.config_prefix, "/my_app/config");
        let c =
            ZkConfig::from_config(&options(serde_json::json!({"config_prefix": "/cfg"}))).unwrap();
        assert_eq!(c.config_prefix, "/cfg");
        assert_eq!(
            ZkConfig::default().with_config_prefix("/x").config_prefix,
            "/x"
        );
        for bad in ["config", "/", "/a/", "/a//b", "/a/../b", ""] {
            let e = ZkConfig::from_config(&options(serde_json::json!({"config_prefix": bad})))
                .unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains("config_prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn coord_prefix_from_url_and_options_is_validated() {
        let c = ZkConfig::from_url("zk://h/services?coord_prefix=/my_app/locks").unwrap();
        assert_eq!(c.coord_prefix, "/my_app/locks");
        let c = ZkConfig::from_config(&options(serde_json::json!({"coord_prefix": "/l"}))).unwrap();
        assert_eq!(c.coord_prefix, "/l");
        assert_eq!(
            ZkConfig::default().with_coord_prefix("/x").coord_prefix,
            "/x"
        );
        for bad in ["coord", "/", "/a/", "/a//b", "/a/./b", ""] {
            let e = ZkConfig::from_config(&options(serde_json::json!({"coord_prefix": bad})))
                .unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains("coord_prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn digest_credentials_are_hidden() {
        let c = ZkConfig::from_url("zk://app:s3cr%40t@h:2181/services").unwrap();
        assert_eq!(c.username.as_deref(), Some("app"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s3cr@t"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn unknown_and_bad_options_are_named() {
        let e = ZkConfig::from_url("zk://h/services?sesion_timeout=1s").unwrap_err();
        assert!(e.to_string().contains("sesion_timeout"), "{e}");
        let e = ZkConfig::from_url("zk://h/services?session_timeout=soon").unwrap_err();
        assert!(
            e.to_string().contains("session_timeout") || e.to_string().contains("soon"),
            "{e}"
        );
        assert!(ZkConfig::from_url("etcd://h/services").is_err());
        assert!(ZkConfig::from_url("zk://h:99999/services").is_err());
        assert!(ZkConfig::from_url("zk://h/a/../b").is_err());
        assert!(ZkConfig::from_url("zk://h/services?payload=xml").is_err());
    }

    #[test]
    fn serde_config_with_options_beside_url() {
        let cfg = Config::for_backend("zookeeper").with_options(
            serde_json::json!({
                "hosts": ["a:1", "b"],
                "root": "/x",
                "session_timeout": 2500,
                "username": "u",
                "password": "p",
            })
            .as_object()
            .unwrap()
            .clone(),
        );
        let c = ZkConfig::from_config(&cfg).unwrap();
        assert_eq!(c.endpoints, ["a:1", "b:2181"]);
        assert_eq!(c.root, "/x");
        assert_eq!(c.session_timeout, Duration::from_millis(2500));
        let over = Config::from_url("zk://h/services?session_timeout=1s")
            .with_option("session_timeout", "4s");
        assert_eq!(
            ZkConfig::from_config(&over).unwrap().session_timeout,
            Duration::from_secs(4)
        );
        let half = Config::from_url("zk://h/services").with_option("username", "u");
        assert!(ZkConfig::from_config(&half).is_err());
    }

    fn options(json: serde_json::Value) -> Config {
        Config::for_backend("zookeeper").with_options(json.as_object().unwrap().clone())
    }

    #[test]
    fn shared_names_and_old_names_both_parse() {
        let new = ZkConfig::from_config(&options(serde_json::json!({
            "endpoints": "a:1,b",
            "username": "u",
            "password": "p",
            "connect_timeout": "1s",
            "request_timeout": "2s",
            "backoff_initial": "10ms",
            "backoff_max": "3s",
        })))
        .unwrap();
        assert_eq!(new.endpoints, ["a:1", "b:2181"]);
        assert_eq!(new.connect_timeout, Duration::from_secs(1));
        assert_eq!(new.request_timeout, Duration::from_secs(2));
        assert_eq!(
            new.backoff(),
            BackoffOptions::new(Duration::from_millis(10), Duration::from_secs(3))
        );
        let old = ZkConfig::from_config(&options(serde_json::json!({
            "hosts": ["a:1", "b"], "username": "u", "password": "p",
            "connect_timeout": "1s", "request_timeout": "2s",
            "backoff_initial": "10ms", "backoff_max": "3s",
        })))
        .unwrap();
        assert_eq!(old, new);
        // Straight serde (a config file read by the application) takes both names too.
        let direct: ZkConfig = serde_json::from_str(r#"{"hosts":"x:1"}"#).unwrap();
        assert_eq!(direct.endpoints, ["x:1"]);
        let direct: ZkConfig = serde_json::from_str(r#"{"endpoints":["x:1"]}"#).unwrap();
        assert_eq!(direct.endpoints, ["x:1"]);
        // An explicit old name still wins over the URL's hosts.
        let over = Config::from_url("zk://h/services").with_option("hosts", "o:7");
        assert_eq!(ZkConfig::from_config(&over).unwrap().endpoints, ["o:7"]);
        // Builders: the old and the shared name.
        assert_eq!(
            ZkConfig::default().with_hosts(["a:1"]),
            ZkConfig::default().with_endpoints(["a:1"])
        );
        assert_eq!(
            ZkConfig::default().with_digest("u", "p"),
            ZkConfig::default().with_credentials("u", "p")
        );
    }

    #[test]
    fn both_names_at_once_or_in_the_query_are_errors_naming_them() {
        let e = ZkConfig::from_config(&options(serde_json::json!({
            "hosts": "a:1", "endpoints": "b:1",
        })))
        .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
        assert!(e.to_string().contains("`hosts`"), "{e}");
        for url in ["zk://h/services?hosts=a:1", "zk://h/services?endpoints=a:1"] {
            let e = ZkConfig::from_url(url).unwrap_err();
            assert!(e.to_string().contains("belongs in the URL"), "{url}: {e}");
        }
        let e = ZkConfig::from_url("zk://h/services?endpoint=a:1").unwrap_err();
        assert!(e.to_string().contains("`endpoint`"), "{e}");
    }

    #[test]
    fn the_password_never_shows() {
        let c = ZkConfig::default().with_credentials("app", "hunter2");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("hunter2"));
        for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
            assert!(
                !shown.contains("hunter2") && shown.contains("<redacted>"),
                "{shown}"
            );
        }
        let e = ZkConfig::from_config(&options(serde_json::json!({"password": "hunter2"})))
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        let e =
            ZkConfig::from_config(&options(serde_json::json!({"password": 12345}))).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("12345"), "{e:?}");
    }
}
