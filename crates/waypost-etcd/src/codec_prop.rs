//! Hostile input for the etcd codec and config (issue 13): any key and value found under
//! a service's prefix (waypost JSON, gRPC-Go naming updates, raw bytes) decodes to a
//! valid instance of that service or is [`Malformed`], never a panic; what we write, in
//! both layouts and under claim keys, reads back equal; any `etcd://` URL parses or is
//! rejected with a typed error.

#[path = "../../waypost-core/tests/arb/mod.rs"]
mod arb;

use arb::{any_json, is_config_error, json_object_with, valid_instance};
use proptest::prelude::*;
use waypost_core::ServiceName;

use crate::codec::{decode, encode, key, service_prefix, service_segment, Malformed};
use crate::config::{EtcdConfig, Layout};

const PREFIX: &str = "/services";

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::Waypost), Just(Layout::Grpc)]
}

/// Decoding never panics, and what it returns is a valid instance of the service.
fn check_decode(layout: Layout, key: &[u8], value: &[u8]) -> Result<(), TestCaseError> {
    let svc = ServiceName::new("svc").unwrap();
    let sp = service_prefix(PREFIX, &svc);
    let _ = service_segment(PREFIX, key);
    match decode(layout, &svc, &sp, key, value) {
        Ok(i) => {
            prop_assert_eq!(&i.service, &svc);
            prop_assert!(i.validate().is_ok(), "{:?}", i);
        }
        Err(Malformed(why)) => prop_assert!(!why.is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encoded_instances_decode_back_equal(inst in valid_instance(), layout in layout(), claim in prop::option::of("[a-z0-9]{1,8}")) {
        let sp = service_prefix(PREFIX, &inst.service);
        let mut k = key(layout, PREFIX, &inst);
        if let (Layout::Waypost, Some(label)) = (layout, &claim) {
            k = format!("{k}@{label}");
        }
        let back = decode(layout, &inst.service, &sp, k.as_bytes(), &encode(layout, &inst)).unwrap();
        prop_assert_eq!(back, inst);
    }

    #[test]
    fn any_key_and_value_decode_or_are_malformed(
        layout in layout(),
        key in prop_oneof![prop::collection::vec(any::<u8>(), 0..40), "/services/svc/.{0,20}".prop_map(String::into_bytes)],
        value in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        check_decode(layout, &key, &value)?;
    }

    #[test]
    fn foreign_json_values_decode_or_are_malformed(
        layout in layout(),
        id in "[a-z0-9.:\\[\\]@-]{1,20}",
        doc in prop_oneof![
            json_object_with(&["Op", "Addr", "Metadata"]),
            json_object_with(&["service", "id", "endpoint", "metadata", "tags", "weight", "zone"]),
            any_json(),
        ],
    ) {
        let key = format!("{PREFIX}/svc/{id}");
        check_decode(layout, key.as_bytes(), &serde_json::to_vec(&doc).unwrap())?;
    }

    #[test]
    fn grpc_updates_from_go_decode_or_are_malformed(addr in ".{0,30}", op in 0u8..3) {
        let doc = serde_json::json!({"Op": op, "Addr": addr});
        let key = format!("{PREFIX}/svc/{addr}");
        check_decode(Layout::Grpc, key.as_bytes(), &serde_json::to_vec(&doc).unwrap())?;
    }

    #[test]
    fn any_url_parses_or_is_a_config_error(url in prop_oneof![".{0,60}", "etcd://.{0,60}", "etcd://[a-z0-9.:,@]{0,30}(/[a-z]{0,5})?\\?[a-z_=&0-9.]{0,30}"]) {
        if let Err(e) = EtcdConfig::from_url(&url) {
            prop_assert!(is_config_error(&e), "{url}: {e}");
        }
    }
}
