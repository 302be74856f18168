//! A distributed lock with fencing tokens: three workers, each its own connection (its own
//! "process"), increment a counter stored in the registry by plain read-modify-write. The
//! lock makes that safe; the fencing token lets the protected resource refuse a holder
//! that lost the lock without knowing it.
//!
//! ```text
//! cargo run --example lock                                   # in-memory registry
//! WAYPOST_URL=etcd://127.0.0.1:2379/services cargo run --example lock --features etcd
//! ```
//!
//! The same code runs on every registry: only the URL changes. The facade's tests run it
//! on each real registry. Exits non-zero if an increment was lost or a token went back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use waypost::coord::{FencingToken, Name};
use waypost::kv::ConfigKey;
use waypost::Config;

const WORKERS: usize = 3;
const ROUNDS: u64 = 5;
const WAIT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the lock protects, as a fenced resource sees it: it remembers the largest token it
/// was written with and refuses older ones.
#[derive(Default)]
struct Fence {
    largest: Option<FencingToken>,
}

impl Fence {
    fn admit(&mut self, token: FencingToken) -> Result<(), String> {
        if self.largest.is_some_and(|l| token <= l) {
            return Err(format!(
                "token {token} refused: {} was already seen",
                self.largest.unwrap()
            ));
        }
        self.largest = Some(token);
        Ok(())
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
    let config = Config::from_env().unwrap_or_else(|| Config::from_url("memory://lock-example"));
    Ok(run(&config).await?)
}

/// The whole scenario on the registry `config` names.
pub(crate) async fn run(config: &Config) -> Result<(), BoxError> {
    println!("waypost lock example on {config:?}");
    let counter: ConfigKey = "lock_example/counter".parse()?;
    let lock: Name = "lock_example/counter-lock".parse()?;
    let setup = waypost::connect_config(config).await?;
    setup.kv()?.put(&counter, b"0".to_vec()).await?;

    println!("1. a held lock: try_lock is refused at once, lock_for gives up in time");
    let coord = setup.coordinator()?;
    let held = coord.lock_for(&lock, WAIT).await?;
    let other = waypost::connect_config(config).await?.coordinator()?;
    match other.try_lock(&lock).await {
        Err(waypost::Error::Busy { what }) => println!("   try_lock: busy ({what})"),
        other => return Err(format!("try_lock on a held lock: {other:?}").into()),
    }
    let started = Instant::now();
    match other.lock_for(&lock, Duration::from_millis(300)).await {
        Err(waypost::Error::Timeout { .. }) => {
            println!(
                "   lock_for(300 ms): timed out after {:?}",
                started.elapsed()
            )
        }
        other => return Err(format!("lock_for on a held lock: {other:?}").into()),
    }
    held.release().await?;

    println!("2. {WORKERS} workers × {ROUNDS} increments, each under the lock");
    let fence = Arc::new(Mutex::new(Fence::default()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = waypost::connect_config(config).await?;
        let (counter, lock, fence) = (counter.clone(), lock.clone(), fence.clone());
        workers.push(tokio::spawn(async move {
            let (coord, kv) = (client.coordinator()?, client.kv()?);
            for _ in 0..ROUNDS {
                let guard = coord.lock_for(&lock, WAIT).await?;
                fence.lock().unwrap().admit(guard.token())?;
                // Plain read-modify-write: only the lock keeps increments from being lost.
                let now = kv.get(&counter).await?.ok_or("the counter is gone")?;
                let n: u64 = std::str::from_utf8(&now.value)?.parse()?;
                if guard.is_lost() {
                    return Err(format!("worker {w} lost the lock mid-increment").into());
                }
                kv.put(&counter, (n + 1).to_string().into_bytes()).await?;
                println!("   worker {w}: {n} -> {} (token {})", n + 1, guard.token());
                guard.release().await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let kv = setup.kv()?;
    let total: u64 = std::str::from_utf8(&kv.get(&counter).await?.ok_or("gone")?.value)?.parse()?;
    println!("   counter = {total}");
    if total != WORKERS as u64 * ROUNDS {
        return Err(format!(
            "increments were lost: {total} of {}",
            WORKERS as u64 * ROUNDS
        )
        .into());
    }
    kv.delete(&counter).await?;
    println!("done");
    Ok(())
}
