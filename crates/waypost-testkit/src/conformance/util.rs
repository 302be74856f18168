//! Helpers the suites share: fresh names, and waiting on watches with deadlines.

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use rand::Rng;
use waypost_core::{Instance, InstanceSet, RegistrationStatus, Result, ServiceName, WatchEvent};

/// Fresh random names for one suite run, so runs never see each other.
#[derive(Clone, Debug)]
pub struct Namespace {
    prefix: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Self::new()
    }
}

impl Namespace {
    /// A new random namespace.
    pub fn new() -> Self {
        let n: u32 = rand::thread_rng().gen();
        Self {
            prefix: format!("wpt{n:08x}"),
        }
    }

    /// The namespace's random prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A service name in this namespace.
    pub fn service(&self, name: &str) -> ServiceName {
        ServiceName::new(format!("{}-{name}", self.prefix)).expect("valid test service name")
    }

    /// An instance of `service` on 127.0.0.1.
    pub fn instance(&self, service: &ServiceName, id: &str, port: u16) -> Instance {
        Instance::new(
            service.clone(),
            id.parse().expect("valid test instance id"),
            waypost_core::Endpoint::new("127.0.0.1", port),
        )
    }
}

/// The next event of a watch, failing the test after `timeout`, on an `Err` item or when
/// the stream ends.
pub async fn next_event(
    stream: &mut BoxStream<'static, Result<WatchEvent>>,
    timeout: Duration,
) -> WatchEvent {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch yielded an error: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {timeout:?}"),
    }
}

/// Applies watch events to `set` until `pred(set)` holds (checked before the first event
/// too), failing after `timeout`. Returns the events applied, in order.
pub async fn wait_for_set(
    stream: &mut BoxStream<'static, Result<WatchEvent>>,
    set: &mut InstanceSet,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&InstanceSet) -> bool,
) -> Vec<WatchEvent> {
    apply_until(stream, set, timeout, what, |_, s| pred(s)).await
}

/// Applies watch events to `set` until `stop(event, set)` holds for an event just
/// applied, failing after `timeout`. Returns the events applied, in order.
pub async fn wait_for_event(
    stream: &mut BoxStream<'static, Result<WatchEvent>>,
    set: &mut InstanceSet,
    timeout: Duration,
    what: &str,
    mut stop: impl FnMut(&WatchEvent, &InstanceSet) -> bool,
) -> Vec<WatchEvent> {
    apply_until(stream, set, timeout, what, |ev, s| {
        ev.is_some_and(|e| stop(e, s))
    })
    .await
}

async fn apply_until(
    stream: &mut BoxStream<'static, Result<WatchEvent>>,
    set: &mut InstanceSet,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(Option<&WatchEvent>, &InstanceSet) -> bool,
) -> Vec<WatchEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: Vec<WatchEvent> = Vec::new();
    while !done(seen.last(), set) {
        let ev = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) => panic!("watch yielded an error while waiting for {what}: {e}"),
            Ok(None) => panic!("watch ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; set has {} instances {:?}; saw {:?}",
                set.len(),
                set.ids().take(10).collect::<Vec<_>>(),
                seen.iter().map(describe).collect::<Vec<_>>()
            ),
        };
        check_change(set, &ev, &seen);
        set.apply(&ev);
        seen.push(ev);
    }
    seen
}

/// The watch contract on one event against the set it applies to (what the consumer
/// holds) and the events before it: a change's revision never falls below the last one
/// applied, and one id changes at most once per revision (several changes may share a
/// revision: one registry transaction, or one answer of a registry that only lists);
/// `Added` is an id the set does not hold, `Updated` one it holds with other contents (no
/// no-op events), `Removed` one it holds.
pub(crate) fn check_change(set: &InstanceSet, ev: &WatchEvent, before: &[WatchEvent]) {
    let log = || before.iter().map(describe).collect::<Vec<_>>();
    let (id, revision) = match ev {
        WatchEvent::Added { instance, revision } => {
            assert!(
                !set.contains(&instance.id),
                "Added {} which is already held; events before: {:?}",
                instance.id,
                log()
            );
            (&instance.id, *revision)
        }
        WatchEvent::Updated { instance, revision } => {
            let held = set.get(&instance.id);
            assert!(
                held.is_some(),
                "Updated {} which is not held; events before: {:?}",
                instance.id,
                log()
            );
            assert!(
                held != Some(instance),
                "Updated {} to what is already held (a no-op event); events before: {:?}",
                instance.id,
                log()
            );
            (&instance.id, *revision)
        }
        WatchEvent::Removed { id, revision } => {
            assert!(
                set.contains(id),
                "Removed {id} which is not held; events before: {:?}",
                log()
            );
            (id, *revision)
        }
        _ => return,
    };
    assert!(
        revision >= set.revision(),
        "the change of {id} at revision {revision} falls below {}; events before: {:?}",
        set.revision(),
        log()
    );
    let twice = before
        .iter()
        .rev()
        .take_while(|e| e.revision() == Some(revision))
        .any(|e| change_id(e) == Some(id));
    assert!(
        !twice,
        "{id} changed twice at revision {revision}; events before: {:?}",
        log()
    );
}

fn change_id(ev: &WatchEvent) -> Option<&waypost_core::InstanceId> {
    match ev {
        WatchEvent::Added { instance, .. } | WatchEvent::Updated { instance, .. } => {
            Some(&instance.id)
        }
        WatchEvent::Removed { id, .. } => Some(id),
        _ => None,
    }
}

/// The id of an event, for messages.
pub(crate) fn describe(ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Snapshot(s) => format!("Snapshot({} @{})", s.len(), s.revision),
        WatchEvent::Resynced(s) => format!("Resynced({} @{})", s.len(), s.revision),
        WatchEvent::Added { instance, revision } => format!("Added({} @{revision})", instance.id),
        WatchEvent::Updated { instance, revision } => {
            format!("Updated({} @{revision})", instance.id)
        }
        WatchEvent::Removed { id, revision } => format!("Removed({id} @{revision})"),
        WatchEvent::Stale { .. } => "Stale".into(),
        other => format!("{other:?}"),
    }
}

/// The watch contract's outage rule on an event log: every `Resynced` comes after a
/// `Stale` that no earlier `Resynced` answered, and `Stale` comes once per outage.
pub fn assert_stale_before_resynced(events: &[WatchEvent]) {
    let mut stale = false;
    for (n, ev) in events.iter().enumerate() {
        match ev {
            WatchEvent::Stale { .. } => {
                assert!(
                    !stale,
                    "a second Stale in one outage at event {n}: {:?}",
                    events.iter().map(describe).collect::<Vec<_>>()
                );
                stale = true;
            }
            WatchEvent::Resynced(_) => {
                assert!(
                    stale,
                    "Resynced without a Stale before it at event {n}: {:?}",
                    events.iter().map(describe).collect::<Vec<_>>()
                );
                stale = false;
            }
            _ => {}
        }
    }
}

/// Records every status a registration publishes, from now on (a fast flip between two
/// polls may coalesce, as `tokio::sync::watch` does).
#[derive(Debug)]
pub struct StatusLog {
    seen: std::sync::Arc<std::sync::Mutex<Vec<RegistrationStatus>>>,
    current: tokio::sync::watch::Receiver<RegistrationStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusLog {
    /// Starts recording `status`, beginning with its current value.
    pub fn start(mut status: tokio::sync::watch::Receiver<RegistrationStatus>) -> Self {
        let current = status.clone();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![*status.borrow_and_update()]));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let s = *status.borrow_and_update();
                let mut log = log.lock().expect("status log");
                if log.last() != Some(&s) {
                    log.push(s);
                }
            }
        });
        Self {
            seen,
            current,
            task,
        }
    }

    /// The statuses seen so far, consecutive repeats merged, ending with the current one
    /// (which the recording task may not have read yet).
    pub fn seen(&self) -> Vec<RegistrationStatus> {
        let mut log = self.seen.lock().expect("status log");
        let now = *self.current.borrow();
        if log.last() != Some(&now) {
            log.push(now);
        }
        log.clone()
    }

    /// Checks the sequence a registration may go through while its guard is held: it
    /// starts `Registered`, every step is a transition the contract allows (`Registered` →
    /// `Suspended` | `Reregistering`; `Suspended` → `Registered` | `Reregistering`;
    /// `Reregistering` → `Registered` | `Suspended`), never `Deregistered`, and it ends
    /// `Registered`. Returns the sequence.
    pub fn assert_recovered(&self) -> Vec<RegistrationStatus> {
        use RegistrationStatus::*;
        let seen = self.seen();
        assert_eq!(seen.first(), Some(&Registered), "statuses: {seen:?}");
        assert_eq!(seen.last(), Some(&Registered), "statuses: {seen:?}");
        for pair in seen.windows(2) {
            let ok = matches!(
                (pair[0], pair[1]),
                (Registered, Suspended | Reregistering)
                    | (Suspended, Registered | Reregistering)
                    | (Reregistering, Registered | Suspended)
            );
            assert!(
                ok,
                "status {:?} → {:?} is not allowed; statuses: {seen:?}",
                pair[0], pair[1]
            );
        }
        seen
    }
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}
