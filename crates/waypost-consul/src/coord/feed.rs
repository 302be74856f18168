//! The leader feed of one election: blocking reads of its lock key, each answer a fresh
//! listing of zero or one leader (core's machine diffs them).
//!
//! Revisions are the answers' `X-Consul-Index`, kept strictly rising (an index that went
//! backwards, after a restarted agent, is numbered past the last one). Outages are
//! noticed as for the other watches: a refused connection at once, a paused agent within
//! two `request_timeout`s. Blocking reads stay in the watch share like configuration
//! watches' (`Agent::get_blocking`).

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::watch;
use waypost_core::backend::{Entry, Feed, Listing, Next};
use waypost_core::coord::{Leader, Name};
use waypost_core::{Error, Result, Revision};

use super::ConsulCoord;
use crate::client::ReadMode;

/// The leader of one election, listed again on every change of its key.
pub(crate) struct LeaderFeed {
    coord: ConsulCoord,
    election: Name,
    key: String,
    /// The agent's index of the last answer: the next blocking read waits past it.
    index: u64,
    /// The last revision handed to the machine.
    revision: Revision,
    generation: watch::Receiver<u64>,
}

impl std::fmt::Debug for LeaderFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderFeed")
            .field("key", &self.key)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl LeaderFeed {
    pub(super) fn new(coord: ConsulCoord, election: Name) -> Self {
        let key = coord.key(&election);
        let generation = coord.agent.generation();
        Self {
            coord,
            election,
            key,
            index: 0,
            revision: 0,
            generation,
        }
    }

    fn listing(&self, leader: Option<Leader>) -> Listing<Leader> {
        Listing {
            entries: leader
                .map(|item| Entry {
                    key: self.election.to_string(),
                    item,
                })
                .into_iter()
                .collect(),
            revision: self.revision,
        }
    }
}

#[async_trait]
impl Feed for LeaderFeed {
    type Item = Leader;

    async fn list(&mut self) -> Result<Listing<Leader>> {
        self.generation.borrow_and_update();
        let (pair, index) = self.coord.read(&self.key, ReadMode::Listing).await?;
        self.index = index;
        self.revision = index.max(self.revision + 1);
        let leader = self
            .coord
            .leader_of(&self.election, &self.key, pair.as_ref());
        Ok(self.listing(leader))
    }

    async fn next(&mut self, _after: Revision) -> Result<Next<Leader>> {
        loop {
            let wait = self
                .coord
                .wait
                .mul_f64(rand::thread_rng().gen_range(0.9..=1.0));
            let (pair, index) = tokio::select! {
                r = self.coord.read(&self.key, ReadMode::Past(self.index, wait)) => r?,
                e = self.coord.agent.lost() => return Err(e),
                _ = self.generation.changed() => {
                    return Err(Error::unavailable("consul: connections dropped (test hook)"));
                }
            };
            if index == self.index {
                continue; // the wait ran out with no change
            }
            self.index = index;
            self.revision = index.max(self.revision + 1);
            let leader = self
                .coord
                .leader_of(&self.election, &self.key, pair.as_ref());
            return Ok(Next::Listing(self.listing(leader)));
        }
    }
}
