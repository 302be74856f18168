//! The config_manager example, run as a test on every registry this build has: the same
//! code, only the URL changes; the outage step pauses the real server.

#[allow(dead_code)]
#[path = "../../../examples/config_manager.rs"]
mod config_manager;

use config_manager::{run, Outage};
use waypost::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_manager_on_memory() {
    let registry = waypost::memory::registry("config-manager-test");
    let (down, up) = (registry.clone(), registry);
    let outage = Outage {
        begin: Box::new(move || down.set_reachable(false)),
        end: Box::new(move || up.set_reachable(true)),
    };
    run(
        &Config::from_url("memory://config-manager-test"),
        Some(outage),
    )
    .await
    .expect("config_manager on memory://");
}

/// An outage that pauses (SIGSTOP) and resumes the server.
#[cfg(any(feature = "etcd", feature = "zookeeper", feature = "consul"))]
macro_rules! pause_outage {
    ($server:expr) => {{
        let server = std::sync::Arc::new($server);
        let (down, up) = (server.clone(), server.clone());
        let outage = Outage {
            begin: Box::new(move || down.pause().expect("pause the server")),
            end: Box::new(move || up.resume().expect("resume the server")),
        };
        (server, outage)
    }};
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_manager_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    let url = etcd.url();
    let (_server, outage) = pause_outage!(etcd);
    run(&Config::from_url(url), Some(outage))
        .await
        .expect("config_manager on etcd");
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_manager_on_zookeeper() {
    let Some(zk) = waypost_testkit::server::zookeeper().await else {
        return;
    };
    let url = zk.url();
    let (_server, outage) = pause_outage!(zk);
    run(&Config::from_url(url), Some(outage))
        .await
        .expect("config_manager on zookeeper");
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_manager_on_consul() {
    let Some(consul) = waypost_testkit::server::consul().await else {
        return;
    };
    // A hung agent is noticed within two request timeouts (10 s each by default).
    let url = format!("{}?request_timeout=2s", consul.url());
    let (_server, outage) = pause_outage!(consul);
    run(&Config::from_url(url), Some(outage))
        .await
        .expect("config_manager on consul");
}
