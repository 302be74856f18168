//! Locks and elections against etcd's own client: `etcdctl lock` and `etcdctl elect`
//! (Go's `concurrency.Mutex` and `Election`) on the same names as waypost, both ways.
//! Mutual exclusion holds between a native holder and ours, tokens keep rising across
//! them, and each sees the other's leader.

mod common;

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use waypost_core::backend::Event;
use waypost_core::coord::Name;
use waypost_core::Error;
use waypost_testkit::conformance::Namespace;

const T: Duration = Duration::from_secs(15);

/// A running `etcdctl`, its standard output as lines.
struct Native {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    what: String,
}

impl Native {
    fn spawn(endpoint: &str, args: &[&str]) -> Self {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoint)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run etcdctl");
        let out = child.stdout.take().expect("etcdctl stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(l)) = out.next_line().await {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            what: format!("etcdctl {args:?}"),
        }
    }

    /// The next line it prints, within `T`.
    async fn line(&mut self) -> String {
        match timeout(T, self.lines.recv()).await {
            Ok(Some(l)) => l,
            Ok(None) => panic!("{}: exited without printing", self.what),
            Err(_) => panic!("{}: printed nothing within {T:?}", self.what),
        }
    }

    /// Whether it printed anything not yet read.
    fn printed(&mut self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// SIGTERM: `etcdctl lock` unlocks, `etcdctl elect` resigns, then it exits.
    async fn stop(mut self) {
        let pid = self.child.id().expect("etcdctl runs").to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(killed.success(), "kill -TERM {pid}");
        self.exited().await;
    }

    async fn exited(&mut self) {
        timeout(T, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: still running after {T:?}", self.what))
            .expect("etcdctl waited for");
    }
}

/// Contender keys under `prefix/` (keys only).
async fn contenders(admin: &mut etcd_client::Client, prefix: &str) -> Vec<etcd_client::KeyValue> {
    let opts = etcd_client::GetOptions::new().with_prefix();
    let mut r = admin
        .get(format!("{prefix}/"), Some(opts))
        .await
        .expect("list contenders");
    r.take_kvs()
}

async fn contenders_become(admin: &mut etcd_client::Client, prefix: &str, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let got = contenders(admin, prefix).await.len();
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: {got} contenders, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup() -> Option<(
    waypost_testkit::EtcdServer,
    waypost_etcd::EtcdDiscovery,
    etcd_client::Client,
)> {
    common::init_tracing();
    let server = waypost_testkit::server::etcd().await?;
    let d = common::connect(&server.url()).await;
    let admin = common::admin(&[server.endpoint()]).await;
    Some((server, d, admin))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_lock_holder_excludes_ours_until_it_unlocks() {
    let Some((server, d, mut admin)) = setup().await else {
        return;
    };
    let coord = d.coordinator();
    let name: Name = Namespace::new().config_key("native-first");
    let path = format!("/coord/{name}");
    let native = {
        let mut n = Native::spawn(&server.endpoint(), &["lock", &path]);
        let key = n.line().await;
        assert!(key.starts_with(&format!("{path}/")), "etcdctl holds {key}");
        n
    };
    let native_rev = contenders(&mut admin, &path).await[0].create_revision();
    match coord.try_lock(&name).await {
        Err(Error::Busy { .. }) => {}
        other => panic!("try_lock while etcdctl holds: {other:?}"),
    }
    contenders_become(&mut admin, &path, 1).await; // try_lock left the queue
    let waiter = tokio::spawn({
        let (coord, name) = (coord.clone(), name.clone());
        async move { coord.lock(&name).await }
    });
    contenders_become(&mut admin, &path, 2).await;
    assert!(!waiter.is_finished(), "ours acquired while etcdctl holds");
    native.stop().await;
    let guard = timeout(T, waiter)
        .await
        .expect("ours acquires once etcdctl unlocked")
        .unwrap()
        .expect("lock");
    assert!(
        guard.token().0 > native_rev as u64,
        "tokens rise across holders"
    );
    // Our key is Go's: `{name}/{lease hex}`, empty, bound to our lease.
    let kvs = contenders(&mut admin, &path).await;
    let lease = d.lease_id().expect("a lease");
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].key_str().unwrap(), format!("{path}/{lease:x}"));
    assert_eq!((kvs[0].value(), kvs[0].lease()), (&b""[..], lease));
    assert_eq!(kvs[0].create_revision() as u64, guard.token().0);
    guard.release().await.expect("release");
    contenders_become(&mut admin, &path, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_lock_holder_excludes_etcdctl_until_released() {
    let Some((server, d, mut admin)) = setup().await else {
        return;
    };
    let coord = d.coordinator();
    let ns = Namespace::new();
    let name: Name = ns.config_key("ours-first");
    let path = format!("/coord/{name}");
    let guard = coord.lock(&name).await.expect("lock");
    // The native holder prints, then holds until the flag file exists.
    let flag = std::env::temp_dir().join(format!("waypost-etcd-lock-{}", ns.prefix()));
    let flag = flag.to_str().unwrap().to_string();
    let script = r#"echo ACQUIRED $ETCD_LOCK_REV; while [ ! -e "$0" ]; do sleep 0.05; done"#;
    let mut native = Native::spawn(
        &server.endpoint(),
        &["lock", &path, "--", "sh", "-c", script, &flag],
    );
    contenders_become(&mut admin, &path, 2).await;
    assert_eq!(native.printed(), None, "etcdctl acquired while we hold");
    let ours = guard.token().0;
    guard.release().await.expect("release");
    let line = native.line().await;
    let rev: u64 = line
        .strip_prefix("ACQUIRED ")
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("etcdctl printed {line:?}"));
    assert!(rev > ours, "etcdctl's token {rev} is above ours {ours}");
    // etcdctl holds now: ours is busy, then waits until it let go.
    match coord.try_lock(&name).await {
        Err(Error::Busy { .. }) => {}
        other => panic!("try_lock while etcdctl holds: {other:?}"),
    }
    let waiter = tokio::spawn({
        let (coord, name) = (coord.clone(), name.clone());
        async move { coord.lock(&name).await }
    });
    contenders_become(&mut admin, &path, 2).await;
    assert!(!waiter.is_finished(), "ours acquired while etcdctl holds");
    std::fs::write(&flag, b"").unwrap();
    native.exited().await;
    let _ = std::fs::remove_file(&flag);
    let g = timeout(T, waiter)
        .await
        .expect("ours acquires once etcdctl let go")
        .unwrap()
        .expect("lock");
    assert!(
        g.token().0 > rev,
        "our token {} is above etcdctl's {rev}",
        g.token()
    );
    g.release().await.expect("release");
    contenders_become(&mut admin, &path, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_with_etcdctl_elect_both_ways() {
    let Some((server, d, mut admin)) = setup().await else {
        return;
    };
    let coord = d.coordinator();
    let e: Name = Namespace::new().config_key("election");
    let path = format!("/coord/{e}");
    let ep = server.endpoint();
    let mut observer = Native::spawn(&ep, &["elect", "-l", &path]);
    let mut ours_observed = coord.observe(&e);
    match timeout(T, ours_observed.next()).await.expect("a snapshot") {
        Some(Ok(Event::Snapshot(l, _))) => assert!(l.is_empty(), "{l:?}"),
        other => panic!("observe: {other:?}"),
    }

    // A native leader: seen by ours, and ours queues behind it.
    let mut native = Native::spawn(&ep, &["elect", &path, "native-1"]);
    let native_key = native.line().await;
    assert_eq!(native.line().await, "native-1");
    let leader = coord.leader(&e).await.unwrap().expect("a leader");
    assert_eq!(leader.value, b"native-1");
    let native_rev = contenders(&mut admin, &path).await[0].create_revision() as u64;
    assert_eq!(leader.token.0, native_rev);
    assert_eq!(
        (observer.line().await, observer.line().await),
        (native_key, "native-1".into())
    );
    let campaign = tokio::spawn({
        let (coord, e) = (coord.clone(), e.clone());
        async move { coord.campaign(&e, b"ours".to_vec()).await }
    });
    contenders_become(&mut admin, &path, 2).await;
    assert!(!campaign.is_finished(), "elected while etcdctl leads");
    native.stop().await;
    let leadership = timeout(T, campaign)
        .await
        .expect("elected once etcdctl resigned")
        .unwrap()
        .expect("campaign");
    assert!(leadership.token().0 > native_rev);
    let our_key = format!("{path}/{:x}", d.lease_id().unwrap());
    assert_eq!(
        (observer.line().await, observer.line().await),
        (our_key.clone(), "ours".into())
    );

    // Ours leads: a native candidate waits, and sees our proclaimed value.
    let mut native = Native::spawn(&ep, &["elect", &path, "native-2"]);
    contenders_become(&mut admin, &path, 2).await;
    leadership
        .proclaim(b"ours-2".to_vec())
        .await
        .expect("proclaim");
    assert_eq!(
        (observer.line().await, observer.line().await),
        (our_key, "ours-2".into())
    );
    assert_eq!(native.printed(), None, "etcdctl elected while we lead");
    leadership.resign().await.expect("resign");
    let _key = native.line().await;
    assert_eq!(native.line().await, "native-2");
    let leader = coord.leader(&e).await.unwrap().expect("a leader");
    assert_eq!(leader.value, b"native-2");
    // Our observer saw every leader, ending with the native one.
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    while seen.last().map(Vec::as_slice) != Some(&b"native-2"[..]) {
        let ev = timeout(deadline - Instant::now(), ours_observed.next())
            .await
            .unwrap_or_else(|_| panic!("observe saw {seen:?}"));
        match ev {
            Some(Ok(Event::Added(l, _) | Event::Updated(l, _))) => seen.push(l.value),
            Some(Ok(Event::Removed(..))) => {}
            other => panic!("observe: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(
        seen.first().map(Vec::as_slice),
        Some(&b"native-1"[..]),
        "{seen:?}"
    );
    assert!(seen.iter().any(|v| v == b"ours-2"), "{seen:?}");
    native.stop().await;
    observer.child.kill().await.expect("stop the observer");
}
