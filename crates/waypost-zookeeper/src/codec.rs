//! The wire format: Apache Curator x-discovery's JSON, one node per instance.
//!
//! ```json
//! {"name":"greeter","id":"g-1","address":"127.0.0.1","port":8001,"sslPort":null,
//!  "payload":{"@class":"java.util.HashMap","zone":"z1"},
//!  "registrationTimeUTC":1795304580073,"serviceType":"DYNAMIC","uriSpec":null}
//! ```
//!
//! Our metadata travels as the payload map's string entries, next to `waypost-weight`,
//! `waypost-tags` (a JSON array as a string) and `waypost-zone` (the `waypost-` prefix is
//! reserved for metadata keys, so these never collide). With the Spring Cloud Zookeeper
//! format the same map is the payload's `metadata`, and the zone is written as `zone`,
//! the key Spring Cloud's zone-preference load balancer reads, instead of
//! `waypost-zone`; only when the instance's metadata has a `zone` entry of its own does
//! that entry keep the key, and `waypost-zone` holds the zone (empty for none).
//!
//! Reading is tolerant: unknown fields and payload classes are ignored, payload entries
//! that are not valid metadata are dropped, and a node written by someone else (no
//! `waypost-weight`) has its `zone` entry taken as the zone. Data that is not JSON, or
//! lacks `address`/`port`/`id`, is an error the watcher logs and skips. Every instance
//! reads back exactly as written, in both formats.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use waypost_core::model::{
    MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN, MAX_TAGS, MAX_TAG_LEN,
    MAX_ZONE_LEN, RESERVED_METADATA_PREFIXES,
};
use waypost_core::{Endpoint, Instance, InstanceId, ServiceName};

use crate::config::PayloadFormat;

/// The payload class Curator's `JsonInstanceSerializer` writes for a map payload.
pub const CURATOR_PAYLOAD_CLASS: &str = "java.util.HashMap";
/// Spring Cloud Zookeeper's payload class.
pub const SPRING_PAYLOAD_CLASS: &str =
    "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance";

const KEY_WEIGHT: &str = "waypost-weight";
const KEY_TAGS: &str = "waypost-tags";
const KEY_ZONE: &str = "waypost-zone";

/// Why a node's data could not be read as an instance.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all (or truncated).
    #[error("node data is not JSON")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an object with the fields a service instance needs.
    #[error("node data is not a service instance: {0}")]
    Shape(String),
}

fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The node data for `instance`.
pub fn encode(instance: &Instance, format: PayloadFormat) -> Vec<u8> {
    let mut map = Map::new();
    for (k, v) in &instance.metadata {
        map.insert(k.clone(), Value::String(v.clone()));
    }
    map.insert(
        KEY_WEIGHT.into(),
        Value::String(instance.weight.to_string()),
    );
    if !instance.tags.is_empty() {
        map.insert(
            KEY_TAGS.into(),
            Value::String(serde_json::to_string(&instance.tags).unwrap_or_default()),
        );
    }
    match (
        format,
        &instance.zone,
        instance.metadata.contains_key("zone"),
    ) {
        // Spring Cloud's load balancer reads the zone from the metadata key `zone`.
        (PayloadFormat::SpringCloud, Some(z), false) => {
            map.insert("zone".into(), Value::String(z.clone()));
        }
        // The metadata's own `zone` entry takes that key: `waypost-zone` says what the
        // zone is, empty for none.
        (PayloadFormat::SpringCloud, zone, true) => {
            let z = zone.clone().unwrap_or_default();
            map.insert(KEY_ZONE.into(), Value::String(z));
        }
        (_, Some(z), _) => {
            map.insert(KEY_ZONE.into(), Value::String(z.clone()));
        }
        (_, None, _) => {}
    }
    let payload = match format {
        PayloadFormat::Curator => {
            let mut p = Map::new();
            p.insert("@class".into(), Value::String(CURATOR_PAYLOAD_CLASS.into()));
            p.extend(map);
            Value::Object(p)
        }
        PayloadFormat::SpringCloud => json!({
            "@class": SPRING_PAYLOAD_CLASS,
            "id": instance.id.as_str(),
            "name": instance.service.as_str(),
            "metadata": Value::Object(map),
        }),
    };
    let doc = json!({
        "name": instance.service.as_str(),
        "id": instance.id.as_str(),
        "address": instance.endpoint.host,
        "port": instance.endpoint.port,
        "sslPort": Value::Null,
        "payload": payload,
        "registrationTimeUTC": millis_now(),
        "serviceType": "DYNAMIC",
        "uriSpec": Value::Null,
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_METADATA_KEY_LEN
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !RESERVED_METADATA_PREFIXES.iter().any(|p| k.starts_with(p))
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads node data as an instance of `service`. Tolerant (see the module docs).
pub fn decode(service: &ServiceName, data: &[u8]) -> Result<Instance, DecodeError> {
    let doc: Value = serde_json::from_slice(data)?;
    let obj = doc
        .as_object()
        .ok_or_else(|| DecodeError::Shape("not a JSON object".into()))?;
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError::Shape("no string `id`".into()))?;
    let id = InstanceId::new(id).map_err(|e| DecodeError::Shape(e.to_string()))?;
    let host = obj
        .get("address")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| DecodeError::Shape("no `address`".into()))?;
    let port = ["port", "sslPort"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| DecodeError::Shape("no valid `port` or `sslPort`".into()))?;
    let mut instance = Instance::new(service.clone(), id, Endpoint::new(host, port));

    let payload = obj.get("payload").and_then(Value::as_object);
    let spring = payload.and_then(|p| {
        p.get("metadata")
            .and_then(Value::as_object)
            .filter(|_| p.get("@class").and_then(Value::as_str) == Some(SPRING_PAYLOAD_CLASS))
    });
    let Some(map) = spring.or(payload) else {
        return Ok(instance);
    };
    let ours = map.contains_key(KEY_WEIGHT);
    // Our Spring Cloud nodes keep the zone in `zone` unless `waypost-zone` is there.
    let zone_is_zone = !ours || (spring.is_some() && !map.contains_key(KEY_ZONE));
    let mut metadata = BTreeMap::new();
    for (k, v) in map {
        match k.as_str() {
            KEY_WEIGHT => {
                if let Some(w) = scalar(v).and_then(|s| s.parse().ok()) {
                    instance.weight = w;
                }
            }
            KEY_TAGS => {
                if let Some(tags) = v
                    .as_str()
                    .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
                {
                    instance.tags = tags
                        .into_iter()
                        .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_LEN)
                        .take(MAX_TAGS)
                        .collect();
                }
            }
            KEY_ZONE => instance.zone = scalar(v),
            "zone" if zone_is_zone && instance.zone.is_none() => instance.zone = scalar(v),
            "zone" if zone_is_zone => {}
            _ if valid_key(k) => {
                if let Some(s) = scalar(v).filter(|s| s.len() <= MAX_METADATA_VALUE_LEN) {
                    if metadata.len() < MAX_METADATA_ENTRIES {
                        metadata.insert(k.clone(), s);
                    }
                }
            }
            _ => {}
        }
    }
    instance.zone = instance
        .zone
        .filter(|z| !z.is_empty() && z.len() <= MAX_ZONE_LEN);
    instance.metadata = metadata;
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceName {
        "greeter".parse().unwrap()
    }

    #[test]
    fn reads_curator_json_exactly_as_curator_writes_it() {
        let raw = br#"{"name":"greeter","id":"g-1","address":"127.0.0.1","port":8001,"sslPort":null,"payload":{"@class":"java.util.HashMap","zone":"z1"},"registrationTimeUTC":1795304580073,"serviceType":"DYNAMIC","uriSpec":null}"#;
        let i = decode(&svc(), raw).unwrap();
        assert_eq!(i.id.as_str(), "g-1");
        assert_eq!(i.endpoint, Endpoint::new("127.0.0.1", 8001));
        assert_eq!(i.zone.as_deref(), Some("z1"));
        assert!(i.metadata.is_empty());
        assert_eq!(i.weight, 100);
    }

    #[test]
    fn round_trips_every_field_in_both_formats() {
        let i = Instance::parse("greeter", "g-2", "::1", 9)
            .unwrap()
            .with_metadata("zone", "meta-zone")
            .with_metadata("version", "2 ✓")
            .with_tag("a,b")
            .with_tag("ü")
            .with_weight(0)
            .with_zone("eu-1a");
        for f in [PayloadFormat::Curator, PayloadFormat::SpringCloud] {
            let back = decode(&svc(), &encode(&i, f)).unwrap();
            assert_eq!(back, i, "{f:?}");
        }
    }

    #[test]
    fn writes_the_curator_fields() {
        let i = Instance::parse("greeter", "g-1", "127.0.0.1", 8001)
            .unwrap()
            .with_metadata("k", "v");
        let v: Value = serde_json::from_slice(&encode(&i, PayloadFormat::Curator)).unwrap();
        assert_eq!(v["name"], "greeter");
        assert_eq!(v["id"], "g-1");
        assert_eq!(v["address"], "127.0.0.1");
        assert_eq!(v["port"], 8001);
        assert!(v["sslPort"].is_null() && v["uriSpec"].is_null());
        assert_eq!(v["serviceType"], "DYNAMIC");
        assert!(v["registrationTimeUTC"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(v["payload"]["@class"], CURATOR_PAYLOAD_CLASS);
        assert_eq!(v["payload"]["k"], "v");
        let s: Value = serde_json::from_slice(&encode(&i, PayloadFormat::SpringCloud)).unwrap();
        assert_eq!(s["payload"]["@class"], SPRING_PAYLOAD_CLASS);
        assert_eq!(s["payload"]["metadata"]["k"], "v");
        assert_eq!(s["payload"]["name"], "greeter");
    }

    #[test]
    fn spring_cloud_payload_carries_the_zone_where_spring_reads_it() {
        let zoned = Instance::parse("greeter", "g-1", "10.0.0.5", 8001)
            .unwrap()
            .with_zone("eu-1a");
        let payload = |i: &Instance, f| {
            let v: Value = serde_json::from_slice(&encode(i, f)).unwrap();
            v["payload"].clone()
        };
        let spring = payload(&zoned, PayloadFormat::SpringCloud);
        assert_eq!(spring["metadata"]["zone"], "eu-1a");
        assert!(spring["metadata"].get(KEY_ZONE).is_none());
        let curator = payload(&zoned, PayloadFormat::Curator);
        assert_eq!(curator[KEY_ZONE], "eu-1a");
        assert!(curator.get("zone").is_none());

        // A metadata entry `zone` keeps its key; `waypost-zone` says the zone.
        let both = zoned.clone().with_metadata("zone", "meta");
        let spring = payload(&both, PayloadFormat::SpringCloud);
        assert_eq!(spring["metadata"]["zone"], "meta");
        assert_eq!(spring["metadata"][KEY_ZONE], "eu-1a");
        let meta_only = Instance::parse("greeter", "g-1", "10.0.0.5", 8001)
            .unwrap()
            .with_metadata("zone", "eu-1a");
        assert_eq!(
            payload(&meta_only, PayloadFormat::SpringCloud)["metadata"][KEY_ZONE],
            ""
        );

        // Each reads back exactly (the keeper compares what it reads with what it wrote).
        let same = zoned.clone().with_metadata("zone", "eu-1a");
        let plain = Instance::parse("greeter", "g-1", "10.0.0.5", 8001).unwrap();
        for i in [&zoned, &both, &meta_only, &same, &plain] {
            for f in [PayloadFormat::Curator, PayloadFormat::SpringCloud] {
                assert_eq!(&decode(&svc(), &encode(i, f)).unwrap(), i, "{f:?} {i:?}");
            }
        }

        // What Spring Cloud itself writes: the zone in the metadata's `zone`.
        let raw = br#"{"name":"greeter","id":"s-1","address":"10.0.0.9","port":8080,"sslPort":null,"payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance","id":"greeter-1","name":"greeter","metadata":{"zone":"eu-1b","instance_status":"UP"}},"registrationTimeUTC":1795304580073,"serviceType":"DYNAMIC","uriSpec":{"parts":[]}}"#;
        let s = decode(&svc(), raw).unwrap();
        assert_eq!(s.zone.as_deref(), Some("eu-1b"));
        assert_eq!(
            s.metadata.get("instance_status").map(String::as_str),
            Some("UP")
        );
        assert!(!s.metadata.contains_key("zone"));
    }

    #[test]
    fn tolerant_of_foreign_payloads_and_fails_typed_on_garbage() {
        let raw = br#"{"id":"x","address":"h","port":null,"sslPort":443,"extra":[1],"payload":{"@class":"com.acme.Info","a.b":"dropped","n":5,"obj":{"x":1}}}"#;
        let i = decode(&svc(), raw).unwrap();
        assert_eq!(i.endpoint.port, 443);
        assert_eq!(i.metadata.get("n").map(String::as_str), Some("5"));
        assert_eq!(i.metadata.len(), 1);
        assert!(i.validate().is_ok());
        assert!(matches!(
            decode(&svc(), b"not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(&svc(), br#"{"id":"x","addr"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(&svc(), b"[1,2]"),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode(&svc(), br#"{"id":"../x","address":"h","port":1}"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(decode(&svc(), b""), Err(DecodeError::Json(_))));
    }
}
