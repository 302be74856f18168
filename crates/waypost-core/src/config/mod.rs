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

mod de_impl;
mod options;
#[cfg(test)]
mod tests;
mod url;

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv::ConfigStore;
use crate::registrar::Registrar;
use crate::watcher::Watcher;

pub use de_impl::{de, duration};
pub use options::{merged_options, options_into, parse_duration, url_options, UrlParts};
pub use url::{redact_url, RegistryUrl};

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
#[non_exhaustive]
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

impl Config {
    /// A config naming `url`.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// A config naming a backend (`memory`, `zookeeper`, ...) without a URL; add its
    /// options with [`Config::with_option`].
    pub fn for_backend(backend: impl Into<String>) -> Self {
        Self {
            backend: Some(backend.into()),
            ..Self::default()
        }
    }

    /// With these options added (they replace options of the same name).
    pub fn with_options(mut self, options: serde_json::Map<String, serde_json::Value>) -> Self {
        self.options.extend(options);
        self
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
    /// Configuration keys and values, where the backend offers them; see
    /// [`Discovery::kv`].
    pub config_store: Option<Arc<dyn ConfigStore>>,
    /// Locks, semaphores and elections, where the backend offers them; see
    /// [`Discovery::coordinator`].
    pub coordination: Option<Arc<dyn crate::coord::Coordinator>>,
    /// Closes the connection's session; see [`Discovery::shutdown`].
    closer: Option<Closer>,
}

/// What [`Discovery::shutdown`] runs.
#[derive(Clone)]
struct Closer(Arc<dyn Fn() -> BoxFuture<'static, Result<()>> + Send + Sync>);

impl fmt::Debug for Closer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Closer")
    }
}

impl Discovery {
    /// A registrar and a watcher of one connection.
    pub fn new(registrar: Arc<dyn Registrar>, watcher: Arc<dyn Watcher>) -> Self {
        Self {
            registrar,
            watcher,
            hooks: None,
            config_store: None,
            coordination: None,
            closer: None,
        }
    }

    /// With the backend's shutdown (closing its session).
    pub fn with_shutdown(
        mut self,
        shutdown: impl Fn() -> BoxFuture<'static, Result<()>> + Send + Sync + 'static,
    ) -> Self {
        self.closer = Some(Closer(Arc::new(shutdown)));
        self
    }

    /// Shuts the connection down now: every registration is deregistered, and the session
    /// is closed, so the registry drops at once whatever is bound to it (locks,
    /// leaderships, contenders left by abandoned acquisitions). Later calls fail with
    /// [`Error::Closed`]. Short-lived processes (a CLI, a job) call it before they exit,
    /// since the background clean-up of dropped guards needs the runtime to keep running.
    pub async fn shutdown(&self) -> Result<()> {
        match &self.closer {
            Some(c) => (c.0)().await,
            None => Ok(()),
        }
    }

    /// With the backend's coordination.
    pub fn with_coordinator(mut self, coordinator: Arc<dyn crate::coord::Coordinator>) -> Self {
        self.coordination = Some(coordinator);
        self
    }

    /// The registry's locks, semaphores and elections ([`Coordinator`](crate::coord::Coordinator)),
    /// bound to the same session as this client's registrations. [`Error::Unsupported`]
    /// for a backend without them.
    pub fn coordinator(&self) -> Result<Arc<dyn crate::coord::Coordinator>> {
        self.coordination
            .clone()
            .ok_or_else(|| Error::unsupported("locks and elections on this backend"))
    }

    /// With the backend's configuration store.
    pub fn with_config_store(mut self, store: Arc<dyn ConfigStore>) -> Self {
        self.config_store = Some(store);
        self
    }

    /// The registry's configuration store ([`ConfigStore`]): keys and values beside the
    /// instances, on the same connection. [`Error::Unsupported`] for a backend without one.
    pub fn kv(&self) -> Result<Arc<dyn ConfigStore>> {
        self.config_store
            .clone()
            .ok_or_else(|| Error::unsupported("configuration keys on this backend"))
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
