//! Hostile input for the ZooKeeper codec and config (issue 13): node data in any shape
//! (waypost's Curator JSON, Curator `ServiceInstance` from Java, Spring Cloud payloads,
//! raw bytes) decodes or is a typed [`DecodeError`], never a panic; what we encode, in
//! both payload formats, decodes back equal; any `zk://` URL parses or is rejected with
//! a typed error.

#[path = "../../waypost-core/tests/arb/mod.rs"]
mod arb;

use arb::{any_json, is_config_error, json_object_with, valid_instance};
use proptest::prelude::*;
use serde_json::{json, Value};
use waypost_core::ServiceName;
use waypost_zookeeper::codec::{decode, encode, DecodeError};
use waypost_zookeeper::{PayloadFormat, ZkConfig};

const INSTANCE_FIELDS: &[&str] = &[
    "name",
    "id",
    "address",
    "port",
    "sslPort",
    "payload",
    "registrationTimeUTC",
    "serviceType",
    "uriSpec",
];
const PAYLOAD_FIELDS: &[&str] = &[
    "@class",
    "id",
    "name",
    "metadata",
    "zone",
    "waypost-weight",
    "waypost-tags",
    "waypost-zone",
    "version",
];

fn svc() -> ServiceName {
    ServiceName::new("svc").unwrap()
}

/// Decoding never panics, and what it returns is a valid instance of the service.
fn check_decode(data: &[u8]) -> Result<(), TestCaseError> {
    match decode(&svc(), data) {
        Ok(i) => {
            prop_assert_eq!(&i.service, &svc());
            prop_assert!(i.validate().is_ok(), "{:?}: {:?}", i, i.validate());
        }
        Err(DecodeError::Json(_) | DecodeError::Shape(_)) => {}
    }
    Ok(())
}

/// A payload map with `@class` either of the two known classes or anything.
fn payload() -> impl Strategy<Value = Value> {
    let class = prop_oneof![
        Just(json!(waypost_zookeeper::codec::CURATOR_PAYLOAD_CLASS)),
        Just(json!(waypost_zookeeper::codec::SPRING_PAYLOAD_CLASS)),
        any_json(),
    ];
    (
        class,
        json_object_with(PAYLOAD_FIELDS),
        json_object_with(PAYLOAD_FIELDS),
    )
        .prop_map(|(class, mut p, metadata)| {
            p["@class"] = class;
            if p.get("metadata").is_some() {
                p["metadata"] = metadata;
            }
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encoded_instances_decode_back_equal(inst in valid_instance(), spring in any::<bool>()) {
        let format = if spring { PayloadFormat::SpringCloud } else { PayloadFormat::Curator };
        let back = decode(&inst.service, &encode(&inst, format)).unwrap();
        prop_assert_eq!(back, inst);
    }

    #[test]
    fn any_bytes_decode_or_are_rejected(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&data)?;
    }

    #[test]
    fn foreign_service_instances_decode_or_are_rejected(
        mut doc in json_object_with(INSTANCE_FIELDS),
        payload in payload(),
        with_payload in any::<bool>(),
    ) {
        if with_payload {
            doc["payload"] = payload;
        }
        check_decode(&serde_json::to_vec(&doc).unwrap())?;
    }

    #[test]
    fn truncated_instances_are_rejected_not_panics(inst in valid_instance(), cut in any::<prop::sample::Index>()) {
        let data = encode(&inst, PayloadFormat::Curator);
        check_decode(&data[..cut.index(data.len())])?;
    }

    #[test]
    fn any_url_parses_or_is_a_config_error(url in prop_oneof![".{0,60}", "zk://.{0,60}", "zookeeper://[a-z0-9.:,]{0,30}(/[a-z]{0,5})?\\?[a-z_=&0-9.]{0,30}"]) {
        if let Err(e) = ZkConfig::from_url(&url) {
            prop_assert!(is_config_error(&e), "{url}: {e}");
        }
    }
}
