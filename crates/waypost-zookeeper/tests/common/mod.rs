//! Shared test helpers: a ZooKeeper server per test and clients of it.
#![allow(dead_code)]

use std::time::Duration;

use waypost_testkit::server::{require, ServerKind, ZooKeeperOptions, ZooKeeperServer};
use waypost_zookeeper::{ZkConfig, ZkDiscovery};

/// The session timeout the tests ask for (the server's default cap is 20 ticks = 4 s).
pub(crate) const SESSION: Duration = Duration::from_secs(2);

/// Starts a ZooKeeper server (tick 200 ms), or `None` (loudly) when it is not installed.
pub(crate) async fn server() -> Option<ZooKeeperServer> {
    require(ServerKind::ZooKeeper)?;
    Some(
        ZooKeeperServer::start_with(ZooKeeperOptions::default())
            .await
            .unwrap_or_else(|e| panic!("starting ZooKeeper failed: {e}")),
    )
}

/// The config of a test client of `server`.
pub(crate) fn config(server: &ZooKeeperServer) -> ZkConfig {
    ZkConfig::from_url(&server.url())
        .unwrap()
        .with_session_timeout(SESSION)
        .with_connect_timeout(Duration::from_secs(5))
}

/// A client of `server`.
pub(crate) async fn client(server: &ZooKeeperServer) -> ZkDiscovery {
    ZkDiscovery::connect(config(server)).await.expect("connect")
}

/// Waits until `cond` holds (checked every 20 ms), at most `timeout`; whether it held.
pub(crate) async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log to the test output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A TCP proxy in front of the server that can swallow the server's replies and cut
/// every connection: a lost reply, on demand.
pub(crate) struct Proxy {
    pub(crate) addr: std::net::SocketAddr,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub(crate) async fn start(target: String) -> Proxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sw, ep, arm) = (swallow.clone(), epoch.clone(), armed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let mut cut = ep.subscribe();
                let sw = sw.clone();
                let arm = arm.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw_) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        // Frames: 4-byte length, then (after the connect request)
                        // xid and op code. A create while armed starts swallowing.
                        let mut pending: Vec<u8> = Vec::new();
                        let mut first = true;
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            pending.extend_from_slice(&buf[..n]);
                            while pending.len() >= 4 {
                                let len =
                                    u32::from_be_bytes(pending[..4].try_into().unwrap()) as usize;
                                if pending.len() < 4 + len {
                                    break;
                                }
                                if !first && len >= 8 {
                                    let op = i32::from_be_bytes(pending[8..12].try_into().unwrap());
                                    // create, create2, createContainer, createTTL
                                    if matches!(op, 1 | 15 | 19 | 21)
                                        && arm.swap(false, Ordering::AcqRel)
                                    {
                                        sw.store(true, Ordering::Release);
                                    }
                                }
                                first = false;
                                pending.drain(..4 + len);
                            }
                            if sw_.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if sw.load(Ordering::Acquire) {
                                continue;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            swallow,
            armed,
            epoch,
            task,
        }
    }

    /// From now on the server's replies are dropped (requests still go through).
    pub(crate) fn swallow_replies(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::Release);
    }

    /// The reply to the next create request, and everything after it, is dropped.
    pub(crate) fn swallow_from_next_create(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Cuts every open connection; new ones work.
    pub(crate) fn cut(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}
