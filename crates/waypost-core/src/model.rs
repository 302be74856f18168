//! The instance model: validated names, endpoints and instances.
//!
//! The limits here are the portable ones: what every backend can store as is. They follow
//! Consul's limits on service metadata (64 keys, keys of `[A-Za-z0-9_-]` up to 128 bytes,
//! values up to 512 bytes), the strictest of the three registries.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest service name or instance id, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most metadata entries on one instance.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 512;
/// Most tags on one instance.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 256;
/// Longest zone, in bytes.
pub const MAX_ZONE_LEN: usize = 128;
/// Longest host, in bytes (a DNS name's limit).
pub const MAX_HOST_LEN: usize = 253;
/// Metadata key prefixes reserved for the registries and for waypost itself.
pub const RESERVED_METADATA_PREFIXES: &[&str] = &["consul-", "waypost-"];

fn check_name(kind: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(Error::invalid_input(format!(
            "{kind} must be 1 to {MAX_NAME_LEN} bytes long, got {} bytes",
            s.len()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid_input(format!(
            "{kind} `{}` contains {c:?}: only [A-Za-z0-9._-] is allowed",
            s.escape_debug()
        )));
    }
    if s == "." || s == ".." {
        return Err(Error::invalid_input(format!("{kind} may not be `{s}`")));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps a name: 1 to 128 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
            /// Anything else is [`Error::InvalidInput`] naming the rule.
            pub fn new(s: impl AsRef<str>) -> Result<Self> {
                let s = s.as_ref();
                check_name($kind, s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }
    };
}

name_type!(
    /// A service's name, as registered and watched: `greeter`, `billing.v2`.
    ServiceName,
    "service name"
);
name_type!(
    /// An instance's id, unique within its service: `greeter-7f3a`, `10.0.0.5-8080`.
    InstanceId,
    "instance id"
);

/// Where an instance is reached: a host (name or IP address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// An endpoint from a host and a port.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.host.is_empty() || self.host.len() > MAX_HOST_LEN {
            return Err(Error::invalid_input(format!(
                "endpoint host must be 1 to {MAX_HOST_LEN} bytes long, got {} bytes",
                self.host.len()
            )));
        }
        if self
            .host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@'))
        {
            return Err(Error::invalid_input(format!(
                "endpoint host `{}` contains whitespace, a control character or one of / ? # @",
                self.host.escape_debug()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The default weight of an instance.
pub const DEFAULT_WEIGHT: u32 = 100;

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// One instance of a service, as registered and as seen by watchers.
///
/// Built with [`Instance::new`] and the `with_*` methods. Weight 0 means draining: the
/// instance stays listed but weighted selection does not pick it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Instance {
    /// The service this instance belongs to.
    pub service: ServiceName,
    /// This instance's id, unique within the service.
    pub id: InstanceId,
    /// Where it is reached.
    pub endpoint: Endpoint,
    /// Free-form string metadata (see the module docs for the limits).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Tags, in the order given.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Relative weight for weighted selection; 100 by default, 0 = drain.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Zone (availability zone, rack, region) for zone-aware selection.
    #[serde(default)]
    pub zone: Option<String>,
}

impl Instance {
    /// A new instance with no metadata, no tags, weight 100 and no zone.
    pub fn new(service: ServiceName, id: InstanceId, endpoint: Endpoint) -> Self {
        Self {
            service,
            id,
            endpoint,
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            weight: DEFAULT_WEIGHT,
            zone: None,
        }
    }

    /// Parses and validates the names; a shorthand for tests and examples.
    pub fn parse(service: &str, id: &str, host: &str, port: u16) -> Result<Self> {
        Ok(Self::new(
            ServiceName::new(service)?,
            InstanceId::new(id)?,
            Endpoint::new(host, port),
        ))
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds one tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Checks every limit of this module. Registrars call it before writing anything, so a
    /// failed check leaves the registry untouched.
    pub fn validate(&self) -> Result<()> {
        // Names are validated on construction, but serde and struct literals in this crate
        // could bypass that; re-check cheaply.
        check_name("service name", self.service.as_str())?;
        check_name("instance id", self.id.as_str())?;
        self.endpoint.validate()?;
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Error::invalid_input(format!(
                "at most {MAX_METADATA_ENTRIES} metadata entries are allowed, got {}",
                self.metadata.len()
            )));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
                return Err(Error::invalid_input(format!(
                    "metadata key `{}` must be 1 to {MAX_METADATA_KEY_LEN} bytes long",
                    k.escape_debug()
                )));
            }
            if !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(Error::invalid_input(format!(
                    "metadata key `{}`: only [A-Za-z0-9_-] is allowed",
                    k.escape_debug()
                )));
            }
            if let Some(p) = RESERVED_METADATA_PREFIXES
                .iter()
                .find(|p| k.starts_with(*p))
            {
                return Err(Error::invalid_input(format!(
                    "metadata key `{k}`: the prefix `{p}` is reserved"
                )));
            }
            if v.len() > MAX_METADATA_VALUE_LEN {
                return Err(Error::invalid_input(format!(
                    "metadata value of `{k}` is {} bytes, at most {MAX_METADATA_VALUE_LEN} are allowed",
                    v.len()
                )));
            }
        }
        if self.tags.len() > MAX_TAGS {
            return Err(Error::invalid_input(format!(
                "at most {MAX_TAGS} tags are allowed, got {}",
                self.tags.len()
            )));
        }
        for t in &self.tags {
            if t.is_empty() || t.len() > MAX_TAG_LEN {
                return Err(Error::invalid_input(format!(
                    "tags must be 1 to {MAX_TAG_LEN} bytes long, got one of {} bytes",
                    t.len()
                )));
            }
        }
        if let Some(z) = &self.zone {
            if z.is_empty() || z.len() > MAX_ZONE_LEN {
                return Err(Error::invalid_input(format!(
                    "zone must be 1 to {MAX_ZONE_LEN} bytes long, got {} bytes",
                    z.len()
                )));
            }
        }
        Ok(())
    }
}

/// A registry's revision: ZooKeeper's zxid, etcd's revision, Consul's index, or the memory
/// registry's counter. Only comparable between events of one watch.
pub type Revision = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_documented_charset() {
        for ok in ["a", "greeter", "billing.v2", "A-b_c.9", &"x".repeat(128)] {
            ServiceName::new(ok).unwrap();
            InstanceId::new(ok).unwrap();
        }
    }

    #[test]
    fn names_reject_everything_else_naming_the_rule() {
        for bad in ["", "a/b", "a b", "ünï", "..", ".", "a:b", &"x".repeat(129)] {
            let e = ServiceName::new(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidInput { .. }), "{bad:?}");
            assert!(e.to_string().contains("service name"), "{e}");
        }
        let e = InstanceId::new("a/b").unwrap_err();
        assert!(e.to_string().contains("[A-Za-z0-9._-]"), "{e}");
    }

    #[test]
    fn serde_validates_names() {
        let e = serde_json::from_str::<ServiceName>("\"a/b\"").unwrap_err();
        assert!(e.to_string().contains("only [A-Za-z0-9._-]"), "{e}");
        let n: ServiceName = serde_json::from_str("\"greeter\"").unwrap();
        assert_eq!(n.as_str(), "greeter");
    }

    #[test]
    fn instance_round_trips_through_json() {
        let i = Instance::parse("greeter", "g-1", "127.0.0.1", 8001)
            .unwrap()
            .with_metadata("version", "ünïcødé ✓")
            .with_tag("primary")
            .with_weight(7)
            .with_zone("z1");
        let j = serde_json::to_string(&i).unwrap();
        assert_eq!(serde_json::from_str::<Instance>(&j).unwrap(), i);
        i.validate().unwrap();
    }

    #[test]
    fn defaults_when_fields_are_missing() {
        let i: Instance =
            serde_json::from_str(r#"{"service":"s","id":"i","endpoint":{"host":"h","port":1}}"#)
                .unwrap();
        assert_eq!(i.weight, DEFAULT_WEIGHT);
        assert!(i.metadata.is_empty() && i.tags.is_empty() && i.zone.is_none());
    }

    #[test]
    fn limits_are_enforced() {
        let base = Instance::parse("s", "i", "h", 1).unwrap();
        let mut many = base.clone();
        for n in 0..=MAX_METADATA_ENTRIES {
            many = many.with_metadata(format!("k{n}"), "v");
        }
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("metadata entries"));
        let big = base.clone().with_metadata("k", "x".repeat(513));
        assert!(big.validate().unwrap_err().to_string().contains("512"));
        let badkey = base.clone().with_metadata("a.b", "v");
        assert!(badkey.validate().is_err());
        let reserved = base.clone().with_metadata("waypost-weight", "v");
        assert!(reserved
            .validate()
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        let host = Instance::parse("s", "i", "a b", 1).unwrap();
        assert!(host.validate().is_err());
        let zone = base.clone().with_zone("");
        assert!(zone.validate().is_err());
    }

    #[test]
    fn endpoint_display_brackets_ipv6() {
        assert_eq!(Endpoint::new("::1", 80).to_string(), "[::1]:80");
        assert_eq!(Endpoint::new("h", 80).to_string(), "h:80");
    }
}
