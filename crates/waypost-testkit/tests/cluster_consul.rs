//! The Consul cluster harness against real agents: 3 servers and a client agent come up
//! within a bound, killing the leader elects another, and a KV write through the client
//! agent is read through a server (and the other way round). Every wait has a deadline.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waypost_testkit::server::{self, ConsulCluster, ConsulOptions, HarnessError, ServerKind};

/// The bound on bringing the cluster up (the harness's own deadline is 30 s per step).
const STARTUP_BOUND: Duration = Duration::from_secs(60);
/// The bound on electing a new leader after the old one is gone.
const ELECTION_BOUND: Duration = Duration::from_secs(30);

async fn start_cluster() -> Option<ConsulCluster> {
    server::require(ServerKind::Consul)?;
    let start = Instant::now();
    let cluster = ConsulCluster::start()
        .await
        .unwrap_or_else(|e| panic!("starting a Consul cluster failed: {e}"));
    let took = start.elapsed();
    eprintln!(
        "Consul cluster of {} servers and a client agent up in {took:?}: {}",
        cluster.len(),
        cluster.url()
    );
    assert!(took < STARTUP_BOUND, "startup took {took:?}");
    Some(cluster)
}

/// One HTTP/1.0 exchange, bounded; `None` if the agent cannot be reached.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// Writes `key` = `value` through the agent at `addr`, trying again until it succeeds
/// (during an election the agent answers 500).
async fn put(addr: &str, key: &str, value: &str) {
    let deadline = Instant::now() + ELECTION_BOUND;
    loop {
        let reply = http(addr, "PUT", &format!("/v1/kv/{key}"), value).await;
        if matches!(&reply, Some((200, body)) if body.trim() == "true") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PUT {key} through {addr} never succeeded; last reply: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads `key` through the agent at `addr` (a consistent read, served by the leader)
/// until it is `value`.
async fn read_eventually(addr: &str, key: &str, value: &str) {
    let deadline = Instant::now() + ELECTION_BOUND;
    loop {
        let reply = http(addr, "GET", &format!("/v1/kv/{key}?raw&consistent"), "").await;
        if matches!(&reply, Some((200, body)) if body == value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {key} through {addr} never returned {value:?}; last reply: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key(test: &str) -> String {
    format!("waypost-{test}-{:08x}", rand::random::<u32>())
}

#[tokio::test]
async fn consul_cluster_comes_up_and_replicates_writes() {
    let Some(cluster) = start_cluster().await else {
        return;
    };
    assert_eq!(cluster.len(), 3);
    let client = cluster.client();
    assert!(!client.is_server());
    assert_eq!(client.server_address(), None);
    assert_eq!(cluster.url(), format!("consul://{}", client.address()));
    assert!(client.is_ready().await);
    let leader = cluster.leader().await.expect("a leader once started");
    let leader_address = cluster.servers()[leader].server_address().unwrap();
    for server in cluster.servers() {
        assert!(server.is_server());
        assert_eq!(
            server.known_leader().await.as_deref(),
            Some(leader_address.as_str())
        );
    }
    assert_eq!(client.known_leader().await, Some(leader_address));

    // The client agent sees every server as an alive member.
    let (status, members) = http(&client.address(), "GET", "/v1/agent/members", "")
        .await
        .expect("members");
    assert_eq!(status, 200);
    let members: serde_json::Value = serde_json::from_str(&members).unwrap();
    for server in cluster.servers() {
        let member = members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Name"] == server.node_name())
            .unwrap_or_else(|| panic!("{} not a member: {members}", server.node_name()));
        assert_eq!(member["Status"], 1, "{} alive", server.node_name());
    }

    // Through the client agent, read through a follower; and back.
    let follower = (leader + 1) % 3;
    let k = key("replicate");
    put(&client.address(), &k, "through-client").await;
    read_eventually(&cluster.servers()[follower].address(), &k, "through-client").await;
    put(&cluster.servers()[follower].address(), &k, "through-server").await;
    read_eventually(&client.address(), &k, "through-server").await;
}

#[tokio::test]
async fn consul_cluster_elects_a_new_leader_when_the_leader_dies() {
    let Some(mut cluster) = start_cluster().await else {
        return;
    };
    let old = cluster.wait_leader(ELECTION_BOUND).await.expect("a leader");
    let k = key("failover");
    put(&cluster.address(), &k, "before").await;

    cluster.member(old).kill().expect("kill the leader");
    let killed = Instant::now();
    let new = cluster
        .wait_new_leader(old, ELECTION_BOUND)
        .await
        .expect("a new leader among the survivors");
    eprintln!(
        "Consul: new leader {new} {:?} after killing {old}",
        killed.elapsed()
    );
    assert_ne!(new, old);

    // The client agent finds the new leader: a write through it is read through the
    // other survivor, and the write from before the failover is still there.
    let other = (0..3).find(|&i| i != old && i != new).unwrap();
    put(&cluster.address(), &k, "after").await;
    read_eventually(&cluster.servers()[other].address(), &k, "after").await;

    // The old leader comes back (same ports, same data) and catches up.
    let address = cluster.servers()[old].address();
    cluster
        .member(old)
        .restart()
        .await
        .expect("restart the old leader");
    assert_eq!(cluster.servers()[old].address(), address);
    cluster
        .wait_ready(STARTUP_BOUND)
        .await
        .expect("every agent ready");
    cluster.wait_leader(ELECTION_BOUND).await.expect("a leader");
    read_eventually(&address, &k, "after").await;
}

#[tokio::test]
async fn consul_cluster_client_agent_and_paused_leader() {
    let Some(mut cluster) = start_cluster().await else {
        return;
    };
    // The client agent restarted comes back a member, and serves.
    let k = key("client");
    cluster.client_mut().kill().expect("kill the client agent");
    assert!(!cluster.client().is_ready().await);
    cluster
        .client_mut()
        .restart()
        .await
        .expect("restart the client agent");
    put(&cluster.address(), &k, "after-client-restart").await;

    // A frozen leader stops heartbeating; the others elect another.
    let old = cluster.wait_leader(ELECTION_BOUND).await.expect("a leader");
    cluster.member(old).pause().expect("pause the leader");
    let new = cluster
        .wait_new_leader(old, ELECTION_BOUND)
        .await
        .expect("a new leader while the old one is frozen");
    assert_ne!(new, old);
    read_eventually(&cluster.address(), &k, "after-client-restart").await;
    cluster.member(old).resume().expect("resume");
    cluster
        .wait_ready(STARTUP_BOUND)
        .await
        .expect("the old leader rejoins");
}

#[tokio::test]
async fn consul_cluster_start_fails_clearly() {
    let Some(()) = server::require(ServerKind::Consul) else {
        return;
    };
    assert!(matches!(
        ConsulCluster::start_with(0, ConsulOptions::default()).await,
        Err(HarnessError::Invalid(_))
    ));
    let acl = ConsulOptions {
        acl_master_token: Some("secret".into()),
        ..ConsulOptions::default()
    };
    assert!(matches!(
        ConsulCluster::start_with(3, acl).await,
        Err(HarnessError::Invalid(_))
    ));

    // An agent that cannot start fails the start at once, with its log.
    let opts = ConsulOptions {
        extra_args: vec!["-no-such-flag".into()],
        ..ConsulOptions::default()
    };
    let start = Instant::now();
    let err = ConsulCluster::start_with(3, opts)
        .await
        .expect_err("an unknown flag does not start");
    eprintln!("broken cluster failed after {:?}: {err}", start.elapsed());
    assert!(matches!(err, HarnessError::Exited { .. }), "{err}");
    assert!(err.log_tail().is_some_and(|t| t.contains("no-such-flag")));

    // A port that stays taken (the last `-http-port` wins over the harness's): retried
    // on new ports a few times, then a clear error naming the cause, not a hang.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let opts = ConsulOptions {
        extra_args: vec![format!("-http-port={port}")],
        ..ConsulOptions::default()
    };
    let start = Instant::now();
    let err = ConsulCluster::start_with(3, opts)
        .await
        .expect_err("a taken port does not start");
    eprintln!(
        "cluster on a taken port failed after {:?}: {err}",
        start.elapsed()
    );
    assert!(
        err.log_tail()
            .is_some_and(|t| t.to_ascii_lowercase().contains("address already in use")),
        "{err}"
    );

    // Agents that never get ready within the deadline are NotReady, not a hang.
    let opts = ConsulOptions {
        startup_timeout: Duration::from_millis(1),
        ..ConsulOptions::default()
    };
    let err = ConsulCluster::start_with(3, opts)
        .await
        .expect_err("nothing is ready within 1 ms");
    assert!(matches!(err, HarnessError::NotReady { .. }), "{err}");
}
