//! The wire format: waypost instances as Consul agent services, and back.
//!
//! - The Consul service ID is `{service}:{id}`: Consul's IDs are unique per agent across
//!   services, waypost's only within a service, and neither part can contain `:`. Services
//!   registered by other tools keep their own ID as the instance id when it is a valid one.
//! - The weight goes to `Weights.Passing`; Consul needs at least 1, so weight 0 (draining)
//!   is carried as `waypost-weight = 0` in `Meta`. The zone is `waypost-zone`. Consul allows
//!   only 64 `Meta` entries and waypost users may use all 64: when waypost's keys do not
//!   fit, they go into tags `waypost-weight=0` / `waypost-zone=...` instead. Both places
//!   are read back.
//! - The checks go in `Checks`: the **alias check** `service:{service}:{id}` of the client's
//!   heartbeat service (`AliasService`: it is critical while the heartbeat's TTL check is),
//!   and, when configured, the agent-run checks `service:{service}:{id}:http` / `:tcp`, all
//!   with the same `DeregisterCriticalServiceAfter`.
//! - The heartbeat service (`waypost-heartbeat`, one per client, `heartbeat.rs`) has the one
//!   TTL check the client passes.
//! - Decoding is tolerant: unknown fields are ignored, and an entry that cannot become a
//!   valid instance is skipped with a warning by the caller.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waypost_core::model::{MAX_METADATA_ENTRIES, RESERVED_METADATA_PREFIXES};
use waypost_core::{Endpoint, Instance, InstanceId, ServiceName};

use crate::config::ConsulConfig;

const META_WEIGHT: &str = "waypost-weight";
/// The name of every client's heartbeat service (see `heartbeat.rs`); hidden from
/// `services()`, and not a name instances may be registered under.
pub(crate) const HEARTBEAT_SERVICE: &str = "waypost-heartbeat";
const META_ZONE: &str = "waypost-zone";

/// The Consul service ID of an instance.
pub(crate) fn service_id(service: &ServiceName, id: &InstanceId) -> String {
    format!("{service}:{id}")
}

/// The key of a health entry: `{node}/{service id}` (a service ID is unique per agent,
/// and one agent is one node).
pub(crate) fn entry_key(node: &str, service_id: &str) -> String {
    format!("{node}/{service_id}")
}

/// The ID of an instance's alias check (of the heartbeat service): the ID of the TTL
/// check instances had before heartbeat services, so an upgraded client replaces it.
pub(crate) fn check_id(service: &ServiceName, id: &InstanceId) -> String {
    format!("service:{}", service_id(service, id))
}

/// `PUT /v1/agent/service/register` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Registration {
    #[serde(rename = "ID")]
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) port: u16,
    pub(crate) tags: Vec<String>,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) weights: Weights,
    pub(crate) checks: Vec<Check>,
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Weights {
    pub(crate) passing: u32,
    #[serde(default)]
    pub(crate) warning: u32,
}

/// One entry of `Checks`: the TTL check, or an HTTP / TCP check run by the agent.
#[derive(Debug, Serialize)]
pub(crate) struct Check {
    #[serde(rename = "CheckID")]
    pub(crate) check_id: String,
    #[serde(rename = "Name")]
    pub(crate) name: String,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub(crate) ttl: Option<String>,
    #[serde(rename = "AliasService", skip_serializing_if = "Option::is_none")]
    pub(crate) alias_service: Option<String>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub(crate) http: Option<String>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub(crate) tcp: Option<String>,
    #[serde(rename = "Interval", skip_serializing_if = "Option::is_none")]
    pub(crate) interval: Option<String>,
    #[serde(rename = "Timeout", skip_serializing_if = "Option::is_none")]
    pub(crate) timeout: Option<String>,
    #[serde(rename = "Status")]
    pub(crate) status: &'static str,
    #[serde(rename = "DeregisterCriticalServiceAfter")]
    pub(crate) deregister_critical_after: String,
}

/// The status the agent-run checks (HTTP / TCP) are registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AgentCheckStart {
    /// Passing: listed at once (a first registration).
    Passing,
    /// Critical: listed once the agent's first run passes (a re-registration after the
    /// agent lost the service).
    Critical,
}

/// The IDs of the agent-run checks of an instance: `{ttl check id}:http` / `:tcp`.
pub(crate) fn agent_check_ids(
    service: &ServiceName,
    id: &InstanceId,
    config: &ConsulConfig,
) -> Vec<String> {
    let base = check_id(service, id);
    let mut ids = Vec::new();
    if config.http_check.is_some() {
        ids.push(format!("{base}:http"));
    }
    if config.tcp_check {
        ids.push(format!("{base}:tcp"));
    }
    ids
}

/// `host` as it goes before `:port` in a URL or dial address (IPv6 in brackets).
fn host_for_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The URL the agent's HTTP check requests for `instance`: a path is appended to
/// `http://{host}:{port}`, a URL template gets `{host}` / `{port}` replaced.
pub(crate) fn http_check_url(template: &str, instance: &Instance) -> String {
    let host = host_for_url(&instance.endpoint.host);
    let port = instance.endpoint.port.to_string();
    if template.starts_with('/') {
        format!("http://{host}:{port}{template}")
    } else {
        template.replace("{host}", &host).replace("{port}", &port)
    }
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The agent registration of the heartbeat service `service_id`: one TTL check
/// (`{service_id}:ttl`), registered passing. It is reaped a minute after the instances'
/// alias checks would be, so a crashed client's instances leave the catalog first. (On
/// Consul 1.8.7 an alias check of a service the agent does not hold is critical, "could
/// not be found on node"; of a service *without checks* it passes, "No checks found.":
/// the heartbeat always carries its TTL check.)
pub(crate) fn heartbeat_registration(service_id: &str, config: &ConsulConfig) -> Registration {
    Registration {
        id: service_id.to_string(),
        name: HEARTBEAT_SERVICE.to_string(),
        address: String::new(),
        port: 0,
        tags: Vec::new(),
        meta: BTreeMap::new(),
        weights: Weights {
            passing: 1,
            warning: 1,
        },
        checks: vec![Check {
            check_id: heartbeat_check_id(service_id),
            name: format!("waypost heartbeat of {service_id}"),
            ttl: Some(go_duration(config.ttl)),
            alias_service: None,
            http: None,
            tcp: None,
            interval: None,
            timeout: None,
            status: "passing",
            deregister_critical_after: go_duration(
                config.deregister_critical_after + Duration::from_secs(60),
            ),
        }],
    }
}

/// The TTL check of the heartbeat service `service_id`.
pub(crate) fn heartbeat_check_id(service_id: &str) -> String {
    format!("{service_id}:ttl")
}

/// The agent registration of `instance`: an alias check of the heartbeat service
/// `heartbeat` and the configured agent-run checks, registered with `start`. (For a check
/// it already has, the agent keeps the current status.)
pub(crate) fn encode(
    instance: &Instance,
    config: &ConsulConfig,
    start: AgentCheckStart,
    heartbeat: &str,
) -> Registration {
    let mut ours = Vec::new();
    if instance.weight == 0 {
        ours.push((META_WEIGHT, "0".to_string()));
    }
    if let Some(z) = &instance.zone {
        ours.push((META_ZONE, z.clone()));
    }
    let mut meta = instance.metadata.clone();
    let mut tags = instance.tags.clone();
    if meta.len() + ours.len() <= MAX_METADATA_ENTRIES {
        meta.extend(ours.into_iter().map(|(k, v)| (k.to_string(), v)));
    } else {
        tags.extend(ours.into_iter().map(|(k, v)| format!("{k}={v}")));
    }
    let sid = service_id(&instance.service, &instance.id);
    let deregister_after = go_duration(config.deregister_critical_after);
    let mut checks = vec![Check {
        check_id: check_id(&instance.service, &instance.id),
        name: format!("waypost heartbeat of {sid}"),
        ttl: None,
        alias_service: Some(heartbeat.to_string()),
        http: None,
        tcp: None,
        interval: None,
        timeout: None,
        status: "passing",
        deregister_critical_after: deregister_after.clone(),
    }];
    let status = match start {
        AgentCheckStart::Passing => "passing",
        AgentCheckStart::Critical => "critical",
    };
    for cid in agent_check_ids(&instance.service, &instance.id, config) {
        let (kind, http, tcp) = if cid.ends_with(":http") {
            let url = http_check_url(config.http_check.as_deref().unwrap_or("/"), instance);
            ("HTTP", Some(url), None)
        } else {
            let addr = format!(
                "{}:{}",
                host_for_url(&instance.endpoint.host),
                instance.endpoint.port
            );
            ("TCP", None, Some(addr))
        };
        checks.push(Check {
            name: format!("waypost {kind} check of {sid}"),
            status,
            check_id: cid,
            ttl: None,
            alias_service: None,
            http,
            tcp,
            interval: Some(go_duration(config.check_interval)),
            timeout: Some(go_duration(config.check_timeout)),
            deregister_critical_after: deregister_after.clone(),
        });
    }
    Registration {
        checks,
        id: sid,
        name: instance.service.to_string(),
        address: instance.endpoint.host.clone(),
        port: instance.endpoint.port,
        tags,
        meta,
        weights: Weights {
            passing: instance.weight.max(1),
            warning: 1,
        },
    }
}

/// One entry of `GET /v1/health/service/{name}`; only what we read.
#[derive(Debug, Deserialize)]
pub(crate) struct HealthEntry {
    #[serde(rename = "Node")]
    pub(crate) node: Option<Node>,
    #[serde(rename = "Service")]
    pub(crate) service: AgentService,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Node {
    #[serde(rename = "Node", default)]
    pub(crate) name: String,
    #[serde(rename = "Address", default)]
    pub(crate) address: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct AgentService {
    #[serde(rename = "ID")]
    pub(crate) id: String,
    #[serde(rename = "Service")]
    pub(crate) service: String,
    #[serde(rename = "Address", default)]
    pub(crate) address: String,
    #[serde(rename = "Port", default)]
    pub(crate) port: u16,
    #[serde(rename = "Tags", default)]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(rename = "Meta", default)]
    pub(crate) meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Weights", default)]
    pub(crate) weights: Option<Weights>,
}

/// Decodes the agent's own record of a service (`GET /v1/agent/service/{id}`), as
/// [`decode`] does a health entry.
pub(crate) fn decode_agent_service(
    service: AgentService,
    expected: &ServiceName,
) -> Result<Instance, String> {
    decode(
        HealthEntry {
            node: None,
            service,
        },
        expected,
    )
}

/// Decodes one health entry of service `expected` into an instance; `Err` says why it is
/// skipped.
pub(crate) fn decode(entry: HealthEntry, expected: &ServiceName) -> Result<Instance, String> {
    let s = entry.service;
    if s.service != expected.as_str() {
        return Err(format!("belongs to service `{}`", s.service.escape_debug()));
    }
    let raw_id =
        s.id.strip_prefix(expected.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .unwrap_or(&s.id);
    let id = InstanceId::new(raw_id).map_err(|e| format!("service ID: {e}"))?;
    // Consul's rule: an empty service address means the node's address.
    let host = if s.address.is_empty() {
        entry.node.map(|n| n.address).unwrap_or_default()
    } else {
        s.address
    };
    let mut meta = s.meta.unwrap_or_default();
    let mut tags = s.tags.unwrap_or_default();
    let mut weight = s
        .weights
        .map_or(waypost_core::model::DEFAULT_WEIGHT, |w| w.passing);
    let mut zone = None;
    let mut ours: Vec<(String, String)> = Vec::new();
    for k in [META_WEIGHT, META_ZONE] {
        if let Some(v) = meta.remove(k) {
            ours.push((k.to_string(), v));
        }
    }
    tags.retain(|t| match t.split_once('=') {
        Some((k, v)) if k == META_WEIGHT || k == META_ZONE => {
            ours.push((k.to_string(), v.to_string()));
            false
        }
        _ => true,
    });
    for (k, v) in ours {
        if k == META_WEIGHT {
            weight = v
                .parse()
                .map_err(|_| format!("{META_WEIGHT} `{}` is not a number", v.escape_debug()))?;
        } else {
            zone = Some(v);
        }
    }
    // Foreign tools may use Consul's own reserved keys; they are not waypost metadata.
    meta.retain(|k, _| !RESERVED_METADATA_PREFIXES.iter().any(|p| k.starts_with(p)));
    let mut instance = Instance::new(expected.clone(), id, Endpoint::new(host, s.port));
    instance.metadata = meta;
    instance.tags = tags;
    instance.weight = weight;
    instance.zone = zone;
    instance.validate().map_err(|e| e.to_string())?;
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(i: &Instance) -> Registration {
        let config = ConsulConfig::default().with_ttl(Duration::from_secs(3));
        encode(i, &config, AgentCheckStart::Passing, "waypost-heartbeat:t")
    }

    fn round_trip(i: &Instance) -> Instance {
        let reg = enc(i);
        let json = serde_json::json!({
            "Node": {"Address": "10.0.0.9", "Extra": 1},
            "Service": {
                "ID": reg.id, "Service": reg.name, "Address": reg.address, "Port": reg.port,
                "Tags": reg.tags, "Meta": reg.meta, "Weights": reg.weights, "Unknown": [1]
            },
            "Checks": []
        });
        decode(serde_json::from_value(json).unwrap(), &i.service).unwrap()
    }

    #[test]
    fn fields_round_trip_including_weight_zero_and_zone() {
        let i = Instance::parse("s", "i-1", "127.0.0.1", 80)
            .unwrap()
            .with_tag("t")
            .with_metadata("k", "v")
            .with_zone("eu-1a")
            .with_weight(0);
        let reg = enc(&i);
        assert_eq!(reg.id, "s:i-1");
        assert_eq!(reg.checks.len(), 1);
        assert_eq!(reg.checks[0].check_id, "service:s:i-1");
        assert_eq!(reg.checks[0].ttl, None);
        assert_eq!(
            reg.checks[0].alias_service.as_deref(),
            Some("waypost-heartbeat:t")
        );
        let hb = heartbeat_registration("waypost-heartbeat:t", &ConsulConfig::default());
        assert_eq!(hb.checks[0].check_id, "waypost-heartbeat:t:ttl");
        assert_eq!(hb.checks[0].ttl.as_deref(), Some("10000ms"));
        assert_eq!(hb.checks[0].deregister_critical_after, "120000ms");
        assert_eq!(reg.weights.passing, 1);
        assert_eq!(reg.meta["waypost-weight"], "0");
        assert_eq!(round_trip(&i), i);
        assert_eq!(round_trip(&i.clone().with_weight(7)), i.with_weight(7));
    }

    #[test]
    fn full_metadata_moves_our_keys_to_tags() {
        let mut i = Instance::parse("s", "i", "h", 1)
            .unwrap()
            .with_zone("z")
            .with_weight(0);
        for n in 0..MAX_METADATA_ENTRIES {
            i = i.with_metadata(format!("k{n}"), "v");
        }
        let reg = enc(&i);
        assert_eq!(reg.meta.len(), MAX_METADATA_ENTRIES);
        assert!(reg.tags.contains(&"waypost-zone=z".to_string()));
        assert_eq!(round_trip(&i), i);
    }

    #[test]
    fn foreign_entries_are_read_or_rejected_with_a_reason() {
        let svc = ServiceName::new("web").unwrap();
        let foreign: HealthEntry = serde_json::from_value(serde_json::json!({
            "Node": {"Address": "10.1.1.1"},
            "Service": {"ID": "web1", "Service": "web", "Address": "", "Port": 80,
                        "Tags": null, "Meta": {"consul-x": "1", "v": "2"}}
        }))
        .unwrap();
        let i = decode(foreign, &svc).unwrap();
        assert_eq!(i.id.as_str(), "web1");
        assert_eq!(i.endpoint, Endpoint::new("10.1.1.1", 80));
        assert_eq!(i.weight, 100);
        assert_eq!(i.metadata.len(), 1);
        let bad: HealthEntry = serde_json::from_value(serde_json::json!({
            "Service": {"ID": "a/b c", "Service": "web", "Port": 1}
        }))
        .unwrap();
        assert!(decode(bad, &svc).unwrap_err().contains("service ID"));
        let bad: HealthEntry = serde_json::from_value(serde_json::json!({
            "Service": {"ID": "x", "Service": "web", "Address": "h", "Port": 1,
                        "Meta": {"waypost-weight": "heavy"}}
        }))
        .unwrap();
        assert!(decode(bad, &svc).unwrap_err().contains("waypost-weight"));
    }

    #[test]
    fn agent_checks_sit_beside_the_ttl_check() {
        let i = Instance::parse("s", "i-1", "10.0.0.5", 8080).unwrap();
        let config = ConsulConfig::default()
            .with_http_check("/health")
            .with_tcp_check(true)
            .with_check_interval(Duration::from_secs(2))
            .with_check_timeout(Duration::from_secs(1));
        let reg = encode(&i, &config, AgentCheckStart::Passing, "waypost-heartbeat:t");
        let json = serde_json::to_value(&reg).unwrap();
        let checks = json["Checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3);
        assert_eq!(checks[0]["CheckID"], "service:s:i-1");
        assert_eq!(checks[0]["AliasService"], "waypost-heartbeat:t");
        assert!(checks[0].get("TTL").is_none());
        assert!(checks[0].get("HTTP").is_none());
        assert_eq!(checks[1]["CheckID"], "service:s:i-1:http");
        assert_eq!(checks[1]["HTTP"], "http://10.0.0.5:8080/health");
        assert_eq!(checks[1]["Interval"], "2000ms");
        assert_eq!(checks[1]["Timeout"], "1000ms");
        assert_eq!(checks[1]["Status"], "passing");
        assert_eq!(checks[1]["DeregisterCriticalServiceAfter"], "60000ms");
        assert!(checks[1].get("TTL").is_none());
        assert_eq!(checks[2]["CheckID"], "service:s:i-1:tcp");
        assert_eq!(checks[2]["TCP"], "10.0.0.5:8080");
        assert!(json.get("Check").is_none());

        // A re-registration by the heartbeat starts them critical; the TTL check passes.
        let reg = encode(
            &i,
            &config,
            AgentCheckStart::Critical,
            "waypost-heartbeat:t",
        );
        let st: Vec<_> = reg.checks.iter().map(|c| c.status).collect();
        assert_eq!(st, ["passing", "critical", "critical"]);
    }

    #[test]
    fn http_check_urls_from_paths_and_templates() {
        let v4 = Instance::parse("s", "i", "10.0.0.5", 81).unwrap();
        let v6 = Instance::parse("s", "i", "::1", 82).unwrap();
        assert_eq!(http_check_url("/h?x=1", &v4), "http://10.0.0.5:81/h?x=1");
        assert_eq!(http_check_url("/h", &v6), "http://[::1]:82/h");
        assert_eq!(
            http_check_url("https://{host}:9443/ready", &v4),
            "https://10.0.0.5:9443/ready"
        );
        assert_eq!(
            http_check_url("http://{host}:{port}/x", &v6),
            "http://[::1]:82/x"
        );
        assert_eq!(
            http_check_url("http://sidecar:1/p/{port}", &v4),
            "http://sidecar:1/p/81"
        );
    }
}
