//! The KV wire format: Consul's KV entries (`GET /v1/kv/...`, values in base64) and the
//! transaction operations (`PUT /v1/txn`) that writes use.
//!
//! Decoding is tolerant: an entry whose key is not a configuration key under the prefix
//! (a space, an empty segment, a Consul "folder" key ending in `/`) is skipped and logged,
//! never an error.

use serde::{Deserialize, Serialize};
use waypost_core::backend::{Entry, Scope};
use waypost_core::kv::{ConfigEntry, ConfigKey};

/// One KV entry as the agent returns it (`Value` is base64, `null` for an empty value).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KvPair {
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: Option<String>,
    pub(super) modify_index: u64,
}

/// One operation of a transaction: `{"KV": {"Verb": ..., "Key": ..., ...}}`.
#[derive(Debug, Serialize)]
pub(super) struct TxnOp {
    #[serde(rename = "KV")]
    kv: TxnKv,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct TxnKv {
    verb: &'static str,
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
}

impl TxnOp {
    /// `verb` on `key`, with a `ModifyIndex`, and no value.
    pub(super) fn new(verb: &'static str, key: &str, index: Option<u64>) -> Self {
        Self {
            kv: TxnKv {
                verb,
                key: key.to_string(),
                value: None,
                flags: None,
                index,
            },
        }
    }

    /// A write of `value` (in base64) with `Flags` set to `stamp`.
    ///
    /// Consul skips a write that changes nothing (same value, flags and session): the
    /// key keeps its `ModifyIndex`. Every write must be a new version, as on the other
    /// registries, so each carries a new stamp in `Flags` (see [`write_stamp`]).
    pub(super) fn write(
        verb: &'static str,
        key: &str,
        value: &[u8],
        stamp: u64,
        index: Option<u64>,
    ) -> Self {
        let mut op = Self::new(verb, key, index);
        op.kv.value = Some(encode_base64(value));
        op.kv.flags = Some(stamp);
        op
    }
}

/// The `Flags` of a write: the wall-clock time in nanoseconds since the Unix epoch, so
/// that two writes of one value differ (and, for Consul's own tools, when it was written).
pub(super) fn write_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The entries of `pairs` that `scope` covers, as configuration entries keyed by their
/// Consul key. `root` is the configuration prefix with its `/` (`config/`). Entries that
/// are not configuration keys are skipped: logged at `warn` when `loud` (a listing),
/// at `debug` otherwise (every answer of a watch repeats them).
pub(super) fn decode_entries(
    pairs: Vec<KvPair>,
    root: &str,
    scope: &Scope,
    loud: bool,
) -> Vec<Entry<ConfigEntry>> {
    pairs
        .into_iter()
        .filter_map(|pair| match decode_pair(&pair, root) {
            Ok(entry) if scope.covers(&entry.key) => Some(Entry {
                key: pair.key,
                item: entry,
            }),
            Ok(_) => None,
            // Folders are how Consul's UI groups keys: nothing to warn about.
            Err(why) if !loud || pair.key.ends_with('/') => {
                tracing::debug!(key = %pair.key.escape_debug(), "consul: skipping a KV entry: {why}");
                None
            }
            Err(why) => {
                tracing::warn!(key = %pair.key.escape_debug(), "consul: skipping a KV entry: {why}");
                None
            }
        })
        .collect()
}

/// One entry as a configuration entry, or why it is not one.
pub(super) fn decode_pair(pair: &KvPair, root: &str) -> Result<ConfigEntry, String> {
    let rest = pair
        .key
        .strip_prefix(root)
        .ok_or_else(|| format!("not below `{root}`"))?;
    let key = ConfigKey::new(rest).map_err(|e| e.to_string())?;
    let value = match &pair.value {
        Some(b64) => decode_base64(b64).ok_or("its value is not base64")?,
        None => Vec::new(),
    };
    Ok(ConfigEntry::new(key, value, pair.modify_index))
}

/// Standard base64 with padding (Go's `encoding/json` for `[]byte`).
pub(super) fn encode_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64 (padding required, as Consul writes it); `None` if it is not.
pub(super) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_consul() {
        // What Consul returned for these values.
        assert_eq!(encode_base64(b"hello"), "aGVsbG8=");
        assert_eq!(encode_base64(b"v1"), "djE=");
        assert_eq!(encode_base64(b""), "");
        assert_eq!(decode_base64("djIw").unwrap(), b"v20");
        for len in 0..300 {
            let v: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            assert_eq!(decode_base64(&encode_base64(&v)).unwrap(), v, "len {len}");
        }
        for bad in ["a", "ab=c", "a===", "ab!d", "YQ==YQ=="] {
            assert_eq!(decode_base64(bad), None, "{bad}");
        }
    }

    fn pair(key: &str, value: Option<&str>, index: u64) -> KvPair {
        KvPair {
            key: key.into(),
            value: value.map(encode_base64_str),
            modify_index: index,
        }
    }

    fn encode_base64_str(s: &str) -> String {
        encode_base64(s.as_bytes())
    }

    #[test]
    fn foreign_keys_are_skipped() {
        let prefix: ConfigKey = "app".parse().unwrap();
        let pairs = vec![
            pair("config/app/", None, 1),
            pair("config/app/ok", Some("v"), 2),
            pair("config/app/bad key", Some("v"), 3),
            pair("config/app//empty", Some("v"), 4),
            pair("config/app/dir/", None, 5),
            pair("config/app/dir/x", None, 6),
            pair("config/app/caf\u{e9}", Some("v"), 7),
            pair("other/app/x", Some("v"), 8),
        ];
        let got = decode_entries(pairs, "config/", &Scope::Prefix(prefix), true);
        let keys: Vec<(&str, &str, u64)> = got
            .iter()
            .map(|e| (e.key.as_str(), e.item.key.as_str(), e.item.version))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("config/app/ok", "app/ok", 2),
                ("config/app/dir/x", "app/dir/x", 6)
            ]
        );
        assert_eq!(got[0].item.value, b"v");
        assert!(got[1].item.value.is_empty(), "a null value is empty");
        let bad_value = KvPair {
            key: "config/app/x".into(),
            value: Some("not base64!".into()),
            modify_index: 9,
        };
        assert!(decode_pair(&bad_value, "config/").is_err());
    }

    #[test]
    fn txn_ops_serialize_as_consul_expects() {
        let op = TxnOp::write("cas", "config/a", b"hi", 7, Some(0));
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            serde_json::json!({"KV": {"Verb": "cas", "Key": "config/a", "Value": "aGk=", "Flags": 7, "Index": 0}})
        );
        assert!(
            write_stamp() > 1_700_000_000_000_000_000,
            "nanoseconds since 1970"
        );
        let op = TxnOp::new("delete", "config/a", None);
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            serde_json::json!({"KV": {"Verb": "delete", "Key": "config/a"}})
        );
    }
}
