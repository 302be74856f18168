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

/// How many random draws the eligibility-aware functions make before they fall back to
/// one exact pass over the slice. Each draw is unbiased, so the fallback only changes the
/// cost, not the distribution.
const QUICK_TRIES: usize = 4;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The MurmurHash3 64-bit finalizer: a bijective mix in which every input bit affects
/// every output bit.
#[inline]
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
#[inline]
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

/// `x % d` by a multiplication (Lemire's fastmod), for a divisor fixed in advance: a
/// division costs tens of cycles, as much as the rest of a pick.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FastMod {
    /// `ceil(2^64 / d)`; 0 for `d <= 1` (everything maps to 0).
    m: u64,
    d: u64,
}

impl FastMod {
    /// For divisor `d`; `reduce` is exact while `d` fits in 32 bits (the pools index
    /// with `u32`). `d = 0` reduces everything to 0.
    pub(crate) fn new(d: usize) -> Self {
        let d = d as u64;
        let m = if d <= 1 {
            0
        } else {
            (u64::MAX / d).wrapping_add(1)
        };
        FastMod { m, d }
    }

    /// `x % d` of the low 32 bits of `x` (a counter that wraps at 2^32 restarts there).
    #[inline]
    pub(crate) fn reduce(&self, x: usize) -> usize {
        let low = self.m.wrapping_mul(u64::from(x as u32));
        ((u128::from(low) * u128::from(self.d)) >> 64) as usize
    }
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
    exact_weighted(cumulative.len(), weight, rng, eligible)
}

/// The exact pass of a weighted draw among the eligible indexes of `0..n` (after the
/// quick draws missed): one draw over the eligible weights, exactly proportional to them.
/// `None` if no eligible index has a weight above 0.
fn exact_weighted(
    n: usize,
    weight: impl Fn(usize) -> u64,
    mut rng: impl FnMut() -> u64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let total: u64 = (0..n).filter(|&i| eligible(i)).map(&weight).sum();
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

mod alias;
mod ring;

pub use alias::AliasTable;
pub use ring::Ring;

#[cfg(test)]
mod tests;
