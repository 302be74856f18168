//! `Registrar` on ZooKeeper: one ephemeral node per instance, bound to the session.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use waypost_core::{
    Error, Instance, Registrar, Registration, RegistrationControl, RegistrationStatus, Result,
};
use zookeeper_client::Error as ZkErr;

use crate::error::ZkError;
use crate::nodes;
use crate::session::{set_status, Inner, Key, NodeRef, RegEntry};
use crate::ZkDiscovery;

#[derive(Debug)]
struct Control {
    inner: Arc<Inner>,
    key: Key,
}

impl Inner {
    /// Removes the registration and deletes its node; returns when the server confirmed.
    pub(crate) async fn remove(&self, key: &Key) -> Result<()> {
        let node = {
            let mut st = self.lock();
            let Some(reg) = st.regs.remove(key) else {
                return Ok(());
            };
            reg.status.send_replace(RegistrationStatus::Deregistered);
            reg.node
        };
        if self.is_crashed() {
            return Ok(());
        }
        let Some(node) = node else { return Ok(()) };
        let conn = self.current()?;
        if conn.session_id() != node.session {
            return Ok(()); // that session expired, and the node went with it
        }
        match conn.client.delete(&node.path, None).await {
            Ok(()) | Err(ZkErr::NoNode) | Err(ZkErr::SessionExpired) => Ok(()),
            Err(e) => {
                self.lock().pending_deletes.push(node.clone());
                self.kick.notify_one();
                Err(ZkError::op("delete", &node.path, e).into())
            }
        }
    }
}

#[async_trait]
impl RegistrationControl for Control {
    async fn update(&self, instance: Instance) -> Result<()> {
        let inner = &self.inner;
        let node = {
            let mut st = inner.lock();
            let reg = st.regs.get_mut(&self.key).ok_or(Error::Closed {
                what: "registration",
            })?;
            reg.instance = instance.clone();
            reg.node.clone()
        };
        let conn = inner.current()?;
        let stale = |inner: &Inner| {
            if let Some(r) = inner.lock().regs.get_mut(&self.key) {
                r.node = None;
            }
            inner.kick.notify_one();
        };
        let Some(node) = node.filter(|n| n.session == conn.session_id()) else {
            // Not in place in this session: the session task writes the new instance.
            stale(inner);
            return Ok(());
        };
        let data = crate::codec::encode(&instance, inner.config.payload);
        match conn.client.set_data(&node.path, &data, None).await {
            Ok(_) => Ok(()),
            Err(ZkErr::NoNode) | Err(ZkErr::SessionExpired) => {
                stale(inner);
                Ok(())
            }
            Err(e) => Err(ZkError::op("set_data", &node.path, e).into()),
        }
    }

    async fn deregister(&self) -> Result<()> {
        self.inner.remove(&self.key).await
    }

    fn deregister_in_background(&self) {
        let inner = self.inner.clone();
        let key = self.key.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = inner.remove(&key).await {
                        tracing::debug!(service = %key.0, id = %key.1, "zookeeper: deregistration deferred: {e}");
                    }
                });
            }
            Err(_) => {
                // No runtime: forget it here; the session task (if any) or the session's
                // end removes the node.
                let mut st = inner.lock();
                if let Some(reg) = st.regs.remove(&key) {
                    reg.status.send_replace(RegistrationStatus::Deregistered);
                    if let Some(n) = reg.node {
                        st.pending_deletes.push(n);
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Registrar for ZkDiscovery {
    async fn register(&self, instance: Instance) -> Result<Registration> {
        instance.validate()?;
        let inner = &self.inner;
        if inner.is_crashed() {
            return Err(Error::Closed {
                what: "zookeeper client (crashed)",
            });
        }
        let key = (instance.service.clone(), instance.id.clone());
        let guid = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = watch::channel(RegistrationStatus::Reregistering);
        {
            let mut st = inner.lock();
            if st.regs.contains_key(&key) {
                return Err(Error::AlreadyExists {
                    what: format!(
                        "instance `{}` of service `{}` is already registered by this client",
                        key.1, key.0
                    ),
                });
            }
            // Reserve the key so a concurrent register of the same id fails fast; the
            // session task skips it while `writing`.
            st.regs.insert(
                key.clone(),
                RegEntry {
                    instance: instance.clone(),
                    status: tx,
                    node: None,
                    guid: guid.clone(),
                    writing: true,
                },
            );
        }
        let mut result = Err(Error::SessionExpired);
        for _ in 0..2 {
            let conn = match inner.live_conn().await {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            result = nodes::put(inner, &conn.client, &instance, &guid)
                .await
                .map(|path| NodeRef {
                    path,
                    session: conn.session_id(),
                });
            if !matches!(result, Err(Error::SessionExpired)) {
                break;
            }
        }
        let node = match result {
            Ok(n) => n,
            Err(e) => {
                inner.lock().regs.remove(&key);
                return Err(e);
            }
        };
        {
            let mut st = inner.lock();
            match st.regs.get_mut(&key) {
                Some(reg) => {
                    reg.writing = false;
                    reg.node = Some(node);
                    set_status(&reg.status, RegistrationStatus::Registered);
                }
                None => {
                    st.pending_deletes.push(node);
                    inner.kick.notify_one();
                    return Err(Error::Closed {
                        what: "zookeeper client",
                    });
                }
            }
        }
        Ok(Registration::new(
            instance,
            rx,
            Box::new(Control {
                inner: inner.clone(),
                key,
            }),
        ))
    }
}
