//! The node rule of configuration keys, and reading them: which znodes are keys (a
//! **directory** — empty data with children now or before — is not), a key's entry, and
//! the walk that lists every key below a node. Shared by the store (`kv.rs`) and the feed
//! (`kv_feed.rs`).

use tokio::time::Instant;
use waypost_core::backend::{Entry, Listing};
use waypost_core::kv::{ConfigEntry, ConfigKey};
use zookeeper_client::{Client, Error as ZkErr, Stat};

use crate::client::{Ctx, Failed};
use crate::feed::zxid;

/// Whether a node holding `data` with `stat` is a key, not a directory.
pub(crate) fn is_key(data: &[u8], stat: &Stat) -> bool {
    !data.is_empty() || (stat.num_children == 0 && stat.cversion == 0)
}

/// The key a node path below `root` names, relative to it (`{root}/a/b` → `a/b`): what
/// listings and feeds use as the entry's registry key.
pub(crate) fn relative<'a>(root: &str, path: &'a str) -> &'a str {
    path.strip_prefix(root)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(path)
}

/// The entry a key node holds, `None` (logged) if its name is not a [`ConfigKey`].
pub(crate) fn entry_at(root: &str, path: &str, data: Vec<u8>, stat: &Stat) -> Option<ConfigEntry> {
    match ConfigKey::new(relative(root, path)) {
        Ok(key) => Some(ConfigEntry::new(key, data, zxid(stat.mzxid))),
        Err(e) => {
            tracing::warn!(
                node = path,
                "zookeeper: skipping a node whose name is not a configuration key: {e}"
            );
            None
        }
    }
}

/// Reads a node: `None` if it does not exist.
pub(crate) async fn read(
    ctx: &Ctx,
    client: &Client,
    path: &str,
    deadline: Instant,
) -> std::result::Result<Option<(Vec<u8>, Stat)>, Failed> {
    match ctx
        .call(deadline, "zookeeper get", path, client.get_data(path))
        .await
    {
        Ok(x) => Ok(Some(x)),
        Err(f) if f.code() == Some(&ZkErr::NoNode) => Ok(None),
        Err(f) => Err(f),
    }
}

/// Every key strictly below node `top`, level by level (the reads of one level
/// pipelined), at the highest zxid seen. Entries are keyed by their path below `root`.
pub(crate) async fn walk(
    ctx: &Ctx,
    client: &Client,
    root: &str,
    top: &str,
    deadline: Instant,
) -> std::result::Result<Listing<ConfigEntry>, Failed> {
    let mut listing = Listing {
        entries: Vec::new(),
        revision: 0,
    };
    let mut dirs = vec![top.to_string()];
    while !dirs.is_empty() {
        let lists: Vec<_> = dirs.iter().map(|d| client.get_children(d)).collect();
        let lists = ctx
            .call(deadline, "zookeeper list", top, async {
                Ok(futures::future::join_all(lists).await)
            })
            .await?;
        let mut level = Vec::new();
        for (dir, r) in dirs.iter().zip(lists) {
            match r {
                Ok((names, stat)) => {
                    listing.revision = listing.revision.max(zxid(stat.pzxid));
                    level.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
                }
                Err(ZkErr::NoNode) => {}
                Err(e) => return Err(Failed::Zk("zookeeper list", dir.clone(), e)),
            }
        }
        let reads: Vec<_> = level.iter().map(|p| client.get_data(p)).collect();
        let reads = ctx
            .call(deadline, "zookeeper get", top, async {
                Ok(futures::future::join_all(reads).await)
            })
            .await?;
        dirs = Vec::new();
        for (path, r) in level.into_iter().zip(reads) {
            match r {
                Ok((data, stat)) => {
                    listing.revision = listing.revision.max(zxid(stat.mzxid));
                    let key = is_key(&data, &stat);
                    if key {
                        if let Some(item) = entry_at(root, &path, data, &stat) {
                            listing.entries.push(Entry {
                                key: relative(root, &path).to_string(),
                                item,
                            });
                        }
                    }
                    if stat.num_children > 0 {
                        dirs.push(path);
                    }
                }
                Err(ZkErr::NoNode) => {}
                Err(e) => return Err(Failed::Zk("zookeeper get", path, e)),
            }
        }
    }
    Ok(listing)
}
