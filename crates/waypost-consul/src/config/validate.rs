//! Checking a [`ConsulConfig`]: every message names the option.

use std::time::Duration;

use waypost_core::config;
use waypost_core::{Error, Result, Secret};

use super::{ConsulConfig, MAX_WAIT};

impl ConsulConfig {
    /// Checks the values; every message names the option.
    pub fn validate(&self) -> Result<()> {
        if self.address.trim().is_empty() || self.address.contains('/') {
            return Err(Error::invalid_config(format!(
                "consul option `address`: `{}` is not host:port",
                self.address.escape_debug()
            )));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid_config(
                "consul options `cert_file` and `key_file` go together",
            ));
        }
        if !self.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err(Error::invalid_config(
                "consul options `ca_file`/`cert_file` need TLS: use consuls:// or `tls = true`",
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(Error::invalid_config(
                "consul option `ttl` must be at least 1s",
            ));
        }
        if self.wait < Duration::from_secs(1) || self.wait > MAX_WAIT {
            return Err(Error::invalid_config(
                "consul option `wait` must be from 1s to 10m",
            ));
        }
        for (k, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("backoff_initial", self.backoff_initial),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "consul option `{k}` may not be zero"
                )));
            }
        }
        if self.backoff_max.is_some_and(|m| m < self.backoff_initial) {
            return Err(Error::invalid_config(
                "consul option `backoff_max` must be at least `backoff_initial`",
            ));
        }
        self.validate_checks()?;
        if self.lock_delay > crate::coord::MAX_LOCK_DELAY {
            return Err(Error::invalid_config(
                "consul option `lock_delay` must be at most 60s (Consul's limit)",
            ));
        }
        if !(1..=90).contains(&self.watch_share_percent) {
            return Err(Error::invalid_config(
                "consul option `watch_share_percent` must be from 1 to 90",
            ));
        }
        if !(1..=10).contains(&self.read_back_every) {
            return Err(Error::invalid_config(
                "consul option `read_back_every` must be from 1 to 10 (keep-alive rounds)",
            ));
        }
        if let Some(dc) = &self.datacenter {
            if dc.is_empty()
                || !dc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(Error::invalid_config(format!(
                    "consul option `datacenter`: `{}` is not a datacenter name",
                    dc.escape_debug()
                )));
            }
        }
        if let Some(t) = self.token.as_ref().map(Secret::expose) {
            if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
                // Never echo the token.
                return Err(Error::invalid_config(
                    "consul option `token` is empty or contains whitespace",
                ));
            }
        }
        Ok(())
    }

    fn validate_checks(&self) -> Result<()> {
        if let Some(h) = &self.http_check {
            let bad = |why: &str| {
                Error::invalid_config(format!(
                    "consul option `http_check`: `{}` {why}",
                    config::redact_url(h).escape_debug()
                ))
            };
            if h.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(bad("contains whitespace or control characters"));
            }
            if let Some((scheme, rest)) = h.split_once("://") {
                if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
                    return Err(bad("is not an http:// or https:// URL"));
                }
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(bad("has no host"));
                }
            } else if !h.starts_with('/') {
                return Err(bad(
                    "is neither a path starting with `/` nor an http(s):// URL",
                ));
            }
        }
        for (k, d) in [
            ("check_interval", self.check_interval),
            ("check_timeout", self.check_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::invalid_config(format!(
                    "consul option `{k}` may not be zero"
                )));
            }
        }
        if self.check_timeout > self.check_interval {
            return Err(Error::invalid_config(format!(
                "consul option `check_timeout` ({:?}) may not exceed `check_interval` ({:?})",
                self.check_timeout, self.check_interval
            )));
        }
        Ok(())
    }
}
