//! Tests of URL parsing and option handling.

use super::*;

#[test]
fn parses_multi_host_urls_with_paths_and_queries() {
    let u = RegistryUrl::parse(
        "zk://alice:s3cr%40t@10.0.0.1:2181,10.0.0.2,[::1]:2182/services/prod?session_timeout=10s&x=a%20b",
    )
    .unwrap();
    assert_eq!(u.scheme, "zk");
    assert_eq!(u.username.as_deref(), Some("alice"));
    assert_eq!(u.password.as_deref(), Some("s3cr@t"));
    assert_eq!(
        u.hosts,
        vec![
            ("10.0.0.1".into(), Some(2181)),
            ("10.0.0.2".into(), None),
            ("::1".into(), Some(2182))
        ]
    );
    assert_eq!(
        u.endpoints(2181),
        ["10.0.0.1:2181", "10.0.0.2:2181", "[::1]:2182"]
    );
    assert_eq!(u.path, "/services/prod");
    assert_eq!(u.query_map().unwrap()["x"], "a b");
    let dbg = format!("{u:?}");
    assert!(!dbg.contains("s3cr"), "{dbg}");
}

#[test]
fn memory_url_has_no_hosts() {
    let u = RegistryUrl::parse("memory://").unwrap();
    assert_eq!(u.scheme, "memory");
    assert!(u.hosts.is_empty() && u.path.is_empty());
    let u = RegistryUrl::parse("MEMORY://tests?ttl=1s").unwrap();
    assert_eq!(u.scheme, "memory");
    assert_eq!(u.hosts, vec![("tests".into(), None)]);
    // Without a URL, the backend is named and its options come from the config.
    let c = Config::for_backend("memory").with_option("name", "by-options");
    assert_eq!(
        (c.backend.as_deref(), c.url.as_deref()),
        (Some("memory"), None)
    );
    let m = crate::memory::MemoryConfig::from_config(&c).unwrap();
    assert_eq!(m.name, "by-options");
}

#[test]
fn bad_urls_name_the_part() {
    for (url, part) in [
        ("127.0.0.1:2181", "scheme://"),
        ("zk://h:99999/x", "port"),
        ("zk://h:abc", "port"),
        ("zk://a,,b/x", "host"),
        ("zk://h/%zz", "percent"),
        ("zk://h?a=1&a=2", "twice"),
    ] {
        let e = RegistryUrl::parse(url)
            .and_then(|u| u.query_map().map(|_| u))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{url}");
        assert!(e.to_string().contains(part), "{url}: {e}");
    }
}

#[test]
fn errors_and_debug_never_show_passwords() {
    let e = RegistryUrl::parse("etcd://root:hunter2@h:notaport/x").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(
        redact_url("etcd://root:hunter2@h:2379/x?token=abc&ttl=1s"),
        "etcd://root:<redacted>@h:2379/x?token=<redacted>&ttl=1s"
    );
    let c = Config::from_url("consul://h:8500?token=abc")
        .with_option("token", "xyz")
        .with_option("datacenter", "dc1");
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("abc") && !dbg.contains("xyz") && dbg.contains("dc1"),
        "{dbg}"
    );
}

#[test]
fn config_from_toml_and_json() {
    let c: Config = toml::from_str("backend = \"memory\"\nname = \"t\"\nttl = \"2s\"\n").unwrap();
    assert_eq!(c.scheme().unwrap(), "memory");
    assert_eq!(c.options["ttl"], "2s");
    let c: Config = serde_json::from_str(r#"{"url":"zk://h:1/s","session_timeout":"3s"}"#).unwrap();
    assert_eq!(c.scheme().unwrap(), "zk");
    let merged = merged_options(
        Some(&RegistryUrl::parse("zk://h:1/s?session_timeout=1s&a=b").unwrap()),
        &c,
    )
    .unwrap();
    assert_eq!(merged["session_timeout"], "3s");
    assert_eq!(merged["a"], "b");
    assert!(Config::default().scheme().is_err());
}

#[test]
fn url_options_fill_parts_unless_set_and_check_the_scheme() {
    let parts = UrlParts {
        hosts: Some("endpoints"),
        default_port: 2379,
        path: Some("prefix"),
        username: Some("user"),
        password: Some("password"),
        renamed: &[],
    };
    let c = Config::from_url("etcd://u:p@a,b:1/svc?ttl=1s").with_option("prefix", "/mine");
    let (url, o) = url_options("etcd", &["etcd"], &c, parts).unwrap();
    assert!(url.is_some());
    assert_eq!(o["endpoints"], serde_json::json!(["a:2379", "b:1"]));
    assert_eq!(o["prefix"], "/mine", "explicit options win");
    assert_eq!(
        (o["user"].as_str(), o["password"].as_str()),
        (Some("u"), Some("p"))
    );
    assert_eq!(o["ttl"], "1s");
    let e = url_options("etcd", &["etcd"], &Config::from_url("zk://h"), parts).unwrap_err();
    assert!(
        e.to_string().contains("`zk`") && e.to_string().contains("etcd://"),
        "{e}"
    );
    let e = url_options(
        "etcd",
        &["etcd"],
        &Config::from_url("etcd://h?prefix=/x"),
        parts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`prefix` belongs in the URL"), "{e}");
    let (url, o) = url_options("etcd", &["etcd"], &Config::default(), parts).unwrap();
    assert!(url.is_none() && o.is_empty());
}

#[test]
fn config_from_env_vars() {
    let vars = [
        ("WAYPOST_URL", "zk://h:2181/s"),
        ("WAYPOST_SESSION_TIMEOUT", "10s"),
        ("OTHER", "x"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let c = Config::from_env_vars("WAYPOST_", vars).unwrap();
    assert_eq!(c.scheme().unwrap(), "zk");
    assert_eq!(c.options.len(), 1);
    assert_eq!(c.options["session_timeout"], "10s");
    assert!(Config::from_env_vars("WAYPOST_", [("OTHER".into(), "x".into())]).is_none());
}

#[test]
fn option_helpers_accept_strings_and_native_values() {
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Opts {
        #[serde(deserialize_with = "de::duration")]
        ttl: std::time::Duration,
        #[serde(deserialize_with = "de::number")]
        n: u32,
        #[serde(deserialize_with = "de::boolean")]
        b: bool,
    }
    let from_url: Opts = options_into(
        "x",
        serde_json::json!({"ttl":"250ms","n":"7","b":"true"})
            .as_object()
            .unwrap()
            .clone(),
    )
    .unwrap();
    assert_eq!(
        (from_url.ttl.as_millis(), from_url.n, from_url.b),
        (250, 7, true)
    );
    let native: Opts = options_into(
        "x",
        serde_json::json!({"ttl":1000,"n":7,"b":false})
            .as_object()
            .unwrap()
            .clone(),
    )
    .unwrap();
    assert_eq!(native.ttl.as_secs(), 1);
    let e = options_into::<Opts>(
        "x",
        serde_json::json!({"ttl":"1s","n":1,"b":true,"bogus":1})
            .as_object()
            .unwrap()
            .clone(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = options_into::<Opts>(
        "x",
        serde_json::json!({"ttl":"soon","n":1,"b":true})
            .as_object()
            .unwrap()
            .clone(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("option `ttl`"), "{e}");
    #[derive(Deserialize, Debug)]
    struct Secret {
        #[allow(dead_code)]
        token: String,
    }
    let e = options_into::<Secret>(
        "x",
        serde_json::json!({"token": 918273645})
            .as_object()
            .unwrap()
            .clone(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("`token`") && !e.to_string().contains("918273645"),
        "{e}"
    );
    assert!(parse_duration("ttl", "soon")
        .unwrap_err()
        .to_string()
        .contains("`ttl`"));
}
