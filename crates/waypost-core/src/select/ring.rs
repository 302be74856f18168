//! The consistent-hash ring of sticky picks.

use std::collections::HashMap;
use std::fmt;

use super::{key_hash, mix64, GOLDEN};

/// The hash of a ring point: the `vnode`-th output of a splitmix64 sequence seeded by the
/// member's id hash.
#[inline]
fn point(id_hash: u64, vnode: u32) -> u64 {
    mix64(id_hash.wrapping_add((u64::from(vnode) + 1).wrapping_mul(GOLDEN)))
}

/// A consistent-hash ring with virtual nodes.
///
/// Every member (an id, identified by its position in the member list) owns `vnodes`
/// points on a 64-bit circle; a key belongs to the owner of the first point at or after
/// its hash. When a member leaves, only the keys on its points move, spread over the
/// others; when one joins it takes about `1/n` of the keys. Lookup is a binary search.
///
/// Members all get the same number of points: the ring ignores weights, so changing a
/// weight never moves a key.
#[derive(Clone)]
pub struct Ring {
    /// Point hashes, ascending. A lookup reads them only when `high` ties.
    pub(super) points: Box<[u64]>,
    /// The top 32 bits of each point: what a lookup searches (half the bytes of
    /// `points`, so that with `owners` the searched data of a 100,000-point ring fits in
    /// a core's L2 cache).
    pub(super) high: Box<[u32]>,
    /// The member owning each point.
    pub(super) owners: Owners,
    /// `index[b]` is the first point whose top `bits` bits are `b` or more; one more
    /// entry at the end holds `points.len()`. Narrows the binary search to a bucket of
    /// about 8 points, so a lookup touches 3 or 4 cache lines instead of ~17.
    pub(super) index: Box<[u32]>,
    pub(super) bits: u32,
    pub(super) members: usize,
    pub(super) vnodes: u32,
}

/// The owner of each point: 16 bits each while the members fit, halving what a lookup
/// reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Owners {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Owners {
    fn new(owners: Vec<u32>, members: usize) -> Self {
        if u16::try_from(members).is_ok() {
            Owners::Narrow(owners.into_iter().map(|o| o as u16).collect())
        } else {
            Owners::Wide(owners.into())
        }
    }

    #[inline]
    pub(super) fn get(&self, i: usize) -> u32 {
        match self {
            Owners::Narrow(o) => u32::from(o[i]),
            Owners::Wide(o) => o[i],
        }
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("vnodes", &self.vnodes)
            .field("points", &self.points.len())
            .finish()
    }
}

impl Default for Ring {
    /// A ring without members.
    fn default() -> Self {
        Ring::new::<&str>(&[], 1)
    }
}

impl Ring {
    /// A ring of `members` (unique ids) with `vnodes` points each (at least 1).
    pub fn new<S: AsRef<str>>(members: &[S], vnodes: u32) -> Ring {
        let vnodes = vnodes.max(1);
        let mut pts = Vec::with_capacity(members.len() * vnodes as usize);
        for (owner, id) in members.iter().enumerate() {
            push_points(&mut pts, id.as_ref(), owner as u32, vnodes);
        }
        pts.sort_unstable();
        Self::from_points(pts, members.len(), vnodes)
    }

    /// The ring of `new`, derived from this ring of `old` without rehashing the members
    /// that stay: their points are kept (renumbered) and merged with the points of the
    /// members that joined. Equal to `Ring::new(new, vnodes)` when both lists are sorted.
    /// `old` must be the list this ring was built from.
    pub fn update<S: AsRef<str>>(&self, old: &[S], new: &[S]) -> Ring {
        debug_assert_eq!(
            old.len(),
            self.members,
            "`old` is not this ring's member list"
        );
        let new_pos: HashMap<&str, u32> = new
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_ref(), i as u32))
            .collect();
        const GONE: u32 = u32::MAX;
        let mut kept = vec![false; new.len()];
        let remap: Vec<u32> = old
            .iter()
            .map(|s| match new_pos.get(s.as_ref()) {
                Some(&j) => {
                    kept[j as usize] = true;
                    j
                }
                None => GONE,
            })
            .collect();
        let any_gone = remap.contains(&GONE);
        let mut added = Vec::new();
        for (i, id) in new.iter().enumerate() {
            if !kept[i] {
                push_points(&mut added, id.as_ref(), i as u32, self.vnodes);
            }
        }
        added.sort_unstable();

        // Copy the old points in runs between the insertion points of the new ones:
        // a bulk copy of the hashes and a table lookup per owner.
        let cap = self.points.len() + added.len();
        let mut points = Vec::with_capacity(cap);
        let mut owners = Vec::with_capacity(cap);
        let copy_run = |points: &mut Vec<u64>, owners: &mut Vec<u32>, from: usize, to: usize| {
            if any_gone {
                for k in from..to {
                    let o = remap[self.owners.get(k) as usize];
                    if o != GONE {
                        points.push(self.points[k]);
                        owners.push(o);
                    }
                }
            } else {
                points.extend_from_slice(&self.points[from..to]);
                owners.extend((from..to).map(|k| remap[self.owners.get(k) as usize]));
            }
        };
        let mut start = 0;
        for (ap, ao) in added {
            let mut pos = start + self.points[start..].partition_point(|&p| p < ap);
            // Equal hashes (practically never) are ordered by owner, as in `new`.
            while pos < self.points.len()
                && self.points[pos] == ap
                && remap[self.owners.get(pos) as usize] < ao
            {
                pos += 1;
            }
            copy_run(&mut points, &mut owners, start, pos);
            points.push(ap);
            owners.push(ao);
            start = pos;
        }
        copy_run(&mut points, &mut owners, start, self.points.len());
        Self::assemble(points, owners, new.len(), self.vnodes)
    }

    fn from_points(pts: Vec<(u64, u32)>, members: usize, vnodes: u32) -> Ring {
        let (points, owners) = pts.into_iter().unzip();
        Self::assemble(points, owners, members, vnodes)
    }

    fn assemble(points: Vec<u64>, owners: Vec<u32>, members: usize, vnodes: u32) -> Ring {
        // About 8 points (one cache line) per bucket; 0 bits (one bucket) for tiny rings.
        let bits = (points.len() / 8).max(1).ilog2();
        let buckets = 1usize << bits;
        let mut index = vec![0u32; buckets + 1];
        for &p in &points {
            index[bucket(p, bits) as usize + 1] += 1;
        }
        for b in 0..buckets {
            index[b + 1] += index[b];
        }
        Ring {
            high: points.iter().map(|&p| (p >> 32) as u32).collect(),
            points: points.into(),
            owners: Owners::new(owners, members),
            index: index.into(),
            bits,
            members,
            vnodes,
        }
    }

    /// The position of the first point at or after `hash`, or `points.len()`.
    #[inline]
    pub(super) fn search(&self, hash: u64) -> usize {
        let b = bucket(hash, self.bits) as usize;
        let (lo, hi) = (self.index[b] as usize, self.index[b + 1] as usize);
        let top = (hash >> 32) as u32;
        let at = lo + self.high[lo..hi].partition_point(|&h| h < top);
        if at < hi && self.high[at] == top {
            // A point shares the key's top half (about one key in 40,000 on a
            // 100,000-point ring): compare the full hashes from there.
            at + self.points[at..hi].partition_point(|&p| p < hash)
        } else {
            at
        }
    }

    /// The member that owns `hash`: the owner of the first point at or after it, walking
    /// on past points of ineligible members. `None` if no member is eligible.
    #[inline]
    pub fn lookup(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.search(hash);
        let start = if start == n { 0 } else { start };
        let first = self.owners.get(start) as usize;
        if eligible(first) {
            return Some(first);
        }
        // One pass over the members first, so a walk is only started when it will end.
        if !(0..self.members).any(&eligible) {
            return None;
        }
        (1..n)
            .map(|k| self.owners.get((start + k) % n) as usize)
            .find(|&o| eligible(o))
    }

    /// Number of members.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Points per member.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Number of points (members times vnodes).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[inline]
fn bucket(hash: u64, bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        hash >> (64 - bits)
    }
}

fn push_points(out: &mut Vec<(u64, u32)>, id: &str, owner: u32, vnodes: u32) {
    let h = key_hash(id.as_bytes());
    out.extend((0..vnodes).map(|v| (point(h, v), owner)));
}
