//! Shared proptest strategies for the property tests of every crate (issue 13): each
//! backend's `prop_*` test includes this file with `#[path]`, so the instance generator
//! is written once.
#![allow(dead_code, unreachable_pub)]

use proptest::prelude::*;
use serde_json::Value;
use waypost_core::{Error, Instance};

/// A name that obeys the rule: 1 to 128 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,128}".prop_filter("`.` and `..` are not names", |s| s != "." && s != "..")
}

/// An instance within every limit of the model.
pub fn valid_instance() -> impl Strategy<Value = Instance> {
    (
        valid_name(),
        valid_name(),
        "[a-z0-9.:-]{1,40}",
        any::<u16>(),
        prop::collection::btree_map("[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", ".{0,40}", 0..8),
        prop::collection::vec(".{1,30}", 0..5),
        any::<u32>(),
        prop::option::of("[a-z0-9-]{1,20}"),
    )
        .prop_map(|(s, i, host, port, meta, tags, weight, zone)| {
            let mut inst = Instance::parse(&s, &i, &host, port).expect("valid names");
            inst.metadata = meta
                .into_iter()
                .filter(|(k, _)| !k.starts_with("consul-") && !k.starts_with("waypost-"))
                .collect();
            inst.tags = tags;
            inst.weight = weight;
            inst.zone = zone;
            inst
        })
}

/// Any JSON value, nested a few levels: what a foreign writer may leave in a registry.
pub fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object with `fields` (known field names of a codec) set to any JSON, plus a
/// few unknown keys: the shape a codec sees from a writer that almost speaks its format.
pub fn json_object_with(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let known = prop::sample::select(fields).prop_map(str::to_string);
    (prop::collection::vec((prop_oneof![3 => known, 1 => ".{0,8}"], any_json()), 0..10))
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Whether a parser's error is the typed rejection of a configuration.
pub fn is_config_error(e: &Error) -> bool {
    matches!(e, Error::InvalidConfig { .. } | Error::UnknownScheme { .. })
}
