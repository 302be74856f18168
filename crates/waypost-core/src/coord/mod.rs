//! Coordination: distributed locks, counting semaphores and leader election, bound to
//! the same registry session that keeps a client's registrations alive.
//!
//! [`Coordinator`] is the contract, the same on every registry, reached as
//! [`Discovery::coordinator`](crate::Discovery::coordinator). Each backend stores its
//! contenders the way the registry's own clients do, so a waypost holder and a native
//! holder exclude each other: Curator's `InterProcessMutex` / `LeaderLatch` nodes on
//! ZooKeeper, etcd's `concurrency` keys (`etcdctl lock`, `etcdctl elect`), Consul's
//! `api.Lock` (`consul lock`). See each backend's docs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> waypost_core::Result<()> {
//! use waypost_core::coord::Coordinator;
//!
//! let d = waypost_core::memory::MemoryRegistry::new("coord-doc")
//!     .client(std::time::Duration::from_secs(10))
//!     .into_discovery();
//! let coord = d.coordinator()?;
//! let name = "jobs/nightly-migration".parse()?;
//! let guard = coord.lock(&name).await?;
//! // Pass the token along to whatever the lock protects: it rejects older tokens.
//! let token = guard.token();
//! assert!(coord.try_lock(&name).await.is_err()); // held
//! assert!(!guard.is_lost());
//! guard.release().await?;
//! let again = coord.try_lock(&name).await?;
//! assert!(again.token() > token);
//! # Ok(()) }
//! ```
//!
//! # Fencing tokens
//!
//! Every acquisition carries a [`FencingToken`] that is strictly greater than the token
//! of every earlier holder of the same name: a registry-wide revision (ZooKeeper's
//! `czxid`, etcd's create revision, Consul's `ModifyIndex` of the acquire). A lock alone
//! cannot protect a resource from a holder that paused (GC, a stalled VM) past its
//! session and woke up still believing it holds the lock; a resource that remembers the
//! largest token it saw and refuses smaller ones can.
//!
//! # Losing a lock
//!
//! A guard reports [`Lost`] when the session it is bound to expired, when its entry was
//! deleted behind its back, or — locally, without asking the registry — when the
//! session's bound passed since the last keep-alive the registry confirmed
//! ([`Lost::Unconfirmed`]). The last is what lets a holder that cannot reach the registry
//! stop before anyone else can acquire: the registry drops the session no earlier than
//! its bound after last hearing from the client, and the guard fires at 90% of it. This
//! assumes the local clock and the registry's run at rates within 10% over one bound.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::watch::{Event, Item};
use crate::error::{Error, Result};
use crate::kv::ConfigKey;

/// The name of a lock, a semaphore or an election: the same rule as a configuration key
/// (`/`-separated segments of `[A-Za-z0-9._-]`).
pub type Name = ConfigKey;

/// A number that rises strictly from one holder of a name to the next; pass it to the
/// protected resource (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How long an acquisition may wait for the holder to let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Until acquired (or the call's future is dropped).
    Forever,
    /// Not at all: [`Error::Busy`] when held.
    No,
    /// Up to this long, then [`Error::Timeout`].
    For(Duration),
}

/// Why a held lock or leadership was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// The session it was bound to expired in the registry (or the client opened a new
    /// one after an expiry).
    SessionExpired,
    /// The registry did not confirm the session for longer than its bound allows: the
    /// registry may have dropped it, so another contender may acquire any moment now.
    /// Decided locally, from the time of the last confirmed keep-alive.
    Unconfirmed,
    /// The lock's entry was deleted or taken over behind the holder's back (a foreign
    /// writer, an operator).
    Deleted,
    /// The client was shut down.
    Closed,
    /// Its holder released it (or resigned).
    Released,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lost::SessionExpired => "the session expired",
            Lost::Unconfirmed => "the registry did not confirm the session within its bound",
            Lost::Deleted => "the entry was deleted behind the holder's back",
            Lost::Closed => "the client was shut down",
            Lost::Released => "released by its holder",
        })
    }
}

/// The current leader of an election.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// The election.
    pub election: Name,
    /// The value the leader campaigned with (or proclaimed since).
    pub value: Vec<u8>,
    /// The leader's fencing token.
    pub token: FencingToken,
}

impl Leader {
    /// A leader of `election`.
    pub fn new(election: Name, value: Vec<u8>, token: FencingToken) -> Self {
        Self {
            election,
            value,
            token,
        }
    }
}

impl Item for Leader {
    const KIND: &'static str = "leader";
    type Id = Name;
    fn id(&self) -> &Name {
        &self.election
    }
}

/// What [`Coordinator::observe`] yields: the watch contract over an election's leader.
/// The snapshot holds the leader, or nothing when there is none; a new leader is
/// `Added` (none before) or `Updated`; `Removed` when the election has no leader.
pub type LeaderEvent = Event<Leader>;

/// Locks, semaphores and elections on one registry; object-safe, the same contract on
/// every backend.
///
/// # Contract
///
/// - Mutual exclusion: at most one [`LockGuard`] of a name is held at a time across every
///   client of the registry (at most `permits` for a semaphore), as long as holders stop
///   when their guard reports [`Lost`].
/// - Tokens strictly rise from one holder of a name to the next.
/// - Waiters are served in the order they asked (per registry: ZooKeeper and etcd queue
///   contenders; Consul's locks are not queued, like `consul lock`), and each waits on its
///   predecessor only.
/// - An acquisition survives a session expiry while it waits (it queues again under the
///   new session); it never hangs silently.
/// - A guard is handed out only while its session is confirmed alive (its last answered
///   keep-alive recent enough that the registry cannot have expired it; otherwise one is
///   asked for at once), never under a session the registry is about to expire.
/// - Dropping the future of an acquisition, or a guard, removes what it wrote, in the
///   background.
#[async_trait]
pub trait Coordinator: fmt::Debug + Send + Sync {
    /// Acquires `name` for one of `permits` holders (1: a lock), waiting as `wait` says.
    async fn acquire(&self, name: &Name, permits: u32, wait: Wait) -> Result<LockGuard>;

    /// Waits until elected in `election`, campaigning with `value`.
    async fn campaign(&self, election: &Name, value: Vec<u8>) -> Result<Leadership>;

    /// The current leader of `election`, `None` when there is none.
    async fn leader(&self, election: &Name) -> Result<Option<Leader>>;

    /// The leader of `election` as it changes: a snapshot first, then changes, `Stale`
    /// while the registry is unreachable and `Resynced` after.
    fn observe(&self, election: &Name) -> BoxStream<'static, Result<LeaderEvent>>;

    /// Waits until `name` is held by nobody else, then holds it.
    async fn lock(&self, name: &Name) -> Result<LockGuard> {
        self.acquire(name, 1, Wait::Forever).await
    }

    /// Holds `name` if nobody does; [`Error::Busy`] at once otherwise. While the
    /// registry does not answer (the enqueue, or the session's confirmation), it retries
    /// for a bounded time, then returns the error ([`Error::Timeout`] for an unconfirmed
    /// session) and leaves nothing behind.
    async fn try_lock(&self, name: &Name) -> Result<LockGuard> {
        self.acquire(name, 1, Wait::No).await
    }

    /// Like [`Coordinator::lock`], but gives up with [`Error::Timeout`] after `timeout`.
    async fn lock_for(&self, name: &Name, timeout: Duration) -> Result<LockGuard> {
        self.acquire(name, 1, Wait::For(timeout)).await
    }
}

/// What a holder asks of the task that keeps its hold.
#[derive(Debug)]
#[doc(hidden)]
pub enum Command {
    /// Let go; answer when the registry confirmed.
    Release(oneshot::Sender<Result<()>>),
    /// Write a new value into the holder's entry (elections).
    Proclaim(Vec<u8>, oneshot::Sender<Result<()>>),
}

/// One held lock, semaphore permit or leadership, as the backend layer hands it out.
/// Build it with [`Hold::new`] (backend implementers only).
#[derive(Debug)]
pub struct Hold {
    name: Name,
    token: FencingToken,
    lost: watch::Receiver<Option<Lost>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Hold {
    /// A hold of `name` at `token`: `lost` says when it was lost; `commands` reach the
    /// task that keeps it (dropping the sender releases it).
    pub fn new(
        name: Name,
        token: FencingToken,
        lost: watch::Receiver<Option<Lost>>,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            name,
            token,
            lost,
            commands,
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    fn lost(&self) -> Pin<Box<dyn Future<Output = Lost> + Send + 'static>> {
        let mut rx = self.lost.clone();
        Box::pin(async move {
            let seen = rx.wait_for(|l| l.is_some()).await.map(|l| l.clone());
            match seen {
                Ok(l) => l.unwrap_or(Lost::Closed),
                // The hold's task ended without a reason: the client is gone.
                Err(_) => rx.borrow().clone().unwrap_or(Lost::Closed),
            }
        })
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<()>>) -> Command,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).map_err(|_| Error::Closed {
            what: "lock holder (its task ended)",
        })?;
        rx.await.map_err(|_| Error::Closed {
            what: "lock holder (its task ended)",
        })?
    }
}

/// A held lock (or semaphore permit). Dropping it releases in the background;
/// [`LockGuard::release`] releases and waits for the registry to confirm.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    hold: Hold,
}

impl LockGuard {
    /// The guard of a hold (backend implementers only).
    pub fn new(hold: Hold) -> Self {
        Self { hold }
    }

    /// The lock's name.
    pub fn name(&self) -> &Name {
        &self.hold.name
    }

    /// The fencing token of this acquisition.
    pub fn token(&self) -> FencingToken {
        self.hold.token
    }

    /// Whether the lock was lost (see [`Lost`]). Once lost, it stays lost.
    pub fn is_lost(&self) -> bool {
        self.hold.is_lost()
    }

    /// Resolves when the lock is lost, with why. Run the protected work in a `select!`
    /// against it.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        self.hold.lost()
    }

    /// A receiver of the lost signal: `None` while held, then why it was lost.
    pub fn lost_signal(&self) -> watch::Receiver<Option<Lost>> {
        self.hold.lost.clone()
    }

    /// Releases the lock and waits until the registry confirmed. After an error, the
    /// release goes on in the background until the registry confirms (or the session
    /// ends, which releases everything).
    pub async fn release(self) -> Result<()> {
        self.hold.ask(Command::Release).await
    }
}

/// Leadership of an election. Dropping it resigns in the background.
#[derive(Debug)]
#[must_use = "leadership is resigned when the guard is dropped"]
pub struct Leadership {
    hold: Hold,
}

impl Leadership {
    /// The leadership of a hold (backend implementers only).
    pub fn new(hold: Hold) -> Self {
        Self { hold }
    }

    /// The election.
    pub fn election(&self) -> &Name {
        &self.hold.name
    }

    /// The fencing token of this term.
    pub fn token(&self) -> FencingToken {
        self.hold.token
    }

    /// Whether leadership was lost (see [`Lost`]). Once lost, it stays lost.
    pub fn is_lost(&self) -> bool {
        self.hold.is_lost()
    }

    /// Resolves when leadership is lost, with why.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        self.hold.lost()
    }

    /// A receiver of the lost signal: `None` while leading, then why it was lost.
    pub fn lost_signal(&self) -> watch::Receiver<Option<Lost>> {
        self.hold.lost.clone()
    }

    /// Publishes a new value as the leader's (observers see an `Updated`).
    pub async fn proclaim(&self, value: Vec<u8>) -> Result<()> {
        self.hold.ask(|tx| Command::Proclaim(value, tx)).await
    }

    /// Steps down and waits until the registry confirmed: the next candidate is elected
    /// at once.
    pub async fn resign(self) -> Result<()> {
        self.hold.ask(Command::Release).await
    }
}
