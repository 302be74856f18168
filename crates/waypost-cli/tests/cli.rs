//! The `waypost` binary, run as an operator would, against a real etcd (the other
//! registries go through the same contract, pinned by the conformance matrix): register in
//! one process, list and watch from others, Ctrl-C deregisters; configuration; locks and
//! elections; errors as one line with a hint.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use assert_cmd::cargo::cargo_bin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(20);

fn waypost(url: &str) -> Command {
    let mut c = Command::new(cargo_bin("waypost"));
    c.env_remove("WAYPOST_URL").arg("--url").arg(url);
    c
}

/// A long-running `waypost` whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start waypost");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line containing `needle`, within the deadline.
    fn expect_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with `{needle}` within {WAIT:?}: {e}"),
            }
        }
    }

    /// Ctrl-C, then the exit code (within the deadline).
    fn interrupt(mut self) -> Option<i32> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).expect("SIGINT");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waypost did not stop after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn output(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("run waypost");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn errors_are_one_line_with_what_to_do_and_no_secret() {
    let (code, _, err) = output(waypost("nosuch://x").arg("services"));
    assert_eq!(code, Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown registry scheme `nosuch`"), "{err}");

    // Nothing listens on port 1: refused, in time, with a hint; the password stays out.
    let started = std::time::Instant::now();
    let (code, _, err) = output(waypost("etcd://ops:hunter2@127.0.0.1:1/services").args([
        "--timeout",
        "3s",
        "instances",
        "svc",
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("is the registry running"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");

    let (code, _, err) = output(
        Command::new(cargo_bin("waypost"))
            .env_remove("WAYPOST_URL")
            .arg("services"),
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no registry given") && err.contains("--url"),
        "{err}"
    );

    let (code, _, err) = output(waypost("memory://").args(["instances", "bad name"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid input"), "{err}");

    let (code, _, err) = output(waypost("memory://").args(["register", "svc", "a", "nohostport"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("expected HOST:PORT"), "{err}");
}

#[test]
fn completions_are_printed() {
    let (code, out, _) = output(Command::new(cargo_bin("waypost")).args(["completions", "bash"]));
    assert_eq!(code, Some(0));
    assert!(out.contains("_waypost()"), "{}", &out[..out.len().min(200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_watch_and_ctrl_c_deregisters_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    let url = etcd.url();
    let reg = Running::start({
        let mut c = waypost(&url);
        c.args([
            "register",
            "cli-svc",
            "a-1",
            "127.0.0.1:9001",
            "--meta",
            "version=2",
            "--zone",
            "z1",
            "--tag",
            "blue",
        ]);
        c
    });
    reg.expect_line("cli-svc/a-1: registered");

    let (code, out, err) = output(waypost(&url).args(["instances", "cli-svc", "--json"]));
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["id"], "a-1");
    assert_eq!(v[0]["zone"], "z1");
    assert_eq!(v[0]["metadata"]["version"], "2");

    let (_, out, _) = output(waypost(&url).args(["instances", "cli-svc"]));
    assert!(
        out.contains("a-1") && out.contains("127.0.0.1:9001") && out.contains("version=2"),
        "{out}"
    );

    let (_, out, _) = output(waypost(&url).args(["services"]));
    assert!(out.lines().any(|l| l == "cli-svc"), "{out}");

    let watch = Running::start({
        let mut c = waypost(&url);
        c.args(["watch", "cli-svc", "--json"]);
        c
    });
    let snap = watch.expect_line("\"snapshot\"");
    assert!(snap.contains("\"a-1\""), "{snap}");
    assert_eq!(reg.interrupt(), Some(0), "Ctrl-C deregisters and exits 0");
    let removed = watch.expect_line("\"removed\"");
    assert!(removed.contains("\"a-1\""), "{removed}");
    assert_eq!(watch.interrupt(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_locks_and_elections_on_etcd() {
    let Some(etcd) = waypost_testkit::server::etcd().await else {
        return;
    };
    let url = etcd.url();
    let (code, out, err) = output(waypost(&url).args(["config", "put", "app/cfg", "{\"pool\":8}"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("app/cfg: version"), "{out}");
    let (_, out, _) = output(waypost(&url).args(["config", "get", "app/cfg"]));
    assert_eq!(out.trim(), "{\"pool\":8}");
    let (_, out, _) = output(waypost(&url).args(["config", "list", "app", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["key"], "app/cfg");
    let (code, _, _) = output(waypost(&url).args(["config", "delete", "app/cfg"]));
    assert_eq!(code, Some(0));
    let (code, _, err) = output(waypost(&url).args(["config", "get", "app/cfg"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("no such key"), "{err}");

    // A command runs under the lock and sees its token; the exit code is passed on.
    let (code, out, err) = output(waypost(&url).args([
        "lock",
        "jobs/x",
        "--",
        "sh",
        "-c",
        "echo token=$WAYPOST_FENCING_TOKEN; exit 7",
    ]));
    assert_eq!(code, Some(7), "{err}");
    assert!(
        out.trim()
            .strip_prefix("token=")
            .is_some_and(|t| t.parse::<u64>().is_ok()),
        "{out}"
    );

    // While another process holds it, --try fails at once.
    let holder = Running::start({
        let mut c = waypost(&url);
        c.args(["lock", "jobs/x", "--", "sh", "-c", "echo holding; sleep 60"]);
        c
    });
    holder.expect_line("holding");
    let (code, _, err) = output(waypost(&url).args(["lock", "jobs/x", "--try", "--", "true"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("busy"), "{err}");
    let (code, _, err) =
        output(waypost(&url).args(["lock", "jobs/x", "--wait", "300ms", "--", "true"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(holder.interrupt(), Some(130));
    let (code, _, err) = output(waypost(&url).args(["lock", "jobs/x", "--try", "--", "true"]));
    assert_eq!(code, Some(0), "released on Ctrl-C: {err}");

    let leader = Running::start({
        let mut c = waypost(&url);
        c.args(["elect", "sched", "alpha"]);
        c
    });
    leader.expect_line("elected in sched");
    let (_, out, _) = output(waypost(&url).args(["leader", "sched"]));
    assert!(out.starts_with("alpha  (fencing token"), "{out}");
    assert_eq!(leader.interrupt(), Some(0));
    let (_, out, _) = output(waypost(&url).args(["leader", "sched", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["leader"], serde_json::Value::Null, "{out}");
}
