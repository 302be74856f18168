//! The connection: one etcd client, one lease, the registrations bound to it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::Notify;
use waypost_core::{Error, Result};

use crate::config::EtcdConfig;
use crate::error::{timed, EtcdError};
use crate::registrar::Session;

/// A connection to etcd: implements [`Registrar`](waypost_core::Registrar) and
/// [`Watcher`](waypost_core::Watcher).
///
/// Every registration of one `EtcdDiscovery` is bound to one lease, kept alive in the
/// background at a third of its TTL. When etcd loses the lease (process paused past its
/// TTL, partition, server restarted without it), a new lease is granted and every live
/// registration written again, with jittered backoff and no retry cap. Dropping the last
/// clone (and every registration guard) revokes the lease, which removes whatever is
/// left at once. Cheap to clone; clones share the lease.
#[derive(Clone)]
pub struct EtcdDiscovery {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) config: Arc<EtcdConfig>,
    pub(crate) session: Mutex<Session>,
    /// Wakes the keep-alive task: a lease was lost, or something needs writing.
    pub(crate) wake: Arc<Notify>,
    /// Test hook: the "process" died; nothing more is sent.
    pub(crate) crashed: AtomicBool,
    /// [`EtcdDiscovery::shutdown`] ran.
    pub(crate) closed: AtomicBool,
    /// The TTL etcd granted the current lease, in seconds (0 before the first grant).
    pub(crate) granted_ttl: AtomicI64,
    pub(crate) task_started: AtomicBool,
    /// Serializes lease grants.
    pub(crate) grant_lock: tokio::sync::Mutex<()>,
    /// Test hook: bumping it drops every watch stream, as a connection drop would.
    pub(crate) drop_watches: tokio::sync::watch::Sender<u64>,
}

impl fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.lock();
        f.debug_struct("EtcdDiscovery")
            .field("endpoints", &self.inner.config.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .field("lease", &s.lease)
            .field("registrations", &s.regs.len())
            .finish()
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("endpoints", &self.config.endpoints)
            .finish_non_exhaustive()
    }
}

fn read_file(option: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::invalid_config(format!(
            "etcd option `{option}`: cannot read `{}`: {e}",
            path.display()
        ))
    })
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        // Watches on a member cut off from the leader are cancelled rather than silent.
        .with_require_leader(true)
        // HTTP/2 pings find dead connections under streams; etcd refuses pings more
        // often than every 5 s, and pings without streams.
        .with_keep_alive(Duration::from_secs(10), config.request_timeout)
        .with_keep_alive_while_idle(false);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        opts = opts
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if config.uses_tls() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_file("ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(
                read_file("cert_file", cert)?,
                read_file("key_file", key)?,
            ));
        }
        if let Some(d) = &config.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

impl EtcdDiscovery {
    /// Connects and checks that etcd answers (a status call) within
    /// `config.connect_timeout`: a wrong endpoint is an error here, not later. Wrong
    /// credentials are [`Error::Unauthorized`].
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let scheme = if config.uses_tls() { "https" } else { "http" };
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        let opts = connect_options(&config)?;
        let unreachable = |source: Option<waypost_core::BoxError>| Error::Unavailable {
            message: format!(
                "cannot reach etcd at {} within {:?}",
                config.endpoints.join(","),
                config.connect_timeout
            ),
            source,
        };
        let connected = tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&endpoints, Some(opts)),
        )
        .await;
        let mut client = match connected {
            Err(_) => return Err(unreachable(None)),
            Ok(Err(e)) => {
                return Err(match Error::from(EtcdError::client("connect", e)) {
                    Error::Unavailable { source, .. } => unreachable(source),
                    Error::Backend { source, .. } => unreachable(Some(source)),
                    other => other,
                })
            }
            Ok(Ok(c)) => c,
        };
        match timed(config.connect_timeout, "status", client.status()).await {
            Ok(_) => {}
            Err(Error::Timeout { .. }) => return Err(unreachable(None)),
            Err(Error::Unavailable { source, .. }) => return Err(unreachable(source)),
            Err(e) => return Err(e),
        }
        tracing::debug!(endpoints = ?config.endpoints, prefix = %config.prefix, "etcd: connected");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                config: Arc::new(config),
                session: Mutex::new(Session::default()),
                wake: Arc::new(Notify::new()),
                crashed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                granted_ttl: AtomicI64::new(0),
                task_started: AtomicBool::new(false),
                grant_lock: tokio::sync::Mutex::new(()),
                drop_watches: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    /// [`EtcdDiscovery::connect`] with a config parsed from `etcd://...`.
    pub async fn from_url(url: &str) -> Result<Self> {
        Self::connect(EtcdConfig::from_url(url)?).await
    }

    /// The configuration this client runs with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The id of the lease the registrations are bound to, if one is granted.
    pub fn lease_id(&self) -> Option<i64> {
        self.inner.lock().lease
    }

    /// The TTL etcd granted the lease (it may round the asked TTL up), once granted.
    pub fn granted_ttl(&self) -> Option<Duration> {
        match self.inner.granted_ttl.load(Ordering::Acquire) {
            n if n > 0 => Some(Duration::from_secs(n as u64)),
            _ => None,
        }
    }

    /// The underlying `etcd-client` client, for anything waypost does not cover.
    pub fn etcd_client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Shuts down: revokes the lease (etcd deletes every key bound to it at once), marks
    /// every registration `Deregistered` and stops keeping anything alive. Later
    /// registrations fail with [`Error::Closed`].
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let lease = {
            let mut s = self.inner.lock();
            for (_, reg) in s.regs.drain() {
                reg.status
                    .send_replace(waypost_core::RegistrationStatus::Deregistered);
            }
            s.lease.take()
        };
        if let Some(lease) = lease {
            timed(
                self.inner.config.request_timeout,
                "revoking the lease",
                self.inner.client.lease_client().revoke(lease),
            )
            .await?;
        }
        Ok(())
    }

    /// **Test hook, not for production.** Drops every watch stream of this client, as a
    /// broken connection would: each watch resumes from its last revision (or resyncs if
    /// that revision was compacted meanwhile).
    #[doc(hidden)]
    pub fn drop_watch_streams_for_tests(&self) {
        self.inner.drop_watches.send_modify(|n| *n += 1);
    }

    /// **Test hook, not for production.** Simulates this process crashing: keep-alives
    /// stop, nothing is revoked or deleted, guards dropped later do nothing, and every
    /// later call fails with [`Error::Closed`]. etcd removes the instances when the
    /// lease's TTL runs out, exactly as for a killed process.
    #[doc(hidden)]
    pub fn crash_for_tests(&self) {
        self.inner.crashed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.crashed.load(Ordering::Acquire) {
            Err(Error::Closed {
                what: "etcd client (crashed by the test hook)",
            })
        } else if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed {
                what: "etcd client (shut down)",
            })
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.crashed.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.crashed.load(Ordering::Acquire) {
            return;
        }
        let lease = self.lock().lease.take();
        let (Some(lease), Ok(handle)) = (lease, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let mut lc = self.client.lease_client();
        let t = self.config.request_timeout;
        handle.spawn(async move {
            if let Err(e) = timed(t, "revoking the lease", lc.revoke(lease)).await {
                tracing::debug!(
                    "etcd: lease {lease:x} not revoked on shutdown (it runs out by its TTL): {e}"
                );
            }
        });
    }
}
