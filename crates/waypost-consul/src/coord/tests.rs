use super::*;

#[test]
fn coord_prefix_and_lock_delay_options() {
    use crate::ConsulConfig;
    use waypost_core::config::Config;
    let c = ConsulConfig::from_url("consul://h:1").unwrap();
    assert_eq!(c.coord_prefix.as_str(), DEFAULT_COORD_PREFIX);
    assert_eq!(c.lock_delay, DEFAULT_LOCK_DELAY);
    let c = ConsulConfig::from_url("consul://h:1?coord_prefix=apps%2Flocks&lock_delay=0s").unwrap();
    assert_eq!(
        (c.coord_prefix.as_str(), c.lock_delay),
        ("apps/locks", Duration::ZERO)
    );
    let c: Config = serde_json::from_str(
        r#"{"backend":"consul","coord_prefix":"team/coord","lock_delay":"15s"}"#,
    )
    .unwrap();
    let c = ConsulConfig::from_config(&c).unwrap();
    assert_eq!(c.coord_prefix.as_str(), "team/coord");
    let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let coord = ConsulCoord::new(
        crate::client::Agent::new(&c).unwrap(),
        &c.coord_prefix,
        c.wait,
    );
    assert_eq!(
        coord.key(&"jobs/x".parse().unwrap()),
        "team/coord/jobs/x/.lock"
    );
    for (url, part) in [
        ("consul://h:1?coord_prefix=/coord", "`coord_prefix`"),
        ("consul://h:1?coord_prefix=a//b", "`coord_prefix`"),
        ("consul://h:1?coord_prefix=", "`coord_prefix`"),
        ("consul://h:1?lock_delay=61s", "`lock_delay`"),
        ("consul://h:1?lock_delay=soon", "lock_delay"),
    ] {
        let e = ConsulConfig::from_url(url).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
        assert!(e.to_string().contains(part), "{url}: {e}");
    }
}

#[test]
fn lock_flag_is_consuls() {
    assert_eq!(LOCK_FLAG_VALUE, 3_304_740_253_564_472_344);
    let p: LockPair = serde_json::from_str(
        r#"{"LockIndex":1,"Key":"coord/a/.lock","Flags":3304740253564472344,"Value":"aGVsbG8=","Session":"s1","CreateIndex":14,"ModifyIndex":15}"#,
    )
    .unwrap();
    assert_eq!(
        (p.holder(), p.value(), p.modify_index),
        (Some("s1"), b"hello".to_vec(), 15)
    );
    let free: LockPair =
        serde_json::from_str(r#"{"Key":"k","Flags":0,"Value":null,"ModifyIndex":3}"#).unwrap();
    assert_eq!((free.holder(), free.value()), (None, Vec::new()));
}
