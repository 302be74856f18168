//! Following a configuration watch in the suites: [`ConfigView`] applies events and checks
//! the watch contract on every one (snapshot first, revisions strictly rising, Added /
//! Updated / Removed consistent with what is held, `Stale` once per outage).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use waypost_core::backend::watch::Event;
use waypost_core::kv::{ConfigEvent, ConfigKey, Version};
use waypost_core::{Result, Revision};

/// What a configuration watch has told so far: the entries by key, the last revision,
/// and every event in order.
#[derive(Debug, Default)]
pub struct ConfigView {
    /// Value and version per key.
    pub entries: BTreeMap<ConfigKey, (Vec<u8>, Version)>,
    /// The revision of the last event.
    pub revision: Revision,
    /// Every event applied, described.
    pub log: Vec<String>,
    /// How many `Stale` events arrived.
    pub stale: usize,
    /// How many `Resynced` events arrived.
    pub resynced: usize,
    /// The keys changed at `revision` so far.
    changed_at_revision: Vec<ConfigKey>,
}

impl ConfigView {
    /// Applies one event, checking the contract as it goes: a `Snapshot` first and only
    /// first; revisions of changes never fall, and a key changes at most once per
    /// revision; an `Added` key was absent, an `Updated` or `Removed` one present; versions
    /// of a key strictly rise; `Resynced` only after `Stale`.
    pub fn apply(&mut self, ev: &ConfigEvent) {
        let first = self.log.is_empty();
        self.log.push(describe(ev));
        match ev {
            Event::Snapshot(entries, rev) => {
                assert!(first, "a Snapshot after other events: {:?}", self.log);
                self.replace(entries, *rev);
            }
            _ if first => panic!("the first event is not a Snapshot: {:?}", self.log),
            Event::Resynced(entries, rev) => {
                assert!(
                    self.resynced < self.stale,
                    "Resynced without a Stale before it: {:?}",
                    self.log
                );
                self.resynced += 1;
                self.replace(entries, *rev);
            }
            Event::Stale(_) => {
                assert_eq!(
                    self.stale, self.resynced,
                    "a second Stale in one outage: {:?}",
                    self.log
                );
                self.stale += 1;
            }
            Event::Added(e, rev) | Event::Updated(e, rev) => {
                self.rising(&e.key, *rev);
                let added = matches!(ev, Event::Added(..));
                let old = self.entries.get(&e.key);
                assert_eq!(
                    old.is_none(),
                    added,
                    "{} of a key that was {}: {:?}",
                    if added { "Added" } else { "Updated" },
                    if old.is_some() { "present" } else { "absent" },
                    self.log
                );
                if let Some((_, v)) = old {
                    assert!(
                        e.version > *v,
                        "version of {} fell: {v} → {}",
                        e.key,
                        e.version
                    );
                }
                self.entries
                    .insert(e.key.clone(), (e.value.clone(), e.version));
            }
            Event::Removed(key, rev) => {
                self.rising(key, *rev);
                assert!(
                    self.entries.remove(key).is_some(),
                    "Removed a key that was absent: {:?}",
                    self.log
                );
            }
        }
    }

    fn rising(&mut self, key: &ConfigKey, rev: Revision) {
        assert!(
            rev >= self.revision,
            "revision {rev} after {}: {:?}",
            self.revision,
            self.log
        );
        if rev > self.revision {
            self.changed_at_revision.clear();
        }
        assert!(
            !self.changed_at_revision.contains(key),
            "{key} changed twice at revision {rev}: {:?}",
            self.log
        );
        self.changed_at_revision.push(key.clone());
        self.revision = rev;
    }

    fn replace(&mut self, entries: &[waypost_core::kv::ConfigEntry], rev: Revision) {
        self.entries = entries
            .iter()
            .map(|e| (e.key.clone(), (e.value.clone(), e.version)))
            .collect();
        assert_eq!(
            self.entries.len(),
            entries.len(),
            "a snapshot lists a key twice"
        );
        self.revision = rev;
        self.changed_at_revision.clear();
    }

    /// The value of `key`, if present.
    pub fn value(&self, key: &ConfigKey) -> Option<&[u8]> {
        self.entries.get(key).map(|(v, _)| v.as_slice())
    }
}

fn describe(ev: &ConfigEvent) -> String {
    match ev {
        Event::Snapshot(e, r) => format!("Snapshot({} @{r})", e.len()),
        Event::Resynced(e, r) => format!("Resynced({} @{r})", e.len()),
        Event::Added(e, r) => format!("Added({} v{} @{r})", e.key, e.version),
        Event::Updated(e, r) => format!("Updated({} v{} @{r})", e.key, e.version),
        Event::Removed(k, r) => format!("Removed({k} @{r})"),
        Event::Stale(e) => format!("Stale({e})"),
    }
}

/// Applies events to `view` until `pred(view)` holds (checked before the first event too),
/// failing after `timeout`, on an `Err` item or when the stream ends.
pub async fn wait_for_config(
    stream: &mut BoxStream<'static, Result<ConfigEvent>>,
    view: &mut ConfigView,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&ConfigView) -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while view.log.is_empty() || !pred(view) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(ev))) => view.apply(&ev),
            Ok(Some(Err(e))) => {
                panic!("config watch yielded an error while waiting for {what}: {e}")
            }
            Ok(None) => panic!("config watch ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; {} keys; saw {:?}",
                view.entries.len(),
                view.log.iter().rev().take(20).collect::<Vec<_>>()
            ),
        }
    }
}

/// The first event of a fresh watch, which must be its `Snapshot`, applied to a new view.
pub async fn first_snapshot(
    stream: &mut BoxStream<'static, Result<ConfigEvent>>,
    timeout: Duration,
) -> ConfigView {
    let mut view = ConfigView::default();
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(ev))) => view.apply(&ev),
        other => panic!("no first snapshot within {timeout:?}: {other:?}"),
    }
    view
}
