//! Weighted draws in constant time: Vose's alias method.

use super::{exact_weighted, QUICK_TRIES};

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
    pub(super) keep: Box<[u64]>,
    pub(super) alias: Box<[u32]>,
    pub(super) weights: Box<[u32]>,
    pub(super) total: u64,
}

/// Vose's method: `left[i]` holds index i's units (`w_i * n`); each column holds `cap`
/// (the total weight) units. Every count stays below `max(w_i) * n`, and with at most 2^32
/// indexes of weights below 2^32 that fits in 64 bits (128-bit counts cost a library call
/// per conversion to a float, which dominated building the table).
fn fill(mut left: Vec<u64>, cap: u64, keep: &mut [u64], alias: &mut [u32]) {
    // A column's share as a fraction of 2^64; f64 keeps it to 2^-52 of the column, far
    // below what sampling can tell apart, and avoids an integer division per column.
    let scale = 2f64.powi(64) / cap as f64;
    let (mut small, mut large): (Vec<usize>, Vec<usize>) =
        (0..left.len()).partition(|&i| left[i] < cap);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        let units = left[s];
        keep[s] = (units as f64 * scale) as u64;
        alias[s] = l as u32;
        left[l] -= cap - units;
        if left[l] < cap {
            large.pop();
            small.push(l);
        }
    }
    // What is left is full up to rounding: keeps its own index.
}

impl AliasTable {
    /// The table of `weights` (index `i` has weight `weights[i]`; 0 is never drawn).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> AliasTable {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let n = weights.len();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut keep = vec![u64::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        assert!(
            u32::try_from(n).is_ok(),
            "an alias table indexes at most 2^32 weights"
        );
        if total > 0 {
            let left = weights.iter().map(|&w| u64::from(w) * n as u64).collect();
            fill(left, total, &mut keep, &mut alias);
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
        // lands on it too. Both loads first: the coin is a coin flip for the branch
        // predictor, so the choice is a select (no branch to mispredict).
        let (keep, alias) = (self.keep[col], self.alias[col] as usize);
        Some(if coin < keep { col } else { alias })
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
        exact_weighted(
            self.weights.len(),
            |i| u64::from(self.weights[i]),
            rng,
            eligible,
        )
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
