//! Leader election: three replicas of a scheduler campaign; one leads and does the work, the
//! others wait. The leader is killed and another takes over; a leader that steps down
//! hands over at once. An observer follows the leader throughout.
//!
//! ```text
//! cargo run --example leader                                   # in-memory registry
//! WAYPOST_URL=zk://127.0.0.1:2181/services cargo run --example leader --features zookeeper
//! ```
//!
//! The same code runs on every registry: only the URL changes. The facade's tests run it
//! on each real registry. A replica is killed by crashing its client (keep-alives stop,
//! nothing is cleaned up) where the client offers test hooks, else by aborting it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::oneshot;
use waypost::backend::Event;
use waypost::coord::{Leader, Name};
use waypost::{Config, Discovery};

const REPLICAS: usize = 3;
/// How long a takeover may take: a crashed leader's session must run out first.
const WAIT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), waypost::Report> {
    // On failure: the error and its causes on one line, not a debug dump.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    // WAYPOST_URL (and WAYPOST_<OPTION>) pick the registry; in-memory by default.
    let config = Config::from_env().unwrap_or_else(|| Config::from_url("memory://leader-example"));
    Ok(run(&config).await?)
}

/// One replica: campaigns, leads until it loses leadership or is told to step down, and
/// campaigns again after a loss.
fn replica(name: String, client: Discovery, election: Name, stop: oneshot::Receiver<()>) {
    tokio::spawn(async move {
        let coord = client.coordinator()?;
        let mut stop = stop;
        loop {
            let leadership = tokio::select! {
                l = coord.campaign(&election, name.clone().into_bytes()) => l?,
                _ = &mut stop => return Ok::<_, BoxError>(()),
            };
            println!("   [{name}] leading (term {})", leadership.token());
            tokio::select! {
                why = leadership.lost() => println!("   [{name}] lost leadership: {why}"),
                _ = &mut stop => {
                    leadership.resign().await?;
                    println!("   [{name}] stepped down");
                    return Ok(());
                }
            }
        }
    });
}

/// The observer's view of the election.
struct Follower {
    leaders: futures::stream::BoxStream<'static, waypost::Result<waypost::coord::LeaderEvent>>,
    current: Option<Leader>,
}

impl Follower {
    /// Waits for a leader whose value is not `not`.
    async fn next(&mut self, what: &str, not: Option<Vec<u8>>) -> Result<Leader, BoxError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .current
                .as_ref()
                .filter(|l| Some(&l.value) != not.as_ref())
            {
                return Ok(l.clone());
            }
            let event = tokio::time::timeout_at(deadline, self.leaders.next())
                .await
                .map_err(|_| format!("{what}: no leader within {WAIT:?}"))?
                .ok_or("the observer stopped")??;
            match event {
                Event::Snapshot(l, _) | Event::Resynced(l, _) => {
                    self.current = l.into_iter().next()
                }
                Event::Added(l, _) | Event::Updated(l, _) => self.current = Some(l),
                Event::Removed(..) => self.current = None,
                Event::Stale(e) => println!("   [observer] registry unreachable: {e}"),
            }
        }
    }
}

/// The scenario on the registry `config` names.
pub(crate) async fn run(config: &Config) -> Result<(), BoxError> {
    println!("waypost leader example on {config:?}");
    let election: Name = "leader_example/scheduler".parse()?;

    let observer = waypost::connect_config(config).await?.coordinator()?;
    let mut follower = Follower {
        leaders: observer.observe(&election),
        current: None,
    };

    println!("1. {REPLICAS} replicas campaign; one leads");
    let mut clients = HashMap::new();
    let mut stops = HashMap::new();
    for i in 0..REPLICAS {
        let name = format!("replica-{i}");
        let client = waypost::connect_config(config).await?;
        let (tx, rx) = oneshot::channel();
        replica(name.clone(), client.clone(), election.clone(), rx);
        clients.insert(name.clone(), client);
        stops.insert(name, tx);
    }
    let first = follower.next("the first leader", None).await?;
    let first_name = String::from_utf8(first.value.clone())?;
    println!("   [observer] leader: {first_name} (term {})", first.token);

    println!("2. {first_name} is killed");
    let killed_at = Instant::now();
    let killed = clients.remove(&first_name).ok_or("unknown leader")?;
    match &killed.hooks {
        Some(hooks) => hooks.crash(),
        // Without test hooks, the closest to a kill: its replica stops at once.
        None => drop(stops.remove(&first_name)),
    }
    let second = follower
        .next("a new leader after the kill", Some(first.value.clone()))
        .await?;
    let second_name = String::from_utf8(second.value.clone())?;
    println!(
        "   [observer] leader: {second_name} (term {}), {:?} after the kill",
        second.token,
        killed_at.elapsed()
    );
    if second.token <= first.token {
        return Err("fencing tokens must rise from term to term".into());
    }

    println!("3. {second_name} steps down: the last replica takes over at once");
    let resigned_at = Instant::now();
    let _ = stops.remove(&second_name).ok_or("unknown leader")?.send(());
    let third = follower
        .next("a leader after the resignation", Some(second.value.clone()))
        .await?;
    println!(
        "   [observer] leader: {} (term {}), {:?} after the resignation",
        String::from_utf8_lossy(&third.value),
        third.token,
        resigned_at.elapsed()
    );
    if third.token <= second.token || third.value == first.value {
        return Err("the last replica should lead".into());
    }
    for (_, stop) in stops {
        let _ = stop.send(());
    }
    println!("done");
    Ok(())
}
