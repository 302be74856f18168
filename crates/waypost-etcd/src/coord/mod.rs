//! Locks, semaphores and elections: core's [`Coord`](waypost_core::backend::Coord) over
//! keys laid out as Go's `concurrency.Mutex` and `concurrency.Election` lay them out
//! (see the crate docs, "Locks and elections").

mod keys;
mod leader;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::sync::watch;
use waypost_core::backend::{Contender, CoordDriver, Kind, Position};
use waypost_core::coord::{FencingToken, Leader, Name};
use waypost_core::{Error, Result, Revision};

use crate::client::Conn;
use crate::stream::{events_after, EtcdWatch, Range};

pub(crate) use keys::name_prefix;
pub(crate) use leader::LeaderFeed;

/// How long a waiter waits on what it watches before it asks where it stands again (its
/// own key may have been deleted meanwhile, which it does not watch).
const RECHECK: Duration = Duration::from_secs(30);

/// What this client knows of one of its keys: which contender it belongs to.
#[derive(Debug)]
struct Local {
    lease: i64,
    id: String,
    election: bool,
    /// Its create revision, once enqueued.
    rev: Option<i64>,
    /// The create revision of the entry an abandoned contender left at this key, which
    /// that contender's cleanup may delete any moment: replaced rather than taken over.
    stale: Option<i64>,
}

/// The etcd coordination primitives of one client. Cheap to clone.
#[derive(Clone)]
pub(crate) struct EtcdCoord {
    conn: Conn,
    drops: watch::Receiver<u64>,
    /// This client's keys (one per lease and name: a key is reused by the next local
    /// contender of that name).
    local: Arc<Mutex<HashMap<String, Local>>>,
    /// Serializes enqueue and forget, which decide by `local` who owns a key.
    enqueueing: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for EtcdCoord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCoord")
            .field("coord_prefix", &self.conn.config.coord_prefix)
            .finish()
    }
}

/// One enqueued contender: its key, and the create revision that makes it this one.
#[derive(Clone, Debug)]
pub(crate) struct Ticket {
    key: String,
    /// The name's prefix, with the trailing `/`.
    np: String,
    lease: i64,
    rev: i64,
    permits: u32,
    id: String,
    /// Whether the enqueueing transaction found this entry first under the name (the
    /// holder): the first [`position`](CoordDriver::position) then answers without a read.
    first: bool,
}

/// What a waiting contender waits on.
#[derive(Debug)]
pub(crate) enum Waiting {
    /// A lock's or an election's predecessor (the key with the largest create revision
    /// below ours), read at revision `at`.
    Predecessor { key: String, rev: i64, at: i64 },
    /// A semaphore: any deletion under the name, after revision `at`.
    Ahead { at: i64 },
}

fn header_revision(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

fn got(resp: &TxnResponse) -> Vec<KeyValue> {
    gets(resp).into_iter().next().unwrap_or_default()
}

/// The keys each `get` of a transaction read, in the order of the gets.
fn gets(resp: &TxnResponse) -> Vec<Vec<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
            _ => None,
        })
        .collect()
}

/// Whether the first-created key read by a transaction's `first_create` get is the entry
/// `key` created at `rev`.
fn is_first(first: Option<&Vec<KeyValue>>, key: &str, rev: i64) -> bool {
    first
        .and_then(|kvs| kvs.first())
        .is_some_and(|kv| kv.key() == key.as_bytes() && kv.create_revision() == rev)
}

impl EtcdCoord {
    pub(crate) fn new(conn: Conn, drops: watch::Receiver<u64>) -> Self {
        Self {
            conn,
            drops,
            local: Arc::default(),
            enqueueing: Arc::default(),
        }
    }

    fn np(&self, name: &Name) -> String {
        name_prefix(self.conn.config.coord_key_prefix(), name)
    }

    fn locals(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `key` is now `c`'s; the create revision of an abandoned contender's
    /// entry there, if known. A lock and an election of one name share the key.
    fn claim(&self, key: &str, lease: i64, c: &Contender) -> Result<Option<i64>> {
        let mut map = self.locals();
        map.retain(|_, l| l.lease == lease);
        let election = c.kind == Kind::Election;
        let fresh = |stale| Local {
            lease,
            id: c.id.clone(),
            election,
            rev: None,
            stale,
        };
        match map.get_mut(key) {
            Some(l) if l.id == c.id => Ok(l.stale),
            Some(l) if l.election != election => Err(Error::Busy {
                what: format!(
                    "`{}` is contended for by this client as {}: on etcd a lock and an election \
                     of one name are one queue with one key per lease (as for etcdctl)",
                    c.name,
                    if l.election { "an election" } else { "a lock" }
                ),
            }),
            Some(l) => {
                let stale = l.rev.or(l.stale);
                *l = fresh(stale);
                Ok(stale)
            }
            None => {
                map.insert(key.to_string(), fresh(None));
                Ok(None)
            }
        }
    }

    fn settle(&self, key: &str, id: &str, rev: i64) {
        if let Some(l) = self.locals().get_mut(key).filter(|l| l.id == id) {
            l.rev = Some(rev);
            l.stale = None;
        }
    }

    fn unclaim(&self, key: &str, id: &str) {
        let mut map = self.locals();
        if map.get(key).is_some_and(|l| l.id == id) {
            map.remove(key);
        }
    }

    /// Deletes `key` if its create revision is `rev` (never a newer entry at the key).
    async fn delete_if(&self, key: &str, rev: i64) -> Result<()> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key, None)]);
        self.conn.txn("removing a contender", txn).await.map(drop)
    }
}

#[async_trait]
impl CoordDriver for EtcdCoord {
    type Handle = i64;
    type Ticket = Ticket;
    type Wait = Waiting;
    type Feed = LeaderFeed;

    fn max_value_len(&self) -> usize {
        crate::kv::MAX_CONFIG_VALUE_LEN
    }

    /// `retry` changes nothing: the key is the same for every try (one per lease and
    /// name), so an earlier try's entry is found there and taken over.
    async fn enqueue(&self, lease: &i64, c: &Contender, _retry: bool) -> Result<Ticket> {
        let lease = *lease;
        let np = self.np(&c.name);
        let key = keys::entry_key(&np, lease, c);
        let permits = match c.kind {
            Kind::Lock { permits } => permits,
            Kind::Election => 1,
        };
        let _one = self.enqueueing.lock().await;
        let stale = self.claim(&key, lease, c)?;
        let ticket = |rev, first| Ticket {
            key: key.clone(),
            np: np.clone(),
            lease,
            rev,
            permits,
            id: c.id.clone(),
            first,
        };
        // The first-created key under the name, read in the same transaction: the
        // uncontended path needs no second round trip (as Go's Mutex.tryAcquire does).
        let first_create = || {
            let opts = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1);
            TxnOp::get(np.as_str(), Some(opts))
        };
        for _ in 0..3 {
            // Go's Mutex.Lock / Election.Campaign: create the key under the lease unless
            // it exists, else read it.
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        c.value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    first_create(),
                ])
                .or_else([TxnOp::get(key.as_str(), None), first_create()]);
            let resp = self.conn.txn("enqueueing a contender", txn).await?;
            let read = gets(&resp);
            if resp.succeeded() {
                let rev = header_revision(&resp);
                self.settle(&key, &c.id, rev);
                return Ok(ticket(rev, is_first(read.first(), &key, rev)));
            }
            let Some(kv) = read.first().and_then(|kvs| kvs.first()).cloned() else {
                continue; // deleted between the compare and the read
            };
            let rev = kv.create_revision();
            if stale == Some(rev) || kv.lease() != lease {
                // An abandoned contender's entry, which its cleanup may delete any
                // moment (or a foreign write at our key): replace it.
                self.delete_if(&key, rev).await?;
                continue;
            }
            // Ours: written by an earlier try whose reply was lost, or left by an
            // abandoned contender of this client that nobody will remove. Take it over,
            // as Go's Mutex reuses its key (an Election proclaims its value).
            if kv.value() != c.value.as_slice() {
                self.proclaim(&ticket(rev, false), &c.value).await?;
            }
            self.settle(&key, &c.id, rev);
            return Ok(ticket(rev, is_first(read.get(1), &key, rev)));
        }
        Err(Error::unavailable(format!(
            "etcd key `{key}` kept changing while enqueueing"
        )))
    }

    async fn position(&self, t: &Ticket) -> Result<Position<Waiting>> {
        if t.first {
            // First under the name when enqueued, so the holder from then on (no key
            // created later comes before it); core asks once for a held ticket.
            return Ok(Position::Held(FencingToken(t.rev as u64)));
        }
        // Everything queued before us (Go's waitDeletes: the last create below ours), in
        // the same transaction that checks our key is still ours.
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_max_create_revision(t.rev - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend);
        let txn = Txn::new()
            .when([Compare::create_revision(
                t.key.as_str(),
                CompareOp::Equal,
                t.rev,
            )])
            .and_then([TxnOp::get(t.np.as_str(), Some(opts))]);
        let resp = self.conn.txn("reading a contender's place", txn).await?;
        if !resp.succeeded() {
            return Ok(Position::Gone);
        }
        let at = header_revision(&resp);
        let mut ahead = got(&resp)
            .into_iter()
            .filter(|kv| keys::is_contender(&t.np, kv.key()));
        let held = FencingToken(t.rev as u64);
        if t.permits <= 1 {
            return Ok(match ahead.next() {
                None => Position::Held(held),
                Some(kv) => Position::Waiting(Waiting::Predecessor {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    rev: kv.create_revision(),
                    at,
                }),
            });
        }
        Ok(if ahead.count() < t.permits as usize {
            Position::Held(held)
        } else {
            Position::Waiting(Waiting::Ahead { at })
        })
    }

    async fn wait(&self, t: &Ticket, w: &Waiting) -> Result<()> {
        let (range, at, pred) = match w {
            Waiting::Predecessor { key, rev, at } => (Range::Key(key.clone()), *at, Some(*rev)),
            Waiting::Ahead { at } => (Range::Prefix(t.np.clone()), *at, None),
        };
        let what = format!("contender {}", t.key);
        let mut watch = EtcdWatch::new(&self.conn, range, what, self.drops.clone());
        let mut after = at as Revision;
        let changed = async {
            loop {
                let r = watch.next(after).await?;
                for (kind, kv, rev) in events_after(&r, after) {
                    after = after.max(rev);
                    let recreated = pred.is_some_and(|p| kv.create_revision() != p);
                    if kind == EventType::Delete || recreated {
                        return Ok(());
                    }
                }
            }
        };
        match tokio::time::timeout(RECHECK, changed).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    async fn watch_held(&self, t: &Ticket) -> Result<()> {
        let what = format!("held {}", t.key);
        let mut watch = EtcdWatch::new(
            &self.conn,
            Range::Key(t.key.clone()),
            what,
            self.drops.clone(),
        );
        let ours = |kv: &KeyValue| kv.create_revision() == t.rev && kv.lease() == t.lease;
        let (kvs, mut after) = watch.list("reading a held contender").await?;
        if !kvs.first().is_some_and(ours) {
            return Ok(());
        }
        loop {
            let r = watch.next(after).await?;
            for (kind, kv, rev) in events_after(&r, after) {
                after = after.max(rev);
                if kind == EventType::Delete || !ours(kv) {
                    return Ok(());
                }
            }
        }
    }

    async fn dequeue(&self, t: &Ticket) -> Result<()> {
        self.delete_if(&t.key, t.rev).await?;
        self.unclaim(&t.key, &t.id);
        Ok(())
    }

    async fn forget(&self, lease: &i64, c: &Contender) -> Result<()> {
        let key = keys::entry_key(&self.np(&c.name), *lease, c);
        let _one = self.enqueueing.lock().await;
        let ours = self
            .locals()
            .get(&key)
            .filter(|l| l.id == c.id && l.lease == *lease)
            .map(|l| l.rev);
        match ours {
            // A later contender of this client owns the key now (or nobody): leave it.
            None => return Ok(()),
            Some(Some(rev)) => self.delete_if(&key, rev).await?,
            Some(None) => {
                self.conn
                    .call("removing a contender", || {
                        let mut kv = self.conn.client.kv_client();
                        let key = key.clone();
                        async move { kv.delete(key, None).await }
                    })
                    .await?;
            }
        }
        self.unclaim(&key, &c.id);
        Ok(())
    }

    async fn proclaim(&self, t: &Ticket, value: &[u8]) -> Result<()> {
        // Go's Election.Proclaim: a put guarded by our create revision.
        let txn = Txn::new()
            .when([Compare::create_revision(
                t.key.as_str(),
                CompareOp::Equal,
                t.rev,
            )])
            .and_then([TxnOp::put(
                t.key.as_str(),
                value.to_vec(),
                Some(PutOptions::new().with_lease(t.lease)),
            )]);
        if self.conn.txn("proclaiming", txn).await?.succeeded() {
            Ok(())
        } else {
            Err(Error::Closed {
                what: "leadership (its entry is gone)",
            })
        }
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        leader::read(&self.conn, &self.np(election), election).await
    }

    fn leader_feed(&self, election: &Name) -> LeaderFeed {
        LeaderFeed::new(&self.conn, &self.np(election), election, self.drops.clone())
    }
}
