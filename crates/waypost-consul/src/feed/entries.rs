//! What a watch remembers of the agent's last health answer: every entry's raw bytes and
//! what they decoded to.
//!
//! A blocking health query answers with the whole service every time (1,000 instances:
//! about a megabyte of JSON), however little changed. The answer is split into its entries'
//! bytes by a scan that follows only strings and brackets (`split`), and only the entries
//! whose bytes differ from every entry of the last answer are decoded (which validates
//! them); the others keep what they decoded to, and were validated when they were. An
//! answer the scan cannot split is parsed by `serde_json` as raw values ([`RawValue`]),
//! whose error is the answer's. An entry's bytes hold all of its state (node, service, checks, each with its
//! `ModifyIndex`), so equal bytes are an unchanged entry. The bytes are looked up by a fast
//! word-at-a-time hash and compared in full, so a hash collision costs a decode, never a
//! missed change.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use serde_json::value::RawValue;
use waypost_core::backend::{Change, Entry};
use waypost_core::{Instance, Revision, ServiceName};

use crate::codec::HealthEntry;

/// A health entry's key (`{node}/{service id}`, `None` when the entry is not even a health
/// entry) and the instance it holds (`None`: not a valid instance of the service; logged).
#[derive(Debug)]
struct Decoded {
    key: Option<String>,
    item: Option<Instance>,
}

/// The entries of the last answer of one service's health query, by their raw bytes.
#[derive(Debug)]
pub(crate) struct Known {
    service: ServiceName,
    entries: HashMap<Box<[u8]>, Decoded, BuildHasherDefault<WordHasher>>,
}

impl Known {
    /// Nothing known yet: the first answer is decoded in full.
    pub(crate) fn new(service: &ServiceName) -> Self {
        Self {
            service: service.clone(),
            entries: HashMap::default(),
        }
    }

    /// Takes `body` (a health answer: a JSON array of entries) as the last answer; returns
    /// how its entries differ from the previous answer's, every change at `revision`. An
    /// entry that is no longer a valid instance is a `Put` without an item.
    pub(crate) fn update(
        &mut self,
        body: &[u8],
        revision: Revision,
    ) -> Result<Vec<Change<Instance>>, serde_json::Error> {
        let raws: Vec<&[u8]> = match split(body) {
            Some(raws) => raws,
            None => serde_json::from_slice::<Vec<&RawValue>>(body)?
                .into_iter()
                .map(|r| r.get().as_bytes())
                .collect(),
        };
        let mut next: HashMap<Box<[u8]>, Decoded, BuildHasherDefault<WordHasher>> =
            HashMap::with_capacity_and_hasher(raws.len(), Default::default());
        let mut changes = Vec::new();
        let mut written = HashSet::new();
        for bytes in raws {
            if let Some((bytes, decoded)) = self.entries.remove_entry(bytes) {
                next.insert(bytes, decoded);
                continue;
            }
            let decoded = decode(&self.service, bytes);
            if let Some(key) = &decoded.key {
                written.insert(key.clone());
                changes.push(Change::Put {
                    key: key.clone(),
                    item: decoded.item.clone(),
                    revision,
                });
            }
            next.insert(bytes.into(), decoded);
        }
        // What is left of the last answer changed (reported above) or is gone.
        for (_, gone) in self.entries.drain() {
            if let Some(key) = gone.key.filter(|k| !written.contains(k)) {
                changes.push(Change::Delete { key, revision });
            }
        }
        self.entries = next;
        Ok(changes)
    }

    /// Every valid instance of the last answer.
    pub(crate) fn listing(&self) -> Vec<Entry<Instance>> {
        self.entries
            .values()
            .filter_map(|d| {
                Some(Entry {
                    key: d.key.clone()?,
                    item: d.item.clone()?,
                })
            })
            .collect()
    }

    /// Whether the last answer held any valid instance.
    pub(crate) fn has_instances(&self) -> bool {
        self.entries.values().any(|d| d.item.is_some())
    }
}

/// The elements of the JSON array `body`, as bytes, found by following only strings
/// (with their escapes) and brackets; nothing is validated (decoding an element does).
/// `None` when `body` is not an array as far as this scan can tell.
fn split(body: &[u8]) -> Option<Vec<&[u8]>> {
    let inner = body.trim_ascii().strip_prefix(b"[")?.strip_suffix(b"]")?;
    let mut out = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, None::<usize>, 0);
    while i < inner.len() {
        match inner[i] {
            b'"' => {
                start.get_or_insert(i);
                i += 1;
                loop {
                    i += inner
                        .get(i..)?
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')?;
                    if inner[i] == b'"' {
                        break;
                    }
                    i += 2; // an escape and what it escapes
                }
            }
            b'{' | b'[' => {
                start.get_or_insert(i);
                depth += 1;
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => {
                out.push(inner[start.take()?..i].trim_ascii_end());
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                start.get_or_insert(i);
            }
        }
        i += 1;
    }
    if depth != 0 {
        return None;
    }
    match start {
        Some(s) => out.push(inner[s..].trim_ascii_end()),
        // `[1,]`: a trailing comma.
        None if !out.is_empty() => return None,
        None => {}
    }
    Some(out)
}

/// Decodes one raw health entry, logging why it is skipped.
fn decode(service: &ServiceName, raw: &[u8]) -> Decoded {
    let entry: HealthEntry = match serde_json::from_slice(raw) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%service, "consul: skipping a malformed health entry: {e}");
            return Decoded {
                key: None,
                item: None,
            };
        }
    };
    let sid = entry.service.id.clone();
    let key = crate::codec::entry_key(entry.node.as_ref().map_or("", |n| &n.name), &sid);
    let item = match crate::codec::decode(entry, service) {
        Ok(item) => Some(item),
        Err(why) => {
            tracing::warn!(%service, service_id = %sid.escape_debug(), "consul: skipping an entry that is not a valid instance: {why}");
            None
        }
    };
    Decoded {
        key: Some(key),
        item,
    }
}

/// A word-at-a-time multiplicative hash (FxHash's step): a few hundred bytes per entry
/// hash in well under a microsecond. Lookups compare the bytes in full, so its weakness
/// (easy collisions) costs time, never correctness.
#[derive(Default)]
pub(crate) struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, port: u16, check_index: u64) -> serde_json::Value {
        serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": format!("web:{id}"), "Service": "web", "Address": "h", "Port": port},
            "Checks": [{"CheckID": "c", "ModifyIndex": check_index}]
        })
    }

    fn body(entries: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(entries).unwrap()
    }

    fn keys(changes: &[Change<Instance>]) -> Vec<String> {
        let mut k: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::Put { key, item, .. } => format!("put {key} {}", item.is_some()),
                Change::Delete { key, .. } => format!("delete {key}"),
            })
            .collect();
        k.sort();
        k
    }

    #[test]
    fn only_changed_entries_are_reported() {
        let mut known = Known::new(&"web".parse().unwrap());
        let (a, b, c) = (entry("a", 1, 5), entry("b", 2, 5), entry("c", 3, 5));
        let first = known
            .update(&body(&[a.clone(), b.clone(), c.clone()]), 10)
            .unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(known.listing().len(), 3);
        // Nothing changed: nothing reported.
        assert!(known
            .update(&body(&[c.clone(), a.clone(), b.clone()]), 11)
            .unwrap()
            .is_empty());
        // `b`'s check moved, `c` left, `d` came, `a` became invalid (foreign service).
        let mut bad = a.clone();
        bad["Service"]["Service"] = "other".into();
        let ch = known
            .update(&body(&[bad, entry("b", 2, 6), entry("d", 4, 5)]), 12)
            .unwrap();
        assert!(ch.iter().all(|c| c.revision() == 12));
        assert_eq!(
            keys(&ch),
            [
                "delete n1/web:c",
                "put n1/web:a false",
                "put n1/web:b true",
                "put n1/web:d true"
            ]
        );
        assert_eq!(known.listing().len(), 2);
        assert!(known.has_instances());
        // A malformed entry is skipped; the key it replaced is gone.
        let ch = known
            .update(&body(&[serde_json::json!({"x": 1}), entry("d", 4, 5)]), 13)
            .unwrap();
        assert_eq!(keys(&ch), ["delete n1/web:a", "delete n1/web:b"]);
        assert!(known.update(b"{\"not\": \"an array\"}", 14).is_err());
    }

    #[test]
    fn split_finds_the_elements_or_gives_up() {
        let body = br#" [ {"a": "x,]}\"{[", "b": [1, {"c": 2}]} , {"d":null}
        ,"s" ,3 ] "#;
        let parts: Vec<&str> = split(body)
            .unwrap()
            .into_iter()
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect();
        assert_eq!(
            parts,
            [
                r#"{"a": "x,]}\"{[", "b": [1, {"c": 2}]}"#,
                r#"{"d":null}"#,
                r#""s""#,
                "3"
            ]
        );
        assert_eq!(split(b"[]").unwrap().len(), 0);
        assert_eq!(split(b"[ ]").unwrap().len(), 0);
        for bad in [
            &b"{}"[..],
            b"[1,]",
            b"[,1]",
            b"[{]",
            b"[\"abc]",
            b"[1]]",
            b"<html>",
        ] {
            assert!(split(bad).is_none(), "{:?}", std::str::from_utf8(bad));
        }
        // Every element of a real array, as serde_json sees them.
        let v = serde_json::json!([{"k": "v\\\"", "n": [1, 2, {"x": "]"}]}, [], "", 0.5, {}]);
        let text = serde_json::to_vec_pretty(&v).unwrap();
        let ours: Vec<serde_json::Value> = split(&text)
            .unwrap()
            .into_iter()
            .map(|p| serde_json::from_slice(p).unwrap())
            .collect();
        assert_eq!(serde_json::Value::Array(ours), v);
    }

    #[test]
    fn hashes_differ_on_every_byte_and_length() {
        let h = |b: &[u8]| {
            let mut s = WordHasher::default();
            s.write(b);
            s.finish()
        };
        assert_ne!(h(b"abcdefghij"), h(b"abcdefghik"));
        assert_ne!(h(b"abcdefgh"), h(b"bbcdefgh"));
    }
}
