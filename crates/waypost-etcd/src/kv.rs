//! Configuration keys: plain etcd keys under `config_prefix`, versioned by their
//! `mod_revision`, written with transactions that compare it, watched like services (a
//! read at a revision, then a watch from the next one; `stream.rs`).

use std::fmt;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, EventType, KeyValue, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use waypost_core::backend::{Change, Entry, Feed, KvDriver, Listing, Next, Scope};
use waypost_core::kv::{ConfigEntry, ConfigKey, Expected, Version};
use waypost_core::{Error, Result, Revision};

use crate::client::Conn;
use crate::stream::{events_after, EtcdWatch, Range};

/// The largest configuration value this backend writes: 1.5 MiB (etcd's default
/// `--max-request-bytes`, 1,572,864 bytes) less 8 KiB for the rest of the request.
///
/// Measured on etcd 3.4 with default settings and the longest key (`/config/` + 512
/// bytes): a plain put fits a value of up to 1,572,319 bytes (545 bytes of overhead), a
/// compare-and-set transaction (the key four times: two compares, the put, the read
/// back) up to 1,570,720 (2,144 bytes). The 8 KiB margin covers that with room for a
/// `config_prefix` of up to 1 KiB (its limit). A larger value is
/// [`InvalidInput`](waypost_core::Error::InvalidInput) before anything is sent.
pub const MAX_CONFIG_VALUE_LEN: usize = 1536 * 1024 - 8 * 1024;

/// The etcd backend's key/value primitives; core's
/// [`Kv`](waypost_core::backend::Kv) runs the
/// [`ConfigStore`](waypost_core::kv::ConfigStore) contract over them.
#[derive(Clone)]
pub(crate) struct EtcdKv {
    conn: Conn,
    /// Bumped by the `drop_connections` test hook: watch streams are dropped.
    drops: watch::Receiver<u64>,
}

impl fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdKv")
            .field("endpoints", &self.conn.config.endpoints)
            .field("config_prefix", &self.conn.config.config_prefix)
            .finish()
    }
}

/// Maps configuration keys to etcd keys and back.
#[derive(Clone, Debug)]
struct Keys {
    /// The configuration prefix with the trailing `/`: `/config/`.
    root: String,
}

impl Keys {
    fn new(conn: &Conn) -> Self {
        Self {
            root: format!("{}/", conn.config.config_key_prefix()),
        }
    }

    /// The etcd key of `key`: `/config/app/db`.
    fn key(&self, key: &ConfigKey) -> String {
        format!("{}{key}", self.root)
    }

    /// The etcd key prefix of every key below `prefix`: `/config/app/`.
    fn below(&self, prefix: &ConfigKey) -> String {
        format!("{}{prefix}/", self.root)
    }

    /// The configuration key an etcd key stands for; `None` (logged) when it is not one
    /// (a foreign key with a space, an empty segment, a trailing `/`...).
    fn decode(&self, raw: &[u8]) -> Option<ConfigKey> {
        let shown = || String::from_utf8_lossy(raw);
        let Some(rest) = raw.strip_prefix(self.root.as_bytes()) else {
            tracing::warn!(key = %shown(), "etcd: skipping a key outside the configuration prefix");
            return None;
        };
        let parsed = std::str::from_utf8(rest)
            .map_err(|_| Error::invalid_input("not UTF-8"))
            .and_then(ConfigKey::new);
        match parsed {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(key = %shown(), "etcd: skipping a key that is not a configuration key: {e}");
                None
            }
        }
    }

    fn entry(&self, kv: &KeyValue) -> Option<ConfigEntry> {
        let key = self.decode(kv.key())?;
        Some(ConfigEntry::new(
            key,
            kv.value().to_vec(),
            kv.mod_revision() as Version,
        ))
    }

    fn listing(&self, kvs: &[KeyValue], revision: Revision) -> Listing<ConfigEntry> {
        let entries = kvs
            .iter()
            .filter_map(|kv| {
                Some(Entry {
                    item: self.entry(kv)?,
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                })
            })
            .collect();
        Listing { entries, revision }
    }
}

impl EtcdKv {
    pub(crate) fn new(conn: Conn, drops: watch::Receiver<u64>) -> Self {
        Self { conn, drops }
    }

    fn keys(&self) -> Keys {
        Keys::new(&self.conn)
    }

    /// Runs `txn` (`compares` → put or delete, else a read of `key`); a failed compare is
    /// a conflict with the key's current version. Returns the revision of the write.
    async fn conditional(
        &self,
        operation: &'static str,
        key: &ConfigKey,
        compares: Vec<Compare>,
        write: TxnOp,
        expected: Expected,
    ) -> Result<Revision> {
        let k = self.keys().key(key);
        let txn = Txn::new()
            .when(compares)
            .and_then([write])
            .or_else([TxnOp::get(k, None)]);
        let resp = self.conn.txn(operation, txn).await?;
        if resp.succeeded() {
            return Ok(resp.header().map(|h| h.revision()).unwrap_or(0) as Revision);
        }
        // The read ran in the same transaction: it shows what the compare saw.
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision() as Version),
            _ => None,
        });
        Err(expected.conflict(key, current))
    }
}

/// The compares of "the key exists at `version`": its `mod_revision` is `version`, and
/// it exists (etcd compares a missing key as all zeros).
fn at_version(k: &str, version: Version) -> Vec<Compare> {
    vec![
        Compare::mod_revision(k, CompareOp::Equal, version as i64),
        Compare::create_revision(k, CompareOp::Greater, 0),
    ]
}

#[async_trait]
impl KvDriver for EtcdKv {
    type Feed = KvFeed;

    fn max_value_len(&self) -> usize {
        MAX_CONFIG_VALUE_LEN
    }

    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
        let k = self.keys().key(key);
        let resp = self
            .conn
            .call("reading a configuration key", || {
                let mut kv = self.conn.client.kv_client();
                let k = k.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| {
            ConfigEntry::new(
                key.clone(),
                kv.value().to_vec(),
                kv.mod_revision() as Version,
            )
        }))
    }

    async fn put(
        &self,
        key: &ConfigKey,
        value: &[u8],
        expected: Option<Expected>,
    ) -> Result<Version> {
        let k = self.keys().key(key);
        let Some(expected) = expected else {
            let resp = self
                .conn
                .call("writing a configuration key", || {
                    let mut kv = self.conn.client.kv_client();
                    let (k, value) = (k.clone(), value.to_vec());
                    async move { kv.put(k, value, None).await }
                })
                .await?;
            // A put's header revision is the revision it wrote: the key's mod_revision.
            return Ok(resp.header().map(|h| h.revision()).unwrap_or(0) as Version);
        };
        let compares = match expected {
            Expected::Absent => vec![Compare::create_revision(k.as_str(), CompareOp::Equal, 0)],
            Expected::Version(v) => at_version(&k, v),
        };
        let write = TxnOp::put(k.as_str(), value, None);
        self.conditional(
            "writing a configuration key",
            key,
            compares,
            write,
            expected,
        )
        .await
    }

    async fn delete(&self, key: &ConfigKey, expected: Option<Version>) -> Result<bool> {
        let k = self.keys().key(key);
        match expected {
            None => {
                let resp = self
                    .conn
                    .call("deleting a configuration key", || {
                        let mut kv = self.conn.client.kv_client();
                        let k = k.clone();
                        async move { kv.delete(k, None).await }
                    })
                    .await?;
                Ok(resp.deleted() > 0)
            }
            Some(v) => {
                let write = TxnOp::delete(k.as_str(), None);
                self.conditional(
                    "deleting a configuration key",
                    key,
                    at_version(&k, v),
                    write,
                    Expected::Version(v),
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn list(&self, prefix: &ConfigKey) -> Result<Listing<ConfigEntry>> {
        let keys = self.keys();
        let watch = EtcdWatch::new(
            &self.conn,
            Range::Prefix(keys.below(prefix)),
            format!("config prefix {prefix}/"),
            self.drops.clone(),
        );
        let (kvs, revision) = watch.read("listing configuration keys").await?;
        Ok(keys.listing(&kvs, revision))
    }

    fn feed(&self, scope: &Scope) -> KvFeed {
        let keys = self.keys();
        let (range, what) = match scope {
            Scope::Key(k) => (Range::Key(keys.key(k)), format!("config key {k}")),
            Scope::Prefix(p) => (Range::Prefix(keys.below(p)), format!("config prefix {p}/")),
        };
        KvFeed {
            watch: EtcdWatch::new(&self.conn, range, what, self.drops.clone()),
            keys,
        }
    }
}

/// A watch of one configuration key or prefix.
pub(crate) struct KvFeed {
    watch: EtcdWatch,
    keys: Keys,
}

impl fmt::Debug for KvFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvFeed")
            .field("watch", &self.watch.what())
            .finish()
    }
}

#[async_trait]
impl Feed for KvFeed {
    type Item = ConfigEntry;

    async fn list(&mut self) -> Result<Listing<ConfigEntry>> {
        let (kvs, revision) = self.watch.list("listing configuration keys").await?;
        Ok(self.keys.listing(&kvs, revision))
    }

    async fn next(&mut self, after: Revision) -> Result<Next<ConfigEntry>> {
        let r = self.watch.next(after).await?;
        let changes = events_after(&r, after)
            .map(|(kind, kv, revision)| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match kind {
                    // A foreign key that is not a configuration key holds nothing for us.
                    EventType::Put => Change::Put {
                        item: self.keys.entry(kv),
                        key,
                        revision,
                    },
                    EventType::Delete => Change::Delete { key, revision },
                }
            })
            .collect();
        Ok(Next::Changes(changes))
    }
}
