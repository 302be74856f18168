//! Local claims: Consul cannot tell two contenders of one session apart (a second
//! `lock` by the same session succeeds), so a client lets one contender per key try under
//! its session at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::session::LockSession;

/// One local claim: which contender of this client may hold a key under its session.
#[derive(Debug)]
struct Claim {
    session: Arc<str>,
    id: String,
    /// A lock was sent for it: the key may be ours whatever the answer was.
    tried: bool,
}

/// The local claims, one per key, and a signal when one is given up.
#[derive(Clone, Default)]
pub(super) struct Claims {
    map: Arc<Mutex<HashMap<String, Claim>>>,
    pub(super) changed: Arc<watch::Sender<u64>>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claim>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` for contender `id` of `session`: `None` if another contender of the
    /// same session holds the claim, else whether a lock was already sent for `id`.
    pub(super) fn claim(&self, key: &str, session: &LockSession, id: &str) -> Option<bool> {
        let mut map = self.lock();
        match map.get(key) {
            Some(c) if c.session == session.0 && c.id != id => None,
            Some(c) if c.session == session.0 => Some(c.tried),
            _ => {
                map.insert(
                    key.to_string(),
                    Claim {
                        session: session.0.clone(),
                        id: id.to_string(),
                        tried: false,
                    },
                );
                Some(false)
            }
        }
    }

    pub(super) fn mark_tried(&self, key: &str, id: &str) {
        if let Some(c) = self.lock().get_mut(key).filter(|c| c.id == id) {
            c.tried = true;
        }
    }

    pub(super) fn tried(&self, key: &str, id: &str) -> bool {
        self.lock().get(key).is_some_and(|c| c.id == id && c.tried)
    }

    /// Gives up `id`'s claim of `key`, if it holds it.
    pub(super) fn release(&self, key: &str, id: &str) {
        let removed = {
            let mut map = self.lock();
            match map.get(key) {
                Some(c) if c.id == id => map.remove(key).is_some(),
                _ => false,
            }
        };
        if removed {
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> LockSession {
        LockSession(id.into())
    }

    #[test]
    fn one_claim_per_key_and_session() {
        let c = Claims::default();
        assert_eq!(c.claim("k", &session("s"), "a"), Some(false));
        assert_eq!(c.claim("k", &session("s"), "b"), None, "another contender");
        c.mark_tried("k", "a");
        assert_eq!(c.claim("k", &session("s"), "a"), Some(true));
        assert!(c.tried("k", "a") && !c.tried("k", "b"));
        c.release("k", "b");
        assert_eq!(c.claim("k", &session("s"), "b"), None, "b never held it");
        // A claim of an older session does not bind the new one.
        assert_eq!(c.claim("k", &session("s2"), "b"), Some(false));
        c.release("k", "b");
        assert_eq!(c.claim("k", &session("s2"), "c"), Some(false));
    }
}
