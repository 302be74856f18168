//! `config get|put|delete|list|watch`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use futures::StreamExt;
use waypost::backend::Event;
use waypost::kv::{ConfigEntry, ConfigKey, ConfigStore};

use crate::output::table;
use crate::{interrupted, parse, within, Ctx, Failure, Outcome};

/// Configuration keys.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Prints a key's value (exit code 1 when absent).
    Get {
        /// The key: `/`-separated segments of `[A-Za-z0-9._-]`.
        key: String,
    },
    /// Writes a value: the argument, `--file PATH`, or stdin with `-`.
    Put {
        /// The key.
        key: String,
        /// The value (`-`: read stdin).
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
    },
    /// Deletes a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Lists the keys strictly below a prefix, with their versions.
    List {
        /// The prefix.
        prefix: String,
    },
    /// Follows a key (or every key below it with `--prefix`): a snapshot, then changes.
    Watch {
        /// The key or prefix.
        key: String,
        /// Watch every key strictly below `key`.
        #[arg(long)]
        prefix: bool,
        /// Stop after this many events (default: until Ctrl-C).
        #[arg(long)]
        events: Option<usize>,
    },
}

fn store(ctx: &Ctx) -> Result<std::sync::Arc<dyn ConfigStore>, Failure> {
    Ok(ctx.discovery.kv()?)
}

fn value_text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn entry_json(e: &ConfigEntry) -> serde_json::Value {
    serde_json::json!({"key": e.key.to_string(), "version": e.version, "value": value_text(&e.value)})
}

pub(crate) async fn run(ctx: &Ctx, cmd: ConfigCommand) -> Outcome {
    let kv = store(ctx)?;
    match cmd {
        ConfigCommand::Get { key } => {
            let key: ConfigKey = parse(&key)?;
            match within(ctx.timeout, "reading a key", kv.get(&key)).await? {
                Some(e) if ctx.json => println!("{}", entry_json(&e)),
                Some(e) => {
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&e.value);
                    if !e.value.ends_with(b"\n") {
                        let _ = out.write_all(b"\n");
                    }
                }
                None => return Err(Failure::new(format!("no such key: {key}"))),
            }
        }
        ConfigCommand::Put { key, value, file } => {
            let key: ConfigKey = parse(&key)?;
            let bytes = match (value.as_deref(), file) {
                (_, Some(path)) => std::fs::read(&path).map_err(|e| {
                    Failure::new(format!("cannot read {}: {e}", path.display())).with_code(2)
                })?,
                (Some("-"), None) => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
                    buf
                }
                (Some(v), None) => v.as_bytes().to_vec(),
                (None, None) => {
                    return Err(
                        Failure::new("no value: give VALUE, `-` for stdin, or --file").with_code(2),
                    )
                }
            };
            let version = within(ctx.timeout, "writing a key", kv.put(&key, bytes)).await?;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"key": key.to_string(), "version": version})
                );
            } else {
                println!("{key}: version {version}");
            }
        }
        ConfigCommand::Delete { key } => {
            let key: ConfigKey = parse(&key)?;
            let existed = within(ctx.timeout, "deleting a key", kv.delete(&key)).await?;
            if !existed {
                return Err(Failure::new(format!("no such key: {key}")));
            }
            println!("{key}: deleted");
        }
        ConfigCommand::List { prefix } => {
            let prefix: ConfigKey = parse(&prefix)?;
            let listing = within(ctx.timeout, "listing keys", kv.list(&prefix)).await?;
            if ctx.json {
                let all: Vec<_> = listing.entries.iter().map(entry_json).collect();
                println!("{}", serde_json::json!(all));
            } else {
                let rows: Vec<[String; 3]> = listing
                    .entries
                    .iter()
                    .map(|e| {
                        [
                            e.key.to_string(),
                            e.version.to_string(),
                            format!("{} bytes", e.value.len()),
                        ]
                    })
                    .collect();
                println!("{}", table(&["KEY", "VERSION", "SIZE"], &rows));
            }
        }
        ConfigCommand::Watch {
            key,
            prefix,
            events,
        } => {
            let key: ConfigKey = parse(&key)?;
            let mut stream = if prefix {
                kv.watch_prefix(&key)
            } else {
                kv.watch(&key)
            };
            let mut seen = 0;
            while events.is_none_or(|l| seen < l) {
                let e = tokio::select! {
                    e = stream.next() => e,
                    _ = interrupted() => break,
                };
                let e = match e {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(Failure::new("the watch ended")),
                };
                let (kind, entries, removed, rev) = match &e {
                    Event::Snapshot(v, r) => ("snapshot", v.clone(), None, Some(*r)),
                    Event::Resynced(v, r) => ("resynced", v.clone(), None, Some(*r)),
                    Event::Added(v, r) => ("added", vec![v.clone()], None, Some(*r)),
                    Event::Updated(v, r) => ("updated", vec![v.clone()], None, Some(*r)),
                    Event::Removed(k, r) => ("removed", vec![], Some(k.to_string()), Some(*r)),
                    Event::Stale(_) => ("stale", vec![], None, None),
                };
                if ctx.json {
                    println!(
                        "{}",
                        serde_json::json!({"event": kind, "revision": rev, "removed": removed,
                            "entries": entries.iter().map(entry_json).collect::<Vec<_>>()})
                    );
                } else {
                    let mut line = format!("{kind:<9}");
                    if let Some(r) = rev {
                        line.push_str(&format!(" rev {r}"));
                    }
                    if let Some(k) = removed {
                        line.push_str(&format!("  {k}"));
                    }
                    for en in &entries {
                        line.push_str(&format!("  {}={}", en.key, value_text(&en.value)));
                    }
                    println!("{line}");
                }
                seen += 1;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
