//! Bad input: a typed error, and nothing half-written.

use waypost_core::{Error, Instance};

use super::util::Namespace;
use super::TestBackend;

/// Invalid names and oversized payloads are `InvalidInput`, and the registry is left
/// untouched.
pub async fn invalid_input_writes_nothing(b: &dyn TestBackend) {
    let ns = Namespace::new();
    let svc = ns.service("bad");
    let d = b.connect().await;
    let base = ns.instance(&svc, "ok", 1);

    let mut too_many = base.clone();
    for k in 0..=waypost_core::model::MAX_METADATA_ENTRIES {
        too_many = too_many.with_metadata(format!("k{k}"), "v");
    }
    let cases: Vec<(&str, Instance)> = vec![
        ("65 metadata entries", too_many),
        (
            "oversized metadata value",
            base.clone().with_metadata("big", "x".repeat(64 * 1024)),
        ),
        (
            "metadata key with a dot",
            base.clone().with_metadata("a.b", "v"),
        ),
        (
            "reserved metadata key",
            base.clone().with_metadata("waypost-zone", "v"),
        ),
        ("empty tag", base.clone().with_tag("")),
        ("oversized tag", base.clone().with_tag("t".repeat(1024))),
        ("host with a space", {
            let mut i = base.clone();
            i.endpoint.host = "bad host".into();
            i
        }),
        ("empty host", {
            let mut i = base.clone();
            i.endpoint.host.clear();
            i
        }),
    ];
    for (what, inst) in cases {
        match d.registrar.register(inst).await {
            Err(Error::InvalidInput { message }) => assert!(!message.is_empty()),
            Err(other) => panic!("{what}: expected InvalidInput, got {other}"),
            Ok(_) => panic!("{what}: was accepted"),
        }
    }
    assert!(
        d.watcher.instances(&svc).await.unwrap().is_empty(),
        "a rejected registration left something behind"
    );

    for bad in ["", "a/b", "a b", "ünï", "..", &"x".repeat(129)] {
        assert!(
            matches!(
                waypost_core::ServiceName::new(bad),
                Err(Error::InvalidInput { .. })
            ),
            "service name {bad:?} accepted"
        );
        assert!(
            matches!(
                waypost_core::InstanceId::new(bad),
                Err(Error::InvalidInput { .. })
            ),
            "instance id {bad:?} accepted"
        );
    }
    let from_json = serde_json::from_str::<Instance>(
        r#"{"service":"../etc","id":"x","endpoint":{"host":"h","port":1}}"#,
    );
    assert!(from_json.is_err(), "an invalid name came in through serde");

    // After all that, a valid registration still works.
    let reg = d
        .registrar
        .register(base.clone())
        .await
        .expect("valid registration");
    assert_eq!(d.watcher.instances(&svc).await.unwrap().len(), 1);
    reg.deregister().await.unwrap();
}
