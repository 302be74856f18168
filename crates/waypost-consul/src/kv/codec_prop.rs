//! Hostile input for the Consul KV codec (issue 13): any entry of a `GET /v1/kv` answer
//! (as JSON values and raw bytes) becomes a configuration entry or is skipped, never a
//! panic; every value we write (base64) reads back equal.

use proptest::prelude::*;
use serde_json::json;
use waypost_core::backend::Scope;
use waypost_core::kv::ConfigKey;

use super::codec::{decode_base64, decode_entries, decode_pair, encode_base64, KvPair};

const ROOT: &str = "config/";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn written_values_read_back_equal(
        key in "[a-z0-9]{1,8}(/[a-z0-9_-][a-z0-9._-]{0,7}){0,3}",
        value in prop::collection::vec(any::<u8>(), 0..300),
        index in any::<u64>(),
    ) {
        let pair = KvPair { key: format!("{ROOT}{key}"), value: Some(encode_base64(&value)), modify_index: index };
        let entry = decode_pair(&pair, ROOT).unwrap();
        prop_assert_eq!(entry.key.as_str(), key.as_str());
        prop_assert_eq!(entry.value, value);
        prop_assert_eq!(entry.version, index);
    }

    #[test]
    fn any_pair_decodes_or_is_skipped(
        key in prop_oneof![".{0,20}", "config/.{0,20}"],
        value in prop::option::of(prop_oneof![".{0,20}", "[A-Za-z0-9+/]{0,20}={0,2}"]),
        index in any::<u64>(),
    ) {
        let _ = decode_base64(value.as_deref().unwrap_or(""));
        let pair = KvPair { key, value, modify_index: index };
        if let Ok(e) = decode_pair(&pair, ROOT) {
            prop_assert!(ConfigKey::new(e.key.as_str()).is_ok());
        }
        let scope = Scope::Prefix(ConfigKey::new("a").unwrap());
        for e in decode_entries(vec![pair], ROOT, &scope, true) {
            prop_assert!(scope.covers(&e.item.key));
        }
    }

    #[test]
    fn any_answer_bytes_decode_or_are_rejected(
        data in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (".{0,12}", any::<i64>()).prop_map(|(k, i)| json!([{"Key": k, "Value": k, "ModifyIndex": i}]).to_string().into_bytes()),
        ],
    ) {
        if let Ok(pairs) = serde_json::from_slice::<Vec<KvPair>>(&data) {
            for p in &pairs {
                let _ = decode_pair(p, ROOT);
            }
        }
    }
}
