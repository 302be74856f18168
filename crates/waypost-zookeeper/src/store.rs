//! The registration primitives: one ephemeral node per instance, bound to the session,
//! in Curator's layout; core's [`Keeper`](waypost_core::backend::Keeper) does the rest.
//!
//! A node is ours when its `ephemeralOwner` is our session. A node of an earlier session
//! of this client is a leftover and replaced; a node bound to no session (a persistent
//! node a foreign writer put at our path) is replaced only on takeover; a node of another
//! live session is `AlreadyExists`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::time::Instant;
use waypost_core::backend::{Presence, RegistryStore};
use waypost_core::{Error, Instance, InstanceId, Result, ServiceName};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkErr, Stat};

use crate::client::{self, Ctx, Failed};
use crate::codec;
use crate::config::NodeLayout;
use crate::error::is_connection_loss;
use crate::session::ZkSession;

/// The prefix of protected nodes, as Curator spells it: `_c_{guid}-`.
const PROTECTED_PREFIX: &str = "_c_";

/// How many times one write starts over after a race (parents created, a leftover
/// removed, a node gone between two reads) before it gives up.
const ATTEMPTS: usize = 8;

/// The instance id a protected sequential node name carries:
/// `_c_{guid}-{id}{10 digits}` → (guid, id).
pub(crate) fn parse_protected(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PROTECTED_PREFIX)?;
    let (guid, rest) = rest.split_at_checked(36)?;
    let rest = rest.strip_prefix('-')?;
    let id = rest.get(..rest.len().checked_sub(10)?)?;
    Some((guid, id))
}

/// Whether the node `name` of a service is where this backend writes `id`.
pub(crate) fn is_own_name(layout: NodeLayout, name: &str, id: &InstanceId) -> bool {
    match layout {
        NodeLayout::ProtectedSequential => {
            parse_protected(name).is_some_and(|(_, i)| i == id.as_str())
        }
        _ => name == id.as_str(),
    }
}

/// Why one attempt of a write did not finish.
enum Step {
    /// Start over at once.
    Again,
    /// The connection was lost: wait for it, then start over.
    Loss(Failed),
    /// Give up with this error.
    Fail(Error),
}

type Key = (ServiceName, InstanceId);

/// How many registrations one keep-alive round reads back.
const INSPECT_PER_ROUND: usize = 64;

/// Writes, inspects and deletes instance nodes.
pub(crate) struct Store {
    ctx: Arc<Ctx>,
    /// The guid of this client's protected nodes.
    guid: String,
    /// Where each instance's node was last written, and in which session: the protected
    /// layout's node names carry a sequence number.
    placed: Mutex<HashMap<Key, (String, u64)>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkStore")
            .field("root", &self.ctx.config.root)
            .field("layout", &self.ctx.config.layout)
            .finish()
    }
}

fn key_of(i: &Instance) -> Key {
    (i.service.clone(), i.id.clone())
}

fn already_exists(instance: &Instance) -> Error {
    Error::AlreadyExists {
        what: format!(
            "instance `{}` of service `{}` is registered by another ZooKeeper session",
            instance.id, instance.service
        ),
    }
}

impl Store {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        Self {
            ctx,
            guid: uuid::Uuid::new_v4().to_string(),
            placed: Mutex::new(HashMap::new()),
        }
    }

    fn placed(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (String, u64)>> {
        self.placed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sequential(&self) -> bool {
        self.ctx.config.layout == NodeLayout::ProtectedSequential
    }

    /// Runs `attempt` until it finishes, waiting for the connection after a loss, at most
    /// until `deadline`.
    async fn retrying<T, F, Fut>(
        &self,
        client: &Client,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Step>>,
    {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Step::Again) => {}
                Err(Step::Fail(e)) => return Err(e),
                Err(Step::Loss(f)) => {
                    if let Err(e) = client::connected(client, deadline).await {
                        return Err(match e {
                            Error::SessionExpired => e,
                            _ => self.ctx.error(f),
                        });
                    }
                    last = Some(f);
                }
            }
        }
        Err(match last {
            Some(f) => self.ctx.error(f),
            None => Error::unavailable("zookeeper: the node kept changing under a write"),
        })
    }

    fn classify(&self, f: Failed) -> Step {
        match f.code() {
            None => Step::Fail(self.ctx.error(f)),
            Some(e) if is_connection_loss(e) => Step::Loss(f),
            Some(_) => Step::Fail(self.ctx.error(f)),
        }
    }

    /// What a node read means for `session`'s claim on it.
    fn presence(
        &self,
        session: &ZkSession,
        instance: &Instance,
        data: &[u8],
        stat: &Stat,
    ) -> Presence {
        match stat.ephemeral_owner {
            o if o == session.id() => Presence::Ours {
                current: codec::decode(&instance.service, data).is_ok_and(|i| i == *instance),
            },
            0 => Presence::Unowned,
            _ => Presence::Foreign,
        }
    }

    /// One attempt at the plain layout's node `{service}/{id}`.
    async fn put_plain(
        &self,
        client: &Client,
        session: &ZkSession,
        instance: &Instance,
        data: &[u8],
        takeover: bool,
        deadline: Instant,
    ) -> std::result::Result<String, Step> {
        let ctx = &self.ctx;
        let service_path = ctx.service_path(&instance.service);
        let path = format!("{service_path}/{}", instance.id);
        let opts = CreateMode::Ephemeral.with_acls(Acls::new(&ctx.node_acls));
        let created = ctx
            .call(
                deadline,
                "zookeeper create",
                &path,
                client.create(&path, data, &opts),
            )
            .await;
        match created {
            Ok(_) => return Ok(path),
            Err(f) => match f.code() {
                Some(ZkErr::NoNode) => {
                    ctx.ensure_parents(client, &service_path, deadline)
                        .await
                        .map_err(|f| self.classify(f))?;
                    return Err(Step::Again);
                }
                Some(ZkErr::NodeExists) => {}
                _ => return Err(self.classify(f)),
            },
        }
        let read = ctx
            .call(deadline, "zookeeper get", &path, client.get_data(&path))
            .await;
        let (old, stat) = match read {
            Ok(x) => x,
            Err(f) if f.code() == Some(&ZkErr::NoNode) => return Err(Step::Again),
            Err(f) => return Err(self.classify(f)),
        };
        match self.presence(session, instance, &old, &stat) {
            Presence::Ours { current: true } => Ok(path),
            Presence::Ours { current: false } => {
                let set = client.set_data(&path, data, Some(stat.version));
                match ctx.call(deadline, "zookeeper set", &path, set).await {
                    Ok(_) => Ok(path),
                    Err(f) if matches!(f.code(), Some(ZkErr::NoNode | ZkErr::BadVersion)) => {
                        Err(Step::Again)
                    }
                    Err(f) => Err(self.classify(f)),
                }
            }
            p => {
                let leftover = ctx.is_past_session(stat.ephemeral_owner, session.id());
                if !(leftover || takeover && p == Presence::Unowned) {
                    return Err(Step::Fail(already_exists(instance)));
                }
                self.remove(client, &path, Some(stat.version), deadline)
                    .await?;
                Err(Step::Again)
            }
        }
    }

    async fn remove(
        &self,
        client: &Client,
        path: &str,
        version: Option<i32>,
        deadline: Instant,
    ) -> std::result::Result<(), Step> {
        let del = client.delete(path, version);
        match self.ctx.call(deadline, "zookeeper delete", path, del).await {
            Ok(()) => Ok(()),
            Err(f) if matches!(f.code(), Some(ZkErr::NoNode | ZkErr::BadVersion)) => Ok(()),
            Err(f) => Err(self.classify(f)),
        }
    }

    /// The protected nodes of `instance`'s id under its service: (path, data, stat).
    async fn find_protected(
        &self,
        client: &Client,
        instance: &Instance,
        deadline: Instant,
    ) -> std::result::Result<Vec<(String, Vec<u8>, Stat)>, Step> {
        let ctx = &self.ctx;
        let service_path = ctx.service_path(&instance.service);
        let list = client.list_children(&service_path);
        let names = match ctx
            .call(deadline, "zookeeper list", &service_path, list)
            .await
        {
            Ok(n) => n,
            Err(f) if f.code() == Some(&ZkErr::NoNode) => return Ok(Vec::new()),
            Err(f) => return Err(self.classify(f)),
        };
        let mut found = Vec::new();
        for name in names {
            if !is_own_name(NodeLayout::ProtectedSequential, &name, &instance.id) {
                continue;
            }
            let path = format!("{service_path}/{name}");
            match ctx
                .call(deadline, "zookeeper get", &path, client.get_data(&path))
                .await
            {
                Ok((data, stat)) => found.push((path, data, stat)),
                Err(f) if f.code() == Some(&ZkErr::NoNode) => {}
                Err(f) => return Err(self.classify(f)),
            }
        }
        Ok(found)
    }

    /// One attempt at the protected layout: our node found by its owner (a create whose
    /// reply was lost included), else a new `_c_{guid}-{id}NNNNNNNNNN`.
    async fn put_protected(
        &self,
        client: &Client,
        session: &ZkSession,
        instance: &Instance,
        data: &[u8],
        takeover: bool,
        deadline: Instant,
    ) -> std::result::Result<String, Step> {
        let ctx = &self.ctx;
        let mut ours = None;
        for (path, old, stat) in self.find_protected(client, instance, deadline).await? {
            match self.presence(session, instance, &old, &stat) {
                Presence::Ours { current } if ours.is_none() => ours = Some((path, current, stat)),
                Presence::Ours { .. } => self.remove(client, &path, None, deadline).await?,
                p => {
                    let leftover = ctx.is_past_session(stat.ephemeral_owner, session.id());
                    if !(leftover || takeover && p == Presence::Unowned) {
                        return Err(Step::Fail(already_exists(instance)));
                    }
                    self.remove(client, &path, None, deadline).await?;
                }
            }
        }
        if let Some((path, current, stat)) = ours {
            if !current {
                let set = client.set_data(&path, data, Some(stat.version));
                match ctx.call(deadline, "zookeeper set", &path, set).await {
                    Ok(_) => {}
                    Err(f) if matches!(f.code(), Some(ZkErr::NoNode | ZkErr::BadVersion)) => {
                        return Err(Step::Again)
                    }
                    Err(f) => return Err(self.classify(f)),
                }
            }
            return Ok(path);
        }
        let service_path = ctx.service_path(&instance.service);
        let prefix = format!(
            "{service_path}/{PROTECTED_PREFIX}{}-{}",
            self.guid, instance.id
        );
        let opts = CreateMode::EphemeralSequential.with_acls(Acls::new(&ctx.node_acls));
        let create = client.create(&prefix, data, &opts);
        match ctx
            .call(deadline, "zookeeper create", &prefix, create)
            .await
        {
            Ok((_, seq)) => Ok(format!("{prefix}{seq}")),
            Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                ctx.ensure_parents(client, &service_path, deadline)
                    .await
                    .map_err(|f| self.classify(f))?;
                Err(Step::Again)
            }
            Err(f) => Err(self.classify(f)),
        }
    }

    /// Where `instance`'s node of `session` is, if this store wrote it.
    fn placed_path(&self, session: &ZkSession, instance: &Instance) -> Option<String> {
        if !self.sequential() {
            let service_path = self.ctx.service_path(&instance.service);
            return Some(format!("{service_path}/{}", instance.id));
        }
        match self.placed().get(&key_of(instance)) {
            Some((path, generation)) if *generation == session.generation() => Some(path.clone()),
            _ => None,
        }
    }
}

#[async_trait]
impl RegistryStore for Store {
    type Handle = ZkSession;

    /// One `getData` per registration: a process with many registrations reads back at
    /// most [`INSPECT_PER_ROUND`] of them per keep-alive round (each within
    /// `ceil(n / 64)` rounds), not all of them every second.
    fn inspect_per_round(&self) -> usize {
        INSPECT_PER_ROUND
    }

    async fn write(&self, session: &ZkSession, instance: &Instance, takeover: bool) -> Result<()> {
        let client = session.client()?;
        let deadline = self.ctx.deadline();
        let data = &codec::encode(instance, self.ctx.config.payload);
        let client = &client;
        let path = self
            .retrying(client, deadline, move || async move {
                if self.sequential() {
                    self.put_protected(client, session, instance, data, takeover, deadline)
                        .await
                } else {
                    self.put_plain(client, session, instance, data, takeover, deadline)
                        .await
                }
            })
            .await?;
        if self.sequential() {
            self.placed()
                .insert(key_of(instance), (path, session.generation()));
        }
        Ok(())
    }

    async fn inspect(&self, session: &ZkSession, instance: &Instance) -> Result<Presence> {
        let client = session.client()?;
        let deadline = self.ctx.deadline();
        let known = &self.placed_path(session, instance);
        let client = &client;
        self.retrying(client, deadline, move || async move {
            if let Some(path) = known {
                let read = client.get_data(path);
                match self.ctx.call(deadline, "zookeeper get", path, read).await {
                    Ok((data, stat)) => return Ok(self.presence(session, instance, &data, &stat)),
                    Err(f) if f.code() == Some(&ZkErr::NoNode) => {
                        if !self.sequential() {
                            return Ok(Presence::Missing);
                        }
                    }
                    Err(f) => return Err(self.classify(f)),
                }
            }
            let mut best = Presence::Missing;
            for (_, data, stat) in self.find_protected(client, instance, deadline).await? {
                let p = self.presence(session, instance, &data, &stat);
                let rank = |p: &Presence| match p {
                    Presence::Ours { current: true } => 4,
                    Presence::Ours { .. } => 3,
                    Presence::Foreign => 2,
                    Presence::Unowned => 1,
                    _ => 0,
                };
                if rank(&p) > rank(&best) {
                    best = p;
                }
            }
            Ok(best)
        })
        .await
    }

    async fn delete(&self, session: &ZkSession, instance: &Instance) -> Result<()> {
        let client = session.client()?;
        let deadline = self.ctx.deadline();
        let known = &self.placed_path(session, instance);
        let client = &client;
        self.retrying(client, deadline, move || async move {
            let mine: Vec<String> = match known {
                Some(path) if !self.sequential() => {
                    let stat = client.check_stat(path);
                    match self.ctx.call(deadline, "zookeeper stat", path, stat).await {
                        Ok(Some(s)) if s.ephemeral_owner == session.id() => vec![path.clone()],
                        Ok(_) => Vec::new(),
                        Err(f) => return Err(self.classify(f)),
                    }
                }
                _ => self
                    .find_protected(client, instance, deadline)
                    .await?
                    .into_iter()
                    .filter(|(_, _, s)| s.ephemeral_owner == session.id())
                    .map(|(p, _, _)| p)
                    .collect(),
            };
            for path in mine {
                self.remove(client, &path, None, deadline).await?;
            }
            Ok(())
        })
        .await?;
        let mut placed = self.placed();
        if placed
            .get(&key_of(instance))
            .is_some_and(|(_, g)| *g == session.generation())
        {
            placed.remove(&key_of(instance));
        }
        Ok(())
    }
}
