//! Connecting: one `etcd-client` connection and the config, shared by the session, the
//! store and every watch feed, with the deadline-and-retry rule every call goes through.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, Txn, TxnResponse};
use waypost_core::{Error, Result};

use crate::config::EtcdConfig;
use crate::error::{retried, EtcdError};

/// A connection to etcd and the config it was made with. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(crate) config: Arc<EtcdConfig>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish()
    }
}

impl Conn {
    /// Connects and checks that etcd answers (a status call) within
    /// `config.connect_timeout`.
    pub(crate) async fn connect(config: EtcdConfig) -> Result<Self> {
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
        let client = match connected {
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
        // A dead member among several endpoints must not fail the connect: the status
        // call is sent again while it does not reach a server (another member answers).
        let attempts = 2 * config.endpoints.len() + 1;
        let status = retried(config.connect_timeout, attempts, "status", || {
            let mut c = client.clone();
            async move { c.status().await }
        });
        let status = match tokio::time::timeout(config.connect_timeout, status).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation: "status",
                after: config.connect_timeout,
            }),
        };
        match status {
            Ok(_) => {}
            Err(Error::Timeout { .. }) => return Err(unreachable(None)),
            Err(Error::Unavailable { source, .. }) => return Err(unreachable(source)),
            Err(e) => return Err(e),
        }
        tracing::debug!(endpoints = ?config.endpoints, prefix = %config.prefix, "etcd: connected");
        Ok(Self {
            client,
            config: Arc::new(config),
        })
    }

    /// The deadline of one request.
    pub(crate) fn rt(&self) -> Duration {
        self.config.request_timeout
    }

    /// One call with the request deadline, sent again while it fails without reaching a
    /// server (a dead member among several endpoints).
    pub(crate) async fn call<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = 2 * self.config.endpoints.len() + 1;
        retried(self.rt(), attempts, operation, call).await
    }

    /// A transaction through [`Conn::call`].
    pub(crate) async fn txn(&self, operation: &'static str, txn: Txn) -> Result<TxnResponse> {
        self.call(operation, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
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

/// How long an HTTP/2 ping may go unanswered: `request_timeout`, at most 3 s (a live
/// member answers a ping at once, even when busy).
fn ping_timeout(config: &EtcdConfig) -> Duration {
    config.request_timeout.min(Duration::from_secs(3))
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        // Watches on a member cut off from the leader are cancelled rather than silent.
        .with_require_leader(true)
        // HTTP/2 pings find dead connections under streams (a blackholed member: the
        // client moves to another one after interval + timeout, 9 s at most, within the
        // default 10 s lease); etcd refuses pings more often than every 5 s
        // (`--grpc-keepalive-min-time`), and pings without streams.
        .with_keep_alive(Duration::from_secs(6), ping_timeout(config))
        .with_keep_alive_while_idle(false);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        opts = opts
            .with_user(user.clone(), password.expose())
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
