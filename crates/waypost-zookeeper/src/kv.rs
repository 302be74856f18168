//! Configuration keys: one persistent znode per key below
//! [`ZkConfig::config_prefix`](crate::ZkConfig::config_prefix); core's
//! [`Kv`](waypost_core::backend::Kv) runs the [`ConfigStore`](waypost_core::kv::ConfigStore)
//! contract over these primitives, and [`ZkKvFeed`](crate::kv_feed::ZkKvFeed) watches them.
//!
//! The node rule (see the crate docs, "Configuration keys"): a node is a key unless it is
//! a **directory**, a node with empty data that has, or once had, children (`numChildren`
//! above 0 or `cversion` above 0). A key's version is its `mzxid`; the node's own
//! `version` is only the precondition of the write that follows a read.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;
use waypost_core::backend::{KvDriver, Listing, Scope, Session};
use waypost_core::kv::{ConfigEntry, ConfigKey, Expected, Version};
use waypost_core::{Error, Result};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr, MultiWriteResult};

use crate::client::{self, Ctx, Failed};
use crate::feed::zxid;
use crate::kv_feed::ZkKvFeed;
use crate::kv_nodes::{is_key, read, walk};
use crate::session::{Driver, ZkSession};

/// The largest configuration value stored, in bytes: 1,000,000.
///
/// ZooKeeper refuses (by closing the connection) any request larger than its
/// `jute.maxbuffer`, 1 MiB − 1 byte by default (1,048,575 bytes), path, ACL and headers
/// included. 1,000,000 leaves 48 KiB for the longest path (a 512-byte key below the
/// prefix), digest ACLs and the parent nodes a first write creates in the same request.
pub const MAX_VALUE_LEN: usize = 1_000_000;

/// How many times one write reads and writes again after the node changed between the
/// two (another writer, a parent removed meanwhile) before it gives up (temporary error).
const ATTEMPTS: usize = 16;

/// Requests up to this size (value, paths and per-node overhead) create a key and its
/// missing parents in one transaction; larger ones create the parents first.
const MULTI_BUDGET: usize = 1024 * 1024 - 8 * 1024;

/// The nodes above `path`, from the top (`/a/b/c` → `/a`, `/a/b`).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .skip(1)
        .map(move |(i, _)| &path[..i])
}

fn check(key: &ConfigKey, expected: Option<Expected>, current: Option<Version>) -> Result<()> {
    expected.map_or(Ok(()), |e| e.check(key, current))
}

/// Whether a write failed because the node changed since it was read: read again.
fn raced(f: &Failed) -> bool {
    matches!(
        f.code(),
        Some(ZkErr::BadVersion | ZkErr::NoNode | ZkErr::NodeExists | ZkErr::NotEmpty)
    )
}

/// The ZooKeeper backend's key/value primitives, bound to the session of a
/// [`ZkDiscovery`](crate::ZkDiscovery) (a new one after an expiry).
#[derive(Clone)]
pub struct ZkKv {
    session: Session<Driver>,
    ctx: Arc<Ctx>,
}

impl fmt::Debug for ZkKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkKv")
            .field("config_prefix", &self.ctx.config.config_prefix)
            .finish()
    }
}

impl ZkKv {
    pub(crate) fn new(session: Session<Driver>, ctx: Arc<Ctx>) -> Self {
        Self { session, ctx }
    }

    fn node(&self, key: &ConfigKey) -> String {
        format!("{}/{key}", self.ctx.config.config_prefix)
    }

    /// A connected client of the current session (waits up to `deadline` for a
    /// reconnection).
    async fn client(&self, deadline: Instant) -> Result<(ZkSession, Client)> {
        let session = self.session.current().await?;
        let client = session.client()?;
        match client::connected(&client, deadline).await {
            Ok(()) => Ok((session, client)),
            Err(e) => Err(self.lost(&session, e)),
        }
    }

    /// An error of `session`: an expiry is reported to core's session at once, which
    /// opens the next.
    fn lost(&self, session: &ZkSession, e: Error) -> Error {
        if matches!(e, Error::SessionExpired) {
            self.session.expired(session);
        }
        e
    }

    fn fail(&self, session: &ZkSession, f: Failed) -> Error {
        self.lost(session, self.ctx.error(f))
    }

    fn create_options(&self, directory: bool) -> zookeeper_client::CreateOptions<'_> {
        let acls = if directory {
            &self.ctx.parent_acls
        } else {
            &self.ctx.node_acls
        };
        CreateMode::Persistent.with_acls(Acls::new(acls))
    }

    /// Creates the key node `path` holding `value`, with the parents it lacks in the same
    /// transaction (so that no parent is ever seen without its child).
    async fn create(
        &self,
        client: &Client,
        path: &str,
        value: &[u8],
        deadline: Instant,
    ) -> std::result::Result<Version, Failed> {
        let ctx = &self.ctx;
        let opts = self.create_options(false);
        match ctx
            .call(
                deadline,
                "zookeeper create",
                path,
                client.create(path, value, &opts),
            )
            .await
        {
            Ok((stat, _)) if !stat.is_invalid() => return Ok(zxid(stat.mzxid)),
            Ok(_) => return self.version_of(client, path, deadline).await,
            Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
            Err(f) => return Err(f),
        }
        // Which parents are missing: one pipelined round of existence checks.
        let parents: Vec<&str> = ancestors(path).collect();
        let checks: Vec<_> = parents.iter().map(|p| client.check_stat(p)).collect();
        let found = ctx
            .call(deadline, "zookeeper exists", path, async {
                Ok(futures::future::join_all(checks).await)
            })
            .await?;
        let mut missing = Vec::new();
        for (p, r) in parents.into_iter().zip(found) {
            match r {
                Ok(Some(_)) => {}
                Ok(None) => missing.push(p),
                Err(e) => return Err(Failed::Zk("zookeeper exists", p.to_string(), e)),
            }
        }
        let dir = self.create_options(true);
        let size = value.len() + missing.iter().map(|p| p.len() + 128).sum::<usize>() + path.len();
        let mut multi = client.new_multi_writer();
        let op = |e| Failed::Zk("zookeeper create", path.to_string(), e);
        for p in &missing {
            multi.add_create(p, b"", &dir).map_err(op)?;
        }
        if size > MULTI_BUDGET {
            // Too large for one request next to the value: the parents first.
            tracing::debug!(
                node = path,
                "zookeeper: creating the parents of a large value first"
            );
            ctx.call(deadline, "zookeeper create", path, async {
                multi.commit().await.map_err(ZkErr::from)
            })
            .await?;
            multi = client.new_multi_writer();
        }
        multi.add_create(path, value, &opts).map_err(op)?;
        let results = ctx
            .call(deadline, "zookeeper create", path, async {
                multi.commit().await.map_err(ZkErr::from)
            })
            .await?;
        match results.last() {
            Some(MultiWriteResult::Create { stat, .. }) if !stat.is_invalid() => {
                Ok(zxid(stat.mzxid))
            }
            _ => self.version_of(client, path, deadline).await,
        }
    }

    /// The `mzxid` of `path`, for servers whose create answers carry no stat.
    async fn version_of(
        &self,
        client: &Client,
        path: &str,
        deadline: Instant,
    ) -> std::result::Result<Version, Failed> {
        let stat = self
            .ctx
            .call(deadline, "zookeeper exists", path, client.check_stat(path))
            .await?;
        stat.map(|s| zxid(s.mzxid))
            .ok_or_else(|| Failed::Zk("zookeeper exists", path.to_string(), ZkErr::NoNode))
    }

    /// Replaces the directory node `path` (no children, at `version`) by a key node with
    /// an empty value, in one transaction.
    async fn replace_empty(
        &self,
        client: &Client,
        path: &str,
        version: i32,
        deadline: Instant,
    ) -> std::result::Result<Version, Failed> {
        let op = |e| Failed::Zk("zookeeper create", path.to_string(), e);
        let mut multi = client.new_multi_writer();
        multi.add_delete(path, Some(version)).map_err(op)?;
        multi
            .add_create(path, b"", &self.create_options(false))
            .map_err(op)?;
        let results = self
            .ctx
            .call(deadline, "zookeeper create", path, async {
                multi.commit().await.map_err(ZkErr::from)
            })
            .await?;
        match results.last() {
            Some(MultiWriteResult::Create { stat, .. }) if !stat.is_invalid() => {
                Ok(zxid(stat.mzxid))
            }
            _ => self.version_of(client, path, deadline).await,
        }
    }

    /// After deleting `path`: removes the directories above it left without children
    /// (below the configuration prefix), each only at the version read. Best effort.
    async fn prune(&self, client: &Client, path: &str, deadline: Instant) {
        let root = &self.ctx.config.config_prefix;
        let mut above: Vec<&str> = ancestors(path)
            .filter(|p| p.len() > root.len() && p.starts_with(root.as_str()))
            .collect();
        while let Some(dir) = above.pop() {
            let Ok(Some((data, stat))) = read(&self.ctx, client, dir, deadline).await else {
                return;
            };
            if is_key(&data, &stat) || stat.num_children > 0 {
                return;
            }
            let delete = client.delete(dir, Some(stat.version));
            if let Err(f) = self
                .ctx
                .call(deadline, "zookeeper delete", dir, delete)
                .await
            {
                tracing::debug!(node = dir, "zookeeper: an empty directory stays: {f:?}");
                return;
            }
        }
    }
}

#[async_trait]
impl KvDriver for ZkKv {
    type Feed = ZkKvFeed;

    fn max_value_len(&self) -> usize {
        MAX_VALUE_LEN
    }

    async fn get(&self, key: &ConfigKey) -> Result<Option<ConfigEntry>> {
        let deadline = self.ctx.deadline();
        let (session, client) = self.client(deadline).await?;
        let path = self.node(key);
        match read(&self.ctx, &client, &path, deadline).await {
            Ok(Some((data, stat))) if is_key(&data, &stat) => {
                Ok(Some(ConfigEntry::new(key.clone(), data, zxid(stat.mzxid))))
            }
            Ok(_) => Ok(None),
            Err(f) => Err(self.fail(&session, f)),
        }
    }

    async fn put(
        &self,
        key: &ConfigKey,
        value: &[u8],
        expected: Option<Expected>,
    ) -> Result<Version> {
        let deadline = self.ctx.deadline();
        let (session, client) = self.client(deadline).await?;
        let path = self.node(key);
        let ctx = &self.ctx;
        // An unconditional non-empty value on an existing node: one round trip.
        if expected.is_none() && !value.is_empty() {
            let set = client.set_data(&path, value, None);
            match ctx.call(deadline, "zookeeper set", &path, set).await {
                Ok(stat) => return Ok(zxid(stat.mzxid)),
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
                Err(f) => return Err(self.fail(&session, f)),
            }
        }
        for _ in 0..ATTEMPTS {
            let found = read(ctx, &client, &path, deadline)
                .await
                .map_err(|f| self.fail(&session, f))?;
            let current = found
                .as_ref()
                .filter(|(data, stat)| is_key(data, stat))
                .map(|(_, stat)| zxid(stat.mzxid));
            check(key, expected, current)?;
            let written = match found {
                None => self.create(&client, &path, value, deadline).await,
                Some((_, stat)) if value.is_empty() && !is_key(value, &stat) => {
                    if stat.num_children > 0 {
                        return Err(Error::invalid_input(format!(
                            "zookeeper: configuration key `{key}` has keys below it: an empty value there would read as a directory (see the backend's node rule)"
                        )));
                    }
                    self.replace_empty(&client, &path, stat.version, deadline)
                        .await
                }
                Some((_, stat)) => {
                    let set = client.set_data(&path, value, Some(stat.version));
                    ctx.call(deadline, "zookeeper set", &path, set)
                        .await
                        .map(|stat| zxid(stat.mzxid))
                }
            };
            match written {
                Ok(version) => return Ok(version),
                Err(f) if raced(&f) => continue,
                Err(f) => return Err(self.fail(&session, f)),
            }
        }
        Err(Error::unavailable(format!(
            "zookeeper: configuration key `{key}` kept changing under a write"
        )))
    }

    async fn delete(&self, key: &ConfigKey, expected: Option<Version>) -> Result<bool> {
        let deadline = self.ctx.deadline();
        let (session, client) = self.client(deadline).await?;
        let path = self.node(key);
        let ctx = &self.ctx;
        for _ in 0..ATTEMPTS {
            let found = read(ctx, &client, &path, deadline)
                .await
                .map_err(|f| self.fail(&session, f))?;
            let stat = match found {
                Some((data, stat)) if is_key(&data, &stat) => stat,
                _ => {
                    return match expected {
                        Some(v) => Err(Expected::Version(v).conflict(key, None)),
                        None => Ok(false),
                    }
                }
            };
            if let Some(v) = expected {
                check(key, Some(Expected::Version(v)), Some(zxid(stat.mzxid)))?;
            }
            let done = if stat.num_children == 0 {
                let delete = client.delete(&path, Some(stat.version));
                ctx.call(deadline, "zookeeper delete", &path, delete)
                    .await
                    .map(|()| true)
            } else {
                // ZooKeeper cannot delete a node with children: empty it, which makes it
                // a directory.
                let set = client.set_data(&path, b"", Some(stat.version));
                ctx.call(deadline, "zookeeper set", &path, set)
                    .await
                    .map(|_| false)
            };
            match done {
                Ok(removed) => {
                    if removed {
                        self.prune(&client, &path, deadline).await;
                    }
                    return Ok(true);
                }
                Err(f) if raced(&f) => continue,
                Err(f) => return Err(self.fail(&session, f)),
            }
        }
        Err(Error::unavailable(format!(
            "zookeeper: configuration key `{key}` kept changing under a delete"
        )))
    }

    async fn list(&self, prefix: &ConfigKey) -> Result<Listing<ConfigEntry>> {
        let deadline = self.ctx.deadline();
        let (session, client) = self.client(deadline).await?;
        let root = &self.ctx.config.config_prefix;
        walk(&self.ctx, &client, root, &self.node(prefix), deadline)
            .await
            .map_err(|f| self.fail(&session, f))
    }

    fn feed(&self, scope: &Scope) -> ZkKvFeed {
        let path = match scope {
            Scope::Key(k) | Scope::Prefix(k) => self.node(k),
        };
        ZkKvFeed::new(self.session.clone(), self.ctx.clone(), scope.clone(), path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_nodes::relative;
    use zookeeper_client::Stat;

    #[test]
    fn ancestors_from_the_top() {
        let a: Vec<&str> = ancestors("/config/a/b").collect();
        assert_eq!(a, ["/config", "/config/a"]);
        assert_eq!(ancestors("/config").count(), 0);
    }

    #[test]
    fn directories_are_empty_nodes_that_have_or_had_children() {
        let stat = |children: i32, cversion: i32| Stat {
            czxid: 1,
            mzxid: 1,
            pzxid: 1,
            ctime: 0,
            mtime: 0,
            version: 0,
            cversion,
            aversion: 0,
            ephemeral_owner: 0,
            data_length: 0,
            num_children: children,
        };
        assert!(is_key(b"", &stat(0, 0)), "an empty value");
        assert!(is_key(b"x", &stat(3, 3)), "a key with keys below it");
        assert!(!is_key(b"", &stat(2, 2)), "a parent");
        assert!(
            !is_key(b"", &stat(0, 4)),
            "a parent whose keys were deleted"
        );
        assert_eq!(relative("/config", "/config/a/b"), "a/b");
    }
}
