//! The ZooKeeper ensemble harness against real servers: it comes up within a bound,
//! killing (or pausing) the leader elects another, and a write through one member is
//! read through another, with ZooKeeper's own CLI. Every wait has a deadline.

use std::time::{Duration, Instant};

use waypost_testkit::server::{
    self, HarnessError, ServerKind, ZooKeeperEnsemble, ZooKeeperOptions, ZooKeeperServer,
};

/// The bound on bringing the ensemble up (the harness's own default deadline is 60 s
/// per step; three JVMs on two shared cores take a few seconds).
const STARTUP_BOUND: Duration = Duration::from_secs(60);
/// The bound on electing a new leader after the old one is gone.
const ELECTION_BOUND: Duration = Duration::from_secs(30);
/// The bound on one CLI call (a JVM start plus a connection).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

async fn start_ensemble() -> Option<ZooKeeperEnsemble> {
    server::require(ServerKind::ZooKeeper)?;
    let start = Instant::now();
    let ensemble = ZooKeeperEnsemble::start()
        .await
        .unwrap_or_else(|e| panic!("starting a ZooKeeper ensemble failed: {e}"));
    let took = start.elapsed();
    eprintln!(
        "ZooKeeper ensemble of {} up in {took:?}: {}",
        ensemble.len(),
        ensemble.url()
    );
    assert!(took < STARTUP_BOUND, "startup took {took:?}");
    Some(ensemble)
}

/// A unique znode path for one test.
fn path(test: &str) -> String {
    format!("/waypost-{test}-{:08x}", rand::random::<u32>())
}

/// Creates `path` with `data` through `member`'s CLI; panics with the CLI's output if it
/// does not succeed.
async fn create(member: &ZooKeeperServer, path: &str, data: &str) {
    let out = member
        .cli(&["create", path, data], CLI_TIMEOUT)
        .await
        .expect("run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        // ZooKeeperMain prints `Created PATH` to stderr.
        out.status.success() && format!("{stdout}{stderr}").contains(&format!("Created {path}")),
        "create {path} through {}: {}\nstdout: {stdout}\nstderr: {stderr}",
        member.address(),
        out.status
    );
}

/// Reads `path` through `member`'s CLI until it holds `data`: a follower may apply a
/// write made through another member a moment later.
async fn read_eventually(member: &ZooKeeperServer, path: &str, data: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = member
            .cli(&["get", path], CLI_TIMEOUT)
            .await
            .expect("run the CLI");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && stdout.lines().any(|l| l.trim() == data) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "get {path} through {} never returned {data:?}; last: {}\nstdout: {stdout}\nstderr: {}",
            member.address(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn zookeeper_ensemble_comes_up_and_replicates_writes() {
    let Some(ensemble) = start_ensemble().await else {
        return;
    };
    assert_eq!(ensemble.len(), 3);
    let addresses = ensemble.addresses();
    assert_eq!(ensemble.connect_string(), addresses.join(","));
    assert_eq!(
        ensemble.url(),
        format!("zk://{}/services", addresses.join(","))
    );
    let leader = ensemble.leader().await.expect("a leader once started");
    let mut followers = 0;
    for (i, member) in ensemble.members().iter().enumerate() {
        assert_eq!(member.myid(), Some(i as u32 + 1));
        assert!(member.peer_addresses().is_some());
        let mode = member.mode().await.expect("every member serves");
        if i == leader {
            assert_eq!(mode, "leader");
        } else {
            assert_eq!(mode, "follower", "member {i}");
            followers += 1;
        }
    }
    assert_eq!(followers, 2);

    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    let path = path("replicate");
    create(&ensemble.members()[a], &path, "through-a").await;
    read_eventually(&ensemble.members()[b], &path, "through-a").await;
    read_eventually(&ensemble.members()[leader], &path, "through-a").await;
}

#[tokio::test]
async fn zookeeper_ensemble_elects_a_new_leader_when_the_leader_dies() {
    let Some(mut ensemble) = start_ensemble().await else {
        return;
    };
    let old = ensemble
        .wait_leader(ELECTION_BOUND)
        .await
        .expect("a leader");
    let addresses = ensemble.addresses();
    ensemble.member(old).kill().expect("kill the leader");
    let killed = Instant::now();
    let new = ensemble
        .wait_new_leader(old, ELECTION_BOUND)
        .await
        .expect("a new leader among the survivors");
    eprintln!(
        "ZooKeeper: new leader {new} {:?} after killing {old}",
        killed.elapsed()
    );
    assert_ne!(new, old);
    assert_eq!(
        ensemble.members()[old].mode().await,
        None,
        "a killed member does not serve"
    );

    // Two of three still form a quorum: a write through one survivor is read through
    // the other.
    let other = (0..3).find(|&i| i != old && i != new).unwrap();
    let path = path("failover");
    create(&ensemble.members()[other], &path, "after-failover").await;
    read_eventually(&ensemble.members()[new], &path, "after-failover").await;

    // The old leader comes back, on its old address, as a follower with the write.
    ensemble
        .member(old)
        .restart()
        .await
        .expect("restart the old leader");
    assert_eq!(ensemble.members()[old].address(), addresses[old]);
    ensemble
        .wait_ready(STARTUP_BOUND)
        .await
        .expect("all members serve");
    assert_eq!(
        ensemble
            .wait_leader(ELECTION_BOUND)
            .await
            .expect("a leader"),
        new
    );
    assert_eq!(
        ensemble.members()[old].mode().await.as_deref(),
        Some("follower")
    );
    read_eventually(&ensemble.members()[old], &path, "after-failover").await;
}

#[tokio::test]
async fn zookeeper_ensemble_survives_a_paused_leader_and_a_full_outage() {
    let Some(mut ensemble) = start_ensemble().await else {
        return;
    };
    let old = ensemble
        .wait_leader(ELECTION_BOUND)
        .await
        .expect("a leader");
    // A frozen leader stops answering its followers; they elect another.
    ensemble.member(old).pause().expect("pause the leader");
    let new = ensemble
        .wait_new_leader(old, ELECTION_BOUND)
        .await
        .expect("a new leader while the old one is frozen");
    assert_ne!(new, old);
    ensemble.member(old).resume().expect("resume");
    ensemble
        .wait_ready(STARTUP_BOUND)
        .await
        .expect("the old leader rejoins");

    // Without a quorum nobody leads; all restarted together, they elect one again.
    let path = path("outage");
    create(&ensemble.members()[new], &path, "before-outage").await;
    for i in 0..ensemble.len() {
        ensemble.member(i).kill().expect("kill");
    }
    assert_eq!(ensemble.leader().await, None);
    ensemble.restart_all().await.expect("restart every member");
    ensemble
        .wait_leader(ELECTION_BOUND)
        .await
        .expect("a leader after the outage");
    read_eventually(&ensemble.members()[old], &path, "before-outage").await;
}

#[tokio::test]
async fn zookeeper_ensemble_start_fails_clearly() {
    let Some(()) = server::require(ServerKind::ZooKeeper) else {
        return;
    };
    assert!(matches!(
        ZooKeeperEnsemble::start_with(0, ZooKeeperOptions::default()).await,
        Err(HarnessError::Invalid(_))
    ));

    // A member that cannot start (a broken config) fails the start at once, with its log.
    let opts = ZooKeeperOptions {
        extra_config: vec![("initLimit".into(), "not-a-number".into())],
        ..ZooKeeperOptions::default()
    };
    let start = Instant::now();
    let err = ZooKeeperEnsemble::start_with(3, opts)
        .await
        .expect_err("a broken config does not start");
    eprintln!("broken ensemble failed after {:?}: {err}", start.elapsed());
    assert!(matches!(err, HarnessError::Exited { .. }), "{err}");
    assert!(err.log_tail().is_some_and(|t| !t.is_empty()));

    // A port that stays taken (the last `clientPort` line wins over the harness's):
    // retried on new ports a few times, then a clear error naming the cause.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let opts = ZooKeeperOptions {
        extra_config: vec![("clientPort".into(), port.to_string())],
        startup_timeout: Duration::from_secs(20),
        ..ZooKeeperOptions::default()
    };
    let start = Instant::now();
    let err = ZooKeeperEnsemble::start_with(3, opts)
        .await
        .expect_err("a taken port does not start");
    eprintln!(
        "ensemble on a taken port failed after {:?}: {err}",
        start.elapsed()
    );
    assert!(
        err.log_tail()
            .is_some_and(|t| t.to_ascii_lowercase().contains("address already in use")),
        "{err}"
    );

    // A member that never serves (here: too short a deadline) is NotReady, not a hang.
    let opts = ZooKeeperOptions {
        startup_timeout: Duration::from_millis(1),
        ..ZooKeeperOptions::default()
    };
    let err = ZooKeeperEnsemble::start_with(3, opts)
        .await
        .expect_err("nothing serves within 1 ms");
    assert!(matches!(err, HarnessError::NotReady { .. }), "{err}");
}
