//! What the commands print: aligned tables and lines for people, JSON for scripts.

use serde_json::{json, Value};
use waypost::{Instance, WatchEvent};

/// One instance as JSON (the instance model's own serde form).
pub(crate) fn instance_json(i: &Instance) -> Value {
    serde_json::to_value(i).unwrap_or(Value::Null)
}

/// A watch event as one JSON object.
pub(crate) fn event_json(e: &WatchEvent) -> Value {
    match e {
        WatchEvent::Snapshot(s) => json!({
            "event": "snapshot", "revision": s.revision,
            "instances": s.instances.iter().map(instance_json).collect::<Vec<_>>(),
        }),
        WatchEvent::Added { instance, revision } => {
            json!({"event": "added", "revision": revision, "instance": instance_json(instance)})
        }
        WatchEvent::Updated { instance, revision } => {
            json!({"event": "updated", "revision": revision, "instance": instance_json(instance)})
        }
        WatchEvent::Removed { id, revision } => {
            json!({"event": "removed", "revision": revision, "id": id.as_str()})
        }
        WatchEvent::Stale { reason } => json!({"event": "stale", "error": reason.to_string()}),
        WatchEvent::Resynced(s) => json!({
            "event": "resynced", "revision": s.revision,
            "instances": s.instances.iter().map(instance_json).collect::<Vec<_>>(),
        }),
        _ => json!({"event": "unknown"}),
    }
}

/// A watch event as one line for people.
pub(crate) fn event_line(e: &WatchEvent) -> String {
    match e {
        WatchEvent::Snapshot(s) => format!(
            "snapshot  rev {}  {} instance(s){}",
            s.revision,
            s.instances.len(),
            ids(&s.instances)
        ),
        WatchEvent::Added { instance, revision } => {
            format!("added     rev {revision}  {}", instance_line(instance))
        }
        WatchEvent::Updated { instance, revision } => {
            format!("updated   rev {revision}  {}", instance_line(instance))
        }
        WatchEvent::Removed { id, revision } => format!("removed   rev {revision}  {id}"),
        WatchEvent::Stale { reason } => format!("stale     (keeping the last known set) {reason}"),
        WatchEvent::Resynced(s) => format!(
            "resynced  rev {}  {} instance(s){}",
            s.revision,
            s.instances.len(),
            ids(&s.instances)
        ),
        _ => "unknown event".into(),
    }
}

fn ids(instances: &[Instance]) -> String {
    if instances.is_empty() {
        return String::new();
    }
    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    format!(": {}", ids.join(", "))
}

fn instance_line(i: &Instance) -> String {
    format!("{} {}", i.id, i.endpoint)
}

/// Instances as an aligned table: id, endpoint, weight, zone, tags, metadata.
pub(crate) fn instance_table(instances: &[Instance]) -> String {
    let header = ["ID", "ENDPOINT", "WEIGHT", "ZONE", "TAGS", "METADATA"];
    let rows: Vec<[String; 6]> = instances
        .iter()
        .map(|i| {
            [
                i.id.to_string(),
                i.endpoint.to_string(),
                i.weight.to_string(),
                i.zone.clone().unwrap_or_else(|| "-".into()),
                if i.tags.is_empty() {
                    "-".into()
                } else {
                    i.tags.join(",")
                },
                if i.metadata.is_empty() {
                    "-".into()
                } else {
                    i.metadata
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

/// An aligned text table.
pub(crate) fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_instances_show_every_field() {
        let i = Instance::parse("svc", "a-1", "10.0.0.1", 8001)
            .unwrap()
            .with_zone("z1")
            .with_tag("blue")
            .with_metadata("version", "2");
        let t = instance_table(&[i]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0], "ID   ENDPOINT       WEIGHT  ZONE  TAGS  METADATA",
            "{t}"
        );
        assert_eq!(
            lines[1], "a-1  10.0.0.1:8001  100     z1    blue  version=2",
            "{t}"
        );
    }

    #[test]
    fn events_as_json_name_their_kind() {
        let i = Instance::parse("svc", "a-1", "10.0.0.1", 8001).unwrap();
        let e = WatchEvent::Added {
            instance: i,
            revision: 7,
        };
        let v = event_json(&e);
        assert_eq!(v["event"], "added");
        assert_eq!(v["revision"], 7);
        assert_eq!(v["instance"]["id"], "a-1");
        assert!(event_line(&e).starts_with("added     rev 7  a-1 10.0.0.1:8001"));
    }
}
