//! The keep-alive loop against a driver whose answers the test releases one by one: a
//! late answer about an earlier session must leave a newer one alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Session, SessionDriver, SessionState};
use crate::backend::BackoffOptions;
use crate::error::{Error, Result};

type Call = (u64, oneshot::Sender<Result<()>>);

/// Sessions numbered from 1; each keep-alive waits for the test's answer.
#[derive(Clone, Debug)]
struct Gated {
    opened: Arc<AtomicU64>,
    calls: mpsc::UnboundedSender<Call>,
}

#[async_trait]
impl SessionDriver for Gated {
    type Handle = u64;

    async fn open(&self) -> Result<u64> {
        Ok(self.opened.fetch_add(1, Ordering::SeqCst) + 1)
    }

    async fn keep_alive(&self, handle: &u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((*handle, tx))
            .map_err(|_| Error::unavailable("the test ended"))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::unavailable("the test ended")))
    }

    async fn close(&self, _handle: &u64) -> Result<()> {
        Ok(())
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(10)
    }

    fn bound(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

/// A session over a [`Gated`] driver, and the keep-alives it sends.
fn gated() -> (Session<Gated>, mpsc::UnboundedReceiver<Call>) {
    let (tx, calls) = mpsc::unbounded_channel();
    let driver = Gated {
        opened: Arc::default(),
        calls: tx,
    };
    (Session::new(driver, BackoffOptions::default()), calls)
}

async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("a keep-alive within the deadline")
        .expect("the loop runs")
}

#[tokio::test(start_paused = true)]
async fn a_late_keep_alive_answer_about_an_earlier_session_leaves_the_newer_one_alone() {
    for late in [
        Error::SessionExpired,
        Error::unavailable("the reply came late"),
    ] {
        let (s, mut calls) = gated();
        assert_eq!(s.current().await.unwrap(), 1);
        let (h, first) = next_call(&mut calls).await;
        assert_eq!(h, 1);
        // While session 1's keep-alive is in flight, an operation learns that the
        // registry lost it, and the next caller opens session 2.
        s.expired(&1);
        assert_eq!(s.current().await.unwrap(), 2);
        // Then the late answer about session 1 arrives.
        let what = late.to_string();
        first.send(Err(late)).unwrap();
        let (h, reply) = next_call(&mut calls).await;
        assert_eq!(
            h, 2,
            "after a late `{what}`, the loop keeps session 2 alive"
        );
        assert_eq!(s.current_state(), SessionState::Live(2), "after `{what}`");
        reply.send(Ok(())).unwrap();
        let (h, _) = next_call(&mut calls).await;
        assert_eq!(h, 2);
    }
}

#[tokio::test(start_paused = true)]
async fn confirmed_waits_for_an_answered_keep_alive_and_is_false_once_the_session_expired() {
    let (s, mut calls) = gated();
    assert_eq!(s.current().await.unwrap(), 1);
    assert!(s.confirmed(&1).await, "just opened: confirmed");
    for expire in [false, true] {
        // Unanswered keep-alives until the last confirmation runs out.
        while s
            .confirmed_until()
            .is_some_and(|at| at > tokio::time::Instant::now())
        {
            let (_, reply) = next_call(&mut calls).await;
            reply.send(Err(Error::unavailable("no answer"))).unwrap();
        }
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.confirmed(&1).await }
        });
        let (h, reply) = next_call(&mut calls).await;
        assert_eq!(h, 1);
        assert!(!waiting.is_finished(), "confirmed before any answer");
        if expire {
            reply.send(Err(Error::SessionExpired)).unwrap();
            assert!(!waiting.await.unwrap(), "session 1 expired: not confirmed");
            assert!(
                !s.confirmed(&1).await,
                "asked again about an expired session"
            );
        } else {
            reply.send(Ok(())).unwrap();
            assert!(waiting.await.unwrap(), "the answered keep-alive confirms");
            assert!(s.confirmed_until().unwrap() > tokio::time::Instant::now());
        }
    }
}
