//! A tonic [`Channel`] that balances over a service's live instances (feature `tonic`).
//!
//! ```no_run
//! # async fn run() -> waypost::Result<()> {
//! let d = waypost::connect("etcd://127.0.0.1:2379/services").await?;
//! // Every live instance of `greeter`, as `http://host:port`, power-of-two-choices:
//! let channel = waypost::grpc::balanced_channel(d.watcher.clone(), "greeter".parse()?, waypost::grpc::plain);
//! // let mut client = GreeterClient::new(channel);
//! # let _ = channel; Ok(()) }
//! ```
//!
//! The channel follows the service's watch ([`discover`](crate::discover)): a new
//! instance is called as soon as the watch reports it, a removed one no longer is. While
//! the registry is unreachable the last known instances keep serving. Use your own
//! function from [`Instance`] to [`Endpoint`] for TLS, timeouts or another port (read it
//! from the instance's metadata, say).

use std::sync::Arc;

use futures::StreamExt;
use tonic::transport::channel::Change as ChannelChange;
use tonic::transport::{Channel, Endpoint};
use tower::discover::Change;

use crate::{discover, Instance, InstanceId, ServiceName, Watcher};

/// `http://host:port` of the instance, with a 5 s connect timeout.
pub fn plain(instance: &Instance) -> Result<Endpoint, crate::BoxError> {
    let ep = &instance.endpoint;
    let host = if ep.host.contains(':') && !ep.host.starts_with('[') {
        format!("[{}]", ep.host)
    } else {
        ep.host.clone()
    };
    Ok(Endpoint::from_shared(format!("http://{host}:{}", ep.port))?
        .connect_timeout(std::time::Duration::from_secs(5)))
}

/// A channel over the live instances of `service`, each turned into an [`Endpoint`] by
/// `endpoint` (see [`plain`]); balanced with tower's power-of-two-choices over pending
/// requests. An instance `endpoint` refuses is skipped and logged.
///
/// Must be called within a tokio runtime: the watch runs in a background task, which
/// ends when the channel (and all its clones) are dropped.
pub fn balanced_channel<F>(watcher: Arc<dyn Watcher>, service: ServiceName, endpoint: F) -> Channel
where
    F: Fn(&Instance) -> Result<Endpoint, crate::BoxError> + Send + 'static,
{
    let (channel, tx) = Channel::balance_channel::<InstanceId>(64);
    let mut changes = discover(watcher, service.clone());
    tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            let change = match change {
                Ok(Change::Insert(id, instance)) => match endpoint(&instance) {
                    Ok(ep) => ChannelChange::Insert(id, ep),
                    Err(e) => {
                        tracing::warn!(%service, id = %id, "instance skipped: no endpoint: {e}");
                        ChannelChange::Remove(id)
                    }
                },
                Ok(Change::Remove(id)) => ChannelChange::Remove(id),
                Err(e) => {
                    tracing::error!(%service, "the balanced channel's watch ended: {e}");
                    return;
                }
            };
            if tx.send(change).await.is_err() {
                // Every clone of the channel was dropped.
                return;
            }
        }
    });
    channel
}
