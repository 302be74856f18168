#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod bench;
pub mod conformance;
pub mod proxy;
pub mod server;

pub use server::{
    ConsulOptions, ConsulServer, EtcdCluster, EtcdOptions, EtcdServer, HarnessError, ServerKind,
    ZooKeeperOptions, ZooKeeperServer,
};
