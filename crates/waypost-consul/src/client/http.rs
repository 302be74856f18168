//! The HTTP clients: headers, timeouts, idle pool size and TLS material.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use waypost_core::{Error, Result};

use crate::config::ConsulConfig;

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidConfig {
        message: format!(
            "consul option `{what}`: cannot read {}: {e}",
            path.display()
        ),
    })
}

/// The HTTP client of `config`, keeping at most `max_idle` idle connections (more are
/// closed as they come back) for `idle` each; fails only on bad TLS material.
pub(super) fn build_http(
    config: &ConsulConfig,
    max_idle: usize,
    idle: Duration,
) -> Result<reqwest::Client> {
    let mut headers = HeaderMap::new();
    if let Some(token) = &config.token {
        let mut v = HeaderValue::from_str(token.expose()).map_err(|_| {
            Error::invalid_config("consul option `token` is not a valid header value")
        })?;
        v.set_sensitive(true);
        headers.insert("X-Consul-Token", v);
    }
    let mut b = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(config.connect_timeout)
        .no_proxy()
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(max_idle)
        .tcp_nodelay(true)
        .user_agent(concat!("waypost-consul/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &config.ca_file {
        let pem = read_pem("ca_file", ca)?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::invalid_config(format!(
                "consul option `ca_file`: not PEM certificates: {e}"
            ))
        })? {
            b = b.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        let mut pem = read_pem("cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read_pem("key_file", key)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Error::invalid_config(format!(
                "consul options `cert_file`/`key_file`: not a PEM certificate and key: {e}"
            ))
        })?;
        b = b.identity(id);
    }
    b.build().map_err(|e| Error::InvalidConfig {
        message: format!("consul: cannot build the HTTP client: {e}"),
    })
}
