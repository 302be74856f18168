//! Edges that mutation testing found unguarded: exact boundaries, the fallbacks for an
//! eligibility that changes during a pick, and pinned hash mappings.

use std::cell::Cell;

use super::super::*;
use super::{past_the_quick_draws, rng};

#[test]
fn the_exact_pass_splits_equal_weights_evenly() {
    // Index 0 is heavy and ineligible, so every quick draw misses; the exact pass walks
    // four weights of 1, subtracting each weight it passes.
    let weights = [6u32, 1, 1, 1, 1];
    let eligible = |i: usize| i != 0;
    let cumulative = cumulative_weights(weights);
    let table = AliasTable::new(weights);
    let mut by_sums = [0usize; 5];
    let mut by_alias = [0usize; 5];
    let mut draws = past_the_quick_draws(rng(21));
    for _ in 0..8000 {
        by_sums[weighted_eligible(&cumulative, &mut draws, eligible).unwrap()] += 1;
        by_alias[table.sample_eligible(&mut draws, eligible).unwrap()] += 1;
    }
    for counts in [by_sums, by_alias] {
        assert_eq!(counts[0], 0, "{counts:?}");
        // 2,000 each expected; σ ≈ 39.
        assert!(
            counts[1..].iter().all(|&c| c.abs_diff(2000) < 200),
            "{counts:?}"
        );
    }
}

/// An eligibility test that answers `true` for the first `n` calls (the pass that
/// counts), `false` for the next `n` (the pass that draws), then `then[i]`: as if
/// instances were ejected and readmitted while a pick runs.
fn changing(n: usize, then: &'static [bool]) -> impl Fn(usize) -> bool {
    let calls = Cell::new(0usize);
    move |i| {
        let c = calls.get();
        calls.set(c + 1);
        if c < n {
            true
        } else if c < 2 * n {
            false
        } else {
            then[i]
        }
    }
}

#[test]
fn the_exact_pass_falls_back_to_an_eligible_index_with_weight() {
    // Eligibility changes between the total and the walk: the walk finds nothing, and
    // the fallback takes the first index that is eligible now and has a weight.
    let weights = [0u64, 5, 5, 5];
    let then = &[true, false, true, true];
    let got = exact_weighted(4, |i| weights[i], rng(1), changing(4, then));
    assert_eq!(got, Some(2));
}

#[test]
fn uniform_eligible_falls_back_when_eligibility_changes() {
    // The quick draws all land on 0 (ineligible at first, like the rest after the
    // count); the count saw one eligible index, the pick pass finds none, the fallback
    // takes the first index eligible now.
    let calls = Cell::new(0usize);
    let eligible = |i: usize| {
        let c = calls.get();
        calls.set(c + 1);
        match c {
            0..=3 => false,        // the quick draws (index 0)
            4..=7 => i == 1,       // the count: only 1
            8..=11 => false,       // the pick pass
            _ => i == 2 || i == 3, // the fallback
        }
    };
    let draws = past_the_quick_draws(rng(3));
    assert_eq!(uniform_eligible(4, draws, eligible), Some(2));
}

#[test]
fn round_robin_scans_forward_from_the_last_ticket() {
    // Tickets 0..=3 hit ineligible indexes; the scan goes on from 3: 4, then 5.
    let mut t = 0usize;
    let ticket = || {
        t += 1;
        t - 1
    };
    assert_eq!(round_robin(8, ticket, |i| i == 5 || i == 6), Some(5));
    // From ticket 6 the scan wraps: 7, 0, 1.
    let mut t = 3usize;
    let ticket = || {
        t += 1;
        t - 1
    };
    assert_eq!(round_robin(8, ticket, |i| i == 1 || i == 2), Some(1));
}

#[test]
fn a_weight_of_zero_is_the_most_loaded() {
    // One weight of 0 against a weight above 0: the weighted instance wins even with
    // requests in flight. Only two zeros compare by requests alone.
    assert!(less_loaded((3, 5), (0, 0)));
    assert!(!less_loaded((0, 0), (3, 5)));
    assert!(less_loaded((0, 0), (1, 0)));
}

#[test]
fn rendezvous_winners_are_pinned() {
    // Like `key_hash`, part of the sticky mapping (of the draining pool): every client
    // and every release must agree on it.
    let hashes: Vec<u64> = (0..5u64).map(|i| key_hash(&i.to_le_bytes())).collect();
    let got: Vec<usize> = (0..16u64)
        .map(|k| {
            let key = key_hash(&k.to_le_bytes());
            rendezvous(key, hashes.iter().copied(), |_| true).unwrap()
        })
        .collect();
    assert_eq!(got, [1, 4, 1, 4, 1, 0, 0, 2, 0, 2, 4, 2, 4, 4, 1, 3]);
}

#[test]
fn ring_owners_are_pinned() {
    // The ring's points are part of the sticky mapping too.
    let ring = Ring::new(&["a", "b", "c", "d", "e"], 10);
    let got: Vec<usize> = (0..16u64)
        .map(|k| ring.lookup(key_hash(&k.to_le_bytes()), |_| true).unwrap())
        .collect();
    assert_eq!(got, [3, 3, 1, 0, 3, 4, 3, 0, 1, 1, 4, 4, 3, 1, 1, 1]);
    assert_eq!(
        (ring.vnodes(), ring.len(), ring.is_empty()),
        (10, 50, false)
    );
    assert!(Ring::default().is_empty());
}

#[test]
fn ring_buckets_hold_about_eight_points() {
    let ids: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
    let ring = Ring::new(&ids, 10);
    let buckets = ring.index.len() - 1;
    assert_eq!(buckets, 1 << ring.bits);
    let sizes: Vec<u32> = ring.index.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = ring.len() as f64 / buckets as f64;
    assert!((8.0..16.0).contains(&mean), "{mean}");
    // 2,000 points in 128 buckets at random: the fullest holds about 30.
    assert!(sizes.iter().all(|&s| s < 48), "{sizes:?}");
}

/// Two ids with the same `key_hash` (so the same points): found by solving the last
/// 8-byte step of the hash for a printable block.
const TWINS: [&str; 2] = ["mem-bbbxsdwrliDH", "member-a-collide"];

#[test]
fn ring_update_orders_equal_points_by_owner() {
    assert_eq!(key_hash(TWINS[0].as_bytes()), key_hash(TWINS[1].as_bytes()));
    // The joining twin sorts before the staying one, then after it.
    for (old, new) in [
        (vec![TWINS[1], "z"], vec![TWINS[0], TWINS[1], "z"]),
        (vec![TWINS[0], "z"], vec![TWINS[0], TWINS[1], "z"]),
        (vec!["a", TWINS[0], TWINS[1]], vec!["a", TWINS[1]]),
    ] {
        let updated = Ring::new(&old, 16).update(&old, &new);
        let fresh = Ring::new(&new, 16);
        assert_eq!(updated.points, fresh.points, "{old:?} -> {new:?}");
        assert_eq!(updated.owners, fresh.owners, "{old:?} -> {new:?}");
    }
}

#[test]
fn an_alias_column_keeps_its_index_below_the_threshold_only() {
    // Weights 1 and 3: column 0 keeps index 0 for coins below 2^63, else gives 1.
    let t = AliasTable::new([1, 3]);
    assert_eq!(t.keep[0], 1 << 63);
    // r * 2 = 2^63 is column 0 with the coin exactly on the threshold.
    assert_eq!(t.sample(1 << 62), Some(1));
    assert_eq!(t.sample((1 << 62) - 1), Some(0));
}

#[test]
fn a_full_column_aliases_itself() {
    // Weight 2 of 6 over 3 columns is exactly one column: it starts full and keeps
    // itself even for the top coin, `u64::MAX` (r * 3 = 2^64 - 1: column 0).
    let t = AliasTable::new([2, 1, 3]);
    assert_eq!((t.keep[0], t.alias[0]), (u64::MAX, 0));
    assert_eq!(t.sample(0x5555_5555_5555_5555), Some(0));
}

#[test]
fn ring_update_grows_from_one_member() {
    // More points join than stay.
    let (old, new) = (["m"], ["a", "m", "z"]);
    let updated = Ring::new(&old, 8).update(&old, &new);
    assert_eq!(updated.points, Ring::new(&new, 8).points);
}
