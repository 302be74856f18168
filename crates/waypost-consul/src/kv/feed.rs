//! The watch primitives of configuration keys: blocking queries on the key
//! (`GET /v1/kv/{key}?index=&wait=`) or the prefix (`?recurse`). A feed never watches
//! "from now": its first blocking query waits past the index of its own listing.
//!
//! - Each answer is a complete read. The feed compares it with the last one by key and
//!   `ModifyIndex`, decodes only the entries that changed, and hands the machine those
//!   changes (and the deletions) at the answer's `X-Consul-Index`: the changes of one
//!   answer share its index, as Consul does not date a deletion. A prefix of 1,000 keys
//!   costs one JSON parse per answer, not 1,000 decodes and a re-diff.
//! - **An index that goes backwards** never stalls the watch (a query that waits past an
//!   index the agent no longer reaches would block for its whole `wait`, again and again).
//!   When an answer's index is not above the last one handed to the machine, or a changed
//!   key's `ModifyIndex` is not: if the answer holds exactly the keys and `ModifyIndex`es
//!   of the last one (Consul reaped the tombstones that held the prefix's index up), the
//!   feed blocks from the new index and reports nothing; otherwise (a restarted `-dev`
//!   agent, a restored snapshot: versions may have gone down) the index is reset and the
//!   feed fails: the machine reports `Stale` and lists again (`Resynced`).
//! - A refused or cut connection fails the feed at once; while a query blocks, the agent
//!   is pinged every `request_timeout`, so a paused agent fails it within two of them.
//! - Connections: the listing is a read in the watch reads' budget; each blocking read is
//!   a blocking query of its own while a per-key permit is free, else the configuration
//!   prefix's change signal and a read (`Agent::get_blocking`, `mux.rs`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::watch;
use waypost_core::backend::{Change, Entry, Feed, Listing, Next, Scope};
use waypost_core::kv::ConfigEntry;
use waypost_core::{Error, Result, Revision};

use super::{codec, ConsulKv};
use crate::client::ReadMode;

/// The feed of one key or one prefix.
pub struct KvFeed {
    kv: ConsulKv,
    scope: Scope,
    /// The agent's index of the last answer: the next blocking query waits past it.
    index: u64,
    /// The last revision handed to the machine.
    revision: Revision,
    /// The keys (Consul's) and `ModifyIndex`es of the last answer handed over.
    held: BTreeMap<String, u64>,
    generation: watch::Receiver<u64>,
}

impl std::fmt::Debug for KvFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvFeed")
            .field("scope", &self.scope)
            .field("index", &self.index)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl KvFeed {
    pub(super) fn new(kv: ConsulKv, scope: Scope) -> Self {
        let generation = kv.agent.generation();
        Self {
            kv,
            scope,
            index: 0,
            revision: 0,
            held: BTreeMap::new(),
            generation,
        }
    }

    fn entries(&self, pairs: Vec<codec::KvPair>, loud: bool) -> Vec<Entry<ConfigEntry>> {
        codec::decode_entries(pairs, &self.kv.root, &self.scope, loud)
    }

    /// The keys and versions of an answer read at `index`, and its changes from what was
    /// handed over last (`held`): entries whose `ModifyIndex` changed (decoded), and
    /// deletions, all at `index`.
    fn changes(
        &self,
        pairs: Vec<codec::KvPair>,
        index: u64,
    ) -> (BTreeMap<String, u64>, Vec<Change<ConfigEntry>>) {
        let mut now = BTreeMap::new();
        let mut changes = Vec::new();
        for pair in pairs {
            if self.held.get(&pair.key) == Some(&pair.modify_index) {
                now.insert(pair.key, pair.modify_index);
                continue;
            }
            match codec::decode_pair(&pair, &self.kv.root) {
                Ok(entry) if self.scope.covers(&entry.key) => {
                    now.insert(pair.key.clone(), pair.modify_index);
                    changes.push(Change::Put {
                        key: pair.key,
                        item: Some(entry),
                        revision: index,
                    });
                }
                Ok(_) => {}
                Err(why) => {
                    tracing::debug!(key = %pair.key.escape_debug(), "consul: skipping a KV entry: {why}");
                }
            }
        }
        for key in self.held.keys() {
            if !now.contains_key(key) {
                changes.push(Change::Delete {
                    key: key.clone(),
                    revision: index,
                });
            }
        }
        (now, changes)
    }
}

/// The keys and versions of `entries`.
fn versions(entries: &[Entry<ConfigEntry>]) -> BTreeMap<String, u64> {
    entries
        .iter()
        .map(|e| (e.key.clone(), e.item.version))
        .collect()
}

/// Whether the answer `now` (at `index`) cannot follow the last one, `held`, handed over
/// at `revision`: its index, or the version of a key that changed, is not above it.
fn went_backwards(
    held: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    revision: Revision,
    index: u64,
) -> bool {
    index <= revision
        || now
            .iter()
            .any(|(k, v)| *v <= revision && held.get(k) != Some(v))
}

#[async_trait]
impl Feed for KvFeed {
    type Item = ConfigEntry;

    async fn list(&mut self) -> Result<Listing<ConfigEntry>> {
        self.kv.session.check_open()?;
        self.generation.borrow_and_update();
        let read = self.kv.read(&self.scope, ReadMode::Listing).await?;
        let entries = self.entries(read.pairs, true);
        self.index = read.index;
        self.revision = read.index;
        self.held = versions(&entries);
        Ok(Listing {
            entries,
            revision: read.index,
        })
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<ConfigEntry>> {
        loop {
            self.kv.session.check_open()?;
            let wait = self
                .kv
                .wait
                .mul_f64(rand::thread_rng().gen_range(0.9..=1.0));
            // Any failure (a refused connection, an agent that does not answer) is an
            // outage: the machine reports `Stale`, and `Resynced` once the agent answers.
            let read = tokio::select! {
                r = self.kv.read(&self.scope, ReadMode::Past(self.index, wait)) => r?,
                e = self.kv.agent.lost() => return Err(e),
                _ = self.generation.changed() => {
                    return Err(Error::unavailable("consul: connections dropped (test hook)"));
                }
            };
            if read.index == self.index {
                continue; // the wait ran out with no change
            }
            let (now, changes) = self.changes(read.pairs, read.index);
            if went_backwards(&self.held, &now, self.revision, read.index) {
                if now == self.held {
                    tracing::debug!(scope = ?self.scope, from = self.index, to = read.index, "consul: the KV index went backwards, nothing changed");
                    self.index = read.index;
                    continue;
                }
                tracing::info!(scope = ?self.scope, from = self.index, to = read.index, "consul: the KV index went backwards (agent restarted? snapshot restored?); listing again");
                self.index = 0;
                return Err(Error::unavailable(format!(
                    "consul: the KV index went backwards ({} after {}): the agent's state was replaced",
                    read.index, self.revision
                )));
            }
            self.index = read.index;
            self.revision = read.index;
            self.held = now;
            if !changes.is_empty() {
                return Ok(Next::Changes(changes));
            }
            // The prefix's index moved (a tombstone), its keys did not.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs
            .iter()
            .map(|(k, v)| (format!("config/{k}"), *v))
            .collect()
    }

    #[test]
    fn an_index_or_a_version_below_the_last_revision_went_backwards() {
        let before = held(&[("a", 5), ("b", 8)]);
        assert!(!went_backwards(&before, &held(&[("a", 5), ("b", 9)]), 8, 9));
        assert!(went_backwards(&before, &held(&[("a", 5)]), 8, 8));
        assert!(went_backwards(&before, &held(&[("a", 5), ("b", 8)]), 8, 3));
        // A restarted agent that got past the old index: a key rewritten at a lower index.
        assert!(went_backwards(
            &before,
            &held(&[("a", 3), ("b", 30)]),
            8,
            30
        ));
    }
}
