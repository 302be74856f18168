//! Node operations: the protected create of an instance node, parents as container
//! nodes, and reading a service's nodes.

use std::time::Duration;

use waypost_core::{Error, Instance, Result, ServiceName};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr};

use crate::codec;
use crate::config::NodeLayout;
use crate::error::ZkError;
use crate::session::Inner;

/// The prefix of protected nodes, as Curator spells it: `_c_{guid}-`.
const PROTECTED_PREFIX: &str = "_c_";

/// How many times a create is retried through connection losses and races with the
/// container reaper before the error goes to the caller.
const CREATE_ATTEMPTS: usize = 8;

/// Creates the parents of `path` (container nodes).
async fn ensure_parents(inner: &Inner, client: &Client, service_path: &str) -> Result<()> {
    let opts = CreateMode::Container.with_acls(Acls::new(&inner.parent_acls));
    match client.mkdir(service_path, &opts).await {
        Ok(()) => Ok(()),
        Err(ZkErr::Unimplemented) => {
            // Before ZooKeeper 3.5.3 there are no container nodes.
            let opts = CreateMode::Persistent.with_acls(Acls::new(&inner.parent_acls));
            client
                .mkdir(service_path, &opts)
                .await
                .map_err(|e| ZkError::op("mkdir", service_path, e).into())
        }
        Err(e) => Err(ZkError::op("mkdir", service_path, e).into()),
    }
}

/// Waits (up to a second) for the client to be connected again after a connection loss.
async fn await_connected(client: &Client) {
    let mut states = client.state_watcher();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let s = client.state();
            if s != zookeeper_client::SessionState::Disconnected {
                return;
            }
            states.changed().await;
        }
    })
    .await;
}

/// The instance id a protected sequential node name carries:
/// `_c_{guid}-{id}{10 digits}` → (guid, id).
pub(crate) fn parse_protected(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PROTECTED_PREFIX)?;
    let (guid, rest) = rest.split_at_checked(36)?;
    let rest = rest.strip_prefix('-')?;
    let id = rest.get(..rest.len().checked_sub(10)?)?;
    Some((guid, id))
}

/// Why one attempt of [`put`] did not finish.
enum Retry {
    /// Try again at once (parents created, an old node of ours removed, a race).
    Again,
    /// The connection was lost: wait for it, then try again.
    Loss,
    /// Give up with this error.
    Fail(Error),
}

fn classify(op: &'static str, path: &str, e: ZkErr) -> Retry {
    match e {
        ZkErr::ConnectionLoss => Retry::Loss,
        e => Retry::Fail(ZkError::op(op, path, e).into()),
    }
}

/// Writes `instance`'s node in this session and returns its path. A create whose reply
/// was lost is recognised by its owner (plain layout) or its guid (protected layout);
/// a node of an old session of ours is replaced; a node of another live session is
/// `AlreadyExists`.
pub(crate) async fn put(
    inner: &Inner,
    client: &Client,
    instance: &Instance,
    guid: &str,
) -> Result<String> {
    let data = codec::encode(instance, inner.config.payload);
    for _ in 0..CREATE_ATTEMPTS {
        match put_once(inner, client, instance, guid, &data).await {
            Ok(path) => return Ok(path),
            Err(Retry::Again) => {}
            Err(Retry::Loss) => await_connected(client).await,
            Err(Retry::Fail(e)) => return Err(e),
        }
    }
    Err(ZkError::op(
        "create",
        &inner.service_path(&instance.service),
        ZkErr::ConnectionLoss,
    )
    .into())
}

async fn put_once(
    inner: &Inner,
    client: &Client,
    instance: &Instance,
    guid: &str,
    data: &[u8],
) -> Result<String, Retry> {
    let service_path = inner.service_path(&instance.service);
    let sid = client.session_id().0;
    let acls = Acls::new(&inner.node_acls);
    let sequential = inner.config.layout == NodeLayout::ProtectedSequential;
    let (path, opts) = if sequential {
        (
            format!("{service_path}/{PROTECTED_PREFIX}{guid}-{}", instance.id),
            CreateMode::EphemeralSequential.with_acls(acls),
        )
    } else {
        (
            format!("{service_path}/{}", instance.id),
            CreateMode::Ephemeral.with_acls(acls),
        )
    };
    if sequential {
        // Ours from an attempt whose reply was lost, or another session's?
        if let Some(found) = find_protected(inner, client, &service_path, instance, guid).await? {
            client
                .set_data(&found, data, None)
                .await
                .map_err(|e| classify("set_data", &found, e))?;
            return Ok(found);
        }
    }
    match client.create(&path, data, &opts).await {
        Ok((_, seq)) => Ok(if sequential {
            format!("{path}{seq}")
        } else {
            path
        }),
        Err(ZkErr::NoNode) => {
            ensure_parents(inner, client, &service_path)
                .await
                .map_err(Retry::Fail)?;
            Err(Retry::Again)
        }
        Err(ZkErr::NodeExists) => match client.check_stat(&path).await {
            Ok(Some(stat)) if stat.ephemeral_owner == sid => {
                // Our own create whose reply was lost: it is registered.
                client
                    .set_data(&path, data, None)
                    .await
                    .map_err(|e| classify("set_data", &path, e))?;
                Ok(path)
            }
            Ok(Some(stat)) if inner.lock().past_sessions.contains(&stat.ephemeral_owner) => {
                // Left by an old session of ours: delete and create again, so watchers
                // see the change and no stale data stays.
                match client.delete(&path, Some(stat.version)).await {
                    Ok(()) | Err(ZkErr::NoNode) | Err(ZkErr::BadVersion) => Err(Retry::Again),
                    Err(e) => Err(classify("delete", &path, e)),
                }
            }
            Ok(Some(_)) => Err(Retry::Fail(already_exists(instance))),
            Ok(None) => Err(Retry::Again),
            Err(e) => Err(classify("stat", &path, e)),
        },
        Err(e) => Err(classify("create", &path, e)),
    }
}

fn already_exists(instance: &Instance) -> Error {
    Error::AlreadyExists {
        what: format!(
            "instance `{}` of service `{}` is registered by another ZooKeeper session",
            instance.id, instance.service
        ),
    }
}

/// In the protected layout: our node (by guid and owner), or `AlreadyExists` when another
/// live session holds the same instance id.
async fn find_protected(
    inner: &Inner,
    client: &Client,
    service_path: &str,
    instance: &Instance,
    guid: &str,
) -> Result<Option<String>, Retry> {
    let children = match client.list_children(service_path).await {
        Ok(c) => c,
        Err(ZkErr::NoNode) => return Ok(None),
        Err(e) => return Err(classify("list", service_path, e)),
    };
    let sid = client.session_id().0;
    for name in children {
        let Some((g, id)) = parse_protected(&name) else {
            continue;
        };
        if id != instance.id.as_str() {
            continue;
        }
        let path = format!("{service_path}/{name}");
        let owner = match client.check_stat(&path).await {
            Ok(Some(stat)) => stat.ephemeral_owner,
            Ok(None) => continue,
            Err(e) => return Err(classify("stat", &path, e)),
        };
        if g == guid && owner == sid {
            return Ok(Some(path));
        }
        if owner == sid || inner.lock().past_sessions.contains(&owner) {
            match client.delete(&path, None).await {
                Ok(()) | Err(ZkErr::NoNode) => continue,
                Err(e) => return Err(classify("delete", &path, e)),
            }
        }
        return Err(Retry::Fail(already_exists(instance)));
    }
    Ok(None)
}

/// A service's instances as read now, with the node name each came from, and the highest
/// zxid seen (the listing's revision).
#[derive(Debug, Default)]
pub(crate) struct Listing {
    pub(crate) instances: Vec<(String, Instance)>,
    pub(crate) revision: u64,
}

/// Reads every node of a service; nodes that are not instances are skipped with a warning.
pub(crate) async fn list(
    client: &Client,
    service_path: &str,
    service: &ServiceName,
) -> Result<Listing> {
    let (names, stat) = match client.get_children(service_path).await {
        Ok(x) => x,
        Err(ZkErr::NoNode) => return Ok(Listing::default()),
        Err(e) => return Err(ZkError::op("list", service_path, e).into()),
    };
    let mut revision = stat.pzxid.max(0) as u64;
    // The client sends requests when they are made: all reads are pipelined.
    let reads: Vec<_> = names
        .iter()
        .map(|n| client.get_data(&format!("{service_path}/{n}")))
        .collect();
    let results = futures::future::join_all(reads).await;
    let mut instances = Vec::with_capacity(names.len());
    for (name, r) in names.into_iter().zip(results) {
        match r {
            Ok((data, stat)) => {
                revision = revision.max(stat.mzxid.max(0) as u64);
                if let Some(i) = decode_node(service, &name, &data) {
                    instances.push((name, i));
                }
            }
            Err(ZkErr::NoNode) => {}
            Err(e) => return Err(ZkError::op("get", &format!("{service_path}/{name}"), e).into()),
        }
    }
    Ok(Listing {
        instances,
        revision,
    })
}

/// Decodes one node, logging and skipping what is not an instance.
pub(crate) fn decode_node(service: &ServiceName, name: &str, data: &[u8]) -> Option<Instance> {
    match codec::decode(service, data) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(%service, node = name, bytes = data.len(), "zookeeper: skipping a node that is not a service instance: {e}");
            None
        }
    }
}
