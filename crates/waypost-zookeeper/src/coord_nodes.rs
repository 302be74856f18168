//! Contender nodes as Curator names them, and a name's queue read from its children.
//!
//! A contender is an ephemeral sequential node `{parent}/_c_{uuid}-{marker}{seq}`: Curator's
//! protected prefix `_c_{uuid}-`, then the recipe's marker (`lock-` for
//! `InterProcessMutex`, `latch-` for `LeaderLatch`; `semaphore-` is ours), then the
//! server's sequence number (`%010d`). Curator orders the children of a lock by what
//! follows the marker; so do we. Any child whose name ends in a marker and digits is a
//! contender, protected or not (a foreign client may omit the `_c_` prefix).

use waypost_core::backend::Kind;

/// What a contender node contends for, by the marker in its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marker {
    /// `lock-`: a lock, as Curator's `InterProcessMutex` (and `LeaderSelector`) writes it.
    Lock,
    /// `semaphore-`: one contender of a counting semaphore (waypost's own, not Curator's
    /// `InterProcessSemaphoreV2` layout).
    Semaphore,
    /// `latch-`: a candidate of an election, as Curator's `LeaderLatch` writes it.
    Latch,
}

impl Marker {
    /// The marker a contender of `kind` writes.
    pub(crate) fn of(kind: Kind) -> Self {
        match kind {
            Kind::Lock { permits: 1 } => Marker::Lock,
            Kind::Lock { .. } => Marker::Semaphore,
            Kind::Election => Marker::Latch,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Marker::Lock => "lock-",
            Marker::Semaphore => "semaphore-",
            Marker::Latch => "latch-",
        }
    }

    /// Whether nodes with this marker queue in elections (else in locks and semaphores,
    /// which share one queue: a contender asking for `permits` holds when fewer than
    /// `permits` are ahead of it, whatever they asked for).
    pub(crate) fn is_election(self) -> bool {
        self == Marker::Latch
    }
}

/// One contender node, parsed from its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Contender {
    /// The node's name (below the name's parent node).
    pub(crate) name: String,
    /// The server's sequence number: the queue's order.
    pub(crate) seq: i64,
    pub(crate) marker: Marker,
}

/// The contender a node name describes, or `None` for a name that is none of ours.
pub(crate) fn parse(name: &str) -> Option<Contender> {
    let head = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = &name[head.len()..];
    if digits.is_empty() {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    let marker_of = |h: &str| {
        [Marker::Semaphore, Marker::Latch, Marker::Lock]
            .into_iter()
            .find(|m| h.ends_with(m.as_str()))
    };
    // After an overflow of the parent's counter the server writes `-000000001`.
    let (marker, seq) = match marker_of(head) {
        Some(m) => (m, n),
        None => (marker_of(head.strip_suffix('-')?)?, -n),
    };
    Some(Contender {
        name: name.to_string(),
        seq,
        marker,
    })
}

/// The contenders of one queue (elections, or locks and semaphores) among the children
/// of `parent`, in order. Children that are no contender, and contenders of the other
/// queue, are skipped; the former are logged.
pub(crate) fn queue(parent: &str, names: &[String], election: bool) -> Vec<Contender> {
    let mut queue: Vec<Contender> = names
        .iter()
        .filter_map(|n| {
            let c = parse(n);
            if c.is_none() {
                tracing::debug!(
                    node = %format!("{parent}/{n}"),
                    "zookeeper: skipping a child of a lock that is no contender"
                );
            }
            c
        })
        .filter(|c| c.marker.is_election() == election)
        .collect();
    queue.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.name.cmp(&b.name)));
    queue
}

/// The node-name prefix of contender `id` (Curator's protected prefix).
pub(crate) fn protected(id: &str) -> String {
    format!("_c_{id}-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curator_names_parse() {
        let c = parse("_c_6f1c2e4a-1b2c-4d5e-8f90-0123456789ab-lock-0000000042").unwrap();
        assert_eq!((c.seq, c.marker), (42, Marker::Lock));
        let c = parse("_c_x-latch-0000000007").unwrap();
        assert_eq!((c.seq, c.marker), (7, Marker::Latch));
        let c = parse("_c_x-semaphore-0000000003").unwrap();
        assert_eq!((c.seq, c.marker), (3, Marker::Semaphore));
        // Unprotected nodes (zookeeper-client's shared prefix) count too.
        assert_eq!(parse("lock-0000000001").unwrap().seq, 1);
        assert_eq!(parse("_c_x-lock--000000001").unwrap().seq, -1);
        for junk in [
            "lock-",
            "junk",
            "_c_x-lease-0000000001",
            "12",
            "_c_x-lock-x",
        ] {
            assert_eq!(parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn queues_are_sorted_and_apart() {
        let names: Vec<String> = [
            "_c_b-lock-0000000010",
            "_c_a-latch-0000000009",
            "junk",
            "_c_c-semaphore-0000000002",
            "_c_d-lock-0000000011",
        ]
        .map(String::from)
        .into();
        let locks: Vec<i64> = queue("/p", &names, false).iter().map(|c| c.seq).collect();
        assert_eq!(locks, [2, 10, 11]);
        let latches: Vec<i64> = queue("/p", &names, true).iter().map(|c| c.seq).collect();
        assert_eq!(latches, [9]);
        assert_eq!(Marker::of(Kind::Lock { permits: 1 }), Marker::Lock);
        assert_eq!(Marker::of(Kind::Lock { permits: 3 }), Marker::Semaphore);
        assert_eq!(Marker::of(Kind::Election), Marker::Latch);
    }
}
