//! waypost's metrics, scraped by Prometheus.
//!
//! waypost reports through the `metrics` facade and installs no exporter (see the table
//! in `waypost::metrics`); an executable picks one. This one installs
//! `metrics-exporter-prometheus`, registers an instance, keeps a [`ServiceCache`] of its
//! service, picks from it once a second, and serves the Prometheus text format at
//! `/metrics` on a loopback port until Ctrl-C.
//!
//! ```text
//! cargo run --example metrics_prometheus                              # memory://
//! WAYPOST_URL=etcd://127.0.0.1:2379/services cargo run --example metrics_prometheus --features etcd
//! curl -s http://127.0.0.1:9464/metrics | grep ^waypost_              # METRICS_ADDR moves it
//! ```
//!
//! The exporter's own HTTP listener (`PrometheusBuilder::with_http_listener`) serves the
//! same text; here the handle's rendering is served by a few lines of tokio, so the
//! address can be port 0 (the facade's test scrapes it) and is printed once bound.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use waypost::cache::{CacheOptions, ServiceCache};
use waypost::{Config, Discovery, Endpoint, Instance, Registration, ServiceName};

const WAIT: Duration = Duration::from_secs(20);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The running demo: the `/metrics` server, this process's registrations and a cache of
/// their service.
pub(crate) struct Demo {
    /// Where `/metrics` is served.
    pub(crate) addr: SocketAddr,
    /// The cache of `metrics-demo` that [`Demo::pick`] picks from.
    pub(crate) cache: ServiceCache,
    service: ServiceName,
    registrations: Vec<Registration>,
    discovery: Discovery,
    server: JoinHandle<()>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Serves `handle`'s rendering at `GET /metrics` (404 elsewhere), one connection at a time.
async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    while let Ok((sock, _)) = listener.accept().await {
        let mut sock = BufReader::new(sock);
        let mut request = String::new();
        if sock.read_line(&mut request).await.is_err() {
            continue;
        }
        // Read the headers up to the blank line, so closing never resets the reply.
        let mut header = String::new();
        while sock.read_line(&mut header).await.is_ok_and(|n| n > 2) {
            header.clear();
        }
        let (status, body) = if request.starts_with("GET /metrics ") {
            ("200 OK", handle.render())
        } else {
            ("404 Not Found", "try /metrics\n".to_string())
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = sock.get_mut().write_all(reply.as_bytes()).await;
        let _ = sock.get_mut().shutdown().await;
    }
}

/// Serves `/metrics` on `listen`, connects to the registry `config` names, registers
/// `metrics-demo/d-1` and waits until a cache of `metrics-demo` sees it.
pub(crate) async fn start(
    config: &Config,
    handle: PrometheusHandle,
    listen: SocketAddr,
) -> Result<Demo, BoxError> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, handle));
    let discovery = waypost::connect_config(config).await?;
    let service: ServiceName = "metrics-demo".parse()?;
    let cache = ServiceCache::watch(
        discovery.watcher.clone(),
        service.clone(),
        CacheOptions::default(),
    );
    let mut demo = Demo {
        addr,
        cache,
        service,
        registrations: Vec::new(),
        discovery,
        server,
    };
    demo.add("d-1", 8001).await?;
    Ok(demo)
}

impl Demo {
    /// Registers another instance and waits until the cache sees it.
    pub(crate) async fn add(&mut self, id: &str, port: u16) -> Result<(), BoxError> {
        let instance = Instance::new(
            self.service.clone(),
            id.parse()?,
            Endpoint::new("127.0.0.1", port),
        );
        let registration = self.discovery.registrar.register(instance).await?;
        self.registrations.push(registration);
        let n = self.registrations.len();
        self.cache.wait_for(WAIT, |v| v.len() == n).await?;
        Ok(())
    }

    /// Picks `n` instances round-robin (what a client does per request).
    pub(crate) fn pick(&self, n: usize) -> Result<(), BoxError> {
        for _ in 0..n {
            self.cache.pick_round_robin().ok_or("no instance to pick")?;
        }
        Ok(())
    }

    /// Deregisters every instance and waits until the cache is empty.
    pub(crate) async fn deregister(&mut self) -> Result<(), BoxError> {
        for r in self.registrations.drain(..) {
            r.deregister().await?;
        }
        self.cache.wait_for(WAIT, |v| v.is_empty()).await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match serve_until_ctrl_c().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // For people: the error and its causes on one line, not a debug dump.
            eprintln!("metrics_prometheus failed: {}", waypost::Report::from(e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Registers, caches, picks once a second and serves `/metrics` until Ctrl-C.
async fn serve_until_ctrl_c() -> Result<(), BoxError> {
    // WAYPOST_URL (and WAYPOST_<OPTION>) pick the registry; in-memory by default.
    let config = Config::from_env().unwrap_or_else(|| Config::from_url("memory://metrics"));
    let listen: SocketAddr = match std::env::var("METRICS_ADDR") {
        Ok(a) => a.parse()?,
        Err(_) => ([127, 0, 0, 1], 9464).into(),
    };
    let handle = PrometheusBuilder::new().install_recorder()?;
    let mut demo = start(&config, handle.clone(), listen).await?;
    println!("serving http://{}/metrics (Ctrl-C stops)", demo.addr);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                demo.pick(1)?;
                // Drains the histograms' buckets now and then, as the exporter's own
                // listener would.
                handle.run_upkeep();
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    demo.deregister().await?;
    Ok(())
}
