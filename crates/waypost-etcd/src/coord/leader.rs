//! An election's leader: the contender with the smallest create revision under the
//! election's prefix (Go's `Election.Leader`, `etcdctl elect -l`), read once or watched.

use std::collections::HashMap;

use async_trait::async_trait;
use etcd_client::{EventType, GetOptions, KeyValue, SortOrder, SortTarget};
use tokio::sync::watch;
use waypost_core::backend::{Entry, Feed, Listing, Next};
use waypost_core::coord::{FencingToken, Leader, Name};
use waypost_core::{Result, Revision};

use super::keys;
use crate::client::Conn;
use crate::stream::{events_after, EtcdWatch, Range};

/// The leader among `(create revision, value)` entries.
fn first<'a>(election: &Name, entries: impl Iterator<Item = (i64, &'a [u8])>) -> Option<Leader> {
    entries
        .min_by_key(|(rev, _)| *rev)
        .map(|(rev, value)| Leader::new(election.clone(), value.to_vec(), FencingToken(rev as u64)))
}

fn contenders<'a>(np: &'a str, kvs: &'a [KeyValue]) -> impl Iterator<Item = &'a KeyValue> {
    kvs.iter()
        .filter(move |kv| keys::is_contender(np, kv.key()))
}

/// The current leader of the election whose prefix is `np`.
pub(super) async fn read(conn: &Conn, np: &str, election: &Name) -> Result<Option<Leader>> {
    let resp = conn
        .call("reading an election's leader", || {
            let mut kv = conn.client.kv_client();
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend);
            let np = np.to_string();
            async move { kv.get(np, Some(opts)).await }
        })
        .await?;
    Ok(first(
        election,
        contenders(np, resp.kvs()).map(|kv| (kv.create_revision(), kv.value())),
    ))
}

/// The leader of one election, watched: a prefix watch of its contenders, the leader
/// computed again after each change (a [`Next::Listing`]).
pub(crate) struct LeaderFeed {
    watch: EtcdWatch,
    np: String,
    election: Name,
    /// The contenders: key → (create revision, value).
    entries: HashMap<Vec<u8>, (i64, Vec<u8>)>,
}

impl LeaderFeed {
    pub(super) fn new(conn: &Conn, np: &str, election: &Name, drops: watch::Receiver<u64>) -> Self {
        Self {
            watch: EtcdWatch::new(
                conn,
                Range::Prefix(np.to_string()),
                format!("election {election}"),
                drops,
            ),
            np: np.to_string(),
            election: election.clone(),
            entries: HashMap::new(),
        }
    }

    fn listing(&self, revision: Revision) -> Listing<Leader> {
        let leader = first(
            &self.election,
            self.entries.values().map(|(rev, v)| (*rev, v.as_slice())),
        );
        Listing {
            entries: leader
                .map(|item| Entry {
                    key: self.election.to_string(),
                    item,
                })
                .into_iter()
                .collect(),
            revision,
        }
    }
}

#[async_trait]
impl Feed for LeaderFeed {
    type Item = Leader;

    async fn list(&mut self) -> Result<Listing<Leader>> {
        let (kvs, revision) = self.watch.list("listing an election").await?;
        self.entries = contenders(&self.np, &kvs)
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    (kv.create_revision(), kv.value().to_vec()),
                )
            })
            .collect();
        Ok(self.listing(revision))
    }

    async fn next(&mut self, after: Revision) -> Result<Next<Leader>> {
        let r = self.watch.next(after).await?;
        let mut last = after;
        for (kind, kv, rev) in events_after(&r, after) {
            last = last.max(rev);
            match kind {
                EventType::Put if keys::is_contender(&self.np, kv.key()) => {
                    self.entries.insert(
                        kv.key().to_vec(),
                        (kv.create_revision(), kv.value().to_vec()),
                    );
                }
                EventType::Put => {}
                EventType::Delete => {
                    self.entries.remove(kv.key());
                }
            }
        }
        Ok(Next::Listing(self.listing(last)))
    }
}
