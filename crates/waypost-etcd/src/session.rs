//! The session: one etcd lease per client. Core's [`Session`](waypost_core::backend::Session)
//! runs the keep-alive loop; this driver grants, refreshes and revokes the lease.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{watch, Mutex};
use waypost_core::backend::SessionDriver;
use waypost_core::{Error, Result};

use crate::client::Conn;
use crate::error::{timed, EtcdError};

/// The lease's keep-alive stream, opened on the first keep-alive and kept open.
struct KeepAlive {
    lease: i64,
    /// The connection generation it was opened in (see [`LeaseDriver::drops`]).
    generation: u64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// Grants, keeps alive and revokes the client's lease. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LeaseDriver {
    conn: Conn,
    /// The TTL etcd granted the current lease, in seconds (0 before the first grant).
    granted: Arc<AtomicI64>,
    stream: Arc<Mutex<Option<KeepAlive>>>,
    /// Bumped by the `drop_connections` test hook: the keep-alive stream is reopened.
    drops: watch::Receiver<u64>,
}

impl fmt::Debug for LeaseDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseDriver")
            .field("conn", &self.conn)
            .field("granted_ttl", &self.granted.load(Ordering::Relaxed))
            .finish()
    }
}

impl LeaseDriver {
    pub(crate) fn new(conn: Conn, drops: watch::Receiver<u64>) -> Self {
        Self {
            conn,
            granted: Arc::new(AtomicI64::new(0)),
            stream: Arc::new(Mutex::new(None)),
            drops,
        }
    }

    /// The TTL etcd granted the last lease, once one was granted.
    pub(crate) fn granted_ttl(&self) -> Option<Duration> {
        match self.granted.load(Ordering::Acquire) {
            n if n > 0 => Some(Duration::from_secs(n as u64)),
            _ => None,
        }
    }

    /// One keep-alive round trip on an open stream.
    async fn round_trip(&self, k: &mut KeepAlive) -> Result<()> {
        k.keeper
            .keep_alive()
            .await
            .map_err(|e| Error::from(EtcdError::client("lease keep-alive", e)))?;
        match timed(self.conn.rt(), "lease keep-alive", k.stream.message()).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            Some(_) => Err(Error::SessionExpired),
            None => Err(Error::unavailable("etcd lease keep-alive stream ended")),
        }
    }
}

#[async_trait]
impl SessionDriver for LeaseDriver {
    type Handle = i64;

    async fn open(&self) -> Result<i64> {
        let ttl = self.conn.config.lease_ttl.as_secs().max(1) as i64;
        let resp = self
            .conn
            .call("granting a lease", || {
                let mut lc = self.conn.client.lease_client();
                async move { lc.grant(ttl, None).await }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(EtcdError::Protocol {
                operation: "lease grant",
                message: resp.error().to_string(),
            }
            .into());
        }
        self.granted.store(resp.ttl(), Ordering::Release);
        tracing::info!(
            lease = format_args!("{:x}", resp.id()),
            asked_ttl = ttl,
            granted_ttl = resp.ttl(),
            "etcd: lease granted"
        );
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: &i64) -> Result<()> {
        let lease = *lease;
        let generation = *self.drops.borrow() & !crate::stream::STALL;
        let mut slot = self.stream.lock().await;
        if !matches!(&*slot, Some(k) if k.lease == lease && k.generation == generation) {
            *slot = None;
            let (keeper, stream) = self
                .conn
                .call("opening the lease keep-alive stream", || {
                    let mut lc = self.conn.client.lease_client();
                    async move { lc.keep_alive(lease).await }
                })
                .await?;
            *slot = Some(KeepAlive {
                lease,
                generation,
                keeper,
                stream,
            });
        }
        let Some(k) = slot.as_mut() else {
            return Err(Error::unavailable("etcd lease keep-alive stream not open"));
        };
        let r = self.round_trip(k).await;
        if r.is_err() {
            *slot = None;
        }
        r
    }

    async fn close(&self, lease: &i64) -> Result<()> {
        let lease = *lease;
        self.stream.lock().await.take();
        let mut lc = self.conn.client.lease_client();
        match timed(self.conn.rt(), "revoking the lease", lc.revoke(lease)).await {
            Ok(_) | Err(Error::SessionExpired) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The lease's TTL: etcd's leader revokes a lease no earlier than its TTL after the
    /// last keep-alive it answered, and a keep-alive counts only once its answer (with a
    /// TTL above 0) came back on the stream. Before the first grant, the TTL asked for
    /// (etcd never grants less).
    fn bound(&self) -> Option<Duration> {
        Some(self.granted_ttl().unwrap_or(self.conn.config.lease_ttl))
    }

    fn interval(&self) -> Duration {
        let ttl = self.granted_ttl().unwrap_or(self.conn.config.lease_ttl);
        (ttl / 3).max(Duration::from_millis(200))
    }
}
