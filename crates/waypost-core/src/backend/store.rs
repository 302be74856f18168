//! What a backend implements for registrations: one entry per instance, bound to a
//! session.

use std::fmt::Debug;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::Instance;

/// What the registry holds at an instance's entry, as seen from one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Presence {
    /// Nothing (or nothing that names this instance).
    Missing,
    /// Our entry, bound to the session; `current`: it holds exactly this instance.
    Ours {
        /// Whether the entry holds exactly the instance asked about.
        current: bool,
    },
    /// An entry bound to no session (a foreign write over our entry, an etcd key detached
    /// from its lease): it would outlive us, and may be replaced.
    Unowned,
    /// An entry bound to another live session: someone else holds this id.
    Foreign,
}

/// The registry primitives behind registrations: one entry per instance, bound to a
/// session.
#[async_trait]
pub trait RegistryStore: Debug + Send + Sync + 'static {
    /// The session handle entries are bound to ([`SessionDriver::Handle`](super::SessionDriver::Handle)).
    type Handle: Clone + Debug + PartialEq + Send + Sync + 'static;

    /// Writes `instance`'s entry bound to `session`. An absent entry is created and our own
    /// entry replaced. An [`Presence::Unowned`] entry is replaced only when `takeover` is
    /// set (the keeper heals a registration it held), else it is
    /// [`Error::AlreadyExists`](crate::Error::AlreadyExists), as is a [`Presence::Foreign`] entry always.
    /// [`Error::SessionExpired`](crate::Error::SessionExpired) if the registry no longer knows `session`.
    async fn write(
        &self,
        session: &Self::Handle,
        instance: &Instance,
        takeover: bool,
    ) -> Result<()>;

    /// What the registry holds at `instance`'s entry. Called once per keep-alive round for
    /// every registration: a backend whose entries need their own heartbeat (Consul's TTL
    /// checks) sends it here.
    async fn inspect(&self, session: &Self::Handle, instance: &Instance) -> Result<Presence>;

    /// Deletes `instance`'s entry if it is ours (bound to `session`); never another
    /// party's. Absent is success.
    async fn delete(&self, session: &Self::Handle, instance: &Instance) -> Result<()>;

    /// Whether the registry keeps what a client wrote when the client's session ends:
    /// `false` by default (a lease, an ephemeral node: the entries go with it). A store
    /// whose entries outlive the session (Consul's agent services outlive the client's
    /// connection epochs) answers `true`, and the keeper carries pending removals into
    /// the next session instead of dropping them.
    fn entries_outlive_session(&self) -> bool {
        false
    }

    /// How many registrations one keep-alive round reads back at most (in rotation, so
    /// each is read within `ceil(n / this)` rounds); all of them by default. A store that
    /// reads entry by entry (ZooKeeper) bounds it, so a process with many registrations
    /// does not load the registry every round.
    fn inspect_per_round(&self) -> usize {
        usize::MAX
    }

    /// Whether keep-alive round `round` (counted from 0 over the keeper's life) reads back
    /// the registrations written under the live session; the others count as held. Every
    /// round by default. A store whose read-back costs the registry a whole listing
    /// whatever the number of registrations (Consul's `GET /v1/agent/services`) may read
    /// every Nth round, and at once when it learnt that the registry may have lost
    /// entries. Registrations not written under the session are written every round.
    fn read_back_round(&self, round: u64) -> bool {
        let _ = round;
        true
    }

    /// [`RegistryStore::inspect`] for many instances at once, answers in the same order:
    /// what the keeper calls once per keep-alive round for every registration written
    /// under `session`. The default asks one by one; a registry that reads many entries in
    /// one request (an etcd prefix range) overrides it.
    async fn inspect_many(
        &self,
        session: &Self::Handle,
        instances: &[Instance],
    ) -> Result<Vec<Presence>> {
        let mut out = Vec::with_capacity(instances.len());
        for i in instances {
            out.push(self.inspect(session, i).await?);
        }
        Ok(out)
    }
}
