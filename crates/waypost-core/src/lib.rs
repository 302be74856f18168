#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod backoff;
pub mod cache;
pub mod config;
pub mod coord;
#[cfg(feature = "tower")]
pub mod discover;
pub mod error;
pub mod event;
pub mod kv;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod registrar;
pub mod secret;
pub mod select;
pub mod watcher;

pub use backoff::Backoff;
pub use cache::{CacheOptions, CacheView, Picked, ServiceCache, Strategy};
pub use config::{Config, Connector, Discovery, RegistryUrl};
#[cfg(feature = "tower")]
pub use discover::discover;
pub use error::{BoxError, Error, Report, Result};
pub use event::{InstanceSet, Snapshot, WatchEvent};
pub use model::{Endpoint, Instance, InstanceId, Revision, ServiceName};
pub use registrar::{Registrar, Registration, RegistrationControl, RegistrationStatus};
pub use secret::Secret;
pub use watcher::Watcher;
