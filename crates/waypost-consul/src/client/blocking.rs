//! Blocking reads and the liveness pinger that bounds them.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use waypost_core::Error;

use super::{Agent, Lane, Pool, Reply};
use crate::error::ConsulError;
use crate::mux::Mux;

/// How [`Agent::get_blocking`] reads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReadMode {
    /// A plain read in the control lane (a `get`, a lock's read before acquiring).
    Plain,
    /// A watch's first read, in the watch reads' budget.
    Listing,
    /// A blocking read past the index for up to the wait, in the watch share.
    Past(u64, Duration),
}

impl Agent {
    /// Resolves when the agent stops answering: a paused agent accepts connections and
    /// never answers, so a blocking query alone would only notice after its whole wait.
    /// One pinger per client (every `request_timeout`, at least 500 ms) serves every
    /// waiter, in the watch budget; it stops when nobody waits.
    pub(crate) async fn lost(&self) -> Error {
        let mut rx = self.learnt.outage.subscribe();
        rx.borrow_and_update();
        self.start_pinger();
        loop {
            if rx.changed().await.is_err() {
                return Error::unavailable("consul: the client is gone");
            }
            if let Some(e) = rx.borrow_and_update().clone() {
                return Error::Unavailable {
                    message: "consul agent does not answer".into(),
                    source: Some(Box::new(e)),
                };
            }
        }
    }

    fn start_pinger(&self) {
        let mut running = self
            .learnt
            .pinging
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *running {
            return;
        }
        *running = true;
        let agent = self.clone();
        let every = self.timeout.max(Duration::from_millis(500));
        tokio::spawn(async move {
            let outage = &agent.learnt.outage;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = outage.closed() => {}
                }
                if outage.receiver_count() == 0 {
                    let mut running = agent
                        .learnt
                        .pinging
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if outage.receiver_count() == 0 {
                        *running = false;
                        return;
                    }
                    continue;
                }
                // Outside the control budget: one of the watch share's reserved connections.
                let r = agent
                    .send(
                        Pool::Watch,
                        "ping",
                        Method::GET,
                        "/v1/status/leader",
                        &[],
                        None,
                        agent.timeout,
                    )
                    .await;
                match r {
                    Ok(_) => {
                        outage.send_if_modified(|o| o.take().is_some());
                    }
                    Err(e) => {
                        outage.send_replace(Some(Arc::new(e)));
                    }
                }
            }
        });
    }

    /// `GET path` with `query`, as `mode` says. A blocking read ([`ReadMode::Past`]) is
    /// in the watch share: a blocking query of its own while one of the per-key permits
    /// (`ConnectionBudget::dedicated_watches`, shared with service watches) is free, else
    /// woken by `signal` (the change signal of the key's KV prefix) and answered by
    /// non-blocking reads in the watch reads' budget.
    pub(crate) async fn get_blocking(
        &self,
        op: &'static str,
        path: &str,
        query: Vec<(&'static str, String)>,
        mode: ReadMode,
        signal: &Mux,
    ) -> Result<Reply, ConsulError> {
        let (index, wait) = match mode {
            ReadMode::Plain => {
                return self
                    .request_limited(op, Method::GET, path, &query, None)
                    .await
            }
            ReadMode::Listing => {
                return self
                    .request_lane(Lane::Watch, op, Method::GET, path, &query, None)
                    .await
            }
            ReadMode::Past(index, wait) => (index, wait),
        };
        if let Ok(_permit) = self.lanes.dedicated.try_acquire() {
            return self.blocking_query(op, path, query, index, wait).await;
        }
        // Shared: read once (a change since the caller's last answer is seen at once),
        // then again each time the prefix's signal moves, until the index moves or the
        // wait is over, like a blocking query.
        let deadline = tokio::time::Instant::now() + wait;
        let mut woken = signal.subscribe();
        loop {
            woken.borrow_and_update();
            let reply = self
                .request_lane(Lane::Watch, op, Method::GET, path, &query, None)
                .await?;
            let failed = !matches!(reply.status, 200..=299 | 404);
            if failed || reply.index != Some(index) || tokio::time::Instant::now() >= deadline {
                return Ok(reply);
            }
            tokio::select! {
                _ = woken.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// A blocking query `GET path?query&index=..&wait=..` in the watch pool, under its own
    /// deadline (the wait, Consul's jitter of up to wait/16, and the request timeout);
    /// the answer whatever its status. The caller holds the connection's permit.
    pub(crate) async fn blocking_query(
        &self,
        op: &'static str,
        path: &str,
        mut query: Vec<(&'static str, String)>,
        index: u64,
        wait: Duration,
    ) -> Result<Reply, ConsulError> {
        query.push(("index", index.to_string()));
        query.push(("wait", format!("{}ms", wait.as_millis())));
        let timeout = wait + wait / 16 + self.timeout;
        self.request_in(Pool::Watch, op, Method::GET, path, &query, None, timeout)
            .await
    }

    /// A blocking `GET path?query&index=..&wait=..` (a change signal), in the watch
    /// share's reserved connections: the body (empty for a `404`, a KV prefix with no
    /// key) and the `X-Consul-Index`.
    pub(crate) async fn blocking_get(
        &self,
        op: &'static str,
        path: &str,
        query: Vec<(&'static str, String)>,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<u8>, u64), ConsulError> {
        let reply = self.blocking_query(op, path, query, index, wait).await?;
        let (body, index) = match reply.status {
            404 => (Vec::new(), reply.index),
            _ => reply.checked(op)?,
        };
        let index = index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        Ok((body, index))
    }
}
