//! The quickstart example, run as a test on every registry this build has: the same code,
//! only the URL changes.

#[allow(dead_code)]
#[path = "../../../examples/quickstart.rs"]
mod quickstart;

use waypost::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_memory() {
    quickstart::run(&Config::from_url("memory://quickstart-test"))
        .await
        .expect("quickstart on memory://");
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    quickstart::run(&Config::from_url(etcd.url()))
        .await
        .expect("quickstart on etcd");
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_zookeeper() {
    let Some(zk) = waypost_testkit::server::zookeeper().await else {
        return;
    };
    quickstart::run(&Config::from_url(zk.url()))
        .await
        .expect("quickstart on zookeeper");
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_consul() {
    let Some(consul) = waypost_testkit::server::consul().await else {
        return;
    };
    quickstart::run(&Config::from_url(consul.url()))
        .await
        .expect("quickstart on consul");
}
