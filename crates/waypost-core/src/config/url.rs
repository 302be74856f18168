//! [`RegistryUrl`]: registry URLs with host lists, and [`redact_url`].

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

use super::is_secret_key;

/// A parsed registry URL: `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]`.
///
/// Unlike a general URL parser this accepts the comma-separated host lists that
/// ZooKeeper and etcd connection strings use. The password is never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// The scheme, lower-cased: `zk`, `consul`, `etcd`, `memory`.
    pub scheme: String,
    /// User name from the userinfo part, percent-decoded.
    pub username: Option<String>,
    /// Password from the userinfo part, percent-decoded. Never printed.
    pub password: Option<String>,
    /// The hosts, in order, each with its port if given.
    pub hosts: Vec<(String, Option<u16>)>,
    /// The path, percent-decoded, without a trailing `/`; empty when absent.
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryUrl")
            .field("scheme", &self.scheme)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hosts", &self.hosts)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish()
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        Error::invalid_config(format!("bad percent-escape in {what}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if what == "query" => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Error::invalid_config(format!("{what} is not UTF-8")))
}

impl RegistryUrl {
    /// Parses a registry URL. Errors name the part that is wrong; they never contain the
    /// password.
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::invalid_config("registry URL must look like `scheme://host:port/path`")
        })?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(Error::invalid_config(format!(
                "registry URL scheme `{}` is not valid",
                scheme.escape_debug()
            )));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(n) => (&rest[..n], &rest[n..]),
            None => (rest, ""),
        };
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (
                    Some(percent_decode(n, "user name")?),
                    Some(percent_decode(p, "password")?),
                ),
                None => (Some(percent_decode(u, "user name")?), None),
            },
        };
        let mut hosts = Vec::new();
        if !hostlist.is_empty() {
            for h in hostlist.split(',') {
                hosts.push(parse_host(h)?);
            }
        }
        let path = percent_decode(path.trim_end_matches('/'), "path")?;
        let mut q = Vec::new();
        if let Some(query) = query {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                q.push((percent_decode(k, "query")?, percent_decode(v, "query")?));
            }
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            username,
            password,
            hosts,
            path,
            query: q,
        })
    }

    /// The hosts as `host:port` strings, filling in `default_port` where none was given.
    pub fn endpoints(&self, default_port: u16) -> Vec<String> {
        self.hosts
            .iter()
            .map(|(h, p)| {
                let port = p.unwrap_or(default_port);
                if h.contains(':') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                }
            })
            .collect()
    }

    /// Takes the query into a map, failing on a key given twice.
    pub fn query_map(&self) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for (k, v) in &self.query {
            if m.insert(k.clone(), v.clone()).is_some() {
                return Err(Error::invalid_config(format!(
                    "URL option `{k}` is given twice"
                )));
            }
        }
        Ok(m)
    }
}

fn parse_host(h: &str) -> Result<(String, Option<u16>)> {
    let bad = || {
        Error::invalid_config(format!(
            "registry URL host `{}` is not valid",
            h.escape_debug()
        ))
    };
    if h.is_empty() {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| {
            Error::invalid_config(format!(
                "registry URL port `{}` is not a number from 0 to 65535",
                p.escape_debug()
            ))
        })?),
    };
    Ok((host.to_string(), port))
}

/// A URL with its password, and any secret-looking query values, replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some((scheme, rest)) = url.split_once("://") {
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                out = format!("{scheme}://{}:<redacted>{}", &rest[..colon], &rest[at..]);
            }
        }
    }
    if let Some((base, query)) = out.clone().split_once('?') {
        let q: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=<redacted>"),
                _ => p.to_string(),
            })
            .collect();
        out = format!("{base}?{}", q.join("&"));
    }
    out
}
