//! Turning a URL and a [`Config`] into a backend's typed options, naming the key on
//! every error.

use crate::error::{Error, Result};

use super::{is_secret_key, Config, RegistryUrl};

/// Parses a duration option such as `10s`, `250ms` or `1m 30s`, naming the key on error.
pub fn parse_duration(key: &str, value: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(value).map_err(|e| {
        Error::invalid_config(format!(
            "option `{key}`: `{}` is not a duration like `10s` or `250ms` ({e})",
            value.escape_debug()
        ))
    })
}

/// Merges a URL's query options and a config's explicit options into one JSON map that a
/// backend deserializes into its typed config (`#[serde(deny_unknown_fields)]` names an
/// unknown key). Query values are strings; explicit options win.
pub fn merged_options(
    url: Option<&RegistryUrl>,
    config: &Config,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    if let Some(u) = url {
        for (k, v) in u.query_map()? {
            m.insert(k, serde_json::Value::String(v));
        }
    }
    for (k, v) in &config.options {
        m.insert(k.clone(), v.clone());
    }
    Ok(m)
}

/// The option names the parts of a backend's URL fill, for [`url_options`]. `None`: the
/// backend's URLs have no such part.
#[derive(Clone, Copy, Debug, Default)]
pub struct UrlParts {
    /// Option filled with the hosts as a list of `host:port` strings.
    pub hosts: Option<&'static str>,
    /// Port filled in where a host has none.
    pub default_port: u16,
    /// Option filled with the path (without a trailing `/`).
    pub path: Option<&'static str>,
    /// Option filled with the user name of the userinfo part.
    pub username: Option<&'static str>,
    /// Option filled with the password of the userinfo part.
    pub password: Option<&'static str>,
    /// Other names the backend accepts for its options, `(other, ours)`: old names kept
    /// working, and names shared with other backends. They are turned into ours before
    /// anything else, so explicit options still win over the URL's whichever name each
    /// uses; one option under both names in one place is an error naming both.
    pub renamed: &'static [(&'static str, &'static str)],
}

/// The common first step of a backend's `from_config`: parses the config's URL (if any),
/// checks its scheme is one of `schemes`, and merges its query options with the config's
/// options ([`merged_options`]). Then fills the options named in `parts` from the URL's
/// hosts, path and userinfo, unless the config sets them explicitly. A query option that
/// names one of those parts is an error: it belongs in the URL itself.
///
/// Other option names in [`UrlParts::renamed`] are turned into the backend's own first.
///
/// Returns the parsed URL too, for checks of the backend's own.
pub fn url_options(
    backend: &str,
    schemes: &[&str],
    config: &Config,
    parts: UrlParts,
) -> Result<(
    Option<RegistryUrl>,
    serde_json::Map<String, serde_json::Value>,
)> {
    let twice = |old: &str, new: &str| {
        Error::invalid_config(format!(
            "{backend} options `{new}` and `{old}` name the same option; give it once"
        ))
    };
    let mut explicit = config.clone();
    for &(old, new) in parts.renamed {
        if let Some(v) = explicit.options.remove(old) {
            if explicit.options.contains_key(new) {
                return Err(twice(old, new));
            }
            explicit.options.insert(new.into(), v);
        }
    }
    let (url, mut options) = url_options_exact(backend, schemes, &explicit, parts)?;
    let in_query = |k: &str| {
        url.as_ref()
            .is_some_and(|u| u.query.iter().any(|(q, _)| q == k))
    };
    let url_parts = [parts.hosts, parts.path, parts.username, parts.password];
    for &(old, new) in parts.renamed {
        // Explicit options were renamed above: an other name here came from the query.
        let Some(v) = options.remove(old) else {
            continue;
        };
        if url_parts.contains(&Some(new)) {
            return Err(Error::invalid_config(format!(
                "{backend} URL option `{old}` belongs in the URL itself (scheme://user:password@host:port/path)"
            )));
        }
        if in_query(new) {
            return Err(twice(old, new));
        }
        options.entry(new).or_insert(v);
    }
    Ok((url, options))
}

/// [`url_options`] without the renaming.
fn url_options_exact(
    backend: &str,
    schemes: &[&str],
    config: &Config,
    parts: UrlParts,
) -> Result<(
    Option<RegistryUrl>,
    serde_json::Map<String, serde_json::Value>,
)> {
    let url = config.url.as_deref().map(RegistryUrl::parse).transpose()?;
    let Some(u) = &url else {
        return Ok((None, merged_options(None, config)?));
    };
    if !schemes.contains(&u.scheme.as_str()) {
        return Err(Error::invalid_config(format!(
            "{backend} config got a `{}` URL; expected one of {}",
            u.scheme,
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let named = [parts.hosts, parts.path, parts.username, parts.password];
    if let Some((k, _)) = u
        .query
        .iter()
        .find(|(k, _)| named.contains(&Some(k.as_str())))
    {
        return Err(Error::invalid_config(format!(
            "{backend} URL option `{k}` belongs in the URL itself (scheme://user:password@host:port/path)"
        )));
    }
    let mut options = merged_options(url.as_ref(), config)?;
    let mut fill = |key: Option<&'static str>, value: Option<serde_json::Value>| {
        if let (Some(k), Some(v)) = (key, value) {
            options.entry(k).or_insert(v);
        }
    };
    fill(
        parts.hosts,
        (!u.hosts.is_empty()).then(|| serde_json::json!(u.endpoints(parts.default_port))),
    );
    fill(
        parts.path,
        (!u.path.is_empty()).then(|| u.path.clone().into()),
    );
    fill(parts.username, u.username.clone().map(Into::into));
    fill(parts.password, u.password.clone().map(Into::into));
    Ok((url, options))
}

/// Deserializes a backend's typed options from a merged option map into
/// [`Error::InvalidConfig`] naming the key: an unknown key (with
/// `#[serde(deny_unknown_fields)]`), or the key whose value did not parse
/// (`serde_path_to_error` keeps the path that `serde_json` alone drops). The value of a
/// secret-looking key (`password`, `token`, ...) is never echoed.
pub fn options_into<T: serde::de::DeserializeOwned>(
    backend: &str,
    options: serde_json::Map<String, serde_json::Value>,
) -> Result<T> {
    serde_path_to_error::deserialize(serde_json::Value::Object(options)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Error::invalid_config(format!("{backend} options: {inner}"))
        } else if is_secret_key(&path) {
            Error::invalid_config(format!(
                "{backend} option `{path}` has the wrong type (it must be a string)"
            ))
        } else {
            Error::invalid_config(format!("{backend} option `{path}`: {inner}"))
        }
    })
}
