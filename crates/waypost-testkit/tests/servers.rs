//! The real-server harness against the real servers: start, pause, resume, kill,
//! restart and stop each of ZooKeeper, etcd and Consul, and an etcd cluster's leader
//! failover. Every wait has a deadline; nothing sleeps and hopes.

use std::future::Future;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use nix::sys::signal;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waypost_testkit::server::{
    self, ConsulOptions, ConsulServer, EtcdCluster, EtcdOptions, EtcdServer, HarnessError,
    ServerKind, ZooKeeperOptions, ZooKeeperServer,
};

const READY: Duration = Duration::from_secs(30);

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn process_exists(pid: u32) -> bool {
    signal::kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// A minimal HTTP/1.0 exchange for the checks the harness's probes do not cover.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        if let Some(token) = token {
            req.push_str(&format!("X-Consul-Token: {token}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
        let status = head
            .split_whitespace()
            .nth(1)
            .expect("status")
            .parse()
            .expect("status code");
        (status, body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("http request timed out")
}

/// The lifecycle every server goes through; a macro because the three server types
/// share their methods by name, not through a trait.
macro_rules! lifecycle {
    ($server:expr) => {{
        let server = &mut $server;
        let kind = server.kind();
        let address = server.address();
        assert!(server.is_ready().await, "{kind} ready after start");
        let pid = server.pid().expect("a running server has a pid");
        assert!(process_exists(pid));

        // Paused: the kernel still accepts connections, but nothing answers.
        server.pause().expect("pause");
        eventually(Duration::from_secs(5), "not ready while paused", || async {
            !server.is_ready().await
        })
        .await;
        TcpStream::connect(&address)
            .await
            .expect("a paused server's port still accepts connections");
        server.resume().expect("resume");
        server
            .wait_ready(READY)
            .await
            .expect("ready again after resume");
        assert_eq!(server.pid(), Some(pid));

        // Killed: the process is gone and the port refuses connections.
        server.kill().expect("kill");
        assert_eq!(server.pid(), None);
        assert!(!process_exists(pid), "pid {pid} still exists after kill");
        assert!(!server.is_ready().await);
        let refused = TcpStream::connect(&address)
            .await
            .expect_err("nothing listens after kill");
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
        server.kill().expect("a second kill is a no-op");
        assert!(matches!(
            server.pause(),
            Err(HarnessError::NotRunning { .. })
        ));

        // Restarted: same address, ready again, a new process.
        server.restart().await.expect("restart");
        assert_eq!(server.address(), address);
        assert!(server.is_ready().await, "{kind} ready after restart");
        let new_pid = server.pid().expect("running after restart");
        assert_ne!(new_pid, pid);

        // Restart also works on a paused server.
        server.pause().expect("pause before restart");
        server.restart().await.expect("restart from paused");
        assert!(server.is_ready().await);

        // Stopped gracefully.
        let last_pid = server.pid().expect("running");
        server.stop().await.expect("stop");
        assert_eq!(server.pid(), None);
        assert!(!process_exists(last_pid));
        assert!(!server.is_ready().await);
        assert!(server.log_path().exists());
    }};
}

#[tokio::test]
async fn zookeeper_lifecycle() {
    let Some(mut zk) = server::zookeeper().await else {
        return;
    };
    assert_eq!(zk.kind(), ServerKind::ZooKeeper);
    assert!(zk.address().starts_with("127.0.0.1:"));
    assert_eq!(zk.url(), format!("zk://{}/services", zk.address()));
    let data_dir = zk.dir().join("data").join("version-2");
    lifecycle!(zk);
    // The data dir outlived kills and restarts: its snapshots are still there.
    let files = std::fs::read_dir(&data_dir)
        .expect("ZooKeeper's data dir")
        .count();
    assert!(files > 0, "no snapshot or log in {}", data_dir.display());
}

#[tokio::test]
async fn zookeeper_tick_time_is_configurable() {
    let Some(()) = server::require(ServerKind::ZooKeeper) else {
        return;
    };
    let zk = ZooKeeperServer::start_with(ZooKeeperOptions {
        tick_time: Duration::from_millis(100),
        max_session_timeout: Some(Duration::from_secs(3)),
        ..ZooKeeperOptions::default()
    })
    .await
    .expect("start ZooKeeper");
    let cfg = std::fs::read_to_string(zk.dir().join("zoo.cfg")).expect("zoo.cfg");
    assert!(cfg.contains("tickTime=100\n"), "{cfg}");
    assert!(cfg.contains("maxSessionTimeout=3000\n"), "{cfg}");
    assert!(zk.is_ready().await);
}

#[tokio::test]
async fn etcd_lifecycle_keeps_data_across_restart() {
    let Some(mut etcd) = server::etcd().await else {
        return;
    };
    assert_eq!(etcd.kind(), ServerKind::Etcd);
    assert_eq!(etcd.url(), format!("etcd://{}/services", etcd.address()));
    // key "waypost", value "survives", base64 as the JSON gateway wants them.
    let put = r#"{"key":"d2F5cG9zdA==","value":"c3Vydml2ZXM="}"#;
    let (status, body) = http(&etcd.address(), "POST", "/v3/kv/put", None, put).await;
    assert_eq!(status, 200, "{body}");

    lifecycle!(etcd);

    etcd.restart().await.expect("restart after stop");
    let (status, body) = http(
        &etcd.address(),
        "POST",
        "/v3/kv/range",
        None,
        r#"{"key":"d2F5cG9zdA=="}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("c3Vydml2ZXM="),
        "the key did not survive kill/restart: {body}"
    );
}

#[tokio::test]
async fn consul_lifecycle() {
    let Some(mut consul) = server::consul().await else {
        return;
    };
    assert_eq!(consul.kind(), ServerKind::Consul);
    assert_eq!(consul.url(), format!("consul://{}", consul.address()));
    assert_eq!(consul.acl_master_token(), None);
    assert_eq!(consul.dns_address().ip().to_string(), "127.0.0.1");
    lifecycle!(consul);
}

#[tokio::test]
async fn consul_with_acls_denies_anonymous_requests() {
    let Some(()) = server::require(ServerKind::Consul) else {
        return;
    };
    let mut consul = ConsulServer::start_with(ConsulOptions {
        acl_master_token: Some("waypost-master-token".into()),
        ..ConsulOptions::default()
    })
    .await
    .expect("start Consul with ACLs");
    assert_eq!(consul.acl_master_token(), Some("waypost-master-token"));
    assert!(consul.is_ready().await);
    let addr = consul.address();
    let (anonymous, _) = http(&addr, "GET", "/v1/agent/self", None, "").await;
    assert_eq!(anonymous, 403);
    let (with_token, _) = http(
        &addr,
        "GET",
        "/v1/agent/self",
        Some("waypost-master-token"),
        "",
    )
    .await;
    assert_eq!(with_token, 200);

    // A restart comes back with the same token.
    consul.restart().await.expect("restart");
    let (with_token, _) = http(
        &addr,
        "GET",
        "/v1/agent/self",
        Some("waypost-master-token"),
        "",
    )
    .await;
    assert_eq!(with_token, 200);
}

#[tokio::test]
async fn etcd_cluster_elects_a_new_leader_when_the_leader_dies() {
    let Some(()) = server::require(ServerKind::Etcd) else {
        return;
    };
    let mut cluster = EtcdCluster::start(3)
        .await
        .expect("start a 3-member etcd cluster");
    assert_eq!(cluster.len(), 3);
    for member in cluster.members() {
        assert!(member.is_ready().await, "{} ready", member.name());
    }
    let addresses = cluster.addresses();
    assert_eq!(
        cluster.url(),
        format!("etcd://{}/services", addresses.join(","))
    );

    let old = cluster.wait_leader(READY).await.expect("a leader");
    assert_eq!(cluster.leader().await, Some(old));
    cluster.member(old).kill().expect("kill the leader");
    let new = cluster
        .wait_new_leader(old, Duration::from_secs(15))
        .await
        .expect("a new leader among the survivors");
    assert_ne!(new, old);

    // The old leader comes back as a follower on its old address.
    cluster
        .member(old)
        .restart()
        .await
        .expect("restart the old leader");
    assert_eq!(cluster.members()[old].address(), addresses[old]);
    cluster.wait_ready(READY).await.expect("all members ready");
    cluster.wait_leader(READY).await.expect("a leader");
}

#[tokio::test]
async fn servers_started_at_once_get_different_ports() {
    let Some(()) = server::require(ServerKind::Etcd) else {
        return;
    };
    let Some(()) = server::require(ServerKind::Consul) else {
        return;
    };
    let (a, b, c, d) = tokio::join!(
        EtcdServer::start(),
        EtcdServer::start(),
        ConsulServer::start(),
        ConsulServer::start()
    );
    let (a, b, c, d) = (a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap());
    let mut seen = std::collections::HashSet::new();
    for addr in [
        a.address(),
        a.peer_address(),
        b.address(),
        b.peer_address(),
        c.address(),
        c.dns_address().to_string(),
        c.grpc_address(),
        d.address(),
        d.dns_address().to_string(),
        d.grpc_address(),
    ] {
        assert!(seen.insert(addr.clone()), "{addr} handed out twice");
    }
    for ready in [
        a.is_ready().await,
        b.is_ready().await,
        c.is_ready().await,
        d.is_ready().await,
    ] {
        assert!(ready);
    }
    assert_ne!(a.dir(), b.dir());
}

#[tokio::test]
async fn a_missing_binary_is_reported_with_the_install_hint() {
    let err = EtcdServer::start_with(EtcdOptions {
        binary: Some("/nonexistent/etcd".into()),
        ..EtcdOptions::default()
    })
    .await
    .expect_err("no such binary");
    match &err {
        HarnessError::MissingBinary { kind, hint } => {
            assert_eq!(*kind, ServerKind::Etcd);
            assert!(hint.contains("scripts/install-servers.sh"), "{hint}");
        }
        other => panic!("expected MissingBinary, got {other}"),
    }
    let err = ConsulServer::start_with(ConsulOptions {
        binary: Some("/nonexistent/consul".into()),
        ..ConsulOptions::default()
    })
    .await
    .expect_err("no such binary");
    assert!(matches!(
        err,
        HarnessError::MissingBinary {
            kind: ServerKind::Consul,
            ..
        }
    ));
    let err = ZooKeeperServer::start_with(ZooKeeperOptions {
        java: Some("/nonexistent/java".into()),
        ..ZooKeeperOptions::default()
    })
    .await
    .expect_err("no such java");
    assert!(matches!(
        err,
        HarnessError::MissingBinary {
            kind: ServerKind::ZooKeeper,
            ..
        }
    ));
}

#[tokio::test]
async fn a_server_that_dies_at_start_up_reports_its_log() {
    let Some(()) = server::require(ServerKind::Etcd) else {
        return;
    };
    let err = EtcdServer::start_with(EtcdOptions {
        extra_args: vec!["--no-such-flag".into()],
        ..EtcdOptions::default()
    })
    .await
    .expect_err("etcd rejects an unknown flag");
    match &err {
        HarnessError::Exited { kind, log_tail, .. } => {
            assert_eq!(*kind, ServerKind::Etcd);
            assert!(log_tail.contains("no-such-flag"), "{log_tail}");
        }
        other => panic!("expected Exited, got {other}"),
    }
}

#[tokio::test]
async fn dropping_a_server_kills_it_even_when_paused() {
    let Some(etcd) = server::etcd().await else {
        return;
    };
    let pid = etcd.pid().expect("running");
    let dir = etcd.dir().to_owned();
    etcd.pause().expect("pause");
    drop(etcd);
    assert!(!process_exists(pid), "pid {pid} outlived its server handle");
    assert!(
        !dir.exists(),
        "{} outlived its server handle",
        dir.display()
    );
}

#[tokio::test]
async fn restart_waits_out_a_briefly_taken_port() {
    let Some(mut etcd) = server::etcd().await else {
        return;
    };
    let address = etcd.address();
    etcd.kill().expect("kill");
    let squatter = std::net::TcpListener::bind(&address).expect("the killed server's port is free");
    // Something holds the port for a moment: restart retries on the same port.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(squatter);
    });
    etcd.restart()
        .await
        .expect("restart once the port is free again");
    release.await.expect("release task");
    assert_eq!(etcd.address(), address);
    assert!(etcd.is_ready().await);
    assert!(
        etcd.log_tail().contains("address already in use"),
        "{}",
        etcd.log_tail()
    );
}
