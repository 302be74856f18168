//! The operations on one lock key: consistent reads, and the `lock` / `unlock` /
//! `check-index` transactions (see the module docs of `coord`).

use super::*;

impl ConsulCoord {
    /// A consistent read of `key` (blocking past `index` for `wait` when `block` is set):
    /// the entry, if any, and the `X-Consul-Index`.
    pub(super) async fn read(&self, key: &str, mode: ReadMode) -> Result<(Option<LockPair>, u64)> {
        let op = "read a lock";
        let path = format!("/v1/kv/{key}");
        let query = vec![("consistent", String::new())];
        let reply = self
            .agent
            .get_blocking(op, &path, query, mode, &self.signal)
            .await?;
        let pair = match reply.status {
            404 => None,
            200 => {
                let mut pairs: Vec<LockPair> = serde_json::from_slice(&reply.body)
                    .map_err(|source| ConsulError::Decode { op, source })?;
                pairs.pop()
            }
            s => return Err(ConsulError::status(op, s, &reply.body).into()),
        };
        let index = reply.index.ok_or_else(|| ConsulError::Protocol {
            op,
            what: "the response has no X-Consul-Index header".into(),
        })?;
        Ok((pair, index.max(1)))
    }

    /// Runs one transaction: the entries of its results, or the errors' text (`409`).
    pub(super) async fn txn(
        &self,
        op: &'static str,
        ops: serde_json::Value,
    ) -> Result<std::result::Result<Vec<LockPair>, String>> {
        self.agent
            .txn(op, ops.to_string().into_bytes(), "a lock")
            .await
    }

    /// `lock` of `key` by `session` with `value` (after `check-session` when `checked`).
    pub(super) async fn lock(
        &self,
        key: &str,
        session: &LockSession,
        value: &[u8],
        checked: bool,
    ) -> Result<Locked> {
        use base64::Engine as _;
        let op = "acquire a lock";
        let lock = serde_json::json!({"KV": {
            "Verb": "lock",
            "Key": key,
            "Value": base64::engine::general_purpose::STANDARD.encode(value),
            "Flags": LOCK_FLAG_VALUE,
            "Session": &*session.0,
        }});
        let ops = if checked {
            let check = serde_json::json!({"KV": {"Verb": "check-session", "Key": key, "Session": &*session.0}});
            serde_json::json!([check, lock])
        } else {
            serde_json::json!([lock])
        };
        match self.txn(op, ops).await? {
            Ok(mut pairs) => pairs.pop().map(Locked::Yes).ok_or_else(|| {
                ConsulError::Protocol {
                    op,
                    what: "the transaction answered without the locked entry".into(),
                }
                .into()
            }),
            Err(why) if why.contains("lock delay") => Ok(Locked::Delay),
            Err(why) if why.contains("invalid session") => Err(Error::SessionExpired),
            Err(why) if why.contains("already held") || why.contains("session check") => {
                Ok(Locked::Held)
            }
            Err(why) => Err(ConsulError::Protocol {
                op,
                what: format!("the lock was refused: {why}"),
            }
            .into()),
        }
    }

    /// `unlock` of `key` by `session`: a key not held by it is left alone.
    pub(super) async fn unlock(&self, key: &str, session: &LockSession) -> Result<()> {
        let ops = serde_json::json!([{"KV": {
            "Verb": "unlock",
            "Key": key,
            "Flags": LOCK_FLAG_VALUE,
            "Session": &*session.0,
        }}]);
        match self.txn("release a lock", ops).await? {
            Ok(mut pairs) => {
                if let Some(p) = pairs.pop().filter(|p| p.holder().is_none()) {
                    let mut released = self.released();
                    if released.len() >= MAX_RELEASED {
                        released.clear();
                    }
                    released.insert(key.to_string(), p.modify_index);
                }
                Ok(())
            }
            Err(why) => {
                tracing::debug!(%key, "consul: nothing to release: {why}");
                Ok(())
            }
        }
    }

    /// The uncontended fast path, one round trip: when our own `unlock` left `t`'s key
    /// free at `index`, a transaction `check-index` + `lock`. The index check proves the
    /// key is still what we left (free, the lock flags), so the read that checks the flags
    /// and the holder can be skipped. `None`: someone wrote the key since (or Consul
    /// refused for any other reason): the caller reads and tries as usual.
    pub(super) async fn relock(&self, t: &Ticket, index: u64) -> Result<Option<FencingToken>> {
        use base64::Engine as _;
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-index", "Key": &t.key, "Index": index}},
            {"KV": {
                "Verb": "lock",
                "Key": &t.key,
                "Value": base64::engine::general_purpose::STANDARD.encode(&t.value),
                "Flags": LOCK_FLAG_VALUE,
                "Session": &*t.session.0,
            }},
        ]);
        match self.txn("acquire a lock", ops).await? {
            Ok(mut pairs) => Ok(pairs
                .pop()
                .filter(|p| p.holder() == Some(&*t.session.0))
                .map(|p| FencingToken(p.modify_index))),
            Err(why) => {
                tracing::debug!(key = %t.key, "consul: the key changed since our release: {why}");
                Ok(None)
            }
        }
    }

    /// One attempt to hold `t`'s key, under its local claim.
    pub(super) async fn attempt(&self, t: &Ticket, tried: bool) -> Result<Position<Blocked>> {
        let known = self.released().remove(&t.key);
        if let Some(index) = known {
            // The lock may land even if its answer is lost.
            self.claims.mark_tried(&t.key, &t.id);
            if let Some(token) = self.relock(t, index).await? {
                return Ok(Position::Held(token));
            }
        }
        let (pair, index) = self.read(&t.key, ReadMode::Plain).await?;
        if let Some(p) = &pair {
            if p.flags != LOCK_FLAG_VALUE {
                return Err(not_a_lock(&t.key, p));
            }
            match p.holder() {
                Some(s) if s != &*t.session.0 => {
                    return Ok(Position::Waiting(Blocked::Held(index)))
                }
                // Ours, left by a contender of this client whose release did not land:
                // release it, so that this acquisition is a new write with a new token.
                Some(_) if !tried => self.unlock(&t.key, &t.session).await?,
                _ => {}
            }
        }
        self.claims.mark_tried(&t.key, &t.id);
        match self.lock(&t.key, &t.session, &t.value, false).await? {
            Locked::Yes(p) => Ok(Position::Held(FencingToken(p.modify_index))),
            Locked::Held => Ok(Position::Waiting(Blocked::Held(index))),
            Locked::Delay => {
                tracing::debug!(key = %t.key, "consul: lock refused during its lock-delay");
                Ok(Position::Waiting(Blocked::Delay))
            }
        }
    }

    /// The leader of the lock key `key`, from a read.
    pub(super) fn leader_of(
        &self,
        election: &Name,
        key: &str,
        pair: Option<&LockPair>,
    ) -> Option<Leader> {
        let p = pair?;
        p.holder()?;
        if p.flags != LOCK_FLAG_VALUE {
            tracing::warn!(%key, flags = p.flags, "consul: skipping a key that is not a lock");
            return None;
        }
        Some(Leader::new(
            election.clone(),
            p.value(),
            FencingToken(p.modify_index),
        ))
    }

    /// Whether `key` is held by any session now (tests: Consul has no queue to count).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(crate) async fn is_held(&self, name: &Name) -> Result<bool> {
        let (pair, _) = self.read(&self.key(name), ReadMode::Plain).await?;
        Ok(pair.as_ref().and_then(LockPair::holder).is_some())
    }
}

pub(super) fn not_a_lock(key: &str, p: &LockPair) -> Error {
    Error::Conflict {
        what: format!(
            "consul key `{key}` exists with flags {:#x}, not a lock's ({LOCK_FLAG_VALUE:#x}): another tool uses it",
            p.flags
        ),
        current: Some(p.modify_index),
    }
}
