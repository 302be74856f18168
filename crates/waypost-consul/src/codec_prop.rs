//! Hostile input for the Consul service codec and config (issue 13): any health entry
//! (as JSON values and as raw bytes of an agent's answer) decodes to a valid instance of
//! the expected service or is skipped with a reason, never a panic; what we register
//! (including weight 0, the zone, and metadata too full for our own keys) reads back
//! equal; any `consul://` URL parses or is rejected with a typed error.

#[path = "../../waypost-core/tests/arb/mod.rs"]
mod arb;

use std::time::Duration;

use arb::{any_json, is_config_error, json_object_with, valid_instance};
use proptest::prelude::*;
use serde_json::{json, Value};
use waypost_core::model::MAX_METADATA_ENTRIES;
use waypost_core::{Instance, ServiceName};

use crate::codec::{decode, encode, AgentCheckStart, HealthEntry};
use crate::config::ConsulConfig;

const SERVICE_FIELDS: &[&str] = &[
    "ID", "Service", "Address", "Port", "Tags", "Meta", "Weights",
];

fn svc() -> ServiceName {
    ServiceName::new("svc").unwrap()
}

/// Decoding never panics, and what it returns is a valid instance of the service.
fn check_decode(entry: HealthEntry) -> Result<(), TestCaseError> {
    if let Ok(i) = decode(entry, &svc()) {
        prop_assert_eq!(&i.service, &svc());
        prop_assert!(i.validate().is_ok(), "{:?}", i);
    }
    Ok(())
}

/// The health entry the agent returns for what `encode` registered.
fn as_health_entry(i: &Instance) -> Value {
    let config = ConsulConfig::default().with_ttl(Duration::from_secs(3));
    let reg = encode(i, &config, AgentCheckStart::Passing, "waypost-heartbeat:p");
    json!({
        "Node": {"Node": "n", "Address": "10.0.0.9"},
        "Service": {
            "ID": reg.id, "Service": reg.name, "Address": reg.address, "Port": reg.port,
            "Tags": reg.tags, "Meta": reg.meta, "Weights": reg.weights,
        },
    })
}

/// A service entry whose fields have the right types but any content.
fn typed_service() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("svc".to_string()), ".{0,10}"],
        prop_oneof![".{0,20}", "svc:.{0,20}"],
        ".{0,20}",
        any::<u16>(),
        prop::collection::vec(prop_oneof![".{0,10}", "waypost-(weight|zone)=.{0,6}"], 0..4),
        prop::collection::btree_map(
            prop_oneof![".{0,10}", "waypost-(weight|zone)", "consul-.{0,4}"],
            ".{0,10}",
            0..4,
        ),
        any::<u32>(),
    )
        .prop_map(|(service, id, address, port, tags, meta, passing)| {
            json!({"ID": id, "Service": service, "Address": address, "Port": port,
                   "Tags": tags, "Meta": meta, "Weights": {"Passing": passing, "Warning": 1}})
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn registered_instances_decode_back_equal(mut inst in valid_instance(), full in any::<bool>()) {
        if full {
            // No room left in `Meta` for our keys: they travel as tags.
            for n in inst.metadata.len()..MAX_METADATA_ENTRIES {
                inst.metadata.insert(format!("fill{n}"), "x".into());
            }
        }
        let entry: HealthEntry = serde_json::from_value(as_health_entry(&inst)).unwrap();
        prop_assert_eq!(decode(entry, &inst.service).unwrap(), inst);
    }

    #[test]
    fn typed_entries_decode_or_are_skipped(service in typed_service(), node_address in ".{0,10}") {
        let doc = json!({"Node": {"Node": "n", "Address": node_address}, "Service": service});
        check_decode(serde_json::from_value(doc).unwrap())?;
    }

    #[test]
    fn foreign_json_entries_decode_or_are_skipped(
        service in prop_oneof![json_object_with(SERVICE_FIELDS), any_json()],
        node in any_json(),
    ) {
        let doc = json!({"Node": node, "Service": service});
        if let Ok(entry) = serde_json::from_value::<HealthEntry>(doc) {
            check_decode(entry)?;
        }
    }

    #[test]
    fn any_answer_bytes_decode_or_are_rejected(data in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(entries) = serde_json::from_slice::<Vec<HealthEntry>>(&data) {
            for e in entries {
                check_decode(e)?;
            }
        }
    }

    #[test]
    fn any_url_parses_or_is_a_config_error(url in prop_oneof![".{0,60}", "consuls?://.{0,60}", "consul://[a-z0-9.:,@]{0,30}(/[a-z]{0,5})?\\?[a-z_=&0-9.]{0,30}"]) {
        if let Err(e) = ConsulConfig::from_url(&url) {
            prop_assert!(is_config_error(&e), "{url}: {e}");
        }
    }
}
