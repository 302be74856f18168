//! The grpc_greeter example, run as a test on every registry this build has: tonic
//! servers register, a balanced channel calls the new one and stops calling the gone one.
#![cfg(feature = "tonic")]

#[allow(dead_code)]
#[path = "../../../examples/grpc_greeter.rs"]
mod grpc_greeter;

use waypost::Config;

async fn on(url: String) {
    grpc_greeter::run(&Config::from_url(url.clone()))
        .await
        .unwrap_or_else(|e| panic!("grpc_greeter on {url}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_greeter_on_memory() {
    on("memory://grpc-greeter-test".into()).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_greeter_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    on(etcd.url()).await;
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_greeter_on_zookeeper() {
    let Some(zk) = waypost_testkit::server::zookeeper().await else {
        return;
    };
    on(zk.url()).await;
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_greeter_on_consul() {
    let Some(consul) = waypost_testkit::server::consul().await else {
        return;
    };
    on(consul.url()).await;
}
