//! The selection algorithms' distributions and the ring's stability.

use super::*;

mod edges;

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

/// An rng whose first `QUICK_TRIES` draws of every call land on index 0 (so the quick
/// draws fail when 0 is ineligible), then draws from `rng`.
fn past_the_quick_draws(mut rng: impl FnMut() -> u64) -> impl FnMut() -> u64 {
    let mut n = 0usize;
    move || {
        n += 1;
        if (n - 1) % (QUICK_TRIES + 1) < QUICK_TRIES {
            0
        } else {
            rng()
        }
    }
}

#[test]
fn the_exact_pass_is_proportional_to_the_eligible_weights() {
    // Index 0 is heavy and ineligible: every quick draw lands on it, the exact pass
    // decides. Eligible weights 2, 2, 5.
    let weights = [6u32, 2, 2, 5];
    let eligible = |i: usize| i != 0;
    let cumulative = cumulative_weights(weights);
    let table = AliasTable::new(weights);
    assert_eq!((table.len(), table.is_empty()), (4, false));
    assert!(AliasTable::new(Vec::<u32>::new()).is_empty());
    let mut by_sums = [0usize; 4];
    let mut by_alias = [0usize; 4];
    let mut draws = past_the_quick_draws(rng(11));
    for _ in 0..9000 {
        by_sums[weighted_eligible(&cumulative, &mut draws, eligible).unwrap()] += 1;
    }
    let mut draws = past_the_quick_draws(rng(12));
    for _ in 0..9000 {
        // The alias table's quick draws: r = 0 lands on column 0, which keeps index 0
        // (the heaviest) with certainty.
        by_alias[table.sample_eligible(&mut draws, eligible).unwrap()] += 1;
    }
    for counts in [by_sums, by_alias] {
        assert_eq!(counts[0], 0, "never the ineligible index: {counts:?}");
        for (i, expect) in [(1, 2000.0), (2, 2000.0), (3, 5000.0)] {
            let got = counts[i] as f64;
            assert!(
                (got - expect).abs() < expect * 0.1,
                "index {i}: {got} of 9000, expected ~{expect}: {counts:?}"
            );
        }
    }
}

#[test]
fn alias_table_is_exact_with_extreme_weights() {
    // Weights near 2^32: the units `w * n` approach 2^64 and must not overflow.
    let weights = [u32::MAX, 1, u32::MAX - 5, 0, 1 << 31];
    let t = AliasTable::new(weights);
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let n = weights.len() as u128;
    let mut mass = vec![0u128; weights.len()];
    for col in 0..weights.len() {
        let own = if t.keep[col] == u64::MAX {
            1u128 << 64
        } else {
            u128::from(t.keep[col])
        };
        mass[col] += own;
        mass[t.alias[col] as usize] += (1u128 << 64) - own;
    }
    for (i, &w) in weights.iter().enumerate() {
        let expected = ((u128::from(w) * n) << 64) / total;
        assert!(
            mass[i].abs_diff(expected) <= n << 13,
            "{i}: {} vs {expected}",
            mass[i]
        );
    }
}

#[test]
fn fast_mod_equals_the_remainder() {
    let mut r = rng(7);
    for d in [
        1usize,
        2,
        3,
        7,
        10,
        999,
        1_000,
        65_537,
        (1 << 31) + 11,
        u32::MAX as usize,
    ] {
        let m = FastMod::new(d);
        let xs = (0..2_000).map(|_| r() as u32 as usize);
        for x in xs.chain([0, 1, d - 1, d, d + 1, u32::MAX as usize]) {
            assert_eq!(m.reduce(x), (x as u32 as usize) % d, "{x} % {d}");
        }
    }
    assert_eq!(FastMod::new(0).reduce(5), 0);
}
