//! Configuration keys in Consul's KV store: core's [`Kv`](waypost_core::backend::Kv) over
//! [`ConsulKv`], the primitives.
//!
//! - Key `a/b` is the KV key `{config_prefix}/a/b` (`config/a/b` by default), so
//!   `consul kv get config/a/b` reads the same bytes.
//! - Reads: `GET /v1/kv/{key}` (`404` with `X-Consul-Index` for a missing key), and
//!   `GET /v1/kv/{prefix}/?recurse` for a listing; `X-Consul-Index` is the listing's
//!   revision, each entry's `ModifyIndex` its version.
//! - Writes are single-operation transactions (`PUT /v1/txn`): `set`, `cas` (index 0 =
//!   create only), `check-index` + `delete`, `get` + `delete`. Unlike `PUT /v1/kv/{key}`
//!   (which answers only `true`/`false`), a transaction answers with the new
//!   `ModifyIndex`, so `put` returns the version *its* write created, in one round trip.
//!   A failed expectation (`409`) is a conflict; the current version is then read. Each
//!   write stamps `Flags` ([`codec::write_stamp`]) so that rewriting a value is a new
//!   version.
//! - Watches: [`feed`]'s blocking queries.

mod codec;
#[cfg(test)]
mod codec_prop;
mod feed;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use waypost_core::backend::{KvDriver, Listing, Scope, Session};
use waypost_core::kv::{ConfigEntry, ConfigKey, Expected, Version};
use waypost_core::{Error, Result};

use crate::client::{Agent, ReadMode};
use crate::error::ConsulError;
use crate::mux::Mux;
use crate::session::AgentDriver;
use codec::{KvPair, TxnOp};
pub use feed::KvFeed;

/// The largest value waypost writes to Consul: 380 KiB.
///
/// Measured on Consul 1.8.7 with default settings: `PUT /v1/kv/{key}` takes values up to
/// `kv_max_value_size` (512 KiB), but it does not answer with the new `ModifyIndex`, so
/// waypost writes through `/v1/txn`, whose whole request is capped by `txn_max_req_len`
/// (512 KiB) with the value in base64 (4/3): a value of 393,100 bytes passes with a short
/// key, 393,216 (384 KiB) does not. 380 KiB leaves room for the longest key (1 KiB with
/// the prefix) and the JSON around it. Larger values written by other tools read fine.
pub const MAX_CONFIG_VALUE_LEN: usize = 380 * 1024;

/// The default `config_prefix`: configuration keys live under the KV key `config/`.
pub const DEFAULT_CONFIG_PREFIX: &str = "config";

/// [`DEFAULT_CONFIG_PREFIX`] as a key.
pub(crate) fn default_config_prefix() -> ConfigKey {
    ConfigKey::new(DEFAULT_CONFIG_PREFIX).expect("the default prefix is a valid key")
}

/// Consul's configuration-key primitives (core's [`Kv`](waypost_core::backend::Kv) runs
/// the [`ConfigStore`](waypost_core::kv::ConfigStore) contract over them). Reach them
/// through [`ConsulDiscovery::kv`](crate::ConsulDiscovery::kv).
#[derive(Clone)]
pub struct ConsulKv {
    agent: Agent,
    /// Wakes the blocking reads below the prefix that hold no per-key permit.
    signal: Mux,
    session: Session<AgentDriver>,
    /// The configuration prefix with its `/`: `config/`.
    root: String,
    wait: Duration,
}

impl fmt::Debug for ConsulKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulKv")
            .field("agent", &self.agent)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// One read: the raw entries (not yet decoded) and the `X-Consul-Index`.
struct Read {
    pairs: Vec<KvPair>,
    index: u64,
}

impl ConsulKv {
    pub(crate) fn new(
        agent: Agent,
        session: Session<AgentDriver>,
        prefix: &ConfigKey,
        wait: Duration,
    ) -> Self {
        let root = format!("{prefix}/");
        Self {
            signal: Mux::kv(&agent, &root, wait),
            agent,
            session,
            root,
            wait,
        }
    }

    /// The KV key of `key`.
    fn consul_key(&self, key: &ConfigKey) -> String {
        format!("{}{key}", self.root)
    }

    /// Reads what `scope` covers, as `mode` says.
    async fn read(&self, scope: &Scope, mode: ReadMode) -> Result<Read> {
        let op = "read configuration keys";
        let (path, query) = match scope {
            Scope::Key(k) => (format!("/v1/kv/{}", self.consul_key(k)), Vec::new()),
            Scope::Prefix(p) => (
                format!("/v1/kv/{}/", self.consul_key(p)),
                vec![("recurse", String::new())],
            ),
        };
        let reply = self
            .agent
            .get_blocking(op, &path, query, mode, &self.signal)
            .await?;
        let pairs = match reply.status {
            404 => Vec::new(),
            200..=299 => serde_json::from_slice(&reply.body)
                .map_err(|source| ConsulError::Decode { op, source })?,
            status => return Err(ConsulError::status(op, status, &reply.body).into()),
        };
        let index = reply.index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        // Consul: an index below 1 must be 1 (0 would not block).
        Ok(Read {
            pairs,
            index: index.max(1),
        })
    }

    /// Runs one transaction: `Ok(results)` when applied, `Ok(Err(why))` when an
    /// operation's check failed (nothing was written).
    async fn txn(
        &self,
        op: &'static str,
        ops: &[TxnOp],
    ) -> Result<std::result::Result<Vec<KvPair>, String>> {
        let body = serde_json::to_vec(ops).map_err(|source| ConsulError::Decode { op, source })?;
        self.agent.txn(op, body, "a KV write").await
    }

    /// The conflict of a write to `key` that expected `expected`, with the current version.
    async fn conflict(&self, key: &ConfigKey, expected: Expected) -> Error {
        match self.get(key).await {
            Ok(current) => expected.conflict(key, current.map(|e| e.version)),
            Err(e) => e,
        }
    }
}

fn no_result(op: &'static str) -> Error {
    ConsulError::Protocol {
        op,
        what: "the transaction answered without the written entry".into(),
    }
    .into()
}

#[async_trait]
impl KvDriver for ConsulKv {
    type Feed = KvFeed;

    fn max_value_len(&self) -> usize {
        MAX_CONFIG_VALUE_LEN
    }

    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
        self.session.check_open()?;
        let read = self.read(&Scope::Key(key.clone()), ReadMode::Plain).await?;
        let full = self.consul_key(key);
        Ok(read
            .pairs
            .into_iter()
            .find(|p| p.key == full)
            .and_then(|p| match codec::decode_pair(&p, &self.root) {
                Ok(e) => Some(e),
                Err(why) => {
                    tracing::warn!(%key, "consul: skipping a KV entry: {why}");
                    None
                }
            }))
    }

    async fn put(
        &self,
        key: &ConfigKey,
        value: &[u8],
        expected: Option<Expected>,
    ) -> Result<Version> {
        self.session.check_open()?;
        let full = self.consul_key(key);
        let stamp = codec::write_stamp();
        let op = match expected {
            None => TxnOp::write("set", &full, value, stamp, None),
            Some(Expected::Absent) => TxnOp::write("cas", &full, value, stamp, Some(0)),
            // `cas=0` means "create only": no key is ever at version 0.
            Some(e @ Expected::Version(0)) => return Err(self.conflict(key, e).await),
            Some(Expected::Version(v)) => TxnOp::write("cas", &full, value, stamp, Some(v)),
        };
        let what = "write a configuration key";
        match self.txn(what, &[op]).await? {
            Ok(results) => results
                .first()
                .map(|p| p.modify_index)
                .ok_or_else(|| no_result(what)),
            Err(why) => {
                tracing::debug!(%key, "consul: conditional write refused: {why}");
                match expected {
                    Some(expected) => Err(self.conflict(key, expected).await),
                    None => Err(ConsulError::Protocol {
                        op: what,
                        what: format!("an unconditional write was refused: {why}"),
                    }
                    .into()),
                }
            }
        }
    }

    async fn delete(&self, key: &ConfigKey, expected: Option<Version>) -> Result<bool> {
        self.session.check_open()?;
        let full = self.consul_key(key);
        let what = "delete a configuration key";
        // A plain `delete` (and `delete-cas` of a missing key) succeeds whether the key
        // existed or not: a check first says which.
        let check = match expected {
            None => TxnOp::new("get", &full, None),
            Some(v) => TxnOp::new("check-index", &full, Some(v)),
        };
        let ops = [check, TxnOp::new("delete", &full, None)];
        match (self.txn(what, &ops).await?, expected) {
            (Ok(_), _) => Ok(true),
            (Err(_), None) => Ok(false),
            (Err(why), Some(v)) => {
                tracing::debug!(%key, "consul: conditional delete refused: {why}");
                Err(self.conflict(key, Expected::Version(v)).await)
            }
        }
    }

    async fn list(&self, prefix: &ConfigKey) -> Result<Listing<ConfigEntry>> {
        self.session.check_open()?;
        let scope = Scope::Prefix(prefix.clone());
        let read = self.read(&scope, ReadMode::Plain).await?;
        Ok(Listing {
            entries: codec::decode_entries(read.pairs, &self.root, &scope, true),
            revision: read.index,
        })
    }

    fn feed(&self, scope: &Scope) -> KvFeed {
        KvFeed::new(self.clone(), scope.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::ConsulConfig;
    use waypost_core::config::Config;
    use waypost_core::Error;

    #[test]
    fn config_prefix_from_urls_and_serde() {
        let c = ConsulConfig::from_url("consul://h:1").unwrap();
        assert_eq!(c.config_prefix.as_str(), super::DEFAULT_CONFIG_PREFIX);
        let c = ConsulConfig::from_url("consul://h:1?config_prefix=apps/prod.v2").unwrap();
        assert_eq!(c.config_prefix.as_str(), "apps/prod.v2");
        let c = ConsulConfig::from_url("consul://h:1?config_prefix=apps%2Fprod").unwrap();
        assert_eq!(c.config_prefix.as_str(), "apps/prod");
        let c: Config =
            serde_json::from_str(r#"{"backend":"consul","config_prefix":"my_app/config"}"#)
                .unwrap();
        let c = ConsulConfig::from_config(&c).unwrap();
        assert_eq!(c.config_prefix.as_str(), "my_app/config");
        let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let c = ConsulConfig::default().with_config_prefix("team/a".parse().unwrap());
        assert_eq!(c.config_prefix.as_str(), "team/a");
    }

    #[test]
    fn bad_config_prefixes_name_the_option() {
        for bad in ["", "/config", "config/", "a//b", "a%20b", "..", "caf%C3%A9"] {
            let url = format!("consul://h:1?config_prefix={bad}");
            let e = ConsulConfig::from_url(&url).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
            assert!(e.to_string().contains("`config_prefix`"), "{url}: {e}");
        }
        let c: Config = serde_json::from_str(r#"{"backend":"consul","config_prefix":7}"#).unwrap();
        let e = ConsulConfig::from_config(&c).unwrap_err();
        assert!(e.to_string().contains("`config_prefix`"), "{e}");
    }
}
