//! Watching a service: a prefix read gives the listing and its revision, a prefix watch
//! from the next revision gives every change (the stream handling, shared with the
//! configuration feeds, is in `stream.rs`). Core's watch machine turns them into the watch
//! contract (snapshot, changes, `Stale`, `Resynced`).

use async_trait::async_trait;
use etcd_client::EventType;
use tokio::sync::watch;
use waypost_core::backend::{Change, Entry, Feed, Listing, Next};
use waypost_core::{Instance, Result, Revision, ServiceName};

use crate::client::Conn;
use crate::codec;
use crate::stream::{events_after, EtcdWatch, Range};

/// One service's watch primitives.
pub(crate) struct WatchFeed {
    conn: Conn,
    service: ServiceName,
    /// The service's key prefix, with the trailing `/`.
    sp: String,
    watch: EtcdWatch,
}

impl WatchFeed {
    pub(crate) fn new(conn: &Conn, service: &ServiceName, drops: watch::Receiver<u64>) -> Self {
        let sp = codec::service_prefix(conn.config.key_prefix(), service);
        Self {
            watch: EtcdWatch::new(
                conn,
                Range::Prefix(sp.clone()),
                format!("service {service}"),
                drops,
            ),
            sp,
            conn: conn.clone(),
            service: service.clone(),
        }
    }

    /// Everything under the service's prefix, at one revision; values that are not
    /// instances are skipped with a warning.
    pub(crate) async fn read(&self) -> Result<Listing<Instance>> {
        let (kvs, revision) = self.watch.read("listing a service").await?;
        Ok(self.listing(kvs, revision))
    }

    fn listing(&self, kvs: Vec<etcd_client::KeyValue>, revision: Revision) -> Listing<Instance> {
        let entries = kvs
            .iter()
            .filter_map(|kv| {
                let item = self.decode(kv.key(), kv.value())?;
                Some(Entry {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    item,
                })
            })
            .collect();
        Listing { entries, revision }
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Option<Instance> {
        match codec::decode(self.conn.config.layout, &self.service, &self.sp, key, value) {
            Ok(i) => Some(i),
            Err(m) => {
                tracing::warn!(
                    key = %String::from_utf8_lossy(key),
                    "etcd: skipping a value that is not an instance: {m}"
                );
                None
            }
        }
    }
}

#[async_trait]
impl Feed for WatchFeed {
    type Item = Instance;

    async fn list(&mut self) -> Result<Listing<Instance>> {
        let (kvs, revision) = self.watch.list("listing a service").await?;
        Ok(self.listing(kvs, revision))
    }

    async fn next(&mut self, after: Revision) -> Result<Next<Instance>> {
        let r = self.watch.next(after).await?;
        let changes = events_after(&r, after)
            .map(|(kind, kv, revision)| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match kind {
                    EventType::Put => Change::Put {
                        item: self.decode(kv.key(), kv.value()),
                        key,
                        revision,
                    },
                    EventType::Delete => Change::Delete { key, revision },
                }
            })
            .collect();
        Ok(Next::Changes(changes))
    }

    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        key == codec::key(self.conn.config.layout, self.conn.config.key_prefix(), item)
    }
}
