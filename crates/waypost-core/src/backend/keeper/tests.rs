//! The keeper's read-back budget, over the memory registry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{BackoffOptions, Keeper, Presence, RegistryStore, Session, SessionDriver};
use crate::memory::backend::{Driver, Store};
use crate::memory::MemoryRegistry;
use crate::{Instance, Registrar, Result, ServiceName};

/// The memory store with a read-back budget of 2, recording each round's batch size;
/// reading back every `every`th round, recording the rounds it was asked about.
#[derive(Debug)]
struct Budgeted {
    inner: Store,
    batches: Arc<Mutex<Vec<usize>>>,
    every: u64,
    rounds: Arc<Mutex<Vec<u64>>>,
}

#[async_trait]
impl RegistryStore for Budgeted {
    type Handle = u64;

    async fn write(&self, s: &u64, i: &Instance, takeover: bool) -> Result<()> {
        self.inner.write(s, i, takeover).await
    }

    async fn inspect(&self, s: &u64, i: &Instance) -> Result<Presence> {
        self.inner.inspect(s, i).await
    }

    async fn delete(&self, s: &u64, i: &Instance) -> Result<()> {
        self.inner.delete(s, i).await
    }

    fn inspect_per_round(&self) -> usize {
        2
    }

    fn read_back_round(&self, round: u64) -> bool {
        self.rounds.lock().unwrap().push(round);
        round.is_multiple_of(self.every)
    }

    async fn inspect_many(&self, s: &u64, instances: &[Instance]) -> Result<Vec<Presence>> {
        self.batches.lock().unwrap().push(instances.len());
        let mut out = Vec::new();
        for i in instances {
            out.push(self.inner.inspect(s, i).await?);
        }
        Ok(out)
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_reads_back_in_rotation_and_heals_every_entry() {
    let registry = MemoryRegistry::new("budget");
    let ttl = Duration::from_secs(4);
    let session = Session::new(
        Driver {
            registry: registry.clone(),
            ttl,
        },
        BackoffOptions::default(),
    );
    let batches = Arc::new(Mutex::new(Vec::new()));
    let keeper = Keeper::new(
        "memory",
        session,
        Budgeted {
            inner: Store {
                registry: registry.clone(),
            },
            batches: batches.clone(),
            every: 1,
            rounds: Arc::default(),
        },
    );
    let svc: ServiceName = "svc".parse().unwrap();
    let mut regs = Vec::new();
    for n in 0..5 {
        let i = Instance::parse("svc", &format!("i{n}"), "h", 1).unwrap();
        regs.push(keeper.register(i).await.unwrap());
    }
    for r in &regs {
        assert!(registry.delete_foreign(&svc, r.instance().id.as_str()));
    }
    assert!(registry.peek(&svc).is_empty());
    // Every entry is read back within ceil(5 / 2) = 3 rounds of a quarter TTL, and healed.
    let deadline = tokio::time::Instant::now() + ttl * 2;
    while registry.peek(&svc).len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "healed {} of 5 in time",
            registry.peek(&svc).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batches = batches.lock().unwrap();
    assert!(!batches.is_empty());
    assert!(
        batches.iter().all(|b| *b <= 2),
        "read back more than the budget: {batches:?}"
    );
    assert!(
        batches.contains(&2),
        "entries written under the live session are read back in batches: {batches:?}"
    );
}

fn keeper_over(registry: &MemoryRegistry, ttl: Duration) -> Keeper<Driver, Store> {
    let session = Session::new(
        Driver {
            registry: registry.clone(),
            ttl,
        },
        BackoffOptions::default(),
    );
    Keeper::new(
        "memory",
        session,
        Store {
            registry: registry.clone(),
        },
    )
}

fn inst(id: &str) -> Instance {
    Instance::parse("svc", id, "h", 1).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_write_that_lands_or_is_refused_leaves_nothing_to_remove() {
    let registry = MemoryRegistry::new("refused");
    let keeper = keeper_over(&registry, Duration::from_secs(10));
    let other = keeper_over(&registry, Duration::from_secs(10));
    assert!(keeper.is_empty());
    let _a = keeper.register(inst("a")).await.unwrap();
    assert_eq!((keeper.len(), keeper.is_empty()), (1, false));
    assert_eq!(
        keeper.pending_removals(),
        0,
        "a write that landed is no unknown"
    );
    let refused = other.register(inst("a")).await.unwrap_err();
    assert!(
        matches!(refused, crate::Error::AlreadyExists { .. }),
        "{refused}"
    );
    assert_eq!(other.pending_removals(), 0, "a refusal is no unknown");
    registry.set_reachable(false);
    assert!(keeper.register(inst("b")).await.is_err());
    assert_eq!(
        keeper.pending_removals(),
        1,
        "a failed write's outcome is unknown"
    );
}

#[tokio::test(start_paused = true)]
async fn a_register_that_finds_its_session_expired_retries_on_a_new_one() {
    let registry = MemoryRegistry::new("expired");
    // A long TTL: the keep-alive loop does not notice the expiry before `register` does.
    let keeper = keeper_over(&registry, Duration::from_secs(60));
    let _a = keeper.register(inst("a")).await.unwrap();
    let first = keeper.session().current_state().handle().unwrap();
    assert_eq!(registry.expire_session(first), 1);
    let b = keeper
        .register(inst("b"))
        .await
        .expect("registered on a new session");
    let now = keeper.session().current_state().handle().unwrap();
    assert_ne!(now, first);
    assert_eq!(b.current_status(), crate::RegistrationStatus::Registered);
    assert!(registry
        .peek(&"svc".parse().unwrap())
        .get(&"b".parse().unwrap())
        .is_some());
}

#[tokio::test(start_paused = true)]
async fn a_crashed_client_deletes_nothing_and_shutdown_removes_everything() {
    let registry = MemoryRegistry::new("crash");
    let svc: ServiceName = "svc".parse().unwrap();
    let crashed = keeper_over(&registry, Duration::from_secs(10));
    let reg = crashed.register(inst("a")).await.unwrap();
    crashed.crash();
    assert!(crashed.session().is_closed());
    reg.deregister().await.unwrap();
    assert_eq!(
        registry.peek(&svc).len(),
        1,
        "a crashed process deletes nothing"
    );

    let clean = keeper_over(&registry, Duration::from_secs(10));
    let reg = clean.register(inst("b")).await.unwrap();
    let status = reg.status();
    clean.shutdown().await.unwrap();
    assert_eq!(*status.borrow(), crate::RegistrationStatus::Deregistered);
    assert!(
        registry.peek(&svc).get(&"b".parse().unwrap()).is_none(),
        "closing the session removed its entries"
    );
    assert!(matches!(
        clean.register(inst("c")).await,
        Err(crate::Error::Closed { .. })
    ));
}

/// The memory store, but every write answers "session expired" (and writes nothing).
#[derive(Debug)]
struct AlwaysExpired {
    writes: Arc<Mutex<usize>>,
}

#[async_trait]
impl RegistryStore for AlwaysExpired {
    type Handle = u64;

    async fn write(&self, _: &u64, _: &Instance, _: bool) -> Result<()> {
        *self.writes.lock().unwrap() += 1;
        Err(crate::Error::SessionExpired)
    }

    async fn inspect(&self, _: &u64, _: &Instance) -> Result<Presence> {
        Ok(Presence::Missing)
    }

    async fn delete(&self, _: &u64, _: &Instance) -> Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_that_finds_its_session_expired_is_retried_once_then_reported() {
    let registry = MemoryRegistry::new("always-expired");
    let writes = Arc::new(Mutex::new(0));
    let keeper = Keeper::new(
        "memory",
        Session::new(
            Driver {
                registry: registry.clone(),
                ttl: Duration::from_secs(10),
            },
            BackoffOptions::default(),
        ),
        AlwaysExpired {
            writes: writes.clone(),
        },
    );
    let e = tokio::time::timeout(Duration::from_secs(60), keeper.register(inst("a")))
        .await
        .expect("register gives up instead of retrying forever")
        .unwrap_err();
    assert!(matches!(e, crate::Error::SessionExpired), "{e}");
    assert_eq!(*writes.lock().unwrap(), 2, "one retry on a new session");
}

#[tokio::test(start_paused = true)]
async fn a_healthy_registration_publishes_no_status_change() {
    let registry = MemoryRegistry::new("quiet");
    let keeper = keeper_over(&registry, Duration::from_secs(2));
    let reg = keeper.register(inst("a")).await.unwrap();
    let mut status = reg.status();
    status.borrow_and_update();
    // Many keep-alive rounds (a quarter TTL each), each reading the entry back.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !status.has_changed().unwrap(),
        "Registered re-published as Registered"
    );
    assert_eq!(*status.borrow(), crate::RegistrationStatus::Registered);
}

#[tokio::test(start_paused = true)]
async fn another_ids_unknown_write_is_still_removed_after_a_new_registration() {
    let registry = MemoryRegistry::new("pending-other");
    let svc: ServiceName = "svc".parse().unwrap();
    let keeper = keeper_over(&registry, Duration::from_secs(2));
    // `b`'s write lands but its reply is lost: `b` is a pending removal.
    registry.lose_replies(1);
    assert!(keeper.register(inst("b")).await.is_err());
    assert_eq!(keeper.pending_removals(), 1);
    // Registering `a` must not forget `b`'s leftovers.
    let _a = keeper.register(inst("a")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while registry.peek(&svc).get(&"b".parse().unwrap()).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the landed write of `b` was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(registry.peek(&svc).get(&"a".parse().unwrap()).is_some());
    wait_until("`b` forgotten once its window closed", || {
        keeper.pending_removals() == 0
    })
    .await;
}

#[test]
fn a_guard_dropped_without_a_runtime_is_deregistered_by_the_keepers_loop() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let registry = MemoryRegistry::new("no-runtime-drop");
    let svc: ServiceName = "svc".parse().unwrap();
    let keeper = keeper_over(&registry, Duration::from_millis(400));
    let reg = rt.block_on(keeper.register(inst("a"))).unwrap();
    let status = reg.status();
    // Dropped on a thread with no runtime: the keeper's own loop removes it.
    std::thread::spawn(move || drop(reg)).join().unwrap();
    assert_eq!(*status.borrow(), crate::RegistrationStatus::Deregistered);
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !registry.peek(&svc).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a guard dropped outside a runtime was never deregistered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The session is still open: only the dropped instance went.
    assert!(!keeper.session().is_closed());
}

fn session_over(registry: &MemoryRegistry, ttl: Duration) -> Session<Driver> {
    Session::new(
        Driver {
            registry: registry.clone(),
            ttl,
        },
        BackoffOptions::default(),
    )
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_session_handle_closes_it_at_once() {
    let registry = MemoryRegistry::new("session-drop");
    let session = session_over(&registry, Duration::from_secs(60));
    let h = session.current().await.unwrap();
    assert_eq!(registry.sessions(), vec![h]);
    drop(session);
    // Closed by the drop, not by its 60 s timeout.
    wait_within(
        "the dropped session closed, not left to time out",
        Duration::from_secs(1),
        || registry.sessions().is_empty(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_late_report_about_an_old_session_leaves_the_new_one_alone() {
    let registry = MemoryRegistry::new("session-late");
    let session = session_over(&registry, Duration::from_secs(60));
    let first = session.current().await.unwrap();
    registry.expire_session(first);
    session.expired(&first);
    let second = session.current().await.unwrap();
    assert_ne!(first, second);
    // Another operation that used the first session reports it expired, late.
    session.expired(&first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        session.current_state().handle(),
        Some(second),
        "a stale expiry report replaced a live session"
    );
    assert_eq!(registry.sessions(), vec![second]);
}

#[tokio::test(start_paused = true)]
async fn per_id_locks_live_as_long_as_their_registration_or_leftover() {
    let registry = MemoryRegistry::new("locks");
    let keeper = keeper_over(&registry, Duration::from_secs(10));
    let a = keeper.register(inst("a")).await.unwrap();
    assert_eq!(keeper.locked_ids(), 1, "a registered id keeps its lock");
    a.deregister().await.unwrap();
    assert_eq!(
        keeper.locked_ids(),
        0,
        "a deregistered id's lock is forgotten"
    );
    // `b` is left pending (its reply was lost): its lock stays, others still go.
    registry.lose_replies(1);
    assert!(keeper.register(inst("b")).await.is_err());
    assert_eq!(keeper.locked_ids(), 1);
    let c = keeper.register(inst("c")).await.unwrap();
    assert_eq!(keeper.locked_ids(), 2);
    c.deregister().await.unwrap();
    assert_eq!(keeper.locked_ids(), 1, "only the pending id keeps its lock");
}

fn budgeted_keeper(
    registry: &MemoryRegistry,
    ttl: Duration,
) -> (Keeper<Driver, Budgeted>, Arc<Mutex<Vec<usize>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let keeper = Keeper::new(
        "memory",
        Session::new(
            Driver {
                registry: registry.clone(),
                ttl,
            },
            BackoffOptions::default(),
        ),
        Budgeted {
            inner: Store {
                registry: registry.clone(),
            },
            batches: batches.clone(),
            every: 1,
            rounds: Arc::default(),
        },
    );
    (keeper, batches)
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_entries_beyond_the_read_budget_are_registered_in_one_round() {
    let registry = MemoryRegistry::new("budget-outage");
    let ttl = Duration::from_secs(8);
    let (keeper, _) = budgeted_keeper(&registry, ttl);
    let mut regs = Vec::new();
    for n in 0..5 {
        regs.push(keeper.register(inst(&format!("i{n}"))).await.unwrap());
    }
    registry.set_reachable(false);
    for r in &regs {
        r.wait_status(ttl, |s| *s == crate::RegistrationStatus::Suspended)
            .await
            .unwrap();
    }
    registry.set_reachable(true);
    // Two are read back in the first round after the outage; the three others count as
    // held (their session is live again) in that same round: none waits for its turn in
    // the rotation (rounds are a quarter TTL, 2 s, apart).
    let registered =
        |r: &crate::Registration| r.current_status() == crate::RegistrationStatus::Registered;
    wait_until("the first round after the outage", || {
        regs.iter().any(registered)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let states: Vec<_> = regs.iter().map(|r| r.current_status()).collect();
    assert!(
        regs.iter().all(registered),
        "all Registered in the round that found the session live again: {states:?}"
    );
}

/// What `Flaky` inspections fail with, if they fail.
type Failure = Arc<Mutex<Option<fn() -> crate::Error>>>;

/// The memory store whose inspections can be made to fail.
#[derive(Debug)]
struct Flaky {
    inner: Store,
    fail: Failure,
}

#[async_trait]
impl RegistryStore for Flaky {
    type Handle = u64;

    async fn write(&self, s: &u64, i: &Instance, takeover: bool) -> Result<()> {
        self.inner.write(s, i, takeover).await
    }

    async fn inspect(&self, s: &u64, i: &Instance) -> Result<Presence> {
        let fail = *self.fail.lock().unwrap();
        match fail {
            Some(e) => Err(e()),
            None => self.inner.inspect(s, i).await,
        }
    }

    async fn delete(&self, s: &u64, i: &Instance) -> Result<()> {
        self.inner.delete(s, i).await
    }
}

fn flaky_keeper(registry: &MemoryRegistry) -> (Keeper<Driver, Flaky>, Failure) {
    let fail = Arc::new(Mutex::new(None));
    let keeper = Keeper::new(
        "memory",
        Session::new(
            Driver {
                registry: registry.clone(),
                ttl: Duration::from_secs(4),
            },
            BackoffOptions::default(),
        ),
        Flaky {
            inner: Store {
                registry: registry.clone(),
            },
            fail: fail.clone(),
        },
    );
    (keeper, fail)
}

async fn wait_until(what: &str, f: impl FnMut() -> bool) {
    wait_within(what, Duration::from_secs(30), f).await
}

/// Waits (on the paused clock, at most `limit`) until `f` holds.
async fn wait_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_leftover_survives_temporary_errors_and_is_removed_once_the_registry_answers() {
    let registry = MemoryRegistry::new("pending-temporary");
    let svc: ServiceName = "svc".parse().unwrap();
    let (keeper, fail) = flaky_keeper(&registry);
    let _a = keeper.register(inst("a")).await.unwrap();
    *fail.lock().unwrap() = Some(|| crate::Error::unavailable("inspections fail"));
    registry.lose_replies(1);
    assert!(keeper.register(inst("b")).await.is_err());
    // Several rounds whose inspections fail: the leftover is kept, not forgotten.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(keeper.pending_removals(), 1);
    assert!(registry.peek(&svc).get(&"b".parse().unwrap()).is_some());
    *fail.lock().unwrap() = None;
    wait_until("the leftover removed and confirmed gone", || {
        registry.peek(&svc).get(&"b".parse().unwrap()).is_none() && keeper.pending_removals() == 0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_leftover_is_given_up_on_an_error_retrying_cannot_fix() {
    let registry = MemoryRegistry::new("pending-permanent");
    let (keeper, fail) = flaky_keeper(&registry);
    registry.lose_replies(1);
    assert!(keeper.register(inst("b")).await.is_err());
    assert_eq!(keeper.pending_removals(), 1);
    *fail.lock().unwrap() = Some(|| crate::Error::Unauthorized {
        message: "no permission".into(),
        source: None,
    });
    let _a = keeper.register(inst("a")).await.unwrap();
    wait_until("the leftover given up", || keeper.pending_removals() == 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_leftover_of_an_expired_session_is_dropped_with_it() {
    let registry = MemoryRegistry::new("pending-expired");
    let (keeper, fail) = flaky_keeper(&registry);
    let _a = keeper.register(inst("a")).await.unwrap();
    let first = keeper.session().current_state().handle().unwrap();
    // Rounds under the first session cannot settle `b` (inspections fail).
    *fail.lock().unwrap() = Some(|| crate::Error::unavailable("inspections fail"));
    registry.lose_replies(1);
    assert!(keeper.register(inst("b")).await.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(keeper.pending_removals(), 1);
    // The session expires: the registry drops `b` with it. The leftover, bound to that
    // session, has nothing left to remove under the next one.
    registry.expire_session(first);
    *fail.lock().unwrap() = None;
    next_session(&keeper, first).await;
    // Dropped at the next round, not looked for through its window (12 s from the failure):
    // its entry went with its session.
    wait_within(
        "the leftover of an ended session dropped",
        Duration::from_secs(2),
        || keeper.pending_removals() == 0,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn reading_back_every_third_round_reads_a_third_as_often_and_still_heals() {
    let registry = MemoryRegistry::new("every-third");
    let ttl = Duration::from_secs(4);
    let (batches, rounds) = (Arc::new(Mutex::new(Vec::new())), Arc::default());
    let keeper = Keeper::new(
        "memory",
        session_over(&registry, ttl),
        Budgeted {
            inner: Store {
                registry: registry.clone(),
            },
            batches: batches.clone(),
            every: 3,
            rounds: Arc::clone(&rounds),
        },
    );
    let svc: ServiceName = "svc".parse().unwrap();
    let regs = [
        keeper.register(inst("a")).await.unwrap(),
        keeper.register(inst("b")).await.unwrap(),
    ];
    // Thirty rounds of a quarter TTL: a read-back in every third (rounds 0, 3, 6, ...).
    tokio::time::sleep(ttl * 30 / 4).await;
    let (asked, reads) = {
        let rounds = rounds.lock().unwrap();
        let reads = rounds.iter().filter(|r| r.is_multiple_of(3)).count();
        (rounds.len(), reads)
    };
    let batches = batches.lock().unwrap().len();
    assert!(asked >= 28, "only {asked} rounds in thirty intervals");
    assert_eq!(
        keeper.rounds(),
        asked as u64,
        "the keeper counts its rounds"
    );
    assert!(
        batches + 1 >= reads && batches <= reads,
        "{batches} read-backs for {reads} reading rounds of {asked}"
    );
    // A foreign delete is healed by the next reading round: within three intervals.
    assert!(registry.delete_foreign(&svc, "a"));
    let deadline = tokio::time::Instant::now() + ttl * 3 / 4 + Duration::from_millis(500);
    while registry.peek(&svc).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not healed within three rounds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in &regs {
        assert_eq!(r.current_status(), crate::RegistrationStatus::Registered);
    }
}

/// The memory store whose next write is held back: it fails with an unknown outcome and
/// lands only when the test plays it, as a request a paused registry applies late.
#[derive(Debug, Default)]
struct Late {
    inner: Option<Store>,
    hold_next: Mutex<bool>,
    held: Mutex<Option<(u64, Instance)>>,
    /// Inspections of a held write's id.
    looked: Mutex<usize>,
    /// What [`RegistryStore::entries_outlive_session`] answers.
    outlive: bool,
}

#[async_trait]
impl RegistryStore for Arc<Late> {
    type Handle = u64;

    async fn write(&self, s: &u64, i: &Instance, takeover: bool) -> Result<()> {
        if std::mem::take(&mut *self.hold_next.lock().unwrap()) {
            *self.held.lock().unwrap() = Some((*s, i.clone()));
            return Err(crate::Error::unavailable("the reply never came"));
        }
        self.inner.as_ref().unwrap().write(s, i, takeover).await
    }

    async fn inspect(&self, s: &u64, i: &Instance) -> Result<Presence> {
        if self
            .held
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(_, h)| h.id == i.id)
        {
            *self.looked.lock().unwrap() += 1;
        }
        self.inner.as_ref().unwrap().inspect(s, i).await
    }

    async fn delete(&self, s: &u64, i: &Instance) -> Result<()> {
        self.inner.as_ref().unwrap().delete(s, i).await
    }

    fn entries_outlive_session(&self) -> bool {
        self.outlive
    }
}

/// A keeper over `driver` whose store can hold a write back.
fn late_keeper<D: SessionDriver<Handle = u64>>(
    registry: &MemoryRegistry,
    driver: D,
) -> (Keeper<D, Arc<Late>>, Arc<Late>) {
    late_keeper_with(registry, driver, false)
}

fn late_keeper_with<D: SessionDriver<Handle = u64>>(
    registry: &MemoryRegistry,
    driver: D,
    outlive: bool,
) -> (Keeper<D, Arc<Late>>, Arc<Late>) {
    let store = Arc::new(Late {
        inner: Some(Store {
            registry: registry.clone(),
        }),
        outlive,
        ..Late::default()
    });
    let session = Session::new(driver, BackoffOptions::default());
    (Keeper::new("memory", session, store.clone()), store)
}

#[tokio::test(start_paused = true)]
async fn a_write_that_lands_after_it_was_found_absent_is_removed_within_the_window() {
    let registry = MemoryRegistry::new("late");
    let svc: ServiceName = "svc".parse().unwrap();
    let ttl = Duration::from_secs(4);
    let driver = Driver {
        registry: registry.clone(),
        ttl,
    };
    let (keeper, store) = late_keeper(&registry, driver);
    let _a = keeper.register(inst("a")).await.unwrap();
    *store.hold_next.lock().unwrap() = true;
    let failed_at = tokio::time::Instant::now();
    assert!(keeper.register(inst("b")).await.is_err());
    // The keeper looks and finds nothing (the write has not landed)...
    wait_until("`b` found absent twice", || {
        *store.looked.lock().unwrap() >= 2
    })
    .await;
    assert_eq!(keeper.pending_removals(), 1, "dropped once found absent");
    // ...then the registry applies it, late.
    let (s, b) = store.held.lock().unwrap().clone().unwrap();
    store
        .inner
        .as_ref()
        .unwrap()
        .write(&s, &b, false)
        .await
        .unwrap();
    wait_until("the late write removed", || {
        registry.peek(&svc).get(&b.id).is_none()
    })
    .await;
    assert!(registry.peek(&svc).get(&"a".parse().unwrap()).is_some());
    // Looked for until the window closes, then forgotten.
    let window = ttl * crate::backend::UNCERTAIN_FOR;
    wait_until("the window closed", || keeper.pending_removals() == 0).await;
    let after = failed_at.elapsed();
    assert!(
        after >= window && after < window + ttl,
        "forgotten after {after:?}: the window is {window:?}"
    );
}

/// The memory driver with no session bound: the keeper counts in keep-alive intervals.
#[derive(Clone, Debug)]
struct Unbounded(Driver);

#[async_trait]
impl SessionDriver for Unbounded {
    type Handle = u64;

    async fn open(&self) -> Result<u64> {
        self.0.open().await
    }

    async fn keep_alive(&self, h: &u64) -> Result<()> {
        self.0.keep_alive(h).await
    }

    async fn close(&self, h: &u64) -> Result<()> {
        self.0.close(h).await
    }

    fn interval(&self) -> Duration {
        self.0.interval()
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_session_bound_an_unknown_write_is_looked_for_nine_intervals() {
    let registry = MemoryRegistry::new("late-unbounded");
    let driver = Unbounded(Driver {
        registry: registry.clone(),
        ttl: Duration::from_secs(4),
    });
    let interval = driver.interval();
    let (keeper, store) = late_keeper(&registry, driver);
    let _a = keeper.register(inst("a")).await.unwrap();
    *store.hold_next.lock().unwrap() = true;
    let failed_at = tokio::time::Instant::now();
    assert!(keeper.register(inst("b")).await.is_err());
    wait_until("`b` forgotten", || keeper.pending_removals() == 0).await;
    let after = failed_at.elapsed();
    assert!(
        after >= interval * 9 && after < interval * 11,
        "forgotten after {after:?}: the window is 9 intervals of {interval:?}"
    );
}

fn memory_driver(registry: &MemoryRegistry) -> Driver {
    Driver {
        registry: registry.clone(),
        ttl: Duration::from_secs(4),
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_with_an_unknown_outcome_then_a_deregistration_is_still_looked_for() {
    let registry = MemoryRegistry::new("late-update");
    let svc: ServiceName = "svc".parse().unwrap();
    let (keeper, store) = late_keeper(&registry, memory_driver(&registry));
    let _anchor = keeper.register(inst("anchor")).await.unwrap();
    let mut a = keeper.register(inst("a")).await.unwrap();
    *store.hold_next.lock().unwrap() = true;
    let moved = Instance::parse("svc", "a", "h", 2).unwrap();
    assert!(
        a.update(moved).await.is_err(),
        "the update's reply never came"
    );
    a.deregister().await.unwrap();
    assert!(registry.peek(&svc).get(&"a".parse().unwrap()).is_none());
    // Looked for after the deregistration, so the update landing late is removed.
    play_late_and_see_it_removed(&registry, &store, None).await;
}

#[tokio::test(start_paused = true)]
async fn where_entries_outlive_the_session_a_leftover_is_looked_for_in_the_next_one() {
    let registry = MemoryRegistry::new("late-outlive");
    let (keeper, store) = late_keeper_with(&registry, memory_driver(&registry), true);
    let _anchor = keeper.register(inst("anchor")).await.unwrap();
    let first = keeper.session().current_state().handle().unwrap();
    *store.hold_next.lock().unwrap() = true;
    assert!(keeper.register(inst("b")).await.is_err());
    // The session ends ...
    registry.expire_session(first);
    let next = next_session(&keeper, first).await;
    // ... and the registry, which keeps entries across sessions, applies the write late.
    play_late_and_see_it_removed(&registry, &store, Some(next)).await;
}

/// Waits until the keeper looked for the held write twice (counted from now), applies it
/// under `session` (the one it was sent under if `None`), and waits until the keeper
/// removed it; `anchor` stays.
async fn play_late_and_see_it_removed(
    registry: &MemoryRegistry,
    store: &Late,
    session: Option<u64>,
) {
    let svc: ServiceName = "svc".parse().unwrap();
    *store.looked.lock().unwrap() = 0;
    wait_until("the held write looked for twice", || {
        *store.looked.lock().unwrap() >= 2
    })
    .await;
    let (sent, late) = store.held.lock().unwrap().clone().unwrap();
    let inner = store.inner.as_ref().unwrap();
    inner
        .write(&session.unwrap_or(sent), &late, false)
        .await
        .unwrap();
    wait_until("the late write removed", || {
        registry.peek(&svc).get(&late.id).is_none()
    })
    .await;
    let anchor = "anchor".parse().unwrap();
    assert!(
        registry.peek(&svc).get(&anchor).is_some(),
        "the anchor went missing"
    );
}

/// Waits until the keeper's session is another than `first`; returns it.
async fn next_session<S: RegistryStore<Handle = u64>>(
    keeper: &Keeper<Driver, S>,
    first: u64,
) -> u64 {
    let handle = || keeper.session().current_state().handle();
    wait_until("a new session", || handle().is_some_and(|h| h != first)).await;
    handle().unwrap()
}
