//! A per-thread wyrand generator: one `u64` of state in a thread-local, no allocation,
//! no lock. Seeded from the standard library's per-process random hash keys.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0) };
}

static THREADS: AtomicU64 = AtomicU64::new(0);

fn seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(THREADS.fetch_add(1, Relaxed));
    h.finish() | 1
}

/// The next random `u64` of this thread's generator.
#[inline]
pub(crate) fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = seed();
        }
        x = x.wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x).wrapping_mul(u128::from(x ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// Seeds this thread's generator, so a test's random picks are reproducible.
#[cfg(test)]
pub(crate) fn seed_this_thread(seed: u64) {
    STATE.with(|s| s.set(seed | 1));
}
