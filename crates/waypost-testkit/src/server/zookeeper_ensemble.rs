//! A ZooKeeper ensemble: several [`ZooKeeperServer`]s on loopback, each its own JVM with
//! its own data dir (`myid`), client, quorum and election ports.

use std::time::Duration;

use super::process::{make_dir, ManagedProcess};
use super::zookeeper::{locate, ZkRole, ZkSpec};
use super::{ports, HarnessError, ServerKind, ZooKeeperOptions, ZooKeeperServer};

/// How many times an ensemble start is tried again when a port turned out to be taken.
const ENSEMBLE_ATTEMPTS: usize = 5;

/// A ZooKeeper ensemble, all members on 127.0.0.1, for leader-failure and failover
/// tests.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use waypost_testkit::server::ZooKeeperEnsemble;
///
/// let mut zk = ZooKeeperEnsemble::start().await.unwrap(); // 3 members
/// let url = zk.url(); // "zk://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/services"
/// let leader = zk.wait_leader(Duration::from_secs(30)).await.unwrap();
/// zk.member(leader).kill().unwrap();
/// let next = zk.wait_new_leader(leader, Duration::from_secs(30)).await.unwrap();
/// zk.member(leader).restart().await.unwrap(); // back as a follower
/// # let _ = (url, next);
/// # }
/// ```
///
/// A member's [`restart`](ZooKeeperServer::restart) waits until it serves, which takes a
/// quorum: with every member down, use [`restart_all`](Self::restart_all).
#[derive(Debug)]
pub struct ZooKeeperEnsemble {
    members: Vec<ZooKeeperServer>,
}

impl ZooKeeperEnsemble {
    /// The number of members [`start`](Self::start) runs.
    pub const DEFAULT_SIZE: usize = 3;

    /// Starts a 3-member ensemble with [`ZooKeeperOptions::default`] and waits until
    /// every member serves and one leads.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(Self::DEFAULT_SIZE, ZooKeeperOptions::default()).await
    }

    /// Starts an `n`-member ensemble with `opts` for every member (its `extra_config`
    /// lines come last in each `zoo.cfg`, so they override the harness's), and waits
    /// until every member serves and one leads, each wait bounded by
    /// `opts.startup_timeout`. Fails at once if a member exits; tries again on new
    /// ports if one was taken.
    pub async fn start_with(n: usize, opts: ZooKeeperOptions) -> Result<Self, HarnessError> {
        if n == 0 {
            return Err(HarnessError::Invalid(
                "a ZooKeeper ensemble needs at least one member".into(),
            ));
        }
        let located = locate(&opts)?;
        let mut attempt = 1;
        loop {
            // Per member: client, quorum, election.
            let ports = ports::allocate(3 * n)?;
            let servers: String = (0..n)
                .map(|i| {
                    format!(
                        "server.{}=127.0.0.1:{}:{}\n",
                        i + 1,
                        ports[3 * i + 1],
                        ports[3 * i + 2]
                    )
                })
                .collect();
            let mut members = Vec::with_capacity(n);
            for i in 0..n {
                let dir = make_dir(ServerKind::ZooKeeper)?;
                let role = ZkRole::Member {
                    myid: i as u32 + 1,
                    peer_port: ports[3 * i + 1],
                    election_port: ports[3 * i + 2],
                };
                let spec =
                    ZkSpec::write(&located, &opts, dir.path(), ports[3 * i], role, &servers)?;
                let mut process = ManagedProcess::new(spec, dir);
                process.spawn()?;
                members.push(ZooKeeperServer::member(process));
            }
            let started = futures::future::try_join_all(
                members.iter().map(|m| m.wait_ready(opts.startup_timeout)),
            )
            .await;
            let port_in_use = members.iter().any(ZooKeeperServer::port_in_use);
            match started {
                Ok(_) => {}
                Err(e) if port_in_use && attempt < ENSEMBLE_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        error = %e,
                        "a port was taken; retrying the ZooKeeper ensemble with new ports"
                    );
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(with_all_logs(e, &members)),
            }
            let ensemble = ZooKeeperEnsemble { members };
            ensemble.wait_leader(opts.startup_timeout).await?;
            tracing::info!(url = %ensemble.url(), "ZooKeeper ensemble ready");
            return Ok(ensemble);
        }
    }

    /// How many members the ensemble has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the ensemble has no members (never true for a started one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members, in `myid` order (member `i` has `myid` `i + 1`).
    pub fn members(&self) -> &[ZooKeeperServer] {
        &self.members
    }

    /// Member `i`, to kill, pause, resume or restart. Panics if `i >= len()`.
    pub fn member(&mut self, i: usize) -> &mut ZooKeeperServer {
        &mut self.members[i]
    }

    /// Every member's client address, `127.0.0.1:PORT`.
    pub fn addresses(&self) -> Vec<String> {
        self.members.iter().map(ZooKeeperServer::address).collect()
    }

    /// The ZooKeeper connect string naming every member: `127.0.0.1:A,127.0.0.1:B,...`.
    pub fn connect_string(&self) -> String {
        self.addresses().join(",")
    }

    /// A waypost URL naming every member: `zk://127.0.0.1:A,127.0.0.1:B,.../services`.
    pub fn url(&self) -> String {
        format!("zk://{}/services", self.connect_string())
    }

    /// Which member leads, as far as can be seen right now (`srvr` on every member):
    /// the one member that says `Mode: leader`, while a majority of the ensemble serves
    /// (leads or follows). `None` during an election, without a quorum, or while two
    /// members both claim to lead.
    pub async fn leader(&self) -> Option<usize> {
        let modes = futures::future::join_all(self.members.iter().map(ZooKeeperServer::mode)).await;
        let single = self.members.len() == 1;
        let leads = |m: &str| m == "leader" || (single && m == "standalone");
        let leaders: Vec<usize> = modes
            .iter()
            .enumerate()
            .filter(|(_, m)| m.as_deref().is_some_and(leads))
            .map(|(i, _)| i)
            .collect();
        let serving = modes
            .iter()
            .flatten()
            .filter(|m| leads(m) || *m == "follower")
            .count();
        match leaders[..] {
            [i] if serving > self.members.len() / 2 => Some(i),
            _ => None,
        }
    }

    /// Waits until [`leader`](Self::leader) names a member (so a quorum serves),
    /// polling every 100 ms.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, HarnessError> {
        self.wait_leader_where(timeout, |_| true).await
    }

    /// Waits until [`leader`](Self::leader) names a member other than `old` (e.g. after
    /// killing or pausing `old`), polling every 100 ms.
    pub async fn wait_new_leader(
        &self,
        old: usize,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        self.wait_leader_where(timeout, |i| i != old).await
    }

    async fn wait_leader_where(
        &self,
        timeout: Duration,
        accept: impl Fn(usize) -> bool,
    ) -> Result<usize, HarnessError> {
        super::wait_leader_where(
            ServerKind::ZooKeeper,
            timeout,
            || self.leader(),
            accept,
            || log_tails(&self.members),
        )
        .await
    }

    /// Waits until every member serves (each one's own deadline is `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        futures::future::try_join_all(self.members.iter().map(|m| m.wait_ready(timeout)))
            .await
            .map(|_| ())
    }

    /// Kills every member that runs, starts them all again at once (same ports, same
    /// data) and waits until each serves: the way back from a whole-ensemble outage,
    /// where restarting members one by one would wait for a quorum that is not there.
    pub async fn restart_all(&mut self) -> Result<(), HarnessError> {
        for member in &mut self.members {
            member.kill()?;
        }
        futures::future::try_join_all(self.members.iter_mut().map(ZooKeeperServer::restart))
            .await
            .map(|_| ())
    }
}

/// Every member's log tail, headed by its `myid`.
fn log_tails(members: &[ZooKeeperServer]) -> String {
    members
        .iter()
        .map(|m| format!("== myid {} ==\n{}", m.myid().unwrap_or(0), m.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A member's not-ready error with every member's log (the cause is often in another's).
fn with_all_logs(error: HarnessError, members: &[ZooKeeperServer]) -> HarnessError {
    match error {
        HarnessError::NotReady { kind, waited, .. } => HarnessError::NotReady {
            kind,
            waited,
            log_tail: log_tails(members),
        },
        other => other,
    }
}
