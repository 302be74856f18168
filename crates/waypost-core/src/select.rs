//! Selection algorithms over slices: the pure half of the
//! [`ServiceCache`](crate::cache::ServiceCache)'s strategies.
//!
//! Everything here works on indexes into a slice the caller owns, takes its randomness as
//! raw `u64`s from the caller, and asks the caller whether an index is `eligible` (not
//! ejected). Nothing here allocates except building a [`Ring`] and [`cumulative_weights`],
//! which the cache does when an update is applied, never when it picks.
//!
//! The hashes ([`key_hash`], the ring's points) are fixed functions of their input bytes,
//! the same on every platform and in every process: clients that see the same set of
//! instances map a sticky key to the same instance.

use std::collections::HashMap;
use std::fmt;

/// How many random draws the eligibility-aware functions make before they fall back to
/// one exact pass over the slice. Each draw is unbiased, so the fallback only changes the
/// cost, not the distribution.
const QUICK_TRIES: usize = 4;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The MurmurHash3 64-bit finalizer: a bijective mix in which every input bit affects
/// every output bit.
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A stable 64-bit hash of a byte string, for sticky keys and ring points.
///
/// Not cryptographic and not collision resistant against an adversary; it only has to
/// spread keys evenly. Its values are part of the sticky mapping, so they never change
/// between releases of the same major version (a test pins a few of them).
pub fn key_hash(bytes: &[u8]) -> u64 {
    #[inline]
    fn step(h: u64, w: u64) -> u64 {
        (h ^ w).wrapping_mul(GOLDEN).rotate_left(29)
    }
    let mut h = 0xcbf2_9ce4_8422_2325 ^ (bytes.len() as u64).wrapping_mul(GOLDEN);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = step(h, u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(w));
    }
    mix64(h)
}

/// Maps a uniform random `u64` onto `0..n` (Lemire's multiply-shift; the bias is below
/// `n / 2^64`). `n` must not be 0.
#[inline]
pub fn uniform_index(r: u64, n: usize) -> usize {
    ((u128::from(r) * n as u128) >> 64) as usize
}

#[inline]
fn bounded(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// Running sums of `weights`: element `i` is the sum of weights `0..=i`. The input of
/// [`weighted_index`]; a weight of 0 adds an entry that is never chosen.
pub fn cumulative_weights(weights: impl IntoIterator<Item = u32>) -> Vec<u64> {
    let mut sum = 0u64;
    weights
        .into_iter()
        .map(|w| {
            sum += u64::from(w);
            sum
        })
        .collect()
}

/// The index a uniform random `r` lands on, each index `i` with probability
/// `weight[i] / total`: a binary search in the running sums. `None` if the slice is empty
/// or every weight is 0.
#[inline]
pub fn weighted_index(cumulative: &[u64], r: u64) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let x = bounded(r, total);
    Some(cumulative.partition_point(|&c| c <= x))
}

/// A uniform choice among the eligible indexes of `0..n`: a few random draws, then one
/// exact pass if they all hit ineligible indexes. `None` if nothing is eligible.
pub fn uniform_eligible(
    n: usize,
    mut rng: impl FnMut() -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    for _ in 0..QUICK_TRIES {
        let i = uniform_index(rng(), n);
        if eligible(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|&i| eligible(i)).count();
    if count == 0 {
        return None;
    }
    let k = uniform_index(rng(), count);
    // Eligibility may change concurrently between the two passes; fall back to any.
    (0..n)
        .filter(|&i| eligible(i))
        .nth(k)
        .or_else(|| (0..n).find(|&i| eligible(i)))
}

/// A weighted choice among the eligible indexes, weights given as running sums (see
/// [`cumulative_weights`]). Exactly proportional to the weights of the eligible indexes.
/// `None` if no eligible index has a weight above 0.
pub fn weighted_eligible(
    cumulative: &[u64],
    mut rng: impl FnMut() -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let first = weighted_index(cumulative, rng())?;
    if eligible(first) {
        return Some(first);
    }
    for _ in 1..QUICK_TRIES {
        let i = weighted_index(cumulative, rng())?;
        if eligible(i) {
            return Some(i);
        }
    }
    let weight = |i: usize| cumulative[i] - if i == 0 { 0 } else { cumulative[i - 1] };
    let n = cumulative.len();
    let total: u64 = (0..n).filter(|&i| eligible(i)).map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut x = bounded(rng(), total);
    for i in (0..n).filter(|&i| eligible(i)) {
        let w = weight(i);
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    (0..n).find(|&i| eligible(i) && weight(i) > 0)
}

/// Walker's alias table: a weighted choice in constant time, one random `u64` per draw.
///
/// Column `c` of `n` keeps its own index with probability `keep[c] / 2^64` and gives the
/// draw to `alias[c]` otherwise; the columns are filled (Vose's method) so that index `i`
/// comes out with probability `weight[i] / total`, up to rounding below `2^-52` per
/// column. A draw takes the column from the high half of `r * n` and the coin from the
/// low half, so it costs one multiplication and two loads, whatever the number of
/// indexes.
#[derive(Clone, Debug, Default)]
pub struct AliasTable {
    keep: Box<[u64]>,
    alias: Box<[u32]>,
    weights: Box<[u32]>,
    total: u64,
}

impl AliasTable {
    /// The table of `weights` (index `i` has weight `weights[i]`; 0 is never drawn).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> AliasTable {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let n = weights.len();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut keep = vec![u64::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        if total > 0 {
            // Each column holds `total` units; index i brings `w_i * n` of them.
            let mut left: Vec<u128> = weights.iter().map(|&w| u128::from(w) * n as u128).collect();
            let cap = u128::from(total);
            // A column's share as a fraction of 2^64; f64 keeps it to 2^-52 of the
            // column, far below what sampling can tell apart, and avoids a 128-bit
            // division per column.
            let scale = 2f64.powi(64) / total as f64;
            let (mut small, mut large): (Vec<usize>, Vec<usize>) =
                (0..n).partition(|&i| left[i] < cap);
            while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
                keep[s] = (left[s] as f64 * scale) as u64;
                alias[s] = l as u32;
                left[l] -= cap - left[s];
                if left[l] < cap {
                    large.pop();
                    small.push(l);
                }
            }
            // What is left is full up to rounding: keeps its own index.
        }
        AliasTable {
            keep: keep.into(),
            alias: alias.into(),
            weights,
            total,
        }
    }

    /// The index `r` draws, each with probability `weight / total`. `None` if the table
    /// is empty or every weight is 0.
    #[inline]
    pub fn sample(&self, r: u64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let m = u128::from(r) * self.keep.len() as u128;
        let (col, coin) = ((m >> 64) as usize, m as u64);
        // A full column keeps `u64::MAX` and aliases itself, so the rare `coin == MAX`
        // lands on it too.
        Some(if coin < self.keep[col] {
            col
        } else {
            self.alias[col] as usize
        })
    }

    /// A weighted choice among the eligible indexes: a few draws, then one exact pass.
    /// Exactly proportional to the weights of the eligible indexes; `None` if no
    /// eligible index has a weight above 0.
    pub fn sample_eligible(
        &self,
        mut rng: impl FnMut() -> u64,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        for _ in 0..QUICK_TRIES {
            let i = self.sample(rng())?;
            if eligible(i) {
                return Some(i);
            }
        }
        let weight = |i: usize| u64::from(self.weights[i]);
        let n = self.weights.len();
        let total: u64 = (0..n).filter(|&i| eligible(i)).map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut x = bounded(rng(), total);
        for i in (0..n).filter(|&i| eligible(i)) {
            let w = weight(i);
            if x < w {
                return Some(i);
            }
            x -= w;
        }
        (0..n).find(|&i| eligible(i) && weight(i) > 0)
    }

    /// Number of indexes.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the table has no indexes.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The sum of the weights.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Round robin over `0..n`: each call takes a ticket (a shared counter) and returns the
/// ticket's index if eligible. An ineligible index uses up its ticket, so the instances
/// after it do not get its share. After a few misses it scans forward instead of taking
/// more tickets, which bounds the cost when most indexes are ineligible.
pub fn round_robin(
    n: usize,
    mut ticket: impl FnMut() -> usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let mut i = 0;
    for _ in 0..QUICK_TRIES {
        i = ticket() % n;
        if eligible(i) {
            return Some(i);
        }
    }
    (1..n).map(|k| (i + k) % n).find(|&j| eligible(j))
}

/// Whether `a` is strictly less loaded than `b`, each given as (requests in flight,
/// weight): compares `(in_flight + 1) / weight`, so with equal weights the one with fewer
/// requests in flight wins, and an instance of twice the weight may carry twice the
/// requests. Two weights of 0 compare by requests in flight alone.
#[inline]
pub fn less_loaded(a: (usize, u32), b: (usize, u32)) -> bool {
    let ((la, wa), (lb, wb)) = (a, b);
    let (wa, wb) = if wa == 0 && wb == 0 { (1, 1) } else { (wa, wb) };
    (la as u128 + 1) * u128::from(wb) < (lb as u128 + 1) * u128::from(wa)
}

/// The power of two choices: two distinct eligible indexes drawn uniformly, and the one
/// `better(x, y)` prefers (`better` returns whether `x` should win over `y`; ties go to the
/// first draw). A single eligible index is returned as is.
pub fn p2c(
    n: usize,
    mut rng: impl FnMut() -> u64,
    eligible: impl Fn(usize) -> bool,
    better: impl Fn(usize, usize) -> bool,
) -> Option<usize> {
    let a = uniform_eligible(n, &mut rng, &eligible)?;
    match uniform_eligible(n, &mut rng, |i| i != a && eligible(i)) {
        Some(b) if better(b, a) => Some(b),
        _ => Some(a),
    }
}

/// Rendezvous (highest random weight) hashing: the eligible member whose
/// `mix64(key ^ member_hash)` is highest. Costs one mix per member, so the cache uses it
/// only for the small fallback pools; it moves only the keys of a member that leaves.
pub fn rendezvous(
    key: u64,
    member_hashes: impl IntoIterator<Item = u64>,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    member_hashes
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| eligible(i))
        .max_by_key(|&(_, h)| mix64(key ^ h))
        .map(|(i, _)| i)
}

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
    /// Point hashes, ascending.
    points: Box<[u64]>,
    /// The member owning each point.
    owners: Box<[u32]>,
    /// `index[b]` is the first point whose top `bits` bits are `b` or more; one more
    /// entry at the end holds `points.len()`. Narrows the binary search to a bucket of
    /// about 8 points, so a lookup touches 3 or 4 cache lines instead of ~17.
    index: Box<[u32]>,
    bits: u32,
    members: usize,
    vnodes: u32,
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
            let (ps, os) = (&self.points[from..to], &self.owners[from..to]);
            if any_gone {
                for (&p, &o) in ps.iter().zip(os) {
                    let o = remap[o as usize];
                    if o != GONE {
                        points.push(p);
                        owners.push(o);
                    }
                }
            } else {
                points.extend_from_slice(ps);
                owners.extend(os.iter().map(|&o| remap[o as usize]));
            }
        };
        let mut start = 0;
        for (ap, ao) in added {
            let mut pos = start + self.points[start..].partition_point(|&p| p < ap);
            // Equal hashes (practically never) are ordered by owner, as in `new`.
            while pos < self.points.len()
                && self.points[pos] == ap
                && remap[self.owners[pos] as usize] < ao
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
            points: points.into(),
            owners: owners.into(),
            index: index.into(),
            bits,
            members,
            vnodes,
        }
    }

    /// The position of the first point at or after `hash`, or `points.len()`.
    #[inline]
    fn search(&self, hash: u64) -> usize {
        let b = bucket(hash, self.bits) as usize;
        let (lo, hi) = (self.index[b] as usize, self.index[b + 1] as usize);
        lo + self.points[lo..hi].partition_point(|&p| p < hash)
    }

    /// The member that owns `hash`: the owner of the first point at or after it, walking
    /// on past points of ineligible members. `None` if no member is eligible.
    pub fn lookup(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.search(hash);
        let start = if start == n { 0 } else { start };
        let first = self.owners[start] as usize;
        if eligible(first) {
            return Some(first);
        }
        // One pass over the members first, so a walk is only started when it will end.
        if !(0..self.members).any(&eligible) {
            return None;
        }
        (1..n)
            .map(|k| self.owners[(start + k) % n] as usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed-seed splitmix64, so these tests are deterministic.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(GOLDEN);
            mix64(s)
        }
    }

    #[test]
    fn key_hash_values_are_pinned() {
        // The sticky mapping depends on these; changing them moves every key.
        let pinned = [
            key_hash(b""),
            key_hash(b"a"),
            key_hash(b"user-42"),
            key_hash(b"a longer key of more than eight bytes"),
        ];
        assert_eq!(pinned, PINNED);
        assert_ne!(key_hash(b"ab"), key_hash(b"ba"));
        assert_ne!(key_hash(b"a"), key_hash(b"a\0"));
    }

    const PINNED: [u64; 4] = [
        17_280_346_270_528_514_342,
        14_607_299_707_259_051_085,
        9_247_652_939_075_736_326,
        17_286_355_384_192_916_672,
    ];

    #[test]
    fn weighted_index_lands_on_the_right_bucket() {
        let cum = cumulative_weights([1, 0, 2, 3]);
        assert_eq!(cum, [1, 1, 3, 6]);
        // r maps to x = r * 6 / 2^64; pick r at the start of each x.
        let at = |x: u64| ((u128::from(x) << 64) / 6 + 1) as u64;
        let got: Vec<_> = (0..6)
            .map(|x| weighted_index(&cum, at(x)).unwrap())
            .collect();
        assert_eq!(got, [0, 2, 2, 3, 3, 3]);
        assert_eq!(weighted_index(&cum, u64::MAX), Some(3));
        assert_eq!(weighted_index(&[], 1), None);
        assert_eq!(weighted_index(&[0, 0], 1), None);
    }

    #[test]
    fn weighted_eligible_is_proportional_among_eligible() {
        let cum = cumulative_weights([100, 300, 600]);
        let mut counts = [0usize; 3];
        let mut r = rng(1);
        let n = 60_000;
        for _ in 0..n {
            counts[weighted_eligible(&cum, &mut r, |i| i != 2).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        // Expected 1:3 among the eligible two: 15,000 and 45,000. σ ≈ 106.
        assert!((counts[0] as i64 - 15_000).abs() < 600, "{counts:?}");
        assert_eq!(weighted_eligible(&cum, &mut r, |_| false), None);
        assert_eq!(
            weighted_eligible(&cumulative_weights([5, 0]), &mut r, |i| i == 1),
            None
        );
    }

    #[test]
    fn alias_table_draws_exactly_proportionally() {
        // Every column's keep threshold is exact: walk r over each column's start and
        // the points just around its threshold, and count the mass each index gets.
        let weights = [1u32, 0, 2, 3, 10, 4];
        let t = AliasTable::new(weights);
        assert_eq!(t.total(), 20);
        let n = weights.len() as u128;
        let mut mass = [0u128; 6];
        for col in 0..weights.len() {
            // Column `col` covers coins in [0, 2^64); its own share is keep/2^64.
            let own = if t.keep[col] == u64::MAX {
                1u128 << 64
            } else {
                u128::from(t.keep[col])
            };
            mass[col] += own;
            mass[t.alias[col] as usize] += (1u128 << 64) - own;
            let r_start = (((col as u128) << 64) / n + 1) as u64;
            assert_eq!(uniform_index(r_start, weights.len()), col);
        }
        for (i, &w) in weights.iter().enumerate() {
            // mass[i] / (n * 2^64) == w / 20, up to 2^-52 of a column per column.
            let expected = ((u128::from(w) * n) << 64) / 20;
            assert!(
                mass[i].abs_diff(expected) <= n << 12,
                "{i}: {} vs {expected}",
                mass[i]
            );
        }
        let mut r = rng(9);
        let mut counts = [0usize; 6];
        for _ in 0..40_000 {
            counts[t.sample(r()).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        // 40,000 * 10/20 = 20,000; σ = 100.
        assert!((counts[4] as i64 - 20_000).abs() < 600, "{counts:?}");
        assert_eq!(AliasTable::new([0, 0]).sample(5), None);
        assert_eq!(AliasTable::new([]).sample(5), None);
        assert_eq!(AliasTable::new([7]).sample(u64::MAX), Some(0));
        let only = t.sample_eligible(&mut r, |i| i == 0 || i == 1);
        assert_eq!(only, Some(0));
        assert_eq!(t.sample_eligible(&mut r, |i| i == 1), None);
    }

    #[test]
    fn uniform_eligible_skips_and_falls_back_exactly() {
        let mut r = rng(2);
        let mut counts = [0usize; 10];
        for _ in 0..50_000 {
            // Only 2 of 10 eligible: most calls take the exact fallback.
            counts[uniform_eligible(10, &mut r, |i| i == 3 || i == 7).unwrap()] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), counts[3] + counts[7]);
        assert!((counts[3] as i64 - 25_000).abs() < 700, "{counts:?}");
        assert_eq!(uniform_eligible(10, &mut r, |_| false), None);
        assert_eq!(uniform_eligible(0, &mut r, |_| true), None);
    }

    #[test]
    fn round_robin_uses_up_the_tickets_of_skipped_indexes() {
        let mut t = 0usize;
        let mut ticket = || {
            t += 1;
            t - 1
        };
        let got: Vec<_> = (0..6)
            .map(|_| round_robin(4, &mut ticket, |i| i != 1).unwrap())
            .collect();
        assert_eq!(got, [0, 2, 3, 0, 2, 3]);
        let mut t = 0usize;
        let ticket = || {
            t += 1;
            t
        };
        assert_eq!(round_robin(4, ticket, |_| false), None);
    }

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let loads = [5usize, 0, 5];
        let mut r = rng(3);
        let mut got = [0usize; 3];
        for _ in 0..3_000 {
            let i = p2c(
                3,
                &mut r,
                |_| true,
                |x, y| less_loaded((loads[x], 1), (loads[y], 1)),
            )
            .unwrap();
            got[i] += 1;
        }
        // Index 1 wins whenever it is drawn (2 of 3 pairs), and ties split the rest.
        assert!(got[1] > 1_800 && got[1] < 2_200, "{got:?}");
        assert_eq!(p2c(3, &mut r, |i| i == 2, |_, _| true), Some(2));
        assert!(less_loaded((3, 200), (2, 100)));
        assert!(!less_loaded((1, 100), (1, 100)));
        assert!(less_loaded((0, 0), (1, 0)));
    }

    #[test]
    fn ring_update_equals_a_fresh_build() {
        let ids: Vec<String> = (0..50).map(|i| format!("i-{i:03}")).collect();
        let ring = Ring::new(&ids, 40);
        assert_eq!(ring.len(), 2_000);
        let mut next = ids.clone();
        next.remove(7);
        next.remove(30);
        next.push("j-new".into());
        next.insert(0, "a-new".into());
        let updated = ring.update(&ids, &next);
        let fresh = Ring::new(&next, 40);
        assert_eq!(updated.points, fresh.points);
        assert_eq!(updated.owners, fresh.owners);
        assert_eq!(updated.index, fresh.index);
        assert_eq!(updated.members(), next.len());
    }

    #[test]
    fn ring_moves_only_the_keys_of_a_member_that_leaves() {
        let ids: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
        let ring = Ring::new(&ids, 100);
        let mut next = ids.clone();
        let gone = next.remove(4);
        let after = ring.update(&ids, &next);
        let mut moved = 0;
        let keys = 20_000u64;
        for k in 0..keys {
            let h = key_hash(&k.to_le_bytes());
            let before = &ids[ring.lookup(h, |_| true).unwrap()];
            let now = &next[after.lookup(h, |_| true).unwrap()];
            if before == &gone {
                moved += 1;
            } else {
                assert_eq!(before, now, "key {k} moved though its owner stayed");
            }
        }
        // About a tenth of the keys were on the member that left.
        assert!(moved > 1_200 && moved < 2_800, "{moved}");
    }

    #[test]
    fn ring_index_search_equals_a_plain_binary_search() {
        for members in [0usize, 1, 3, 64, 500] {
            let ids: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
            let ring = Ring::new(&ids, 10);
            let mut r = rng(members as u64);
            let probes = ring
                .points
                .iter()
                .flat_map(|&p| [p, p.wrapping_add(1), p.wrapping_sub(1)]);
            for h in probes.chain((0..2_000).map(|_| r())).chain([0, u64::MAX]) {
                assert_eq!(
                    ring.search(h),
                    ring.points.partition_point(|&p| p < h),
                    "{h}"
                );
            }
        }
    }

    #[test]
    fn ring_lookup_walks_past_ineligible_and_wraps() {
        let ring = Ring::new(&["a", "b", "c"], 8);
        for k in 0..1_000u64 {
            let h = key_hash(&k.to_le_bytes());
            assert_eq!(ring.lookup(h, |o| o == 2), Some(2));
            let skip = ring.lookup(h, |_| true).unwrap();
            assert_ne!(ring.lookup(h, |o| o != skip), Some(skip));
        }
        assert!(ring.lookup(u64::MAX, |_| true).is_some());
        assert_eq!(ring.lookup(0, |_| false), None);
        assert_eq!(Ring::new::<&str>(&[], 8).lookup(0, |_| true), None);
    }

    #[test]
    fn ring_spreads_keys_about_evenly() {
        let ids: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}-8080")).collect();
        let ring = Ring::new(&ids, 100);
        let mut counts = vec![0usize; ids.len()];
        for k in 0..100_000u64 {
            counts[ring.lookup(key_hash(&k.to_le_bytes()), |_| true).unwrap()] += 1;
        }
        // 5,000 each on average; 100 vnodes keep every member within about ±35%.
        assert!(counts.iter().all(|&c| c > 3_000 && c < 7_000), "{counts:?}");
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_leaver() {
        let hashes: Vec<u64> = (0..5u64).map(|i| key_hash(&i.to_le_bytes())).collect();
        for k in 0..2_000u64 {
            let key = key_hash(&k.to_le_bytes());
            let all = rendezvous(key, hashes.iter().copied(), |_| true).unwrap();
            let without_3 = rendezvous(key, hashes.iter().copied(), |i| i != 3).unwrap();
            if all != 3 {
                assert_eq!(all, without_3);
            }
        }
        assert_eq!(rendezvous(1, hashes.iter().copied(), |_| false), None);
    }
}
