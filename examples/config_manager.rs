//! The usual "ConfigManager", end to end: an application loads its configuration from the
//! registry, reacts when an operator changes it, ignores a broken value, and keeps running
//! on the last good value while the registry is down.
//!
//! ```text
//! cargo run --example config_manager                                   # in-memory registry
//! WAYPOST_URL=etcd://127.0.0.1:2379/services cargo run --example config_manager --features etcd
//! ```
//!
//! The same code runs on every registry: only the URL changes. The facade's tests run it
//! on each real registry, pausing the server for the outage step. Exits non-zero if the
//! application ever runs with a value other than the last good one.

use std::time::Duration;

use serde::Deserialize;
use waypost::kv::{ConfigKey, ConfigStore, Expected, LiveConfig, LiveOptions};
use waypost::Config;

const WAIT: Duration = Duration::from_secs(20);
/// How long a registry may take to notice it is down: Consul's agent is pinged every
/// `request_timeout` (10 s by default), so a hung agent takes up to twice that.
const OUTAGE_WAIT: Duration = Duration::from_secs(45);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The application's configuration, stored as JSON at `my_app/config`.
#[derive(Debug, Deserialize, PartialEq)]
pub(crate) struct AppConfig {
    database_url: String,
    pool_size: u32,
    #[serde(default)]
    features: Vec<String>,
}

fn check(c: &AppConfig) -> Result<(), String> {
    if c.pool_size == 0 || c.pool_size > 1000 {
        return Err(format!("pool_size {} is outside 1..=1000", c.pool_size));
    }
    if !c.database_url.starts_with("postgres://") {
        return Err("database_url must be a postgres:// URL".into());
    }
    Ok(())
}

/// How to cut the application off the registry and heal it (a paused server in the tests,
/// an unreachable in-memory registry in `main`).
pub(crate) struct Outage {
    pub(crate) begin: Box<dyn Fn() + Send + Sync>,
    pub(crate) end: Box<dyn Fn() + Send + Sync>,
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
    Ok(match Config::from_env() {
        Some(config) => run(&config, None).await,
        None => {
            let registry = waypost::memory::registry("config-manager");
            let (down, up) = (registry.clone(), registry);
            let outage = Outage {
                begin: Box::new(move || down.set_reachable(false)),
                end: Box::new(move || up.set_reachable(true)),
            };
            run(&Config::from_url("memory://config-manager"), Some(outage)).await
        }
    }?)
}

/// The whole scenario on the registry `config` names.
pub(crate) async fn run(config: &Config, outage: Option<Outage>) -> Result<(), BoxError> {
    println!("waypost config_manager on {config:?}");
    let key: ConfigKey = "my_app/config".parse()?;

    // The operator's side: a separate connection, as a deploy tool or a CLI would be.
    let operator = waypost::connect_config(config).await?.kv()?;
    println!("1. the operator seeds the configuration (only if absent)");
    let seed = br#"{"database_url": "postgres://db-1/app", "pool_size": 8}"#;
    match operator.put_if(&key, seed.to_vec(), Expected::Absent).await {
        Ok(v) => println!("   written at version {v}"),
        Err(waypost::Error::Conflict { current, .. }) => {
            println!("   already there (version {current:?}); resetting it");
            operator.put(&key, seed.to_vec()).await?;
        }
        Err(e) => return Err(e.into()),
    }

    println!("2. the application loads it and keeps it live");
    let app = waypost::connect_config(config).await?;
    let options = LiveOptions::<AppConfig>::json().validate(check);
    let live = LiveConfig::new(app.kv()?, key.clone(), options);
    let st = live.wait_for(WAIT, |s| s.value.is_some()).await?;
    let current = live.get().expect("loaded");
    println!(
        "   pool_size = {} (version {:?})",
        current.pool_size, st.version
    );
    expect(current.pool_size == 8, "the seeded value")?;

    // The application reacts to changes in its own task; it reports each resize (a
    // watch channel keeps only the latest state, so a reactor that runs late sees the
    // newest value, not every one in between).
    let mut changes = live.changes();
    let (resized_tx, mut resized) = tokio::sync::mpsc::unbounded_channel();
    let reactor = tokio::spawn(async move {
        let mut last = None;
        while changes.changed().await.is_ok() {
            let st = changes.borrow_and_update().clone();
            if let Some(v) = &st.value {
                if last != Some(v.pool_size) {
                    println!("   [app] resizing the pool to {}", v.pool_size);
                    last = Some(v.pool_size);
                    let _ = resized_tx.send(v.pool_size);
                }
            }
        }
    });

    println!("3. the operator raises the pool size: the application follows");
    let v2 = operator
        .put(&key, br#"{"database_url": "postgres://db-1/app", "pool_size": 32, "features": ["fast-checkout"]}"#.to_vec())
        .await?;
    live.wait_for(WAIT, |s| s.version == Some(v2)).await?;
    expect(live.get().expect("value").pool_size == 32, "the new value")?;

    println!("4. a broken value (bad JSON), then an invalid one (pool_size 0): both refused");
    let bad = operator.put(&key, b"{\"database_url\": ".to_vec()).await?;
    let st = live
        .wait_for(WAIT, |s| {
            s.rejected.as_ref().is_some_and(|r| r.version == bad)
        })
        .await?;
    println!(
        "   rejected: {}",
        st.rejected.as_ref().expect("rejected").reason
    );
    let invalid = operator
        .put(
            &key,
            br#"{"database_url": "postgres://db-1/app", "pool_size": 0}"#.to_vec(),
        )
        .await?;
    let st = live
        .wait_for(WAIT, |s| {
            s.rejected.as_ref().is_some_and(|r| r.version == invalid)
        })
        .await?;
    println!(
        "   rejected: {}",
        st.rejected.as_ref().expect("rejected").reason
    );
    expect(
        live.get().expect("value").pool_size == 32,
        "the last good value stays",
    )?;

    if let Some(outage) = &outage {
        println!("5. the registry goes down: the application keeps its last good value");
        (outage.begin)();
        let st = live
            .wait_for(OUTAGE_WAIT, |s| s.stale_since.is_some())
            .await?;
        expect(
            live.get().expect("value").pool_size == 32,
            "served while stale",
        )?;
        println!("   stale, serving version {:?}", st.version);
        (outage.end)();
        live.wait_for(OUTAGE_WAIT, |s| s.stale_since.is_none())
            .await?;
        println!("   the registry is back");
    } else {
        println!("5. (no outage to simulate on this registry from here)");
    }

    println!("6. the operator fixes the value with a compare-and-set");
    let fixed = put_fixed(&*operator, &key).await?;
    live.wait_for(WAIT, |s| s.version == Some(fixed) && s.rejected.is_none())
        .await?;
    expect(
        live.get().expect("value").pool_size == 16,
        "the fixed value",
    )?;
    // The application applied it before the key goes.
    let mut seen = Vec::new();
    while seen.last() != Some(&16) {
        match tokio::time::timeout(WAIT, resized.recv()).await {
            Ok(Some(size)) => seen.push(size),
            _ => return Err("the application did not resize its pool to 16".into()),
        }
    }

    operator.delete(&key).await?;
    live.wait_for(WAIT, |s| s.deleted).await?;
    drop(live);
    reactor.await?;
    while let Ok(size) = resized.try_recv() {
        seen.push(size);
    }
    println!("   the application resized its pool to {seen:?}");
    expect(
        seen == vec![8, 32, 16] || seen == vec![32, 16],
        "every good value, in order",
    )?;
    println!("done");
    Ok(())
}

/// Read, then write only if nobody changed the key in between (retrying on a conflict).
async fn put_fixed(kv: &dyn ConfigStore, key: &ConfigKey) -> Result<u64, BoxError> {
    loop {
        let current = kv.get(key).await?.map(|e| e.version);
        let expected = current.map_or(Expected::Absent, Expected::Version);
        let value = br#"{"database_url": "postgres://db-2/app", "pool_size": 16}"#.to_vec();
        match kv.put_if(key, value, expected).await {
            Ok(v) => return Ok(v),
            Err(waypost::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn expect(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("config_manager: expected {what}").into())
    }
}
