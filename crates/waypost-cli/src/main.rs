#![doc = include_str!("../README.md")]

mod coord;
mod discovery;
mod kv;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use waypost::{Config, Discovery};

/// Service discovery and coordination on ZooKeeper, Consul, etcd — one command, by URL.
#[derive(Debug, Parser)]
#[command(name = "waypost", version, about, propagate_version = true)]
struct Cli {
    /// The registry: `zk://host:2181/root`, `consul://host:8500`, `etcd://host:2379/prefix`.
    /// Options as query parameters or `WAYPOST_<OPTION>` variables.
    #[arg(long, global = true, env = "WAYPOST_URL", hide_env_values = true)]
    url: Option<String>,

    /// Machine-readable output: JSON, one object per line for streams.
    #[arg(long, global = true)]
    json: bool,

    /// How long to wait for the registry to answer a one-shot command.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The services in the registry.
    Services,
    /// The live instances of a service.
    Instances {
        /// The service.
        service: String,
    },
    /// A service's live event stream: a snapshot, then changes, `stale` / `resynced`.
    Watch {
        /// The service.
        service: String,
        /// Stop after this many events (default: until Ctrl-C).
        #[arg(long)]
        events: Option<usize>,
    },
    /// Registers an instance and holds it until Ctrl-C, then deregisters it.
    Register(discovery::RegisterArgs),
    /// Configuration keys: get, put, delete, list, watch.
    #[command(subcommand)]
    Config(kv::ConfigCommand),
    /// Runs a command while holding a lock (like `consul lock`, `etcdctl lock`).
    Lock(coord::LockArgs),
    /// Campaigns in an election and leads until Ctrl-C (then resigns).
    Elect {
        /// The election.
        name: String,
        /// The value to lead with (what `waypost leader` shows).
        value: String,
    },
    /// The current leader of an election.
    Leader {
        /// The election.
        name: String,
        /// Follow the leader as it changes.
        #[arg(long)]
        watch: bool,
    },
    /// Shell completions, printed to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// A failure, as the user reads it: the message, and what to do about it.
pub(crate) struct Failure {
    message: String,
    hint: Option<&'static str>,
    code: u8,
}

impl Failure {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            code: 1,
        }
    }

    pub(crate) fn with_code(mut self, code: u8) -> Self {
        self.code = code;
        self
    }
}

impl From<waypost::Error> for Failure {
    fn from(e: waypost::Error) -> Self {
        let hint = match &e {
            waypost::Error::Unavailable { .. } | waypost::Error::Timeout { .. } => {
                Some("is the registry running and reachable at --url (or WAYPOST_URL)?")
            }
            waypost::Error::Unauthorized { .. } => {
                Some("check the credentials in the URL or the token option")
            }
            waypost::Error::InvalidConfig { .. } => {
                Some("check --url (or WAYPOST_URL) and its options")
            }
            _ => None,
        };
        // The whole chain, on one line.
        let message = waypost::Report::from(e).to_string();
        Self {
            message,
            hint,
            code: 1,
        }
    }
}

pub(crate) type Outcome = Result<ExitCode, Failure>;

/// Runs `f` within the one-shot timeout.
pub(crate) async fn within<T>(
    timeout: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = waypost::Result<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(_) => Err(Failure::from(waypost::Error::Timeout {
            operation: what,
            after: timeout,
        })),
    }
}

/// The connection the command runs on.
pub(crate) struct Ctx {
    pub(crate) discovery: Discovery,
    pub(crate) json: bool,
    pub(crate) timeout: Duration,
}

async fn connect(cli: &Cli) -> Result<Discovery, Failure> {
    let config = match &cli.url {
        Some(url) => Config::from_url(url.clone()),
        None => Config::from_env().ok_or_else(|| {
            let mut f = Failure::new("no registry given");
            f.hint = Some("pass --url (zk://…, consul://…, etcd://…) or set WAYPOST_URL");
            f
        })?,
    };
    within(cli.timeout, "connecting", waypost::connect_config(&config)).await
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "waypost",
            &mut std::io::stdout(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = Ctx {
        discovery: connect(&cli).await?,
        json: cli.json,
        timeout: cli.timeout,
    };
    let outcome = match cli.command {
        Command::Services => discovery::services(&ctx).await,
        Command::Instances { service } => discovery::instances(&ctx, &service).await,
        Command::Watch { service, events } => discovery::watch(&ctx, &service, events).await,
        Command::Register(args) => discovery::register(&ctx, args).await,
        Command::Config(c) => kv::run(&ctx, c).await,
        Command::Lock(args) => coord::lock(&ctx, args).await,
        Command::Elect { name, value } => coord::elect(&ctx, &name, value).await,
        Command::Leader { name, watch } => coord::leader(&ctx, &name, watch).await,
        Command::Completions { .. } => unreachable!("handled above"),
    };
    // Close the session: whatever this process still has bound to it (a contender left by
    // a lock that timed out, a lock whose release failed) goes at once, not after the
    // session's timeout.
    if let Err(e) = within(ctx.timeout, "closing the session", ctx.discovery.shutdown()).await {
        eprintln!("waypost: warning: the session was not closed ({}); the registry drops it after its timeout", e.message);
    }
    outcome
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WAYPOST_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waypost: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(f) => {
            match f.hint {
                Some(hint) => eprintln!("waypost: error: {} ({hint})", f.message),
                None => eprintln!("waypost: error: {}", f.message),
            }
            ExitCode::from(f.code)
        }
    }
}

/// Parses a name of the registry's kind, as a usage error when invalid.
pub(crate) fn parse<T: std::str::FromStr<Err = waypost::Error>>(s: &str) -> Result<T, Failure> {
    s.parse::<T>().map_err(Failure::from)
}

/// Waits for Ctrl-C (or SIGTERM).
pub(crate) async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
