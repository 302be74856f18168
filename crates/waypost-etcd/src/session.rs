//! The keep-alive task: one lease per client, refreshed at a third of its TTL; after a
//! lost lease, a new one and every registration written again, with backoff, forever.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use waypost_core::{Backoff, Error, RegistrationStatus, Result};

use crate::client::Inner;
use crate::error::{retried, timed, EtcdError};
use crate::registrar::set_status;

struct Keeper {
    lease: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl Inner {
    /// One keep-alive round trip on the lease's stream (opening it if needed).
    async fn keep_alive(&self, keeper: &mut Option<Keeper>, lease: i64) -> Result<()> {
        if let Some(k) = keeper.as_mut().filter(|k| k.lease == lease) {
            let sent = k.keeper.keep_alive().await;
            let answer = match sent {
                Ok(()) => timed(self.rt(), "lease keep-alive", k.stream.message()).await,
                Err(e) => Err(EtcdError::client("lease keep-alive", e).into()),
            };
            match answer {
                Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                Ok(Some(_)) => {
                    *keeper = None;
                    Err(Error::SessionExpired)
                }
                Ok(None) => {
                    *keeper = None;
                    Err(Error::unavailable("etcd lease keep-alive stream ended"))
                }
                Err(e) => {
                    *keeper = None;
                    Err(e)
                }
            }
        } else {
            *keeper = None;
            let (k, stream) = retried(
                self.rt(),
                self.attempts(),
                "opening the lease keep-alive stream",
                || {
                    let mut lc = self.client.lease_client();
                    async move { lc.keep_alive(lease).await }
                },
            )
            .await?;
            *keeper = Some(Keeper {
                lease,
                keeper: k,
                stream,
            });
            Ok(())
        }
    }

    /// One round of the session task: keep the lease alive, finish deletions, write
    /// whatever etcd lost.
    async fn round(&self, keeper: &mut Option<Keeper>) -> Result<()> {
        self.check_alive()?;
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => {
                self.suspend_all();
                return Err(e);
            }
        };
        match self.keep_alive(keeper, lease).await {
            Ok(()) => {}
            Err(Error::SessionExpired) => {
                self.lease_lost(lease);
                return Err(Error::SessionExpired);
            }
            Err(e) => {
                self.suspend_all();
                return Err(e);
            }
        }
        let pending = std::mem::take(&mut self.lock().pending_deletes);
        let mut rest = pending.into_iter();
        while let Some((key, l)) = rest.next() {
            if let Err(e) = self.delete_if_ours(&key, l).await {
                let mut s = self.lock();
                s.pending_deletes.push((key, l));
                s.pending_deletes.extend(rest);
                return Err(e);
            }
        }
        match self.write_pending(lease).await {
            Ok(()) => {}
            Err(Error::SessionExpired) => {
                self.lease_lost(lease);
                return Err(Error::SessionExpired);
            }
            Err(e) => return Err(e),
        }
        for reg in self.lock().regs.values() {
            if reg.written == Some(lease) {
                set_status(reg, RegistrationStatus::Registered);
            }
        }
        Ok(())
    }

    fn tick(&self) -> Duration {
        let ttl = match self.granted_ttl.load(Ordering::Acquire) {
            n if n > 0 => Duration::from_secs(n as u64),
            _ => self.config.lease_ttl,
        };
        (ttl / 3).max(Duration::from_millis(200))
    }

    pub(crate) fn ensure_task(self: &Arc<Self>) {
        if self.task_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        let max =
            (self.config.lease_ttl / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
        tokio::spawn(session_task(
            weak,
            wake,
            Backoff::new(Duration::from_millis(100), max),
        ));
    }
}

async fn session_task(weak: Weak<Inner>, wake: Arc<tokio::sync::Notify>, mut backoff: Backoff) {
    let mut keeper: Option<Keeper> = None;
    loop {
        let delay = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.is_dead() {
                tracing::debug!("etcd: keep-alive task stops");
                return;
            }
            match inner.round(&mut keeper).await {
                Ok(()) => {
                    backoff.reset();
                    inner.tick()
                }
                Err(Error::Closed { .. }) => return,
                Err(Error::SessionExpired) => Duration::ZERO,
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::debug!(retry_in = ?d, "etcd: keep-alive round failed: {e}");
                    d
                }
            }
        };
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wake.notified() => {}
            }
        }
    }
}
