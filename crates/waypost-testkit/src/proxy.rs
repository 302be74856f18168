//! A fault-injecting TCP proxy between a client and one registry endpoint, on loopback.
//!
//! Point the client at [`Proxy::addr`] instead of the server; then [`Proxy::set`] a
//! [`Mode`] to cut it off (a partition), slow it down, refuse it, or cut one direction
//! only, and [`Proxy::reset`] to break every connection at once. One proxy per endpoint:
//! a client partitioned from a whole cluster goes through one proxy per member, all set
//! alike; partitioned from one member, through that member's proxy only.
//!
//! A partition holds bytes rather than dropping them, as TCP would retransmit them: when
//! the mode returns to [`Mode::Pass`] within the client's own timeouts, its connections
//! carry on; a client that gave up meanwhile reconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk after this delay (both directions).
    Latency(Duration),
    /// New connections are accepted and reset at once (a refusing endpoint); existing ones
    /// pass.
    RefuseNew,
    /// Accept, never answer: existing and new connections stall in both directions (a
    /// partition, or a hung server).
    Blackhole,
    /// Client → server bytes stall; server → client pass.
    CutToServer,
    /// Server → client bytes stall; client → server pass.
    CutToClient,
}

/// Which way a pump carries bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

impl Mode {
    /// Whether `dir` stalls in this mode.
    fn stalls(self, dir: Direction) -> bool {
        match self {
            Mode::Blackhole => true,
            Mode::CutToServer => dir == Direction::ToServer,
            Mode::CutToClient => dir == Direction::ToClient,
            _ => false,
        }
    }
}

struct Shared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by [`Proxy::reset`]: every connection older than the bump is reset.
    resets: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

/// A running proxy; dropping it stops accepting and closes its connections.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<Notify>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("mode", &*self.shared.mode.borrow())
            .finish()
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            mode: watch::Sender::new(Mode::Pass),
            resets: watch::Sender::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let stop = Arc::new(Notify::new());
        tokio::spawn(accept(listener, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// Where clients connect: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Switches the mode; stalled bytes flow again when a mode no longer stalls them.
    pub fn set(&self, mode: Mode) {
        tracing::debug!(proxy = %self.addr, ?mode, "proxy mode");
        self.shared.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Resets every open connection (both sides see a reset); later ones are not affected.
    pub fn reset(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.notify_waiters();
        self.reset();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: Arc<Notify>) {
    loop {
        let (client, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("proxy accept: {e}");
                    continue;
                }
            },
            _ = stop.notified() => return,
        };
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        if *shared.mode.borrow() == Mode::RefuseNew {
            reset_stream(client);
            continue;
        }
        tokio::spawn(connection(client, shared.clone()));
    }
}

/// Closes `s` with a reset (linger 0) rather than an orderly close.
fn reset_stream(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let mut resets = shared.resets.subscribe();
    resets.borrow_and_update();
    // A blackholed endpoint accepts and never answers: connect upstream only once the
    // mode lets bytes through, so a hung server is what the client sees.
    let mut mode = shared.mode.subscribe();
    if mode.borrow_and_update().stalls(Direction::ToServer) {
        tokio::select! {
            _ = mode.wait_for(|m| !m.stalls(Direction::ToServer)) => {}
            _ = resets.changed() => return reset_stream(client),
        }
    }
    let server = match TcpStream::connect(shared.target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("proxy: upstream {} refused: {e}", shared.target);
            return reset_stream(client);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::AcqRel);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = pump(&mut cr, &mut sw, &shared, Direction::ToServer);
    let down = pump(&mut sr, &mut cw, &shared, Direction::ToClient);
    let reset = tokio::select! {
        _ = up => false,
        _ = down => false,
        _ = resets.changed() => true,
    };
    shared.open.fetch_sub(1, Ordering::AcqRel);
    if reset {
        if let (Ok(c), Ok(s)) = (cr.reunite(cw), sr.reunite(sw)) {
            reset_stream(c);
            reset_stream(s);
        }
    }
}

/// Carries bytes one way until either side closes, stalling while the mode says so.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    dir: Direction,
) {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let m = *mode.borrow_and_update();
        if m.stalls(dir) && mode.wait_for(|m| !m.stalls(dir)).await.is_err() {
            return;
        }
        let latency = match *mode.borrow() {
            Mode::Latency(d) => Some(d),
            _ => None,
        };
        if let Some(d) = latency {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn passes_then_stalls_then_heals_without_losing_bytes() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut s, b"one", LONG).await.as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(p.open_connections(), 1);

        p.set(Mode::Blackhole);
        assert_eq!(
            round_trip(&mut s, b"two", SHORT).await,
            None,
            "a partition answers nothing"
        );
        p.set(Mode::Pass);
        let mut buf = [0u8; 3];
        tokio::time::timeout(LONG, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"two", "held bytes flow after the heal");

        for (mode, dir) in [
            (Mode::CutToServer, "to server"),
            (Mode::CutToClient, "to client"),
        ] {
            p.set(mode);
            assert_eq!(round_trip(&mut s, b"cut", SHORT).await, None, "cut {dir}");
            p.set(Mode::Pass);
            tokio::time::timeout(LONG, s.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf, b"cut");
        }
    }

    #[tokio::test]
    async fn latency_delays_each_way() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        p.set(Mode::Latency(Duration::from_millis(150)));
        let started = std::time::Instant::now();
        assert!(round_trip(&mut s, b"slow", LONG).await.is_some());
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn refuses_new_connections_and_resets_open_ones() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut old = TcpStream::connect(p.addr()).await.unwrap();
        assert!(round_trip(&mut old, b"hi", LONG).await.is_some());
        p.set(Mode::RefuseNew);
        let mut new = TcpStream::connect(p.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(LONG, new.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "a refused connection is closed: {r:?}"
        );
        assert!(
            round_trip(&mut old, b"still", LONG).await.is_some(),
            "open ones pass"
        );

        p.reset();
        let r = tokio::time::timeout(LONG, old.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "reset: {r:?}");
        let deadline = tokio::time::Instant::now() + LONG;
        while p.open_connections() != 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_blackholed_endpoint_accepts_and_never_answers() {
        let p = Proxy::start(echo().await).await.unwrap();
        p.set(Mode::Blackhole);
        let mut s = tokio::time::timeout(LONG, TcpStream::connect(p.addr()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(round_trip(&mut s, b"anyone", SHORT).await, None);
        p.set(Mode::Pass);
        let mut buf = [0u8; 6];
        tokio::time::timeout(LONG, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"anyone");
    }
}
