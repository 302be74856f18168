#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod bench;
pub mod conformance;
pub mod proxy;
pub mod server;

pub use server::{
    ConsulAgent, ConsulCluster, ConsulOptions, ConsulServer, EtcdCluster, EtcdOptions, EtcdServer,
    HarnessError, ServerKind, ZooKeeperEnsemble, ZooKeeperOptions, ZooKeeperServer,
};
