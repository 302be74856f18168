#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub use waypost_core::*;

#[cfg(feature = "tonic")]
pub mod grpc;

/// The ZooKeeper backend (feature `zookeeper`).
#[cfg(feature = "zookeeper")]
pub use waypost_zookeeper as zookeeper;

/// The Consul backend (feature `consul`).
#[cfg(feature = "consul")]
pub use waypost_consul as consul;

/// The etcd backend (feature `etcd`).
#[cfg(feature = "etcd")]
pub use waypost_etcd as etcd;

use waypost_core::memory::MemoryConnector;

/// Every scheme waypost knows, with the feature of this crate that provides it.
const KNOWN_SCHEMES: &[(&str, Option<&str>)] = &[
    ("memory", None),
    ("zookeeper", Some("zookeeper")),
    ("zk", Some("zookeeper")),
    ("consul", Some("consul")),
    ("consuls", Some("consul")),
    ("etcd", Some("etcd")),
];

/// The backends compiled into this build.
pub fn connectors() -> Vec<&'static dyn Connector> {
    #[allow(unused_mut)]
    let mut all: Vec<&'static dyn Connector> = vec![&MemoryConnector];
    #[cfg(feature = "zookeeper")]
    all.push(&waypost_zookeeper::ZkConnector);
    #[cfg(feature = "consul")]
    all.push(&waypost_consul::ConsulConnector);
    #[cfg(feature = "etcd")]
    all.push(&waypost_etcd::EtcdConnector);
    all
}

/// Connects to the registry a URL names: `memory://`, `zk://host:port[,…]/root`,
/// `consul://host:port`, `etcd://host:port[,…]/prefix`, options as query parameters.
pub async fn connect(url: &str) -> Result<Discovery> {
    connect_config(&Config::from_url(url)).await
}

/// Connects to the registry the environment names (`WAYPOST_URL`, `WAYPOST_BACKEND`,
/// `WAYPOST_<OPTION>`; see [`Config::from_env`]), or to `default` when none is set.
pub async fn connect_env(default: &str) -> Result<Discovery> {
    match Config::from_env() {
        Some(c) => connect_config(&c).await,
        None => connect(default).await,
    }
}

/// Connects to the registry a serde [`Config`] names.
pub async fn connect_config(config: &Config) -> Result<Discovery> {
    let scheme = config.scheme()?;
    let connectors = connectors();
    if let Some(c) = connectors
        .iter()
        .find(|c| c.schemes().contains(&scheme.as_str()))
    {
        return c.connect(config).await;
    }
    let feature = KNOWN_SCHEMES
        .iter()
        .find(|(s, _)| *s == scheme)
        .and_then(|(_, f)| *f);
    Err(Error::UnknownScheme {
        scheme,
        available: connectors
            .iter()
            .flat_map(|c| c.schemes())
            .copied()
            .collect(),
        feature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_urls_share_named_registries() {
        let a = connect("memory://facade-test").await.unwrap();
        let b = connect_config(&Config::for_backend("memory").with_option("name", "facade-test"))
            .await
            .unwrap();
        let reg = a
            .registrar
            .register(Instance::parse("svc", "i", "h", 1).unwrap())
            .await
            .unwrap();
        let seen = b.watcher.instances(&"svc".parse().unwrap()).await.unwrap();
        assert_eq!(seen.len(), 1);
        reg.deregister().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_scheme_names_it_and_the_available_ones() {
        let e = connect("nosuch://h:1").await.unwrap_err();
        match &e {
            Error::UnknownScheme {
                scheme,
                available,
                feature,
            } => {
                assert_eq!(scheme, "nosuch");
                assert!(available.contains(&"memory"));
                assert!(feature.is_none());
            }
            other => panic!("expected UnknownScheme, got {other}"),
        }
    }

    #[tokio::test]
    async fn each_scheme_connects_or_names_its_feature() {
        // Port 1 on loopback is closed: a compiled-in backend fails fast and temporarily.
        for (url, feature) in [
            ("zk://127.0.0.1:1/services?connect_timeout=1s", "zookeeper"),
            ("consul://127.0.0.1:1?connect_timeout=1s", "consul"),
            ("etcd://127.0.0.1:1/services?connect_timeout=1s", "etcd"),
        ] {
            let scheme = url.split("://").next().unwrap();
            let compiled_in = connectors().iter().any(|c| c.schemes().contains(&scheme));
            let started = std::time::Instant::now();
            let e = connect(url).await.unwrap_err();
            if compiled_in {
                assert!(e.is_temporary(), "{url}: {e}");
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(5),
                    "{url} hung"
                );
            } else {
                let msg = e.to_string();
                assert!(matches!(e, Error::UnknownScheme { .. }), "{url}: {msg}");
                assert!(
                    msg.contains(&format!("`{feature}` feature")),
                    "{url}: {msg}"
                );
                assert!(msg.contains("memory"), "{msg}");
            }
        }
    }

    #[tokio::test]
    async fn unknown_options_are_named() {
        let e = connect("memory://x?tll=1s").await.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
        assert!(e.to_string().contains("tll"), "{e}");
        let e = connect("memory://x?ttl=soon").await.unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        let e = connect("memory://a:1/x").await.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    }

    #[tokio::test]
    async fn config_from_toml() {
        let c: Config =
            toml::from_str("backend = \"memory\"\nname = \"toml\"\nttl = \"2s\"").unwrap();
        connect_config(&c).await.unwrap();
        let c: Config = toml::from_str("url = \"memory://toml\"\nbogus = 1").unwrap();
        let e = connect_config(&c).await.unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}

/// The workspace README's code, compiled as doc tests so it cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
