//! [`CoordDriver`] over [`ConsulCoord`]: core's lock and election machinery on Consul's
//! lock recipe (see the module docs of `coord`).

use super::*;

#[async_trait]
impl CoordDriver for ConsulCoord {
    type Handle = LockSession;
    type Ticket = Ticket;
    type Wait = Blocked;
    type Feed = LeaderFeed;

    fn max_value_len(&self) -> usize {
        crate::kv::MAX_CONFIG_VALUE_LEN
    }

    /// Consul has no queue: entering it writes nothing; [`CoordDriver::position`] tries.
    async fn enqueue(&self, session: &LockSession, c: &Contender, _retry: bool) -> Result<Ticket> {
        if let Kind::Lock { permits } = c.kind {
            if permits > 1 {
                return Err(Error::unsupported(format!(
                    "semaphores ({permits} permits) on consul (locks and elections only)"
                )));
            }
        }
        let key = self.key(&c.name);
        self.contenders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .insert(c.id.clone(), session.0.clone());
        Ok(Ticket {
            key,
            session: session.clone(),
            id: c.id.clone(),
            value: c.value.clone(),
        })
    }

    async fn position(&self, t: &Ticket) -> Result<Position<Blocked>> {
        let Some(tried) = self.claims.claim(&t.key, &t.session, &t.id) else {
            return Ok(Position::Waiting(Blocked::Local));
        };
        let r = self.attempt(t, tried).await;
        match &r {
            Ok(Position::Held(token)) => {
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(t.id.clone(), token.0);
            }
            // A lock whose answer was lost: the key may be ours; keep the claim.
            Err(_) if self.claims.tried(&t.key, &t.id) => {}
            _ => self.claims.release(&t.key, &t.id),
        }
        r
    }

    async fn wait(&self, t: &Ticket, w: &Blocked) -> Result<()> {
        match *w {
            Blocked::Held(index) => {
                tokio::select! {
                    r = self.read(&t.key, ReadMode::Past(index, self.wait)) => r.map(|_| ()),
                    e = self.agent.lost() => Err(e),
                }
            }
            Blocked::Delay => {
                tokio::time::sleep(LOCK_RETRY).await;
                Ok(())
            }
            Blocked::Local => {
                let mut rx = self.claims.changed.subscribe();
                let _ = tokio::time::timeout(self.wait, rx.changed()).await;
                Ok(())
            }
        }
    }

    async fn watch_held(&self, t: &Ticket) -> Result<()> {
        // The key's index is the token its acquisition wrote: block past it (a retried
        // watch reads first). A change made meanwhile is above that index, so starting
        // late loses nothing: it only delays noticing a key deleted behind our back by
        // `HELD_WATCH_DELAY`, and a short critical section sends no watch at all (the
        // agent would answer it when we release: measured, ~20 % of an uncontended
        // lock + release). The session's bound does not depend on this watch.
        let mut index = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.id)
            .unwrap_or(0);
        if index > 0 {
            tokio::time::sleep(HELD_WATCH_DELAY).await;
        }
        loop {
            let mode = match index {
                0 => ReadMode::Listing,
                _ => ReadMode::Past(index, self.wait),
            };
            let (pair, now) = self.read(&t.key, mode).await?;
            if pair.as_ref().and_then(LockPair::holder) != Some(&*t.session.0) {
                return Ok(());
            }
            // An index that went backwards (a restarted agent) must not block for long.
            index = if now < index { 0 } else { now };
        }
    }

    async fn dequeue(&self, t: &Ticket) -> Result<()> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.id);
        // Another contender of this client holds the key now: it is not ours to release.
        if self.claims.claim(&t.key, &t.session, &t.id).is_none() {
            self.left(&t.key, &t.id);
            return Ok(());
        }
        self.claims.mark_tried(&t.key, &t.id);
        let r = self.unlock(&t.key, &t.session).await;
        self.claims.release(&t.key, &t.id);
        if r.is_ok() {
            self.left(&t.key, &t.id);
        }
        r
    }

    async fn forget(&self, session: &LockSession, c: &Contender) -> Result<()> {
        let key = self.key(&c.name);
        if !self.claims.tried(&key, &c.id) {
            self.claims.release(&key, &c.id);
            self.left(&key, &c.id);
            return Ok(());
        }
        let t = self.enqueue(session, c, true).await?;
        self.dequeue(&t).await
    }

    async fn proclaim(&self, t: &Ticket, value: &[u8]) -> Result<()> {
        match self.lock(&t.key, &t.session, value, true).await? {
            Locked::Yes(_) => Ok(()),
            Locked::Held | Locked::Delay => Err(Error::Closed {
                what: "leadership (its key is no longer held by this session)",
            }),
        }
    }

    async fn leader(&self, election: &Name) -> Result<Option<Leader>> {
        let key = self.key(election);
        let (pair, _) = self.read(&key, ReadMode::Plain).await?;
        Ok(self.leader_of(election, &key, pair.as_ref()))
    }

    fn leader_feed(&self, election: &Name) -> LeaderFeed {
        LeaderFeed::new(self.clone(), election.clone())
    }
}
