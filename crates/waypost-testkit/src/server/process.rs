//! The one process manager behind every server type: spawn, probe, signal, reap.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{ports, probe, HarnessError, ServerKind};

/// How many log lines an error carries.
const LOG_TAIL_LINES: usize = 40;
/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(50);
/// How long `stop()` waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a SIGKILLed process may take to be reaped.
const REAP_DEADLINE: Duration = Duration::from_secs(10);
/// The line the harness writes to the log before each spawn.
const SPAWN_MARKER: &str = "--- waypost-testkit: spawning";
/// How many times a start is tried again when a port turned out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// What differs between the servers: how to run one, and how to tell it is ready.
pub(crate) trait ServerSpec: Send + Sync + 'static {
    /// Which server this is.
    const KIND: ServerKind;
    /// The command that runs the server (program, arguments, environment). The
    /// harness sets the working directory, stdio and kill-on-drop.
    fn command(&self) -> Command;
    /// One readiness probe; the caller bounds it by [`probe::PROBE_TIMEOUT`].
    fn probe(&self) -> impl Future<Output = bool> + Send;
    /// How long a start (or restart) may take before it counts as failed.
    fn startup_timeout(&self) -> Duration;
}

/// A server process in its own temp dir, with its output in a log file there.
pub(crate) struct ManagedProcess<S> {
    spec: S,
    dir: TempDir,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

impl<S: ServerSpec> fmt::Debug for ManagedProcess<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedProcess")
            .field("kind", &S::KIND)
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Makes the temp dir one server lives in.
pub(crate) fn make_dir(kind: ServerKind) -> Result<TempDir, HarnessError> {
    tempfile::Builder::new()
        .prefix(&format!("waypost-{}-", kind.slug()))
        .tempdir()
        .map_err(|e| HarnessError::io(format!("creating a temp dir for {kind}"), e))
}

/// Starts a server on fresh ports: `build` gets the temp dir and `nports` free ports and
/// writes whatever config the server needs. When the server cannot bind a port (someone
/// took it between our check and its bind), it is tried again with new ports.
pub(crate) async fn launch<S: ServerSpec>(
    nports: usize,
    mut build: impl FnMut(&Path, &[u16]) -> Result<S, HarnessError>,
) -> Result<ManagedProcess<S>, HarnessError> {
    let mut attempt = 1;
    loop {
        let dir = make_dir(S::KIND)?;
        let ports = ports::allocate(nports)?;
        let spec = build(dir.path(), &ports)?;
        let mut process = ManagedProcess::new(spec, dir);
        process.spawn()?;
        match process.wait_ready(process.spec.startup_timeout()).await {
            Ok(()) => return Ok(process),
            Err(e) if process.port_in_use() && attempt < PORT_ATTEMPTS => {
                tracing::warn!(kind = %S::KIND, attempt, ?ports, error = %e, "a port was taken; retrying with new ports");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

impl<S: ServerSpec> ManagedProcess<S> {
    /// A process that is not spawned yet.
    pub(crate) fn new(spec: S, dir: TempDir) -> Self {
        let log_path = dir.path().join(format!("{}.log", S::KIND.slug()));
        ManagedProcess {
            spec,
            dir,
            log_path,
            child: Mutex::new(None),
        }
    }

    pub(crate) fn kind(&self) -> ServerKind {
        S::KIND
    }

    pub(crate) fn spec(&self) -> &S {
        &self.spec
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns the server (it must not be running), output appended to the log file.
    pub(crate) fn spawn(&mut self) -> Result<(), HarnessError> {
        let kind = S::KIND;
        let mut cmd = self.spec.command();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log_path.display()), e))?;
        let line = format!("{SPAWN_MARKER} {:?}\n", cmd.as_std());
        let _ = log.write_all(line.as_bytes());
        let stderr = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating the log file handle", e))?;
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::io(format!("spawning {kind} ({:?})", cmd.as_std()), e))?;
        tracing::info!(%kind, pid = ?child.id(), dir = %self.dir.path().display(), "spawned server");
        *self.lock() = Some(child);
        Ok(())
    }

    /// The OS process id while the process runs (`None` once it is killed, stopped or
    /// has exited).
    pub(crate) fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => child.id(),
            _ => None,
        }
    }

    /// The exit status, if the process has exited (and was reaped by this call).
    fn exit_status(&self) -> Option<ExitStatus> {
        self.lock().as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `sig` to the running process.
    pub(crate) fn signal(&self, sig: Signal) -> Result<(), HarnessError> {
        let kind = S::KIND;
        let pid = self.pid().ok_or(HarnessError::NotRunning { kind })?;
        let pid = i32::try_from(pid).map_err(|_| HarnessError::NotRunning { kind })?;
        tracing::debug!(%kind, pid, signal = sig.as_str(), "signalling server");
        signal::kill(Pid::from_raw(pid), sig).map_err(|source| HarnessError::Signal {
            kind,
            signal: sig.as_str(),
            source,
        })
    }

    /// SIGSTOP, then waits (at most 2 s) until every thread of the process is stopped: a
    /// signal takes effect asynchronously, and a request sent right after `pause()`
    /// returns must not be served (a Go or Java server runs many threads).
    pub(crate) fn pause(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGSTOP)?;
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !all_threads_stopped(pid) {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(kind = %S::KIND, pid, "not every server thread stopped within 2 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGKILLs the process (a stopped one too) and reaps it. Idempotent.
    pub(crate) fn kill(&self) -> Result<(), HarnessError> {
        let kind = S::KIND;
        let mut guard = self.lock();
        let Some(child) = guard.as_mut() else {
            return Ok(());
        };
        if let Ok(Some(_)) = child.try_wait() {
            *guard = None;
            return Ok(());
        }
        let pid = child.id();
        // An error here means the process is already gone; reaping below settles it.
        let _ = child.start_kill();
        let deadline = Instant::now() + REAP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(%kind, ?pid, %status, "killed server");
                    *guard = None;
                    return Ok(());
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(None) => {
                    return Err(HarnessError::io(
                        format!("reaping {kind} (pid {pid:?}) after SIGKILL"),
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "process did not exit"),
                    ));
                }
                Err(e) => {
                    *guard = None;
                    return Err(HarnessError::io(format!("reaping {kind} (pid {pid:?})"), e));
                }
            }
        }
    }

    /// SIGTERM (plus SIGCONT, in case it is paused), wait up to a deadline, then SIGKILL.
    pub(crate) async fn stop(&self) -> Result<(), HarnessError> {
        if self.pid().is_none() {
            return self.kill();
        }
        self.signal(Signal::SIGTERM)?;
        let _ = self.signal(Signal::SIGCONT);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                tracing::info!(kind = %S::KIND, %status, "server stopped");
                *self.lock() = None;
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::warn!(kind = %S::KIND, "server ignored SIGTERM; sending SIGKILL");
        self.kill()
    }

    /// One probe, bounded by [`probe::PROBE_TIMEOUT`]; false when no process runs.
    pub(crate) async fn is_ready(&self) -> bool {
        if self.pid().is_none() {
            return false;
        }
        tokio::time::timeout(probe::PROBE_TIMEOUT, self.spec.probe())
            .await
            .unwrap_or(false)
    }

    /// Polls until the server is ready; fails at once if the process exits.
    pub(crate) async fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let kind = S::KIND;
        let start = Instant::now();
        loop {
            {
                let mut guard = self.lock();
                match guard.as_mut() {
                    None => return Err(HarnessError::NotRunning { kind }),
                    Some(child) => {
                        if let Ok(Some(status)) = child.try_wait() {
                            *guard = None;
                            drop(guard);
                            return Err(HarnessError::Exited {
                                kind,
                                status: status.to_string(),
                                log_tail: self.log_tail(),
                            });
                        }
                    }
                }
            }
            if self.is_ready().await {
                tracing::debug!(%kind, waited = ?start.elapsed(), "server ready");
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(HarnessError::NotReady {
                    kind,
                    waited,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL.min(timeout - waited)).await;
        }
    }

    /// Kills the process if it runs, starts it again with the same command (same ports,
    /// same data dir) and waits until it is ready.
    pub(crate) async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill()?;
        let mut attempt = 1;
        loop {
            self.spawn()?;
            match self.wait_ready(self.spec.startup_timeout()).await {
                Ok(()) => return Ok(()),
                // The old process's ports are normally free at once; give a straggler
                // (another socket briefly on the port) a moment, same ports again.
                Err(e) if self.port_in_use() && attempt < PORT_ATTEMPTS => {
                    tracing::warn!(kind = %S::KIND, attempt, error = %e, "port still in use on restart; retrying");
                    self.kill()?;
                    tokio::time::sleep(Duration::from_millis(250 * attempt as u64)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the log of the latest spawn says a port could not be bound (Go: `bind:
    /// address already in use`; Java: `java.net.BindException: Address already in use`).
    pub(crate) fn port_in_use(&self) -> bool {
        let Ok(text) = read_end(&self.log_path, 256 * 1024) else {
            return false;
        };
        let latest = text.rsplit(SPAWN_MARKER).next().unwrap_or_default();
        latest
            .to_ascii_lowercase()
            .contains("address already in use")
    }

    /// The last lines of the server's log.
    pub(crate) fn log_tail(&self) -> String {
        read_tail(&self.log_path, LOG_TAIL_LINES)
            .unwrap_or_else(|e| format!("<could not read {}: {e}>", self.log_path.display()))
    }
}

impl<S> Drop for ManagedProcess<S> {
    fn drop(&mut self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.start_kill();
                let deadline = Instant::now() + REAP_DEADLINE;
                while let Ok(None) = child.try_wait() {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

/// The last `max` bytes of a file, lossily decoded.
fn read_end(path: &Path, max: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
fn read_tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let text = read_end(path, 64 * 1024)?;
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

/// The inherent methods every server type shares, delegating to its `process` field.
macro_rules! common_server_methods {
    ($ty:ty) => {
        impl $ty {
            /// Which server this is.
            pub fn kind(&self) -> $crate::server::ServerKind {
                self.process.kind()
            }

            /// The OS process id while the server process runs; `None` after
            /// [`kill`](Self::kill) or [`stop`](Self::stop) (or if it exited).
            pub fn pid(&self) -> Option<u32> {
                self.process.pid()
            }

            /// SIGKILLs the server process and reaps it. Its data dir stays, so
            /// [`restart`](Self::restart) brings it back with its data. Does nothing if
            /// it is not running.
            pub fn kill(&mut self) -> Result<(), $crate::server::HarnessError> {
                self.process.kill()
            }

            /// Freezes the server process (SIGSTOP): its ports still accept connections,
            /// but nothing answers, as with a hung server or a long GC pause.
            pub fn pause(&self) -> Result<(), $crate::server::HarnessError> {
                self.process.pause()
            }

            /// Thaws a paused server process (SIGCONT).
            pub fn resume(&self) -> Result<(), $crate::server::HarnessError> {
                self.process.signal(::nix::sys::signal::Signal::SIGCONT)
            }

            /// Kills the server if it runs, starts it again on the same ports with the
            /// same data dir, and waits until it is ready.
            pub async fn restart(&mut self) -> Result<(), $crate::server::HarnessError> {
                self.process.restart().await
            }

            /// Stops the server gracefully: SIGTERM, then SIGKILL if it has not exited
            /// within 10 s. Its data dir stays.
            pub async fn stop(&mut self) -> Result<(), $crate::server::HarnessError> {
                self.process.stop().await
            }

            /// Waits until a readiness probe succeeds, polling every 50 ms; fails when
            /// `timeout` passes or the process exits first.
            pub async fn wait_ready(
                &self,
                timeout: ::std::time::Duration,
            ) -> Result<(), $crate::server::HarnessError> {
                self.process.wait_ready(timeout).await
            }

            /// One readiness probe, bounded by a short (500 ms) timeout. False when the
            /// process is not running, paused, or not (yet) serving.
            pub async fn is_ready(&self) -> bool {
                self.process.is_ready().await
            }

            /// The temp dir the server lives in (config, data, log). Deleted on drop.
            pub fn dir(&self) -> &::std::path::Path {
                self.process.dir()
            }

            /// The file the server's stdout and stderr go to.
            pub fn log_path(&self) -> &::std::path::Path {
                self.process.log_path()
            }

            /// The last 40 lines of the server's log.
            pub fn log_tail(&self) -> String {
                self.process.log_tail()
            }
        }
    };
}

pub(crate) use common_server_methods;

/// Whether every thread of `pid` is stopped (state `T` or `t` in `/proc/PID/task/*/stat`).
/// Where `/proc` cannot be read, it cannot tell and says yes.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            // `pid (comm) state ...`: the state follows the last `)`.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state == 'T' || state == 't')
        })
    })
}
