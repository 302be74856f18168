//! URL and option parsing of [`ConsulConfig`].

use super::*;

#[test]
fn parses_plain_and_tls_urls() {
    let c = ConsulConfig::from_url("consul://10.0.0.1:8501").unwrap();
    assert_eq!(c.base_url(), "http://10.0.0.1:8501");
    let c = ConsulConfig::from_url("consul://agent").unwrap();
    assert_eq!(c.address, "agent:8500");
    let c = ConsulConfig::from_url("consuls://[::1]:8501?datacenter=dc2&ttl=3s&wait=30s").unwrap();
    assert_eq!(c.base_url(), "https://[::1]:8501");
    assert_eq!(c.datacenter.as_deref(), Some("dc2"));
    assert_eq!(c.ttl, Duration::from_secs(3));
    assert_eq!(c.wait, Duration::from_secs(30));
    let c = ConsulConfig::from_url("consul://h:1?dc=east").unwrap();
    assert_eq!(c.datacenter.as_deref(), Some("east"));
    assert_eq!(c.watch_share_percent, 50);
    let c = ConsulConfig::from_url("consul://h:1?watch_share_percent=30").unwrap();
    assert_eq!(c.watch_share_percent, 30);
    assert_eq!(c.read_back_every, 1);
    let c = ConsulConfig::from_url("consul://h:1?read_back_every=3").unwrap();
    assert_eq!(c.read_back_every, 3);
}

#[test]
fn config_options_override_the_url() {
    let c = ConsulConfig::from_config(
        &Config::from_url("consul://h:1?ttl=3s")
            .with_option("ttl", "5s")
            .with_option("timeout", 250),
    )
    .unwrap();
    assert_eq!(c.ttl, Duration::from_secs(5));
    assert_eq!(c.request_timeout, Duration::from_millis(250));
    let c: Config =
        serde_json::from_str(r#"{"backend":"consul","address":"h:2","token":"t"}"#).unwrap();
    let c = ConsulConfig::from_config(&c).unwrap();
    assert_eq!(c.address, "h:2");
    assert_eq!(c.token.as_ref().map(Secret::expose), Some("t"));
}

#[test]
fn bad_urls_and_options_name_the_key() {
    for (url, part) in [
        ("consul://h:1?bogus=1", "bogus"),
        ("consul://a:1,b:2", "one agent"),
        ("consul://h:1/services", "no path"),
        ("consul://h:1?ttl=soon", "ttl"),
        ("consul://h:1?ttl=100ms", "ttl"),
        ("consul://h:1?wait=1h", "wait"),
        ("consul://h:1?dc=a%20b", "datacenter"),
        ("consul://h:1?ca_file=/x", "TLS"),
        ("consuls://h:1?cert_file=/x", "key_file"),
        ("etcd://h:1", "consul://"),
        ("consul://h:1?timeout=0s", "timeout"),
        ("consul://h:1?watch_share_percent=0", "watch_share_percent"),
        ("consul://h:1?read_back_every=0", "read_back_every"),
        ("consul://h:1?read_back_every=11", "read_back_every"),
        ("consul://h:1?watch_share_percent=95", "watch_share_percent"),
        (
            "consul://h:1?watch_share_percent=half",
            "watch_share_percent",
        ),
    ] {
        let e = ConsulConfig::from_url(url).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
        assert!(e.to_string().contains(part), "{url}: {e}");
    }
}

#[test]
fn agent_check_options_from_urls_and_serde() {
    let c = ConsulConfig::from_url("consul://h:1").unwrap();
    assert_eq!(c.http_check, None);
    assert!(!c.tcp_check && !c.has_agent_checks());
    assert_eq!(c.check_interval, Duration::from_secs(10));
    assert_eq!(c.check_timeout, Duration::from_secs(5));
    let c = ConsulConfig::from_url(
        "consul://h:1?http_check=/health&tcp_check=true&check_interval=2s&check_timeout=500ms",
    )
    .unwrap();
    assert_eq!(c.http_check.as_deref(), Some("/health"));
    assert!(c.tcp_check && c.has_agent_checks());
    assert_eq!(c.check_interval, Duration::from_secs(2));
    assert_eq!(c.check_timeout, Duration::from_millis(500));
    let c = ConsulConfig::from_url(
        "consul://h:1?http_check=https%3A%2F%2F%7Bhost%7D%3A9000%2Fready%3Fdeep%3D1",
    )
    .unwrap();
    assert_eq!(
        c.http_check.as_deref(),
        Some("https://{host}:9000/ready?deep=1")
    );
    let c: Config = serde_json::from_str(
        r#"{"backend":"consul","http_check":"http://{host}:{port}/live",
            "tcp_check":true,"check_interval":"3s","check_timeout":1000}"#,
    )
    .unwrap();
    let c = ConsulConfig::from_config(&c).unwrap();
    assert_eq!(c.http_check.as_deref(), Some("http://{host}:{port}/live"));
    assert!(c.tcp_check);
    assert_eq!(c.check_interval, Duration::from_secs(3));
    assert_eq!(c.check_timeout, Duration::from_secs(1));
    let c = ConsulConfig::default()
        .with_http_check("/h")
        .with_tcp_check(true)
        .with_check_interval(Duration::from_secs(1))
        .with_check_timeout(Duration::from_secs(1));
    c.validate().unwrap();
    let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn bad_agent_check_options_name_the_key() {
    for (url, part) in [
        ("consul://h:1?http_check=health", "`http_check`"),
        ("consul://h:1?http_check=", "`http_check`"),
        ("consul://h:1?http_check=ftp%3A%2F%2Fh%2Fx", "`http_check`"),
        ("consul://h:1?http_check=http%3A%2F%2F", "`http_check`"),
        ("consul://h:1?http_check=%2Fa%20b", "`http_check`"),
        ("consul://h:1?tcp_check=maybe", "tcp_check"),
        ("consul://h:1?check_interval=0s", "`check_interval`"),
        ("consul://h:1?check_interval=often", "check_interval"),
        ("consul://h:1?check_timeout=0ms", "`check_timeout`"),
        (
            "consul://h:1?check_interval=1s&check_timeout=2s",
            "`check_timeout`",
        ),
        ("consul://h:1?check_timeout=11s", "`check_timeout`"),
    ] {
        let e = ConsulConfig::from_url(url).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{url}: {e}");
        assert!(e.to_string().contains(part), "{url}: {e}");
    }
    let c: Config = serde_json::from_str(r#"{"backend":"consul","http_check":"health"}"#).unwrap();
    let e = ConsulConfig::from_config(&c).unwrap_err();
    assert!(
        matches!(e, Error::InvalidConfig { .. }) && e.to_string().contains("`http_check`"),
        "{e}"
    );
}

#[test]
fn the_token_never_shows() {
    let c = ConsulConfig::from_url("consul://h:1?token=hunter2").unwrap();
    assert_eq!(c.token.as_ref().map(Secret::expose), Some("hunter2"));
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("hunter2") && dbg.contains("redacted"),
        "{dbg}"
    );
    let with_creds =
        ConsulConfig::default().with_http_check("http://probe:s3cret@{host}:{port}/health");
    let dbg = format!("{with_creds:?}");
    assert!(!dbg.contains("s3cret") && dbg.contains("probe"), "{dbg}");
    let e = ConsulConfig::from_url("consul://h:1?token=hun%20ter2").unwrap_err();
    assert!(!e.to_string().contains("hun"), "{e}");
    let e = ConsulConfig::from_url("consul://user:hunter2@h:1").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let json = serde_json::to_string(&c).unwrap();
    assert!(!json.contains("hunter2"), "{json}");
}

fn options(json: serde_json::Value) -> Config {
    Config::for_backend("consul").with_options(json.as_object().unwrap().clone())
}

#[test]
fn shared_names_and_old_names_both_parse() {
    let new = ConsulConfig::from_config(&options(serde_json::json!({
        "endpoints": ["h:2"], "token": "t", "datacenter": "dc1",
        "connect_timeout": "1s", "request_timeout": "2s",
        "backoff_initial": "10ms", "backoff_max": "3s",
        "tls": true, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
    })))
    .unwrap();
    assert_eq!(new.address, "h:2");
    assert_eq!(new.request_timeout, Duration::from_secs(2));
    assert_eq!(
        new.backoff(),
        BackoffOptions::new(Duration::from_millis(10), Duration::from_secs(3))
    );
    let old = ConsulConfig::from_config(&options(serde_json::json!({
        "address": "h:2", "token": "t", "dc": "dc1",
        "connect_timeout": "1s", "timeout": "2s",
        "backoff_initial": "10ms", "backoff_max": "3s",
        "tls": true, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
    })))
    .unwrap();
    assert_eq!(old, new);
    for one in [r#""h:3""#, r#"["h:3"]"#] {
        let c: ConsulConfig = serde_json::from_str(&format!(r#"{{"endpoints":{one}}}"#)).unwrap();
        assert_eq!(c.address, "h:3");
    }
    let c = ConsulConfig::from_url("consul://h:1?endpoints=o:2&timeout=3s").unwrap();
    assert_eq!(
        (c.address.as_str(), c.request_timeout),
        ("o:2", Duration::from_secs(3))
    );
    // Explicit options win over the query, whichever name each uses.
    let c = ConsulConfig::from_config(
        &Config::from_url("consul://h:1?timeout=3s")
            .with_option("request_timeout", "4s")
            .with_option("endpoints", "x:9"),
    )
    .unwrap();
    assert_eq!(
        (c.address.as_str(), c.request_timeout),
        ("x:9", Duration::from_secs(4))
    );
    assert_eq!(
        ConsulConfig::default().with_timeout(Duration::from_secs(1)),
        ConsulConfig::default().with_request_timeout(Duration::from_secs(1))
    );
}

#[test]
fn backoff_default_follows_ttl_unless_given() {
    let c = ConsulConfig::default();
    assert_eq!(
        c.backoff(),
        BackoffOptions::new(Duration::from_millis(100), Duration::from_secs(10) / 3)
    );
    let c = ConsulConfig::from_url("consul://h:1?ttl=60s").unwrap();
    assert_eq!(c.backoff().backoff_max, Duration::from_secs(5));
    let c = ConsulConfig::from_url("consul://h:1?ttl=60s&backoff_max=20s").unwrap();
    assert_eq!(c.backoff().backoff_max, Duration::from_secs(20));
    let back: ConsulConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn bad_shared_options_name_the_key() {
    for (cfg, part) in [
        (
            serde_json::json!({"endpoints": ["a:1", "b:1"]}),
            "`address`",
        ),
        (serde_json::json!({"endpoints": "a:1,b:1"}), "one agent"),
        (
            serde_json::json!({"endpoints": "a:1", "address": "b:1"}),
            "`endpoints`",
        ),
        (
            serde_json::json!({"timeout": "1s", "request_timeout": "1s"}),
            "`timeout`",
        ),
        (
            serde_json::json!({"request_timeout": "0s"}),
            "`request_timeout`",
        ),
        (
            serde_json::json!({"backoff_initial": "0s"}),
            "`backoff_initial`",
        ),
        (
            serde_json::json!({"backoff_initial": "2s", "backoff_max": "1s"}),
            "`backoff_max`",
        ),
        (serde_json::json!({"tls_domain": "x"}), "tls_domain"),
    ] {
        let e = ConsulConfig::from_config(&options(cfg.clone())).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{cfg}: {e:?}");
        assert!(e.to_string().contains(part), "{cfg}: {e}");
    }
    let e = ConsulConfig::from_url("consul://h:1?timeout=1s&request_timeout=2s").unwrap_err();
    assert!(e.to_string().contains("`timeout`"), "{e}");
    let e = ConsulConfig::from_config(&options(serde_json::json!({"token": 12345}))).unwrap_err();
    assert!(!format!("{e} {e:?}").contains("12345"), "{e:?}");
}
