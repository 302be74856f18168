//! Hostile input for the core parsers (issue 13): names, instances, registry URLs and the
//! serde [`Config`] that `waypost::connect` / `connect_config` read before connecting.
//! Any input is accepted or rejected with a typed error, never a panic; what we write
//! reads back equal; errors never carry a password.

mod arb;

use arb::{is_config_error, valid_instance};
use proptest::prelude::*;
use waypost_core::kv::ConfigKey;
use waypost_core::{Config, Error, Instance, InstanceId, RegistryUrl, ServiceName};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn names_accept_exactly_the_rule(s in ".{0,140}") {
        let rule = !s.is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && s != "."
            && s != "..";
        for r in [ServiceName::new(&s).map(|n| n.to_string()), InstanceId::new(&s).map(|n| n.to_string())] {
            match r {
                Ok(n) => { prop_assert!(rule); prop_assert_eq!(n, s.clone()); }
                Err(e) => { prop_assert!(!rule); prop_assert!(matches!(e, Error::InvalidInput { .. }), "{e}"); }
            }
        }
        // Serde goes through the same check.
        let json = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(serde_json::from_str::<ServiceName>(&json).is_ok(), rule);
    }

    #[test]
    fn config_keys_parse_or_are_invalid_input(s in prop_oneof![".{0,40}", "[a-z./]{0,20}"]) {
        match ConfigKey::new(&s) {
            Ok(k) => {
                prop_assert_eq!(k.as_str(), s.as_str());
                prop_assert!(k.as_str().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
            }
            Err(e) => prop_assert!(matches!(e, Error::InvalidInput { .. }), "{e}"),
        }
    }

    #[test]
    fn valid_instances_round_trip_through_json(inst in valid_instance()) {
        prop_assert!(inst.validate().is_ok(), "{:?}", inst.validate());
        let bytes = serde_json::to_vec(&inst).unwrap();
        let back: Instance = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(back, inst);
    }

    #[test]
    fn any_bytes_as_an_instance_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(inst) = serde_json::from_slice::<Instance>(&bytes) {
            let _ = inst.validate();
        }
    }

    #[test]
    fn any_instance_shaped_json_validates_or_says_why(
        host in ".{0,8}",
        meta in prop::collection::btree_map(".{0,6}", ".{0,6}", 0..4),
        tags in prop::collection::vec(".{0,4}", 0..4),
        zone in prop::option::of(".{0,4}"),
    ) {
        let doc = serde_json::json!({
            "service": "svc", "id": "i", "endpoint": {"host": host, "port": 1},
            "metadata": meta, "tags": tags, "zone": zone,
        });
        let inst: Instance = serde_json::from_value(doc).unwrap();
        if let Err(e) = inst.validate() {
            prop_assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
        }
    }

    #[test]
    fn any_url_parses_or_is_an_invalid_config(url in ".{0,80}") {
        if let Err(e) = RegistryUrl::parse(&url) {
            prop_assert!(is_config_error(&e), "{e}");
        }
        // What `waypost::connect(url)` does before it connects.
        if let Err(e) = Config::from_url(url.clone()).scheme() {
            prop_assert!(is_config_error(&e), "{e}");
        }
    }

    #[test]
    fn url_errors_never_show_the_password(
        scheme in "[a-z]{1,6}",
        password in "[A-Za-z0-9]{12,20}",
        rest in ".{0,30}",
    ) {
        let url = format!("{scheme}://user:{password}@{rest}");
        match RegistryUrl::parse(&url) {
            Ok(u) => {
                let shown = format!("{u:?}");
                prop_assert!(!shown.contains(&password));
            }
            Err(e) => prop_assert!(!e.to_string().contains(&password), "{e}"),
        }
    }

    #[test]
    fn urls_we_build_parse_back_to_their_parts(
        scheme in "[a-z][a-z0-9+.-]{0,8}",
        hosts in prop::collection::vec(("[a-z0-9.-]{1,20}", prop::option::of(any::<u16>())), 1..4),
        path in prop::collection::vec("[A-Za-z0-9._-]{1,10}", 0..3),
        query in prop::collection::vec(("[a-z_]{1,10}", "[A-Za-z0-9._-]{0,10}"), 0..4),
    ) {
        let hostlist: Vec<String> = hosts
            .iter()
            .map(|(h, p)| p.map_or(h.clone(), |p| format!("{h}:{p}")))
            .collect();
        let path = path.iter().map(|s| format!("/{s}")).collect::<String>();
        let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let url = format!("{scheme}://{}{path}?{}", hostlist.join(","), q.join("&"));
        let u = RegistryUrl::parse(&url).unwrap();
        prop_assert_eq!(u.scheme, scheme);
        prop_assert_eq!(u.hosts, hosts);
        prop_assert_eq!(u.path, path);
        prop_assert_eq!(u.query, query);
    }

    #[test]
    fn any_json_as_a_config_never_panics(
        keys in prop::collection::vec(prop_oneof![Just("backend".to_string()), Just("url".to_string()), ".{0,8}"], 0..4),
        values in prop::collection::vec(prop_oneof![
            ".{0,20}".prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!([1, {"a": "b"}])),
        ], 0..4),
    ) {
        let doc: serde_json::Map<_, _> = keys.into_iter().zip(values).collect();
        if let Ok(c) = serde_json::from_value::<Config>(serde_json::Value::Object(doc)) {
            if let Err(e) = c.scheme() {
                prop_assert!(is_config_error(&e), "{e}");
            }
        }
    }
}
