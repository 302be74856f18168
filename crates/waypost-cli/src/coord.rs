//! `lock NAME -- CMD…`, `elect NAME VALUE`, `leader NAME [--watch]`.

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use waypost::backend::Event;
use waypost::coord::{Coordinator, Leader, Name};

use crate::{interrupted, parse, within, Ctx, Failure, Outcome};

/// The exit code when a held lock or leadership is lost.
const LOST: u8 = 3;

/// `lock NAME [--timeout D] [--try] -- CMD…`
#[derive(Debug, clap::Args)]
pub(crate) struct LockArgs {
    /// The lock.
    name: String,
    /// Give up waiting for the lock after this long (default: wait).
    #[arg(long = "wait", value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Fail at once when the lock is held.
    #[arg(long = "try", conflicts_with = "wait")]
    try_only: bool,
    /// The command to run while holding the lock; it gets the fencing token in
    /// `WAYPOST_FENCING_TOKEN`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn coordinator(ctx: &Ctx) -> Result<std::sync::Arc<dyn Coordinator>, Failure> {
    Ok(ctx.discovery.coordinator()?)
}

fn note(ctx: &Ctx, json: serde_json::Value, text: String) {
    if ctx.json {
        eprintln!("{json}");
    } else {
        eprintln!("{text}");
    }
}

pub(crate) async fn lock(ctx: &Ctx, args: LockArgs) -> Outcome {
    let coord = coordinator(ctx)?;
    let name: Name = parse(&args.name)?;
    let guard = if args.try_only {
        within(ctx.timeout, "taking a lock", coord.try_lock(&name)).await?
    } else if let Some(d) = args.wait {
        coord.lock_for(&name, d).await?
    } else {
        tokio::select! {
            g = coord.lock(&name) => g?,
            _ = interrupted() => return Ok(ExitCode::from(130)),
        }
    };
    let token = guard.token();
    note(
        ctx,
        serde_json::json!({"lock": name.to_string(), "token": token.0, "event": "acquired"}),
        format!("waypost: holding {name} (fencing token {token})"),
    );
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("WAYPOST_FENCING_TOKEN", token.to_string())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::new(format!("cannot run `{}`: {e}", args.command[0])))?;
    let outcome = tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| Failure::new(format!("waiting for the command: {e}")))?;
            Ok(ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8)))
        }
        why = guard.lost() => {
            // Stop the command before anyone else can take the lock.
            let _ = child.kill().await;
            Err(Failure::new(format!("lost the lock {name}: {why}; the command was stopped")).with_code(LOST))
        }
        _ = interrupted() => {
            let _ = child.kill().await;
            Ok(ExitCode::from(130))
        }
    };
    if !guard.is_lost() {
        within(ctx.timeout, "releasing the lock", guard.release()).await?;
        note(
            ctx,
            serde_json::json!({"lock": name.to_string(), "event": "released"}),
            format!("waypost: released {name}"),
        );
    }
    outcome
}

pub(crate) async fn elect(ctx: &Ctx, name: &str, value: String) -> Outcome {
    let coord = coordinator(ctx)?;
    let name: Name = parse(name)?;
    note(
        ctx,
        serde_json::json!({"election": name.to_string(), "event": "campaigning"}),
        format!("waypost: campaigning in {name}"),
    );
    let leadership = tokio::select! {
        l = coord.campaign(&name, value.into_bytes()) => l?,
        _ = interrupted() => return Ok(ExitCode::from(130)),
    };
    let token = leadership.token();
    let elected =
        serde_json::json!({"election": name.to_string(), "event": "elected", "token": token.0});
    if ctx.json {
        println!("{elected}");
    } else {
        println!("elected in {name} (fencing token {token})");
    }
    tokio::select! {
        why = leadership.lost() => {
            Err(Failure::new(format!("lost leadership of {name}: {why}")).with_code(LOST))
        }
        _ = interrupted() => {
            within(ctx.timeout, "resigning", leadership.resign()).await?;
            if !ctx.json {
                println!("resigned from {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn leader_json(name: &Name, l: &Option<Leader>) -> serde_json::Value {
    match l {
        Some(l) => {
            serde_json::json!({"election": name.to_string(), "leader": String::from_utf8_lossy(&l.value), "token": l.token.0})
        }
        None => serde_json::json!({"election": name.to_string(), "leader": null}),
    }
}

fn leader_line(name: &Name, l: &Option<Leader>) -> String {
    match l {
        Some(l) => format!(
            "{}  (fencing token {})",
            String::from_utf8_lossy(&l.value),
            l.token
        ),
        None => format!("no leader in {name}"),
    }
}

pub(crate) async fn leader(ctx: &Ctx, name: &str, follow: bool) -> Outcome {
    let coord = coordinator(ctx)?;
    let name: Name = parse(name)?;
    if !follow {
        let l = within(ctx.timeout, "reading the leader", coord.leader(&name)).await?;
        if ctx.json {
            println!("{}", leader_json(&name, &l));
        } else {
            println!("{}", leader_line(&name, &l));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut events = coord.observe(&name);
    let mut current: Option<Leader>;
    loop {
        let e = tokio::select! {
            e = events.next() => e,
            _ = interrupted() => return Ok(ExitCode::SUCCESS),
        };
        let e = match e {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(Failure::new("the watch ended")),
        };
        match e {
            Event::Snapshot(l, _) | Event::Resynced(l, _) => current = l.into_iter().next(),
            Event::Added(l, _) | Event::Updated(l, _) => current = Some(l),
            Event::Removed(..) => current = None,
            Event::Stale(e) => {
                eprintln!("waypost: registry unreachable, the leader shown may be stale: {e}");
                continue;
            }
        }
        if ctx.json {
            println!("{}", leader_json(&name, &current));
        } else {
            println!("{}", leader_line(&name, &current));
        }
    }
}
