//! The `with_*` builder methods of [`ConsulConfig`].

use std::path::PathBuf;
use std::time::Duration;

use waypost_core::kv::ConfigKey;
use waypost_core::Secret;

use super::ConsulConfig;

impl ConsulConfig {
    /// Sets the agent address (`host:port`).
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// Sets HTTPS.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the datacenter.
    pub fn with_datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Sets the ACL token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
        self
    }

    /// Trusts the CA certificates in this PEM file.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this client certificate and key (PEM files).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Sets the check TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets `DeregisterCriticalServiceAfter`.
    pub fn with_deregister_critical_after(mut self, d: Duration) -> Self {
        self.deregister_critical_after = d;
        self
    }

    /// Sets the blocking-query wait.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the timeout of every non-blocking request.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the request timeout: the old name of
    /// [`with_request_timeout`](Self::with_request_timeout).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_request_timeout(timeout)
    }

    /// Sets the retry backoff bounds (`backoff_initial`, `backoff_max`).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = Some(max.max(initial));
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Adds an HTTP check run by the agent: a path such as `/health`, or an
    /// `http(s)://` URL template with `{host}` and `{port}`.
    pub fn with_http_check(mut self, path_or_url: impl Into<String>) -> Self {
        self.http_check = Some(path_or_url.into());
        self
    }

    /// Adds (or removes) a TCP check run by the agent on the instance's `host:port`.
    pub fn with_tcp_check(mut self, on: bool) -> Self {
        self.tcp_check = on;
        self
    }

    /// Sets how often the agent runs its checks.
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// Sets the timeout of each agent-run check.
    pub fn with_check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// Sets the KV prefix of configuration keys.
    pub fn with_config_prefix(mut self, prefix: ConfigKey) -> Self {
        self.config_prefix = prefix;
        self
    }

    /// Sets the KV prefix of locks and elections.
    pub fn with_coord_prefix(mut self, prefix: ConfigKey) -> Self {
        self.coord_prefix = prefix;
        self
    }

    /// Sets the `LockDelay` of the coordination session.
    pub fn with_lock_delay(mut self, delay: Duration) -> Self {
        self.lock_delay = delay;
        self
    }

    /// Sets the share (percent) of the agent's per-client connection limit that watches
    /// may use.
    pub fn with_watch_share_percent(mut self, percent: u8) -> Self {
        self.watch_share_percent = percent;
        self
    }

    /// Reads the client's registrations back from the agent every `rounds` keep-alive
    /// rounds (1 to 10).
    pub fn with_read_back_every(mut self, rounds: u8) -> Self {
        self.read_back_every = rounds;
        self
    }
}
