//! A standalone ZooKeeper 3.8 server, run straight from the jars with the system Java.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::process::{common_server_methods, launch, ManagedProcess, ServerSpec};
use super::{find_program, probe, HarnessError, ServerKind, INSTALL_HINT};

/// Where Debian's `zookeeper` package puts the server jar.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// The SLF4J binding and log4j jars the server logs through. The jar's manifest pulls
/// in all its other dependencies; `/usr/share/java/*` would not do, as it holds six
/// SLF4J bindings and SLF4J then picks the no-op one (no log at all).
const LOGGING_JARS: [&str; 2] = [
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
];

/// The log4j configuration of [`ZooKeeperServer::cli`]: warnings only, to stderr, so
/// stdout carries the command's output alone.
const CLI_LOG4J: &str = "cli-log4j.properties";
const CLI_LOG4J_PROPERTIES: &str = "\
log4j.rootLogger=WARN, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.Target=System.err
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%-5p %m%n
";

const LOG4J_PROPERTIES: &str = "\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.Target=System.out
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} - %-5p [%t:%C{1}@%L] - %m%n
";

/// How a [`ZooKeeperServer`] is configured.
#[derive(Debug, Clone)]
pub struct ZooKeeperOptions {
    /// ZooKeeper's `tickTime`. Sessions time out between 2 and 20 ticks unless
    /// [`min_session_timeout`](Self::min_session_timeout) /
    /// [`max_session_timeout`](Self::max_session_timeout) say otherwise, so the default
    /// of 200 ms makes session expiry take 0.4–4 s. Default: 200 ms.
    pub tick_time: Duration,
    /// `minSessionTimeout`; `None` keeps ZooKeeper's default of 2 ticks.
    pub min_session_timeout: Option<Duration>,
    /// `maxSessionTimeout`; `None` keeps ZooKeeper's default of 20 ticks.
    pub max_session_timeout: Option<Duration>,
    /// More `key=value` lines for `zoo.cfg` (unknown keys become `zookeeper.<key>`
    /// system properties, e.g. `("extendedTypesEnabled", "true")` for TTL nodes).
    pub extra_config: Vec<(String, String)>,
    /// The `java` to run; default: `$WAYPOST_JAVA`, else `java` on `PATH`.
    pub java: Option<PathBuf>,
    /// The Java class path; default: `$WAYPOST_ZOOKEEPER_CLASSPATH`, else the Debian
    /// package's `zookeeper.jar` plus the log4j SLF4J binding.
    pub classpath: Option<String>,
    /// How long a start or restart may take. Default: 60 s (it is a JVM; measured
    /// about 0.5–1 s here).
    pub startup_timeout: Duration,
}

impl Default for ZooKeeperOptions {
    fn default() -> Self {
        ZooKeeperOptions {
            tick_time: Duration::from_millis(200),
            min_session_timeout: None,
            max_session_timeout: None,
            extra_config: Vec::new(),
            java: None,
            classpath: None,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// The programs a ZooKeeper server is run with.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    java: PathBuf,
    classpath: String,
}

/// Finds `java` and the ZooKeeper jars, or says what is missing.
pub(crate) fn locate(opts: &ZooKeeperOptions) -> Result<Located, HarnessError> {
    let missing = |what: String| HarnessError::MissingBinary {
        kind: ServerKind::ZooKeeper,
        hint: format!("{what}; {INSTALL_HINT} (Debian packages `zookeeper` and a Java runtime)"),
    };
    let java = find_program(opts.java.as_deref(), "WAYPOST_JAVA", "java", &[]).map_err(missing)?;
    let classpath = match opts.classpath.clone().or_else(|| {
        std::env::var("WAYPOST_ZOOKEEPER_CLASSPATH")
            .ok()
            .filter(|v| !v.is_empty())
    }) {
        Some(cp) => cp,
        None => {
            if !Path::new(ZOOKEEPER_JAR).is_file() {
                return Err(missing(format!("{ZOOKEEPER_JAR} not found")));
            }
            std::iter::once(ZOOKEEPER_JAR)
                .chain(LOGGING_JARS.into_iter().filter(|j| Path::new(j).is_file()))
                .collect::<Vec<_>>()
                .join(":")
        }
    };
    Ok(Located { java, classpath })
}

/// Where a ZooKeeper process sits: alone, or as member `myid` of an ensemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZkRole {
    /// A standalone server: ready when `srvr` says `Mode: standalone`.
    Standalone,
    /// An ensemble member: ready when `srvr` says it leads or follows (so a quorum
    /// serves), or `standalone` for a one-member ensemble.
    Member {
        myid: u32,
        peer_port: u16,
        election_port: u16,
    },
}

/// How one ZooKeeper process is run and probed.
#[derive(Debug)]
pub(crate) struct ZkSpec {
    located: Located,
    cfg: PathBuf,
    log4j: PathBuf,
    dir: PathBuf,
    port: u16,
    role: ZkRole,
    startup_timeout: Duration,
}

impl ZkSpec {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes `zoo.cfg` (and `data/myid` for a member) into `dir` and returns the spec.
    /// `servers` holds the ensemble's `server.N=...` lines (empty when standalone).
    pub(crate) fn write(
        located: &Located,
        opts: &ZooKeeperOptions,
        dir: &Path,
        port: u16,
        role: ZkRole,
        servers: &str,
    ) -> Result<Self, HarnessError> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)
            .map_err(|e| HarnessError::io(format!("creating {}", data.display()), e))?;
        let mut cfg = format!(
            "tickTime={}\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n4lw.commands.whitelist=*\nmaxClientCnxns=0\n\
             forceSync=no\n",
            millis(opts.tick_time),
            data.display(),
        );
        if let ZkRole::Member { myid, .. } = role {
            write_file(&data.join("myid"), &format!("{myid}\n"))?;
            // Followers give up on a silent leader after syncLimit ticks (1 s at the
            // default 200 ms tick); election connections time out after 1 s.
            cfg.push_str("initLimit=10\nsyncLimit=5\ncnxTimeout=1000\n");
            cfg.push_str(servers);
        }
        if let Some(min) = opts.min_session_timeout {
            cfg.push_str(&format!("minSessionTimeout={}\n", millis(min)));
        }
        if let Some(max) = opts.max_session_timeout {
            cfg.push_str(&format!("maxSessionTimeout={}\n", millis(max)));
        }
        for (key, value) in &opts.extra_config {
            cfg.push_str(&format!("{key}={value}\n"));
        }
        let cfg_path = dir.join("zoo.cfg");
        write_file(&cfg_path, &cfg)?;
        let log4j = dir.join("log4j.properties");
        write_file(&log4j, LOG4J_PROPERTIES)?;
        write_file(&dir.join(CLI_LOG4J), CLI_LOG4J_PROPERTIES)?;
        Ok(ZkSpec {
            located: located.clone(),
            cfg: cfg_path,
            log4j,
            dir: dir.to_owned(),
            port,
            role,
            startup_timeout: opts.startup_timeout,
        })
    }

    /// The `Mode:` line of `srvr` (`leader`, `follower`, `standalone`...), if it serves.
    async fn mode(&self) -> Option<String> {
        let reply = probe::four_letter(&self.address(), "srvr", probe::PROBE_TIMEOUT)
            .await
            .ok()?;
        reply
            .lines()
            .find_map(|l| l.strip_prefix("Mode:"))
            .map(|m| m.trim().to_owned())
    }
}

impl ServerSpec for ZkSpec {
    const KIND: ServerKind = ServerKind::ZooKeeper;

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.located.java);
        cmd.arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-XX:-UsePerfData")
            .arg(format!("-Djava.io.tmpdir={}", self.dir.display()))
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                self.log4j.display()
            ))
            .arg("-Dzookeeper.jmx.log4j.disable=true")
            .arg("-cp")
            .arg(&self.located.classpath)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&self.cfg);
        cmd
    }

    async fn probe(&self) -> bool {
        match probe::four_letter(&self.address(), "ruok", probe::PROBE_TIMEOUT).await {
            Ok(reply) if reply.trim() == "imok" => {}
            _ => return false,
        }
        let mode = self.mode().await;
        match self.role {
            ZkRole::Standalone => mode.as_deref() == Some("standalone"),
            ZkRole::Member { .. } => {
                matches!(mode.as_deref(), Some("leader" | "follower" | "standalone"))
            }
        }
    }

    fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

fn write_file(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

/// A ZooKeeper server on 127.0.0.1, standalone or one member of a
/// [`ZooKeeperEnsemble`](super::ZooKeeperEnsemble) (see the [module docs](super)).
pub struct ZooKeeperServer {
    process: ManagedProcess<ZkSpec>,
}

impl fmt::Debug for ZooKeeperServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZooKeeperServer")
            .field("address", &self.address())
            .field("role", &self.process.spec().role)
            .field("process", &self.process)
            .finish()
    }
}

impl ZooKeeperServer {
    /// Starts a server with [`ZooKeeperOptions::default`] and waits until it is ready.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(ZooKeeperOptions::default()).await
    }

    /// Starts a server with `opts` and waits until it is ready (`ruok` answers `imok`
    /// and `srvr` says `Mode: standalone`).
    pub async fn start_with(opts: ZooKeeperOptions) -> Result<Self, HarnessError> {
        let located = locate(&opts)?;
        let process = launch(1, |dir, ports| {
            ZkSpec::write(&located, &opts, dir, ports[0], ZkRole::Standalone, "")
        })
        .await?;
        tracing::info!(address = %process.spec().address(), "ZooKeeper ready");
        Ok(ZooKeeperServer { process })
    }

    /// Wraps an ensemble member's process.
    pub(crate) fn member(process: ManagedProcess<ZkSpec>) -> Self {
        ZooKeeperServer { process }
    }

    /// Whether the log of the latest spawn says a port was taken.
    pub(crate) fn port_in_use(&self) -> bool {
        self.process.port_in_use()
    }

    /// What the server says it is now (`srvr`'s `Mode:` line: `leader`, `follower`,
    /// `standalone`...), in one short probe; `None` if it does not answer or does not
    /// serve (no quorum, paused, killed).
    pub async fn mode(&self) -> Option<String> {
        self.pid()?;
        self.process.spec().mode().await
    }

    /// The member's id (its `myid`) in an ensemble; `None` for a standalone server.
    pub fn myid(&self) -> Option<u32> {
        match self.process.spec().role {
            ZkRole::Member { myid, .. } => Some(myid),
            ZkRole::Standalone => None,
        }
    }

    /// The quorum (follower-to-leader) and election addresses of an ensemble member,
    /// `127.0.0.1:PORT` each; `None` for a standalone server.
    pub fn peer_addresses(&self) -> Option<(String, String)> {
        match self.process.spec().role {
            ZkRole::Member {
                peer_port,
                election_port,
                ..
            } => Some((
                format!("127.0.0.1:{peer_port}"),
                format!("127.0.0.1:{election_port}"),
            )),
            ZkRole::Standalone => None,
        }
    }

    /// Runs one command of ZooKeeper's own CLI (`zkCli.sh`'s `ZooKeeperMain`, with the
    /// server's `java` and class path) against this server: `-server 127.0.0.1:PORT`
    /// followed by `args`, e.g. `["create", "/a", "data"]` or `["get", "/a"]`. The
    /// process is killed if it has not exited within `timeout`.
    pub async fn cli(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output, HarnessError> {
        let spec = self.process.spec();
        let mut cmd = Command::new(&spec.located.java);
        cmd.arg("-Xmx64m")
            .arg("-XX:+UseSerialGC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-XX:-UsePerfData")
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                spec.dir.join(CLI_LOG4J).display()
            ))
            .arg("-cp")
            .arg(&spec.located.classpath)
            .arg("org.apache.zookeeper.ZooKeeperMain")
            .arg("-server")
            .arg(spec.address())
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let what = format!(
            "running the ZooKeeper CLI {args:?} against {}",
            spec.address()
        );
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(output) => output.map_err(|e| HarnessError::io(what, e)),
            Err(_) => Err(HarnessError::io(
                what,
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no exit within {timeout:?}"),
                ),
            )),
        }
    }

    /// How many watches the server holds now, over all clients (`wchs`: persistent and
    /// one-shot watches alike).
    pub async fn watch_count(&self) -> std::io::Result<usize> {
        let reply =
            probe::four_letter(&self.address(), "wchs", std::time::Duration::from_secs(5)).await?;
        reply
            .lines()
            .find_map(|l| l.strip_prefix("Total watches:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected `wchs` reply: {reply:?}")))
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.process.spec().address()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.process.spec().port
    }

    /// A waypost URL for this server: `zk://127.0.0.1:PORT/services`.
    pub fn url(&self) -> String {
        format!("zk://{}/services", self.address())
    }
}

common_server_methods!(ZooKeeperServer);
