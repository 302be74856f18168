//! Where contenders live: the key layout of Go's `concurrency` package, and which keys
//! under a name's prefix count as contenders.

use waypost_core::backend::{Contender, Kind};
use waypost_core::coord::Name;

/// The prefix of `name`'s contenders, with the trailing `/`: `{coord_prefix}/{name}/`
/// (what `etcdctl lock {coord_prefix}/{name}` and `etcdctl elect` use).
pub(crate) fn name_prefix(coord_prefix: &str, name: &Name) -> String {
    format!("{coord_prefix}/{name}/")
}

/// The key of `contender` under `lease`: `{name prefix}{lease as lowercase hex}`, as
/// Go's `Mutex` and `Election` write it (one key per lease and name). A semaphore's
/// contenders, several per lease, add `-{id}`: not a layout any etcd tool knows.
pub(crate) fn entry_key(np: &str, lease: i64, c: &Contender) -> String {
    match c.kind {
        Kind::Lock { permits } if permits > 1 => format!("{np}{lease:x}-{}", c.id),
        _ => format!("{np}{lease:x}"),
    }
}

/// Whether `key` (under `np`) is a contender of that name: `{hex}` (Go's layout)
/// or `{hex}-{id}` (a semaphore's). Keys of nested names (`np` + `a/...`) are passed
/// over quietly; anything else is skipped with a warning.
pub(crate) fn is_contender(np: &str, key: &[u8]) -> bool {
    let Some(rest) = key.strip_prefix(np.as_bytes()) else {
        return false;
    };
    if rest.contains(&b'/') {
        return false; // a nested name's contender
    }
    let (lease, id) = match rest.iter().position(|b| *b == b'-') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hex = !lease.is_empty()
        && lease.len() <= 16
        && lease
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let ok = hex && id.is_none_or(|id| !id.is_empty());
    if !ok {
        tracing::warn!(
            key = %String::from_utf8_lossy(key),
            "etcd: skipping a key under a lock or election that is no contender"
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contender(kind: Kind) -> Contender {
        Contender {
            name: "jobs/x".parse().unwrap(),
            kind,
            id: "u-1".into(),
            value: Vec::new(),
        }
    }

    #[test]
    fn layout_is_gos_for_locks_and_elections() {
        let np = name_prefix("/coord", &"jobs/x".parse().unwrap());
        assert_eq!(np, "/coord/jobs/x/");
        let lock = contender(Kind::Lock { permits: 1 });
        assert_eq!(entry_key(&np, 0x694d_77aa, &lock), "/coord/jobs/x/694d77aa");
        let elect = contender(Kind::Election);
        assert_eq!(entry_key(&np, 255, &elect), "/coord/jobs/x/ff");
        let sem = contender(Kind::Lock { permits: 3 });
        assert_eq!(entry_key(&np, 255, &sem), "/coord/jobs/x/ff-u-1");
        assert_eq!(name_prefix("", &"a".parse().unwrap()), "/a/");
    }

    #[test]
    fn only_contender_keys_count() {
        let np = "/coord/jobs/";
        for ok in ["694d77aa", "ff-u-1", "0"] {
            assert!(is_contender(np, format!("{np}{ok}").as_bytes()), "{ok}");
        }
        for bad in [
            "x/694d77aa",
            "",
            "G1",
            "FF",
            "ff-",
            "-1",
            "1234567890abcdef0",
            "ab cd",
        ] {
            assert!(
                !is_contender(np, format!("{np}{bad}").as_bytes()),
                "{bad:?}"
            );
        }
        assert!(!is_contender(np, b"/coord/other/ff"));
    }
}
