//! The watch machine against scripted feeds.

use std::time::Duration;

use super::*;
use std::sync::Mutex;

/// A scripted feed: each call pops the next answer.
struct Script {
    lists: Arc<Mutex<VecDeque<Result<Listing<Instance>>>>>,
    nexts: Arc<Mutex<VecDeque<Result<Next<Instance>>>>>,
}

#[async_trait]
impl Feed for Script {
    type Item = Instance;
    async fn list(&mut self) -> Result<Listing<Instance>> {
        let next = self.lists.lock().unwrap().pop_front();
        match next {
            Some(r) => r,
            None => futures::future::pending().await,
        }
    }
    async fn next(&mut self, _after: Revision) -> Result<Next<Instance>> {
        let next = self.nexts.lock().unwrap().pop_front();
        match next {
            Some(r) => r,
            None => futures::future::pending().await,
        }
    }
    fn is_canonical(&self, key: &str, item: &Instance) -> bool {
        key == format!("/s/{}", item.id)
    }
}

fn inst(id: &str, port: u16) -> Instance {
    Instance::parse("s", id, "h", port).unwrap()
}

fn entry(key: &str, i: Instance) -> Entry<Instance> {
    Entry {
        key: key.into(),
        item: i,
    }
}

fn put(key: &str, i: Instance, revision: Revision) -> Change<Instance> {
    Change::Put {
        key: key.into(),
        item: Some(i),
        revision,
    }
}

async fn take(s: &mut BoxStream<'static, Result<WatchEvent>>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(30), s.next())
            .await
            .expect("event in time")
            .expect("stream open");
        out.push(match ev {
            Ok(WatchEvent::Snapshot(s)) => format!("snapshot{:?}", ports(&s)),
            Ok(WatchEvent::Resynced(s)) => format!("resynced{:?}", ports(&s)),
            Ok(WatchEvent::Added { instance, revision }) => {
                format!("+{}:{}@{revision}", instance.id, instance.endpoint.port)
            }
            Ok(WatchEvent::Updated { instance, revision }) => {
                format!("~{}:{}@{revision}", instance.id, instance.endpoint.port)
            }
            Ok(WatchEvent::Removed { id, revision }) => format!("-{id}@{revision}"),
            Ok(WatchEvent::Stale { .. }) => "stale".into(),
            Err(e) => format!("err {e}"),
        });
    }
    out
}

fn ports(s: &Snapshot) -> Vec<String> {
    s.instances
        .iter()
        .map(|i| format!("{}:{}", i.id, i.endpoint.port))
        .collect()
}

fn run(
    lists: Vec<Result<Listing<Instance>>>,
    nexts: Vec<Result<Next<Instance>>>,
) -> BoxStream<'static, Result<WatchEvent>> {
    run_with(lists, nexts, BackoffOptions::default())
}

fn run_with(
    lists: Vec<Result<Listing<Instance>>>,
    nexts: Vec<Result<Next<Instance>>>,
    backoff: BackoffOptions,
) -> BoxStream<'static, Result<WatchEvent>> {
    let feed = Script {
        lists: Arc::new(Mutex::new(lists.into())),
        nexts: Arc::new(Mutex::new(nexts.into())),
    };
    watch_instances(feed, &backoff, &"s".parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_registry_without_revisions_still_delivers_changes() {
    // Revision 0 everywhere: nothing is taken for a repeat.
    let mut s = run(
        vec![Ok(Listing {
            entries: vec![],
            revision: 0,
        })],
        vec![Ok(Next::Changes(vec![put("/s/a", inst("a", 1), 0)]))],
    );
    assert_eq!(take(&mut s, 2).await, ["snapshot[]", "+a:1@0"]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_registry_is_retried_after_a_backoff_not_at_once() {
    let second = Duration::from_secs(1);
    let mut s = run_with(
        vec![
            Ok(Listing {
                entries: vec![],
                revision: 1,
            }),
            Ok(Listing {
                entries: vec![],
                revision: 2,
            }),
        ],
        vec![Err(Error::unavailable("lost"))],
        BackoffOptions::new(second, second),
    );
    assert_eq!(take(&mut s, 2).await, ["snapshot[]", "stale"]);
    let stale_at = tokio::time::Instant::now();
    assert_eq!(take(&mut s, 1).await, ["resynced[]"]);
    // Jittered between half and all of the 1 s bound.
    let waited = stale_at.elapsed();
    assert!(waited >= second / 2 && waited <= second, "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn snapshot_first_then_changes_without_repeats() {
    let mut s = run(
        vec![Ok(Listing {
            entries: vec![entry("/s/a", inst("a", 1))],
            revision: 5,
        })],
        vec![Ok(Next::Changes(vec![
            put("/s/a", inst("a", 7), 4), // below the listing (a repeat): ignored
            put("/s/a", inst("a", 8), 5), // at the listing: ignored
            put("/s/b", inst("b", 1), 6),
            put("/s/b", inst("b", 1), 7), // same value: nothing to report
            put("/s/b", inst("b", 2), 8),
            Change::Delete {
                key: "/s/a".into(),
                revision: 9,
            },
        ]))],
    );
    assert_eq!(
        take(&mut s, 4).await,
        ["snapshot[\"a:1\"]", "+b:1@6", "~b:2@8", "-a@9"]
    );
}

#[tokio::test(start_paused = true)]
async fn failures_are_stale_once_then_resynced_and_fatal_errors_end_the_stream() {
    let mut s = run(
        vec![
            Err(Error::unavailable("down before the first snapshot")),
            Ok(Listing {
                entries: vec![entry("/s/a", inst("a", 1))],
                revision: 1,
            }),
            Err(Error::unavailable("still down")),
            Err(Error::unavailable("still down")),
            Ok(Listing {
                entries: vec![],
                revision: 3,
            }),
        ],
        vec![
            Err(Error::unavailable("lost")),
            Err(Error::Unauthorized {
                message: "revoked".into(),
                source: None,
            }),
        ],
    );
    let got = take(&mut s, 4).await;
    assert_eq!(got[..3], ["snapshot[\"a:1\"]", "stale", "resynced[]"]);
    assert!(got[3].starts_with("err unauthorized"), "{got:?}");
    assert!(
        s.next().await.is_none(),
        "the stream ends after a fatal error"
    );
}

#[tokio::test(start_paused = true)]
async fn one_entry_per_id_ours_wins_and_removal_reexposes_the_other() {
    let mut s = run(
        vec![Ok(Listing {
            entries: vec![
                entry("/s/zz-foreign", inst("a", 9)),
                entry("/s/a", inst("a", 1)),
            ],
            revision: 1,
        })],
        vec![
            Ok(Next::Changes(vec![Change::Delete {
                key: "/s/a".into(),
                revision: 2,
            }])),
            Ok(Next::Changes(vec![put("/s/a", inst("a", 1), 3)])),
            Ok(Next::Changes(vec![Change::Put {
                key: "/s/zz-foreign".into(),
                item: None,
                revision: 4,
            }])),
            Ok(Next::Listing(Listing {
                entries: vec![entry("/s/x", inst("a", 7)), entry("/s/y", inst("a", 8))],
                revision: 10,
            })),
        ],
    );
    assert_eq!(
        take(&mut s, 4).await,
        ["snapshot[\"a:1\"]", "~a:9@2", "~a:1@3", "~a:7@10"]
    );
}

#[tokio::test]
async fn resolve_lists_an_id_once() {
    let feed = Script {
        lists: Default::default(),
        nexts: Default::default(),
    };
    let snap = snapshot(
        &feed,
        &"s".parse().unwrap(),
        Listing {
            entries: vec![
                entry("/s/b-foreign", inst("a", 2)),
                entry("/s/a-foreign", inst("a", 3)),
            ],
            revision: 4,
        },
    );
    assert_eq!(
        ports(&snap),
        ["a:3"],
        "the smallest key wins among foreign ones"
    );
}

mod shared {
    use super::*;
    use crate::memory::MemoryRegistry;
    use crate::{InstanceSet, Registrar, Watcher};

    async fn first(s: &mut BoxStream<'static, Result<WatchEvent>>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("no error")
    }

    async fn wait_watches(registry: &MemoryRegistry, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while registry.open_watches() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the registry serves {} watches, expected {n}",
                registry.open_watches()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn local_watchers_share_one_registry_watch_and_late_ones_get_a_snapshot() {
        let registry = MemoryRegistry::new("hub-share");
        let client = registry.client(Duration::from_secs(10));
        let svc: ServiceName = "s".parse().unwrap();
        let _a = client.register(inst("a", 1)).await.unwrap();
        let mut watches: Vec<_> = (0..10).map(|_| client.watch(&svc)).collect();
        for w in &mut watches {
            assert!(matches!(first(w).await, WatchEvent::Snapshot(s) if s.len() == 1));
        }
        wait_watches(&registry, 1).await;
        let _b = client.register(inst("b", 2)).await.unwrap();
        for w in &mut watches {
            assert!(
                matches!(first(w).await, WatchEvent::Added { instance, .. } if instance.id.as_str() == "b")
            );
        }
        // A late watcher starts with the set as it stands, then follows.
        let mut late = client.watch(&svc);
        assert!(matches!(first(&mut late).await, WatchEvent::Snapshot(s) if s.len() == 2));
        drop(_a);
        assert!(
            matches!(first(&mut late).await, WatchEvent::Removed { id, .. } if id.as_str() == "a")
        );
        assert_eq!(registry.open_watches(), 1, "still one registry watch");
        // Another client is another process: its own registry watch.
        let other = registry.client(Duration::from_secs(10));
        let mut theirs = other.watch(&svc);
        first(&mut theirs).await;
        wait_watches(&registry, 2).await;
        // The last local watcher gone, the registry watch goes.
        drop(watches);
        drop(late);
        wait_watches(&registry, 1).await;
    }

    #[tokio::test]
    async fn a_watcher_that_joins_during_an_outage_gets_the_last_set_then_stale() {
        let registry = MemoryRegistry::new("hub-outage");
        let client = registry.client(Duration::from_secs(10));
        let svc: ServiceName = "s".parse().unwrap();
        let _a = client.register(inst("a", 1)).await.unwrap();
        let mut w1 = client.watch(&svc);
        first(&mut w1).await;
        registry.set_reachable(false);
        assert!(matches!(first(&mut w1).await, WatchEvent::Stale { .. }));
        let mut w2 = client.watch(&svc);
        assert!(matches!(first(&mut w2).await, WatchEvent::Snapshot(s) if s.len() == 1));
        assert!(matches!(first(&mut w2).await, WatchEvent::Stale { .. }));
        registry.set_reachable(true);
        for w in [&mut w1, &mut w2] {
            assert!(matches!(first(w).await, WatchEvent::Resynced(s) if s.len() == 1));
        }
    }

    #[tokio::test]
    async fn a_slow_watcher_is_resynced_not_cut_off() {
        let registry = MemoryRegistry::new("hub-lag");
        let client = registry.client(Duration::from_secs(60));
        let svc: ServiceName = "s".parse().unwrap();
        let mut fast = client.watch(&svc);
        let mut slow = client.watch(&svc);
        first(&mut fast).await;
        first(&mut slow).await;
        let mut regs = Vec::new();
        for i in 0..1500 {
            regs.push(client.register(inst(&format!("i{i:04}"), 1)).await.unwrap());
        }
        let mut set = InstanceSet::new();
        while set.len() < 1500 {
            set.apply(&first(&mut fast).await);
        }
        // `slow` read nothing meanwhile: it is told it missed events, then gets the set.
        assert!(matches!(first(&mut slow).await, WatchEvent::Stale { .. }));
        assert!(matches!(first(&mut slow).await, WatchEvent::Resynced(s) if s.len() == 1500));
        regs.truncate(1499);
        assert!(
            matches!(first(&mut slow).await, WatchEvent::Removed { id, .. } if id.as_str() == "i1499")
        );
    }

    #[tokio::test]
    async fn an_error_that_ends_the_watch_reaches_every_watcher_and_the_next_watch_starts_afresh() {
        let hub: WatchHub<&'static str, Instance> = WatchHub::new();
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = |starts: Arc<std::sync::atomic::AtomicUsize>| {
            move || {
                starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                futures::stream::iter([
                    Ok(Event::Snapshot(vec![inst("a", 1)], 1)),
                    Err(crate::Error::Unauthorized {
                        message: "token revoked".into(),
                        source: None,
                    }),
                ])
                .chain(futures::stream::pending())
                .boxed()
            }
        };
        let mut w1 = hub.watch("k", start(starts.clone()));
        assert!(matches!(w1.next().await, Some(Ok(Event::Snapshot(..)))));
        let e = w1.next().await.unwrap().unwrap_err();
        assert!(
            matches!(&e, crate::Error::Unauthorized { message, .. } if message == "token revoked"),
            "{e}"
        );
        assert!(w1.next().await.is_none(), "the stream ends after the error");
        // A watcher joining a failed watch: a new one is started.
        let mut w2 = hub.watch("k", start(starts.clone()));
        assert!(matches!(w2.next().await, Some(Ok(Event::Snapshot(..)))));
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_after_an_outage_is_told_stale_again() {
        let registry = MemoryRegistry::new("hub-lag-after-outage");
        let client = registry.client(Duration::from_secs(60));
        let svc: ServiceName = "s".parse().unwrap();
        let mut fast = client.watch(&svc);
        let mut slow = client.watch(&svc);
        first(&mut fast).await;
        first(&mut slow).await;
        registry.set_reachable(false);
        for w in [&mut fast, &mut slow] {
            assert!(matches!(first(w).await, WatchEvent::Stale { .. }));
        }
        registry.set_reachable(true);
        for w in [&mut fast, &mut slow] {
            assert!(matches!(first(w).await, WatchEvent::Resynced(_)));
        }
        // Live again; now `slow` falls more than 1,024 events behind.
        let mut regs = Vec::new();
        for i in 0..1500 {
            regs.push(client.register(inst(&format!("i{i:04}"), 1)).await.unwrap());
        }
        // (`fast` may fall behind too while the registrations run: it converges either way.)
        let mut set = crate::InstanceSet::new();
        while set.len() < 1500 {
            set.apply(&first(&mut fast).await);
        }
        assert!(
            matches!(first(&mut slow).await, WatchEvent::Stale { .. }),
            "a new outage for this watcher: Stale before its Resynced"
        );
        assert!(matches!(first(&mut slow).await, WatchEvent::Resynced(s) if s.len() == 1500));
    }
}
