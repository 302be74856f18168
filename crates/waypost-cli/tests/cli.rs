//! The `waypost` binary, run as an operator would, on every real registry (ZooKeeper, etcd,
//! Consul): register in one process, list and watch from others, Ctrl-C deregisters;
//! configuration; locks and elections; errors as one line with a hint. The scenarios are
//! written once, as functions of the registry's URL, and run on each backend against one
//! server per backend (they use distinct names, so they run side by side).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn waypost(url: &str) -> Command {
    let mut c = Command::new(cargo_bin("waypost"));
    c.env_remove("WAYPOST_URL").arg("--url").arg(url);
    c
}

/// `waypost --url URL ARGS…`, as a command to start or run.
fn cmd(url: &str, args: &[&str]) -> Command {
    let mut c = waypost(url);
    c.args(args);
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
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
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
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
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

/// Runs a one-shot command that must succeed; its stdout.
fn ok(url: &str, args: &[&str]) -> String {
    let (code, out, err) = output(&mut cmd(url, args));
    assert_eq!(code, Some(0), "waypost {args:?}: {err}");
    out
}

/// Runs a one-shot `--json` command until its output satisfies `done` (what another
/// process wrote may reach this reader a moment later, e.g. Consul's catalog), within the
/// deadline; the last JSON read.
fn json_until(url: &str, args: &[&str], done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v: Value = serde_json::from_str(&ok(url, args)).expect("JSON");
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "waypost {args:?}: still {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-line error (exit code 1) whose message contains every `needle`; the message.
fn fails(url: &str, args: &[&str], needles: &[&str]) -> String {
    let (code, _, err) = output(&mut cmd(url, args));
    assert_eq!(code, Some(1), "waypost {args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "waypost {args:?}: no `{n}` in {err}");
    }
    err
}

/// Register in one process; watch, list and `services` from others; Ctrl-C deregisters.
fn discovery(url: &str) {
    let watch = Running::start(cmd(url, &["watch", "cli-svc", "--json"]));
    watch.expect_line("\"snapshot\"");
    let reg = Running::start(cmd(
        url,
        &[
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
        ],
    ));
    reg.expect_line("cli-svc/a-1: registered");
    let added = watch.expect_line("\"added\"");
    assert!(added.contains("\"a-1\""), "{added}");

    let v = json_until(url, &["instances", "cli-svc", "--json"], |v| {
        v[0].is_object()
    });
    assert_eq!(v[0]["id"], "a-1");
    assert_eq!(v[0]["zone"], "z1");
    assert_eq!(v[0]["metadata"]["version"], "2");
    assert_eq!(v[0]["tags"][0], "blue");
    let table = ok(url, &["instances", "cli-svc"]);
    assert!(
        table.contains("a-1") && table.contains("127.0.0.1:9001") && table.contains("version=2"),
        "{table}"
    );
    let services = ok(url, &["services"]);
    assert!(services.lines().any(|l| l == "cli-svc"), "{services}");

    assert_eq!(reg.interrupt(), Some(0), "Ctrl-C deregisters and exits 0");
    let removed = watch.expect_line("\"removed\"");
    assert!(removed.contains("\"a-1\""), "{removed}");
    json_until(url, &["instances", "cli-svc", "--json"], |v| {
        v == &Value::Array(vec![])
    });
    assert_eq!(watch.interrupt(), Some(0));
}

/// `config put|get|list|delete`, followed by `config watch` in another process.
fn configuration(url: &str) {
    let watch = Running::start(cmd(url, &["config", "watch", "app/cfg", "--json"]));
    watch.expect_line("\"snapshot\"");
    let out = ok(url, &["config", "put", "app/cfg", "{\"pool\":8}"]);
    assert!(out.contains("app/cfg: version"), "{out}");
    assert!(watch.expect_line("\"added\"").contains("pool\\\":8"));
    assert_eq!(
        ok(url, &["config", "get", "app/cfg"]).trim(),
        "{\"pool\":8}"
    );
    ok(url, &["config", "put", "app/cfg", "{\"pool\":16}"]);
    assert!(watch.expect_line("\"updated\"").contains("pool\\\":16"));
    let v: Value = serde_json::from_str(&ok(url, &["config", "list", "app", "--json"])).unwrap();
    assert_eq!(v[0]["key"], "app/cfg", "{v}");
    ok(url, &["config", "delete", "app/cfg"]);
    assert!(watch.expect_line("\"removed\"").contains("app/cfg"));
    fails(url, &["config", "get", "app/cfg"], &["no such key"]);
    assert_eq!(watch.interrupt(), Some(0));
}

/// `lock NAME -- CMD`: the token, the exit code passed on, `--try` / `--wait` while another
/// process holds it, Ctrl-C releases.
fn locks(url: &str) {
    let script = "echo token=$WAYPOST_FENCING_TOKEN; exit 7";
    let (code, out, err) = output(&mut cmd(url, &["lock", "jobs/x", "--", "sh", "-c", script]));
    assert_eq!(code, Some(7), "{err}");
    assert!(
        out.trim()
            .strip_prefix("token=")
            .is_some_and(|t| t.parse::<u64>().is_ok()),
        "{out}"
    );

    let holding = "echo holding; sleep 60";
    let holder = Running::start(cmd(url, &["lock", "jobs/x", "--", "sh", "-c", holding]));
    holder.expect_line("holding");
    fails(url, &["lock", "jobs/x", "--try", "--", "true"], &["busy"]);
    let wait = ["lock", "jobs/x", "--wait", "300ms", "--", "true"];
    fails(url, &wait, &["timed out"]);
    assert_eq!(holder.interrupt(), Some(130));
    ok(url, &["lock", "jobs/x", "--try", "--", "true"]);
}

/// `elect NAME VALUE` leads until Ctrl-C; `leader` (and `leader --watch` from another
/// process) show it, then no leader.
fn elections(url: &str) {
    let follow = Running::start(cmd(url, &["leader", "sched", "--watch", "--json"]));
    follow.expect_line("\"leader\":null");
    let leader = Running::start(cmd(url, &["elect", "sched", "alpha"]));
    leader.expect_line("elected in sched");
    follow.expect_line("\"leader\":\"alpha\"");
    let out = ok(url, &["leader", "sched"]);
    assert!(out.starts_with("alpha  (fencing token"), "{out}");
    assert_eq!(leader.interrupt(), Some(0));
    follow.expect_line("\"leader\":null");
    let v: Value = serde_json::from_str(&ok(url, &["leader", "sched", "--json"])).unwrap();
    assert_eq!(v["leader"], Value::Null, "{v}");
    assert_eq!(follow.interrupt(), Some(0));
}

/// Invalid names on a live registry; a registry where nothing listens (`unreachable`,
/// with a secret in it): refused in time, with a hint, the secret kept out.
fn errors(url: &str, unreachable: &str) {
    fails(url, &["instances", "bad name"], &["invalid input"]);
    fails(
        url,
        &["register", "svc", "bad id", "h:1"],
        &["invalid input"],
    );
    fails(url, &["config", "get", "../x"], &["invalid input"]);
    fails(url, &["lock", "bad name", "--", "true"], &["invalid input"]);

    let started = Instant::now();
    let args = ["--timeout", "3s", "instances", "svc"];
    let err = fails(unreachable, &args, &["is the registry running"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(!err.contains("hunter2"), "the secret leaked: {err}");
}

/// Every scenario on the registry at `url`, side by side.
fn every_scenario(url: &str, unreachable: &str) {
    let scenarios: [(&str, &(dyn Fn() + Sync)); 5] = [
        ("discovery", &|| discovery(url)),
        ("configuration", &|| configuration(url)),
        ("locks", &|| locks(url)),
        ("elections", &|| elections(url)),
        ("errors", &|| errors(url, unreachable)),
    ];
    std::thread::scope(|s| {
        let running: Vec<_> = scenarios
            .iter()
            .map(|(name, f)| {
                let t = std::thread::Builder::new().name(format!("{url} {name}"));
                (*name, t.spawn_scoped(s, f).expect("spawn"))
            })
            .collect();
        let failed: Vec<&str> = running
            .into_iter()
            .filter_map(|(name, t)| t.join().is_err().then_some(name))
            .collect();
        assert!(
            failed.is_empty(),
            "on {url}, failed: {failed:?} (see above)"
        );
    });
}

/// One test per backend: starts its server, runs [`every_scenario`].
macro_rules! on_every_registry {
    ($($test:ident: $start:path, unreachable $unreachable:literal;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let Some(server) = $start().await else {
                return;
            };
            every_scenario(&server.url(), $unreachable);
        }
    )+};
}

on_every_registry! {
    cli_on_zookeeper: waypost_testkit::server::zookeeper,
        unreachable "zk://ops:hunter2@127.0.0.1:1/services";
    cli_on_etcd: waypost_testkit::server::etcd,
        unreachable "etcd://ops:hunter2@127.0.0.1:1/services";
    cli_on_consul: waypost_testkit::server::consul,
        unreachable "consul://127.0.0.1:1?token=hunter2";
}

#[test]
fn errors_without_a_registry_are_one_line_with_what_to_do() {
    let err = fails(
        "nosuch://x",
        &["services"],
        &["unknown registry scheme `nosuch`"],
    );
    assert!(
        err.contains("zk") && err.contains("etcd"),
        "names the available: {err}"
    );

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

    fails("memory://", &["instances", "bad name"], &["invalid input"]);
    let (code, _, err) = output(&mut cmd(
        "memory://",
        &["register", "svc", "a", "nohostport"],
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("expected HOST:PORT"), "{err}");
}

#[test]
fn completions_are_printed() {
    let (code, out, _) = output(Command::new(cargo_bin("waypost")).args(["completions", "bash"]));
    assert_eq!(code, Some(0));
    assert!(out.contains("_waypost()"), "{}", &out[..out.len().min(200)]);
}
