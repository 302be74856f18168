//! Configuration: registry URLs, the serde [`Config`], and the [`Connector`] a backend
//! implements so the facade can pick it by scheme.
//!
//! A registry is named either by a URL:
//!
//! ```text
//! memory://                      zk://127.0.0.1:2181,127.0.0.2:2181/services
//! consul://127.0.0.1:8500        etcd://127.0.0.1:2379/services?lease_ttl=10s
//! ```
//!
//! or by the equivalent serde [`Config`], e.g. in TOML:
//!
//! ```toml
//! backend = "memory"
//! name = "default"
//! ttl = "10s"
//! ```
//!
//! Query parameters of a URL and the fields of a config are the same options, named the
//! same way; an unknown one is an error naming it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registrar::Registrar;
use crate::watcher::Watcher;

/// A parsed registry URL: `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]`.
///
/// Unlike a general URL parser this accepts the comma-separated host lists that
/// ZooKeeper and etcd connection strings use. The password is never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// The scheme, lower-cased: `zk`, `consul`, `etcd`, `memory`.
    pub scheme: String,
    /// User name from the userinfo part, percent-decoded.
    pub username: Option<String>,
    /// Password from the userinfo part, percent-decoded. Never printed.
    pub password: Option<String>,
    /// The hosts, in order, each with its port if given.
    pub hosts: Vec<(String, Option<u16>)>,
    /// The path, percent-decoded, without a trailing `/`; empty when absent.
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryUrl")
            .field("scheme", &self.scheme)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hosts", &self.hosts)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish()
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        Error::invalid_config(format!("bad percent-escape in {what}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if what == "query" => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Error::invalid_config(format!("{what} is not UTF-8")))
}

impl RegistryUrl {
    /// Parses a registry URL. Errors name the part that is wrong; they never contain the
    /// password.
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::invalid_config("registry URL must look like `scheme://host:port/path`")
        })?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(Error::invalid_config(format!(
                "registry URL scheme `{}` is not valid",
                scheme.escape_debug()
            )));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(n) => (&rest[..n], &rest[n..]),
            None => (rest, ""),
        };
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (
                    Some(percent_decode(n, "user name")?),
                    Some(percent_decode(p, "password")?),
                ),
                None => (Some(percent_decode(u, "user name")?), None),
            },
        };
        let mut hosts = Vec::new();
        if !hostlist.is_empty() {
            for h in hostlist.split(',') {
                hosts.push(parse_host(h)?);
            }
        }
        let path = percent_decode(path.trim_end_matches('/'), "path")?;
        let mut q = Vec::new();
        if let Some(query) = query {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                q.push((percent_decode(k, "query")?, percent_decode(v, "query")?));
            }
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            username,
            password,
            hosts,
            path,
            query: q,
        })
    }

    /// The hosts as `host:port` strings, filling in `default_port` where none was given.
    pub fn endpoints(&self, default_port: u16) -> Vec<String> {
        self.hosts
            .iter()
            .map(|(h, p)| {
                let port = p.unwrap_or(default_port);
                if h.contains(':') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                }
            })
            .collect()
    }

    /// Takes the query into a map, failing on a key given twice.
    pub fn query_map(&self) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for (k, v) in &self.query {
            if m.insert(k.clone(), v.clone()).is_some() {
                return Err(Error::invalid_config(format!(
                    "URL option `{k}` is given twice"
                )));
            }
        }
        Ok(m)
    }
}

fn parse_host(h: &str) -> Result<(String, Option<u16>)> {
    let bad = || {
        Error::invalid_config(format!(
            "registry URL host `{}` is not valid",
            h.escape_debug()
        ))
    };
    if h.is_empty() {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| {
            Error::invalid_config(format!(
                "registry URL port `{}` is not a number from 0 to 65535",
                p.escape_debug()
            ))
        })?),
    };
    Ok((host.to_string(), port))
}

/// Keys whose values are secrets: `Debug` of a [`Config`] hides them.
const SECRET_KEYS: &[&str] = &["password", "token", "secret", "key", "credential"];

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|s| k.contains(s))
}

/// A registry named by configuration: which backend, and its options.
///
/// Deserializes from any self-describing serde format (TOML, JSON, YAML, environment via
/// `envy`/`figment`): a `backend` key (`memory`, `zookeeper`, `consul`, `etcd`) and the
/// backend's own options beside it, or a `url` key alone (or with options that override
/// the URL's). Each backend parses the options into its typed config, where an unknown
/// key is an error naming it. `Debug` hides secret values (keys containing `password`,
/// `token`, `secret`, `key` or `credential`).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The backend's name or URL scheme; may be omitted when `url` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// A registry URL; its options are overridden by those given beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The backend's options.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Opts<'a>(&'a serde_json::Map<String, serde_json::Value>);
        impl fmt::Debug for Opts<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut m = f.debug_map();
                for (k, v) in self.0 {
                    if is_secret_key(k) {
                        m.entry(k, &"<redacted>");
                    } else {
                        m.entry(k, v);
                    }
                }
                m.finish()
            }
        }
        let url = self.url.as_deref().map(redact_url);
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("url", &url)
            .field("options", &Opts(&self.options))
            .finish()
    }
}

/// A URL with its password, and any secret-looking query values, replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some((scheme, rest)) = url.split_once("://") {
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                out = format!("{scheme}://{}:<redacted>{}", &rest[..colon], &rest[at..]);
            }
        }
    }
    if let Some((base, query)) = out.clone().split_once('?') {
        let q: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=<redacted>"),
                _ => p.to_string(),
            })
            .collect();
        out = format!("{base}?{}", q.join("&"));
    }
    out
}

impl Config {
    /// A config naming `url`.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// The backend name or scheme this config selects: `backend` if given, else the URL's
    /// scheme.
    pub fn scheme(&self) -> Result<String> {
        if let Some(b) = &self.backend {
            return Ok(b.to_ascii_lowercase());
        }
        match &self.url {
            Some(u) => Ok(RegistryUrl::parse(u)?.scheme),
            None => Err(Error::invalid_config(
                "a registry config needs a `backend` or a `url`",
            )),
        }
    }

    /// A config from environment variables: `{prefix}URL`, `{prefix}BACKEND`, and every
    /// other `{prefix}NAME` as option `name` (lower-cased), e.g. with prefix `WAYPOST_`:
    /// `WAYPOST_URL=zk://h:2181/services WAYPOST_SESSION_TIMEOUT=10s`. `None` when neither
    /// a URL nor a backend is set.
    pub fn from_env_vars(
        prefix: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Option<Self> {
        let mut c = Self::default();
        for (k, v) in vars {
            let Some(name) = k.strip_prefix(prefix) else {
                continue;
            };
            match name {
                "URL" => c.url = Some(v),
                "BACKEND" => c.backend = Some(v),
                "" => {}
                other => {
                    c.options
                        .insert(other.to_ascii_lowercase(), serde_json::Value::String(v));
                }
            }
        }
        (c.url.is_some() || c.backend.is_some()).then_some(c)
    }

    /// [`Config::from_env_vars`] on this process's environment with prefix `WAYPOST_`.
    pub fn from_env() -> Option<Self> {
        Self::from_env_vars("WAYPOST_", std::env::vars())
    }

    /// Sets one option (builder style).
    pub fn with_option(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }
}

/// The registrar and watcher of one connection to a registry.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Discovery {
    /// Registers instances.
    pub registrar: Arc<dyn Registrar>,
    /// Lists and watches instances.
    pub watcher: Arc<dyn Watcher>,
    /// Fault injection for tests ([`TestHooks`](crate::backend::TestHooks)), where the
    /// backend offers it.
    pub hooks: Option<Arc<dyn crate::backend::TestHooks>>,
}

impl Discovery {
    /// A registrar and a watcher of one connection.
    pub fn new(registrar: Arc<dyn Registrar>, watcher: Arc<dyn Watcher>) -> Self {
        Self {
            registrar,
            watcher,
            hooks: None,
        }
    }

    /// With the backend's test hooks.
    pub fn with_hooks(mut self, hooks: Arc<dyn crate::backend::TestHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }
}

/// What a backend exports so that the facade can pick it by scheme: its names and a way
/// to connect from a URL or a [`Config`].
pub trait Connector: fmt::Debug + Send + Sync {
    /// The backend's canonical name, used as `backend` in configs: `zookeeper`.
    fn name(&self) -> &'static str;

    /// Every URL scheme or backend name it answers to, canonical name included:
    /// `["zookeeper", "zk"]`.
    fn schemes(&self) -> &'static [&'static str];

    /// Connects as configured. The config's scheme is one of [`Connector::schemes`].
    /// Must not hang on an unreachable registry: fail with [`Error::Unavailable`] or
    /// [`Error::Timeout`] within the configured connect timeout.
    fn connect<'a>(&'a self, config: &'a Config) -> BoxFuture<'a, Result<Discovery>>;
}

/// Parses a duration option such as `10s`, `250ms` or `1m 30s`, naming the key on error.
pub fn parse_duration(key: &str, value: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(value).map_err(|e| {
        Error::invalid_config(format!(
            "option `{key}`: `{}` is not a duration like `10s` or `250ms` ({e})",
            value.escape_debug()
        ))
    })
}

/// Merges a URL's query options and a config's explicit options into one JSON map that a
/// backend deserializes into its typed config (`#[serde(deny_unknown_fields)]` names an
/// unknown key). Query values are strings; explicit options win.
pub fn merged_options(
    url: Option<&RegistryUrl>,
    config: &Config,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    if let Some(u) = url {
        for (k, v) in u.query_map()? {
            m.insert(k, serde_json::Value::String(v));
        }
    }
    for (k, v) in &config.options {
        m.insert(k.clone(), v.clone());
    }
    Ok(m)
}

/// The option names the parts of a backend's URL fill, for [`url_options`]. `None`: the
/// backend's URLs have no such part.
#[derive(Clone, Copy, Debug, Default)]
pub struct UrlParts {
    /// Option filled with the hosts as a list of `host:port` strings.
    pub hosts: Option<&'static str>,
    /// Port filled in where a host has none.
    pub default_port: u16,
    /// Option filled with the path (without a trailing `/`).
    pub path: Option<&'static str>,
    /// Option filled with the user name of the userinfo part.
    pub username: Option<&'static str>,
    /// Option filled with the password of the userinfo part.
    pub password: Option<&'static str>,
}

/// The common first step of a backend's `from_config`: parses the config's URL (if any),
/// checks its scheme is one of `schemes`, and merges its query options with the config's
/// options ([`merged_options`]). Then fills the options named in `parts` from the URL's
/// hosts, path and userinfo, unless the config sets them explicitly. A query option that
/// names one of those parts is an error: it belongs in the URL itself.
///
/// Returns the parsed URL too, for checks of the backend's own.
pub fn url_options(
    backend: &str,
    schemes: &[&str],
    config: &Config,
    parts: UrlParts,
) -> Result<(
    Option<RegistryUrl>,
    serde_json::Map<String, serde_json::Value>,
)> {
    let url = config.url.as_deref().map(RegistryUrl::parse).transpose()?;
    let Some(u) = &url else {
        return Ok((None, merged_options(None, config)?));
    };
    if !schemes.contains(&u.scheme.as_str()) {
        return Err(Error::invalid_config(format!(
            "{backend} config got a `{}` URL; expected one of {}",
            u.scheme,
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let named = [parts.hosts, parts.path, parts.username, parts.password];
    if let Some((k, _)) = u
        .query
        .iter()
        .find(|(k, _)| named.contains(&Some(k.as_str())))
    {
        return Err(Error::invalid_config(format!(
            "{backend} URL option `{k}` belongs in the URL itself (scheme://user:password@host:port/path)"
        )));
    }
    let mut options = merged_options(url.as_ref(), config)?;
    let mut fill = |key: Option<&'static str>, value: Option<serde_json::Value>| {
        if let (Some(k), Some(v)) = (key, value) {
            options.entry(k).or_insert(v);
        }
    };
    fill(
        parts.hosts,
        (!u.hosts.is_empty()).then(|| serde_json::json!(u.endpoints(parts.default_port))),
    );
    fill(
        parts.path,
        (!u.path.is_empty()).then(|| u.path.clone().into()),
    );
    fill(parts.username, u.username.clone().map(Into::into));
    fill(parts.password, u.password.clone().map(Into::into));
    Ok((url, options))
}

/// Deserializes a backend's typed options from a merged option map into
/// [`Error::InvalidConfig`] naming the key: an unknown key (with
/// `#[serde(deny_unknown_fields)]`), or the key whose value did not parse
/// (`serde_path_to_error` keeps the path that `serde_json` alone drops). The value of a
/// secret-looking key (`password`, `token`, ...) is never echoed.
pub fn options_into<T: serde::de::DeserializeOwned>(
    backend: &str,
    options: serde_json::Map<String, serde_json::Value>,
) -> Result<T> {
    serde_path_to_error::deserialize(serde_json::Value::Object(options)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Error::invalid_config(format!("{backend} options: {inner}"))
        } else if is_secret_key(&path) {
            Error::invalid_config(format!(
                "{backend} option `{path}` has the wrong type (it must be a string)"
            ))
        } else {
            Error::invalid_config(format!("{backend} option `{path}`: {inner}"))
        }
    })
}

/// Serde `with` module for duration options: written as `"10s"` (humantime), read from
/// `"10s"` / `"250ms"` or a number of milliseconds. Use as
/// `#[serde(with = "waypost_core::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Writes `"10s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    /// Reads `"10s"`, `"250ms"` or milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::de::duration(d)
    }
}

/// Serde helpers for options that arrive as strings from URLs but as native values from
/// TOML or JSON.
pub mod de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum DurationRepr {
        Text(String),
        Millis(u64),
    }

    /// A duration given as `"10s"`/`"250ms"` or as a number of milliseconds.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match DurationRepr::deserialize(d)? {
            DurationRepr::Text(s) => humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!("`{s}` is not a duration like `10s` ({e})"))
            }),
            DurationRepr::Millis(ms) => Ok(Duration::from_millis(ms)),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumRepr {
        Text(String),
        Num(u64),
    }

    /// An unsigned number given as a number or as a string (as in URL queries).
    pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        let n = match NumRepr::deserialize(d)? {
            NumRepr::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a number")))?,
            NumRepr::Num(n) => n,
        };
        T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolRepr {
        Text(String),
        Bool(bool),
    }

    /// A boolean given as `true`/`false` or as a string (as in URL queries).
    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match BoolRepr::deserialize(d)? {
            BoolRepr::Bool(b) => Ok(b),
            BoolRepr::Text(s) => match s.as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(serde::de::Error::custom(format!(
                    "`{s}` is not true or false"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_host_urls_with_paths_and_queries() {
        let u = RegistryUrl::parse(
            "zk://alice:s3cr%40t@10.0.0.1:2181,10.0.0.2,[::1]:2182/services/prod?session_timeout=10s&x=a%20b",
        )
        .unwrap();
        assert_eq!(u.scheme, "zk");
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cr@t"));
        assert_eq!(
            u.hosts,
            vec![
                ("10.0.0.1".into(), Some(2181)),
                ("10.0.0.2".into(), None),
                ("::1".into(), Some(2182))
            ]
        );
        assert_eq!(
            u.endpoints(2181),
            ["10.0.0.1:2181", "10.0.0.2:2181", "[::1]:2182"]
        );
        assert_eq!(u.path, "/services/prod");
        assert_eq!(u.query_map().unwrap()["x"], "a b");
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("s3cr"), "{dbg}");
    }

    #[test]
    fn memory_url_has_no_hosts() {
        let u = RegistryUrl::parse("memory://").unwrap();
        assert_eq!(u.scheme, "memory");
        assert!(u.hosts.is_empty() && u.path.is_empty());
        let u = RegistryUrl::parse("MEMORY://tests?ttl=1s").unwrap();
        assert_eq!(u.scheme, "memory");
        assert_eq!(u.hosts, vec![("tests".into(), None)]);
    }

    #[test]
    fn bad_urls_name_the_part() {
        for (url, part) in [
            ("127.0.0.1:2181", "scheme://"),
            ("zk://h:99999/x", "port"),
            ("zk://h:abc", "port"),
            ("zk://a,,b/x", "host"),
            ("zk://h/%zz", "percent"),
            ("zk://h?a=1&a=2", "twice"),
        ] {
            let e = RegistryUrl::parse(url)
                .and_then(|u| u.query_map().map(|_| u))
                .unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}");
            assert!(e.to_string().contains(part), "{url}: {e}");
        }
    }

    #[test]
    fn errors_and_debug_never_show_passwords() {
        let e = RegistryUrl::parse("etcd://root:hunter2@h:notaport/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            redact_url("etcd://root:hunter2@h:2379/x?token=abc&ttl=1s"),
            "etcd://root:<redacted>@h:2379/x?token=<redacted>&ttl=1s"
        );
        let c = Config::from_url("consul://h:8500?token=abc")
            .with_option("token", "xyz")
            .with_option("datacenter", "dc1");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("abc") && !dbg.contains("xyz") && dbg.contains("dc1"),
            "{dbg}"
        );
    }

    #[test]
    fn config_from_toml_and_json() {
        let c: Config =
            toml::from_str("backend = \"memory\"\nname = \"t\"\nttl = \"2s\"\n").unwrap();
        assert_eq!(c.scheme().unwrap(), "memory");
        assert_eq!(c.options["ttl"], "2s");
        let c: Config =
            serde_json::from_str(r#"{"url":"zk://h:1/s","session_timeout":"3s"}"#).unwrap();
        assert_eq!(c.scheme().unwrap(), "zk");
        let merged = merged_options(
            Some(&RegistryUrl::parse("zk://h:1/s?session_timeout=1s&a=b").unwrap()),
            &c,
        )
        .unwrap();
        assert_eq!(merged["session_timeout"], "3s");
        assert_eq!(merged["a"], "b");
        assert!(Config::default().scheme().is_err());
    }

    #[test]
    fn url_options_fill_parts_unless_set_and_check_the_scheme() {
        let parts = UrlParts {
            hosts: Some("endpoints"),
            default_port: 2379,
            path: Some("prefix"),
            username: Some("user"),
            password: Some("password"),
        };
        let c = Config::from_url("etcd://u:p@a,b:1/svc?ttl=1s").with_option("prefix", "/mine");
        let (url, o) = url_options("etcd", &["etcd"], &c, parts).unwrap();
        assert!(url.is_some());
        assert_eq!(o["endpoints"], serde_json::json!(["a:2379", "b:1"]));
        assert_eq!(o["prefix"], "/mine", "explicit options win");
        assert_eq!(
            (o["user"].as_str(), o["password"].as_str()),
            (Some("u"), Some("p"))
        );
        assert_eq!(o["ttl"], "1s");
        let e = url_options("etcd", &["etcd"], &Config::from_url("zk://h"), parts).unwrap_err();
        assert!(
            e.to_string().contains("`zk`") && e.to_string().contains("etcd://"),
            "{e}"
        );
        let e = url_options(
            "etcd",
            &["etcd"],
            &Config::from_url("etcd://h?prefix=/x"),
            parts,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`prefix` belongs in the URL"), "{e}");
        let (url, o) = url_options("etcd", &["etcd"], &Config::default(), parts).unwrap();
        assert!(url.is_none() && o.is_empty());
    }

    #[test]
    fn config_from_env_vars() {
        let vars = [
            ("WAYPOST_URL", "zk://h:2181/s"),
            ("WAYPOST_SESSION_TIMEOUT", "10s"),
            ("OTHER", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::from_env_vars("WAYPOST_", vars).unwrap();
        assert_eq!(c.scheme().unwrap(), "zk");
        assert_eq!(c.options.len(), 1);
        assert_eq!(c.options["session_timeout"], "10s");
        assert!(Config::from_env_vars("WAYPOST_", [("OTHER".into(), "x".into())]).is_none());
    }

    #[test]
    fn option_helpers_accept_strings_and_native_values() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Opts {
            #[serde(deserialize_with = "de::duration")]
            ttl: std::time::Duration,
            #[serde(deserialize_with = "de::number")]
            n: u32,
            #[serde(deserialize_with = "de::boolean")]
            b: bool,
        }
        let from_url: Opts = options_into(
            "x",
            serde_json::json!({"ttl":"250ms","n":"7","b":"true"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert_eq!(
            (from_url.ttl.as_millis(), from_url.n, from_url.b),
            (250, 7, true)
        );
        let native: Opts = options_into(
            "x",
            serde_json::json!({"ttl":1000,"n":7,"b":false})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert_eq!(native.ttl.as_secs(), 1);
        let e = options_into::<Opts>(
            "x",
            serde_json::json!({"ttl":"1s","n":1,"b":true,"bogus":1})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = options_into::<Opts>(
            "x",
            serde_json::json!({"ttl":"soon","n":1,"b":true})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("option `ttl`"), "{e}");
        #[derive(Deserialize, Debug)]
        struct Secret {
            #[allow(dead_code)]
            token: String,
        }
        let e = options_into::<Secret>(
            "x",
            serde_json::json!({"token": 918273645})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("`token`") && !e.to_string().contains("918273645"),
            "{e}"
        );
        assert!(parse_duration("ttl", "soon")
            .unwrap_err()
            .to_string()
            .contains("`ttl`"));
    }
}
