//! Locks and elections against Consul's own `consul lock` (`api.Lock`) on the same key,
//! both ways, and what is Consul-specific: keys that are not locks, semaphores.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use waypost_consul::{ConsulConfig, ConsulDiscovery};
use waypost_core::coord::{Name, Wait};
use waypost_core::Error;
use waypost_testkit::conformance::Namespace;
use waypost_testkit::ConsulServer;

const T: Duration = Duration::from_secs(15);

async fn client(server: &ConsulServer) -> ConsulDiscovery {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = ConsulConfig::from_url(&server.url())
        .unwrap()
        .with_request_timeout(Duration::from_secs(3));
    ConsulDiscovery::connect(config).await.expect("connect")
}

/// `consul lock coord/{name}` running a child that prints `ACQUIRED` and waits for a
/// line on its stdin. (`consul lock` 1.8 relays its child's output through its UI,
/// which turns the first line into an empty one: the child prints `START` first.)
struct Native {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Native {
    fn spawn(server: &ConsulServer, name: &Name, timeout: Option<&str>) -> Self {
        let mut cmd = Command::new("consul");
        cmd.arg("lock")
            .arg(format!("-http-addr={}", server.address()))
            .arg("-pass-stdin");
        if let Some(t) = timeout {
            cmd.arg(format!("-timeout={t}"));
        }
        cmd.arg(format!("coord/{name}"))
            .args([
                "sh",
                "-c",
                "echo START; echo ACQUIRED; read line; echo RELEASING",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("run consul lock");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// The next non-empty line the child printed, or `None` once `consul lock` exited.
    async fn line(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .expect("consul lock said something in time")
                .expect("read consul lock's output");
            match line.as_deref() {
                Some("") | Some("START") => continue,
                _ => return line,
            }
        }
    }

    async fn acquired(&mut self) {
        assert_eq!(self.line(T).await.as_deref(), Some("ACQUIRED"));
    }

    /// Lets the child end: `consul lock` releases and exits.
    async fn release(mut self) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        drop(stdin);
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .expect("consul lock exited in time")
            .unwrap();
        assert!(status.success(), "consul lock: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_holder_excludes_us_until_it_releases() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let name = Namespace::new().config_key("native-first");
    let ours = client(&server).await;
    let coord = ours.coordinator();
    let mut native = Native::spawn(&server, &name, None);
    native.acquired().await;

    match coord.try_lock(&name).await {
        Err(Error::Busy { .. }) => {}
        other => panic!("try_lock on a lock `consul lock` holds: {other:?}"),
    }
    match coord.lock_for(&name, Duration::from_millis(500)).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("lock_for on a lock `consul lock` holds: {other:?}"),
    }
    // An election of the same name is the same key: `consul lock` leads it.
    let leader = coord.leader(&name).await.unwrap().expect("a native leader");
    assert!(leader.value.is_empty(), "consul lock writes no value");

    let waiting = tokio::spawn({
        let ours = ours.clone();
        let name = name.clone();
        async move { ours.coordinator().lock(&name).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "we wait while consul lock holds");
    native.release().await;
    let guard = tokio::time::timeout(T, waiting)
        .await
        .expect("acquired after consul lock released")
        .unwrap()
        .expect("lock");
    assert!(guard.token().0 > leader.token.0, "tokens rise");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_exclude_a_native_contender_until_we_release() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let name = Namespace::new().config_key("ours-first");
    let ours = client(&server).await;
    let guard = ours.coordinator().lock(&name).await.expect("lock");

    // `consul lock -timeout=2s` gives up without ever running its child.
    let mut refused = Native::spawn(&server, &name, Some("2s"));
    assert_eq!(refused.line(T).await, None, "consul lock ran while we held");

    let mut native = Native::spawn(&server, &name, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    guard.release().await.expect("release");
    native.acquired().await;
    native.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_with_consul_lock() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let election = Namespace::new().config_key("election");
    let ours = client(&server).await;
    let coord = ours.coordinator();
    let leadership = coord
        .campaign(&election, b"waypost-1".to_vec())
        .await
        .expect("campaign");
    // The value is the key's, where Consul's own tools read it.
    let (ok, out) = kv_get(&server, &format!("coord/{election}/.lock")).await;
    assert!(ok && out == "waypost-1\n", "consul kv get: {out:?}");

    let mut native = Native::spawn(&server, &election, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    leadership
        .proclaim(b"waypost-2".to_vec())
        .await
        .expect("proclaim");
    let l = coord.leader(&election).await.unwrap().expect("a leader");
    assert_eq!(l.value, b"waypost-2");
    let first = leadership.token();
    leadership.resign().await.expect("resign");
    native.acquired().await;
    let native_leader = coord
        .leader(&election)
        .await
        .unwrap()
        .expect("consul lock leads");
    assert!(native_leader.token > first);

    let other = client(&server).await;
    let campaign = tokio::spawn({
        let other = other.clone();
        let election = election.clone();
        async move {
            other
                .coordinator()
                .campaign(&election, b"waypost-3".to_vec())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!campaign.is_finished(), "one leader at a time");
    native.release().await;
    let l3 = tokio::time::timeout(T, campaign)
        .await
        .expect("elected after consul lock released")
        .unwrap()
        .expect("campaign");
    assert!(l3.token() > native_leader.token);
    let now = coord.leader(&election).await.unwrap().expect("a leader");
    assert_eq!((now.value, now.token), (b"waypost-3".to_vec(), l3.token()));
}

async fn kv_get(server: &ConsulServer, key: &str) -> (bool, String) {
    let out = Command::new("consul")
        .args([
            "kv",
            "get",
            &format!("-http-addr={}", server.address()),
            key,
        ])
        .output()
        .await
        .expect("run consul kv get");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_no_lock_is_a_conflict_and_semaphores_are_unsupported() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let name = Namespace::new().config_key("not-a-lock");
    let out = Command::new("consul")
        .args([
            "kv",
            "put",
            &format!("-http-addr={}", server.address()),
            &format!("coord/{name}/.lock"),
            "someone else's",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = client(&server).await;
    let coord = ours.coordinator();
    match coord.try_lock(&name).await {
        Err(Error::Conflict { what, .. }) => assert!(what.contains("flags"), "{what}"),
        other => panic!("a key with foreign flags: {other:?}"),
    }
    assert_eq!(
        coord.leader(&name).await.unwrap(),
        None,
        "skipped, no crash"
    );
    let (ok, out) = kv_get(&server, &format!("coord/{name}/.lock")).await;
    assert!(ok && out == "someone else's\n", "left alone: {out:?}");

    let free = Namespace::new().config_key("pool");
    match coord.acquire(&free, 2, Wait::No).await {
        Err(Error::Unsupported { .. }) => {}
        other => panic!("a semaphore: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_prefix_option_moves_the_keys() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let name = Namespace::new().config_key("moved");
    let config =
        ConsulConfig::from_url(&format!("{}?coord_prefix=team/locks", server.url())).unwrap();
    let ours = ConsulDiscovery::connect(config).await.expect("connect");
    let guard = ours.coordinator().lock(&name).await.expect("lock");
    let url = format!("http://{}/v1/kv/team/locks/{name}/.lock", server.address());
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body[0]["Flags"], waypost_consul::LOCK_FLAG_VALUE);
    assert_eq!(body[0]["ModifyIndex"], guard.token().0);
    assert!(body[0]["Session"].as_str().is_some_and(|s| !s.is_empty()));
    guard.release().await.unwrap();
    ours.shutdown().await.unwrap();
}

/// After our own release, the next acquisition skips the read (a `check-index` + `lock`
/// transaction on the index our release left); a foreign write in between fails the
/// check, and the key is read and judged as usual: a key that is no longer a lock is a
/// conflict, never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_write_after_our_release_is_seen_by_the_next_acquisition() {
    let Some(server) = waypost_testkit::server::consul().await else {
        return;
    };
    let name = Namespace::new().config_key("relock");
    let ours = client(&server).await;
    let coord = ours.coordinator();
    let mut last = 0;
    for _ in 0..3 {
        // `lock`, not `try_lock`: core frees its local (in-client) lock just after
        // `release` returns, so an immediate `try_lock` may find it still taken.
        let g = tokio::time::timeout(T, coord.lock(&name))
            .await
            .expect("in time")
            .expect("free");
        assert!(
            g.token().0 > last,
            "tokens rise: {} after {last}",
            g.token().0
        );
        last = g.token().0;
        g.release().await.unwrap();
    }
    let out = Command::new("consul")
        .args([
            "kv",
            "put",
            &format!("-http-addr={}", server.address()),
            &format!("coord/{name}/.lock"),
            "someone else's",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    match tokio::time::timeout(T, coord.lock(&name)).await {
        Ok(Err(Error::Conflict { what, .. })) => assert!(what.contains("flags"), "{what}"),
        other => panic!("a key rewritten with foreign flags: {other:?}"),
    }
    let (ok, out) = kv_get(&server, &format!("coord/{name}/.lock")).await;
    assert!(ok && out == "someone else's\n", "left alone: {out:?}");
}
