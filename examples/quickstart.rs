//! The classic discovery scenario, end to end.
//!
//! Three instances of a small TCP "greeter" service (ports 8001-8003) register; a client
//! watches the service and routes requests round-robin; a fourth instance joins and gets
//! traffic; one instance stops and the client stops using it; one crashes and the client
//! ejects it before the registry notices.
//!
//! ```text
//! cargo run --example quickstart                                  # in-memory registry
//! WAYPOST_URL=zk://127.0.0.1:2181/services cargo run --example quickstart --features zookeeper
//! ```
//!
//! The same code runs on every registry: only the URL changes. Exits non-zero if the
//! client ever routes to the wrong set of instances.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use waypost::cache::{CacheOptions, ServiceCache};
use waypost::{Config, Discovery, Instance, InstanceId, Registration, ServiceName};

const WAIT: Duration = Duration::from_secs(20);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One running instance of the greeter: its TCP server and its registration.
struct Greeter {
    id: InstanceId,
    server: JoinHandle<()>,
    registration: Registration,
    // Each instance is its own "process": its own connection to the registry.
    _discovery: Discovery,
}

async fn start_greeter(
    config: &Config,
    service: &ServiceName,
    n: u16,
) -> Result<Greeter, BoxError> {
    let wanted = 8000 + n;
    let listener = match TcpListener::bind(("127.0.0.1", wanted)).await {
        Ok(l) => l,
        Err(e) => {
            println!("  (port {wanted} is taken: {e}; using a free port instead)");
            TcpListener::bind(("127.0.0.1", 0)).await?
        }
    };
    let port = listener.local_addr()?.port();
    let name = format!("greeter-{n}");
    let reply = name.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = sock
                    .write_all(format!("hello from {reply}\n").as_bytes())
                    .await;
            });
        }
    });
    let discovery = waypost::connect_config(config).await?;
    let instance = Instance::new(
        service.clone(),
        name.parse()?,
        waypost::Endpoint::new("127.0.0.1", port),
    )
    .with_metadata("version", "1.0")
    .with_zone("local");
    let registration = discovery.registrar.register(instance).await?;
    println!("  {name} listening on 127.0.0.1:{port}, registered");
    Ok(Greeter {
        id: name.parse()?,
        server,
        registration,
        _discovery: discovery,
    })
}

/// Sends one request to an instance picked round-robin; reports dead endpoints to the
/// cache so it stops picking them before the registry notices.
async fn call(cache: &ServiceCache) -> Result<String, BoxError> {
    for _ in 0..8 {
        let Some(instance) = cache.pick_round_robin() else {
            return Err("no instance available".into());
        };
        let addr = instance.endpoint.to_string();
        let attempt = async {
            let sock = TcpStream::connect(&addr).await?;
            let mut line = String::new();
            BufReader::new(sock).read_line(&mut line).await?;
            Ok::<_, std::io::Error>(line.trim().to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(reply)) if !reply.is_empty() => return Ok(reply),
            other => {
                let why = match other {
                    Ok(Ok(_)) => "an empty reply".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no reply within 2 s".to_string(),
                };
                println!("    {} at {addr} failed ({why}); ejecting it", instance.id);
                cache.report_failure(&instance.id);
            }
        }
    }
    Err("every attempt failed".into())
}

/// Sends `n` requests and returns which instances answered.
async fn round(cache: &ServiceCache, n: usize) -> Result<BTreeSet<String>, BoxError> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let reply = call(cache).await?;
        println!("    <- {reply}");
        seen.insert(reply.trim_start_matches("hello from ").to_string());
    }
    Ok(seen)
}

fn expect(what: &str, seen: &BTreeSet<String>, want: &[&str]) -> Result<(), BoxError> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    if *seen == want {
        println!("  ok: {what}: {seen:?}");
        Ok(())
    } else {
        Err(format!("{what}: expected {want:?}, got {seen:?}").into())
    }
}

#[tokio::main]
async fn main() -> Result<(), waypost::Report> {
    // On failure: the error and its causes on one line, not a debug dump.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    // WAYPOST_URL (and WAYPOST_<OPTION>) pick the registry; in-memory by default.
    let config = Config::from_env().unwrap_or_else(|| Config::from_url("memory://quickstart"));
    Ok(run(&config).await?)
}

/// The whole scenario on the registry `config` names. Also run by the facade's tests on
/// every real registry.
pub(crate) async fn run(config: &Config) -> Result<(), BoxError> {
    println!("waypost quickstart on {config:?}");
    let service: ServiceName = "greeter".parse()?;

    println!("1. three greeters start and register");
    let mut greeters = Vec::new();
    for n in 1..=3 {
        greeters.push(start_greeter(config, &service, n).await?);
    }

    println!("2. a client watches `greeter` and routes round-robin");
    let client = waypost::connect_config(config).await?;
    let cache = ServiceCache::watch(
        client.watcher.clone(),
        service.clone(),
        CacheOptions::default(),
    );
    cache.wait_for(WAIT, |v| v.len() == 3).await?;
    println!("  the client sees {} instances", cache.len());
    expect(
        "6 requests reach all three",
        &round(&cache, 6).await?,
        &["greeter-1", "greeter-2", "greeter-3"],
    )?;

    println!("3. a fourth greeter joins");
    greeters.push(start_greeter(config, &service, 4).await?);
    cache.wait_for(WAIT, |v| v.len() == 4).await?;
    expect(
        "8 requests reach all four",
        &round(&cache, 8).await?,
        &["greeter-1", "greeter-2", "greeter-3", "greeter-4"],
    )?;

    println!("4. greeter-2 stops: it deregisters and shuts down");
    let stopped = greeters.remove(1);
    let stopped_id = stopped.id.clone();
    stopped.registration.deregister().await?;
    stopped.server.abort();
    cache
        .wait_for(WAIT, |v| !v.contains(stopped_id.as_str()))
        .await?;
    expect(
        "9 requests avoid greeter-2",
        &round(&cache, 9).await?,
        &["greeter-1", "greeter-3", "greeter-4"],
    )?;

    println!("5. greeter-3 crashes: its server dies, nobody deregisters it");
    // The registry still lists it until its session/TTL runs out; the client ejects it
    // on the first failed call instead of routing to a dead endpoint meanwhile.
    let crashed = greeters
        .iter()
        .position(|g| g.id.as_str() == "greeter-3")
        .ok_or("greeter-3")?;
    greeters[crashed].server.abort();
    let _ = (&mut greeters[crashed].server).await;
    expect(
        "6 requests avoid the crashed greeter-3",
        &round(&cache, 6).await?,
        &["greeter-1", "greeter-4"],
    )?;
    if !cache.is_ejected("greeter-3") {
        return Err("greeter-3 was not ejected".into());
    }

    println!("6. shutting down");
    for g in greeters {
        g.registration.deregister().await?;
        g.server.abort();
    }
    cache.wait_for(WAIT, |v| v.is_empty()).await?;
    println!("  the client sees no instances left. done.");
    drop(client);
    Ok(())
}
