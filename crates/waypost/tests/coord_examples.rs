//! The lock and leader examples, run as tests on every registry this build has: the same
//! code, only the URL changes.

#[allow(dead_code)]
#[path = "../../../examples/lock.rs"]
mod lock;

#[allow(dead_code)]
#[path = "../../../examples/leader.rs"]
mod leader;

use waypost::Config;

/// Runs both examples against one registry URL.
async fn both(url: String) {
    lock::run(&Config::from_url(url.clone()))
        .await
        .unwrap_or_else(|e| panic!("the lock example on {url}: {e}"));
    leader::run(&Config::from_url(url.clone()))
        .await
        .unwrap_or_else(|e| panic!("the leader example on {url}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_examples_on_memory() {
    both("memory://coord-examples-test".into()).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_examples_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    both(etcd.url()).await;
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_examples_on_zookeeper() {
    let Some(zk) = waypost_testkit::server::zookeeper().await else {
        return;
    };
    both(zk.url()).await;
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_examples_on_consul() {
    let Some(consul) = waypost_testkit::server::consul().await else {
        return;
    };
    both(consul.url()).await;
}
