//! The wire format: keys and values of both layouts.
//!
//! - `waypost` layout: key `{prefix}/{service}/{id}`, value the [`Instance`] as JSON.
//! - `grpc` layout (gRPC-Go's etcd naming resolver): key `{prefix}/{service}/{host:port}`,
//!   value `{"Op":0,"Addr":"host:port","Metadata":{...instance...}}`. Entries written by
//!   Go programs (without our metadata) are read as instances whose id is the address
//!   with `:` replaced by `-`.
//!
//! - Claims: another writer may claim an id beside its own key, under
//!   `{prefix}/{service}/{id}@{label}` (waypost layout): it decodes as that id. When
//!   several keys claim one id, watchers list it once: the instance's own key wins, else
//!   the smallest key (core's watch machine).
//!
//! Whatever else is found under a service's prefix (not JSON, another service's
//! instance, invalid names, oversized values) is reported as [`Malformed`] and skipped by
//! the caller with a warning.

use std::fmt;

use serde::{Deserialize, Serialize};
use waypost_core::{Endpoint, Instance, InstanceId, ServiceName};

use crate::config::Layout;

/// Values larger than this are not decoded (the instance limits keep ours far below).
pub const MAX_VALUE_LEN: usize = 256 * 1024;

/// Why a key/value found in etcd is not one of our instances.
#[derive(Debug)]
pub(crate) struct Malformed(pub(crate) String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Separates the id from a writer's label in a key that claims an id beside the
/// instance's own key: `{prefix}/{service}/{id}@{label}`. Not allowed in ids, so a key
/// names at most one id.
pub const CLAIM_SEPARATOR: char = '@';

/// The key prefix of a service, with the trailing `/`: `/services/greeter/`.
pub(crate) fn service_prefix(prefix: &str, service: &ServiceName) -> String {
    format!("{prefix}/{service}/")
}

/// The service a key found under the service prefix belongs to: the segment between
/// `{prefix}/` and the next `/`, as bytes (`None` when the key is not
/// `{prefix}/{segment}/...`, so lies under no service's prefix). Whether the segment is
/// a valid [`ServiceName`] is the caller's question.
pub(crate) fn service_segment<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k [u8]> {
    let rest = key.strip_prefix(prefix.as_bytes())?.strip_prefix(b"/")?;
    let end = rest.iter().position(|&b| b == b'/')?;
    Some(&rest[..end])
}

/// The key of an instance in `layout`.
pub(crate) fn key(layout: Layout, prefix: &str, instance: &Instance) -> String {
    match layout {
        Layout::Waypost => format!("{prefix}/{}/{}", instance.service, instance.id),
        Layout::Grpc => format!("{prefix}/{}/{}", instance.service, instance.endpoint),
    }
}

#[derive(Serialize, Deserialize)]
struct GrpcUpdate {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default, skip_serializing_if = "Option::is_none")]
    metadata: Option<serde_json::Value>,
}

/// The value of an instance in `layout`.
pub(crate) fn encode(layout: Layout, instance: &Instance) -> Vec<u8> {
    let r = match layout {
        Layout::Waypost => serde_json::to_vec(instance),
        Layout::Grpc => serde_json::to_vec(&GrpcUpdate {
            op: 0,
            addr: instance.endpoint.to_string(),
            metadata: serde_json::to_value(instance).ok(),
        }),
    };
    // An `Instance` is plain strings, numbers and maps: serializing cannot fail.
    r.unwrap_or_default()
}

/// Reads the instance stored at `key` (which lies under `service`'s prefix `sp`).
pub(crate) fn decode(
    layout: Layout,
    service: &ServiceName,
    sp: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Instance, Malformed> {
    let key = std::str::from_utf8(key).map_err(|_| Malformed("key is not UTF-8".into()))?;
    let last = key
        .strip_prefix(sp)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(|| Malformed(format!("key `{}` is not `{sp}<id>`", key.escape_debug())))?;
    if value.len() > MAX_VALUE_LEN {
        return Err(Malformed(format!(
            "value of {} bytes exceeds {MAX_VALUE_LEN} bytes",
            value.len()
        )));
    }
    let instance = match layout {
        Layout::Waypost => serde_json::from_slice::<Instance>(value)
            .map_err(|e| Malformed(format!("value is not an instance: {e}")))?,
        Layout::Grpc => {
            let u: GrpcUpdate = serde_json::from_slice(value)
                .map_err(|e| Malformed(format!("value is not a gRPC naming update: {e}")))?;
            if u.op != 0 {
                return Err(Malformed(format!("gRPC naming op {} is not Add", u.op)));
            }
            match u
                .metadata
                .and_then(|m| serde_json::from_value::<Instance>(m).ok())
            {
                Some(i) => i,
                None => foreign_grpc_instance(service, &u.addr)?,
            }
        }
    };
    if &instance.service != service {
        return Err(Malformed(format!(
            "value names service `{}`, not `{service}`",
            instance.service
        )));
    }
    let named = last.split_once(CLAIM_SEPARATOR).map_or(last, |(id, _)| id);
    if layout == Layout::Waypost && instance.id.as_str() != named {
        return Err(Malformed(format!(
            "value names id `{}` but the key says `{}`",
            instance.id,
            named.escape_debug()
        )));
    }
    instance
        .validate()
        .map_err(|e| Malformed(format!("instance is invalid: {e}")))?;
    Ok(instance)
}

/// An instance registered by a Go program: only an address.
fn foreign_grpc_instance(service: &ServiceName, addr: &str) -> Result<Instance, Malformed> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            Malformed(format!(
                "address `{}` is not host:port",
                addr.escape_debug()
            ))
        })?;
    let id: String = addr
        .chars()
        .map(|c| if c == ':' { '-' } else { c })
        .filter(|c| !matches!(c, '[' | ']'))
        .collect();
    let id = InstanceId::new(id).map_err(|e| Malformed(e.to_string()))?;
    Ok(Instance::new(
        service.clone(),
        id,
        Endpoint::new(host, port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceName {
        ServiceName::new("greeter").unwrap()
    }

    #[test]
    fn service_segment_is_the_first_segment_below_the_prefix() {
        let seg = |p, k: &'static [u8]| service_segment(p, k);
        assert_eq!(
            seg("/services", b"/services/greeter/g-1"),
            Some(&b"greeter"[..])
        );
        assert_eq!(
            seg("/services", b"/services/greeter/g-1/deeper"),
            Some(&b"greeter"[..])
        );
        assert_eq!(
            seg("/services", b"/services/greeter/"),
            Some(&b"greeter"[..])
        );
        assert_eq!(seg("/services", b"/services//x"), Some(&b""[..]));
        assert_eq!(seg("/services", b"/services/\xff/x"), Some(&b"\xff"[..]));
        // Not below any service's prefix.
        assert_eq!(seg("/services", b"/services/greeter"), None);
        assert_eq!(seg("/services", b"/servicesx/greeter/g-1"), None);
        assert_eq!(seg("/services", b"/other/greeter/g-1"), None);
        // The root prefix: keys are `/{service}/{id}`.
        assert_eq!(seg("", b"/greeter/g-1"), Some(&b"greeter"[..]));
        assert_eq!(seg("", b"greeter/g-1"), None);
    }

    #[test]
    fn waypost_round_trip_and_key() {
        let i = Instance::parse("greeter", "g-1", "10.0.0.5", 8001)
            .unwrap()
            .with_metadata("k", "v")
            .with_tag("t")
            .with_zone("z");
        let k = key(Layout::Waypost, "/services", &i);
        assert_eq!(k, "/services/greeter/g-1");
        let sp = service_prefix("/services", &svc());
        let back = decode(
            Layout::Waypost,
            &svc(),
            &sp,
            k.as_bytes(),
            &encode(Layout::Waypost, &i),
        )
        .unwrap();
        assert_eq!(back, i);
        let claim = format!("{k}{CLAIM_SEPARATOR}sidecar");
        let back = decode(
            Layout::Waypost,
            &svc(),
            &sp,
            claim.as_bytes(),
            &encode(Layout::Waypost, &i),
        )
        .unwrap();
        assert_eq!(
            back, i,
            "a claim under `{{id}}@{{label}}` decodes as the id"
        );
    }

    #[test]
    fn grpc_round_trip_and_foreign_entries() {
        let i = Instance::parse("greeter", "g-1", "10.0.0.5", 8001).unwrap();
        let k = key(Layout::Grpc, "/services", &i);
        assert_eq!(k, "/services/greeter/10.0.0.5:8001");
        let v = encode(Layout::Grpc, &i);
        let json: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(json["Op"], 0);
        assert_eq!(json["Addr"], "10.0.0.5:8001");
        let sp = service_prefix("/services", &svc());
        assert_eq!(
            decode(Layout::Grpc, &svc(), &sp, k.as_bytes(), &v).unwrap(),
            i
        );
        let go = br#"{"Op":0,"Addr":"10.0.0.6:9000","Metadata":"from go"}"#;
        let g = decode(
            Layout::Grpc,
            &svc(),
            &sp,
            b"/services/greeter/10.0.0.6:9000",
            go,
        )
        .unwrap();
        assert_eq!(g.id.as_str(), "10.0.0.6-9000");
        assert_eq!(g.endpoint, Endpoint::new("10.0.0.6", 9000));
    }

    #[test]
    fn malformed_values_are_reported_not_panicked() {
        let sp = service_prefix("/services", &svc());
        let other = Instance::parse("other", "x", "h", 1).unwrap();
        let wrong_id = Instance::parse("greeter", "y", "h", 1).unwrap();
        let cases: Vec<(&[u8], Vec<u8>)> = vec![
            (b"/services/greeter/x", b"not json".to_vec()),
            (b"/services/greeter/x", b"{}".to_vec()),
            (b"/services/greeter/x", encode(Layout::Waypost, &other)),
            (b"/services/greeter/x", encode(Layout::Waypost, &wrong_id)),
            (
                b"/services/greeter/x/deeper",
                encode(Layout::Waypost, &wrong_id),
            ),
            (b"/services/greeter/\xff", b"{}".to_vec()),
            (b"/services/greeter/x", vec![b' '; MAX_VALUE_LEN + 1]),
            (
                b"/services/greeter/x",
                br#"{"service":"greeter","id":"x","endpoint":{"host":"bad host","port":1}}"#
                    .to_vec(),
            ),
        ];
        for (k, v) in cases {
            assert!(
                decode(Layout::Waypost, &svc(), &sp, k, &v).is_err(),
                "{k:?}"
            );
        }
        assert!(decode(
            Layout::Grpc,
            &svc(),
            &sp,
            b"/services/greeter/a",
            br#"{"Op":1,"Addr":"a:1"}"#
        )
        .is_err());
        assert!(decode(
            Layout::Grpc,
            &svc(),
            &sp,
            b"/services/greeter/a",
            br#"{"Op":0,"Addr":"nohost"}"#
        )
        .is_err());
    }
}
