//! Test support for waypost backends: a harness that runs the real registries
//! (ZooKeeper, etcd, Consul) as child processes, and the conformance suites every
//! backend passes.
#![forbid(unsafe_code)]

pub mod bench;
pub mod conformance;
pub mod server;

pub use server::{
    ConsulOptions, ConsulServer, EtcdCluster, EtcdOptions, EtcdServer, HarnessError, ServerKind,
    ZooKeeperOptions, ZooKeeperServer,
};
