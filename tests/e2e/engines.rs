//! What engines rely on beyond the OCI commands, with runc as the oracle. conmon (Podman) and
//! containerd's runc shim (Docker) are subreapers: they take the pid `create` writes to
//! `--pid-file`, adopt that process once `create` has exited, wait for it and report its exit
//! status as the container's (128+N for a signal).
//!
//! This test binary makes itself a subreaper, as those engines are, so it holds only tests that
//! want that (orphans of other tests would otherwise be adopted here).

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::harness::engines::{run_args, run_args_on, Docker, Engine, EngineRuntime, Podman};
use husk_e2e::harness::{http_get, stderr, text, unique, Env, Husk, TestBundle};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// One runtime: husk, or runc with a root of its own.
fn runtime(husk: &Husk, runc_root: &Path, runc: bool, args: &[&str]) -> Command {
    if !runc {
        return husk.command(args);
    }
    let mut cmd = Command::new("runc");
    cmd.arg("--root").arg(runc_root).args(args);
    cmd
}

/// The process's exit as an engine reports it: its code, or 128+N for signal N.
fn reap(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Some(128 + signal as i32),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
    None
}

/// `create --pid-file`, `start`, then `kill` when given (a signal by `kill`, or `pid`: SIGKILL
/// to the pid-file process itself); the exit status of the pid-file
/// process as this subreaper reaps it, and what `/proc` showed of that process while it ran.
fn exit_via_pid_file(
    husk: &Husk,
    runc_root: &Path,
    runc: bool,
    script: &str,
    kill: Option<&str>,
) -> (Option<i32>, Vec<String>) {
    let bundle = TestBundle::busybox(husk, &["sh", "-c", script]);
    bundle.edit(|c| c["process"]["terminal"] = false.into());
    let id = unique("pidfile");
    let pid_file = bundle.path().join("pid");
    // Stderr to a file: the container's process keeps `create`'s stdio open while it runs.
    let err_file = bundle.path().join("stderr");
    let run = |args: &[&str]| {
        let err = std::fs::File::create(&err_file).expect("stderr file");
        let status = runtime(husk, runc_root, runc, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .expect("runtime command");
        Output {
            status,
            stdout: Vec::new(),
            stderr: std::fs::read(&err_file).unwrap_or_default(),
        }
    };
    let bundle_dir = bundle.path().to_str().expect("utf-8");
    let pid_path = pid_file.to_str().expect("utf-8");
    let created = run(&[
        "create",
        "--bundle",
        bundle_dir,
        "--pid-file",
        pid_path,
        &id,
    ]);
    assert!(created.status.success(), "create: {}", stderr(&created));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let mut seen = Vec::new();
    let own = |kind: &str| {
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).ok();
        ns(&pid.to_string()) != ns("self")
    };
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        seen.push(format!("own {kind} namespace: {}", own(kind)));
    }
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_owned()))
        .and_then(|r| r.split_whitespace().nth(1).map(str::to_owned));
    seen.push(format!(
        "adopted by the subreaper: {}",
        parent == Some(std::process::id().to_string())
    ));
    let started = run(&["start", &id]);
    assert!(started.status.success(), "start: {}", stderr(&started));
    match kill {
        // SIGKILL straight to the pid, as a user (or an engine's timeout) may send it.
        Some("pid") => {
            std::thread::sleep(Duration::from_millis(300));
            nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
                .expect("kill the pid");
        }
        Some(signal) => {
            std::thread::sleep(Duration::from_millis(300));
            let killed = run(&["kill", &id, signal]);
            assert!(killed.status.success(), "kill: {}", stderr(&killed));
        }
        None => {}
    }
    let code = reap(pid, Duration::from_secs(60));
    // The engine deletes the container once it has reaped its process: it is stopped then.
    let state = run(&["state", &id]);
    seen.push(format!(
        "state after reaping succeeds: {}",
        state.status.success()
    ));
    let deleted = run(&["delete", &id]);
    seen.push(format!(
        "delete after reaping succeeds: {}",
        deleted.status.success()
    ));
    (code, seen)
}

/// The process whose pid `create` writes to `--pid-file` is adopted by the caller's subreaper
/// once `create` exits, lives in namespaces of its own, and exits with the container's exit
/// status (128+N when a signal ended the container), as runc's container process does; killing
/// it kills the container.
#[test]
fn test_pid_file_process_exits_with_the_container_status_as_runc() {
    let Some(env) = Env::get("test_pid_file_process_exits_with_the_container_status_as_runc")
    else {
        return;
    };
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    let husk = env.husk();
    let runc_root = tempfile::tempdir().expect("runc root");
    let cases: [(&str, Option<&str>); 4] = [
        ("exit 0", None),
        ("sleep 0.2; exit 3", None),
        ("exec sleep 60", Some("KILL")),
        ("exec sleep 60", Some("pid")),
    ];
    for (script, kill) in cases {
        let expected = exit_via_pid_file(&husk, runc_root.path(), true, script, kill);
        let got = exit_via_pid_file(&husk, runc_root.path(), false, script, kill);
        assert_eq!(
            got, expected,
            "{script:?} kill {kill:?}: husk differs from runc"
        );
    }
    husk.assert_clean();
}

/// One step of an engine scenario as compared: its name, exit code and output.
type Step = (String, Option<i32>, String);

/// `<engine> <args>` typed on a terminal of `size` (rows, columns), as a step: its exit code
/// and what the terminal showed.
fn terminal_step(engine: &dyn Engine, name: &str, args: &[&str], size: (u16, u16)) -> Step {
    let out = engine.on_terminal(args, size.0, size.1);
    let seen = text(&out.stdout).replace('\r', "").trim().to_owned();
    (name.to_owned(), out.status.code(), seen)
}

/// An engine's daily commands (part of issue 14's list), each step's exit code and output.
fn daily_commands(engine: &dyn Engine) -> Vec<Step> {
    let flags = engine.run_flags();
    let mut steps = Vec::new();
    let mut step = |name: &str, args: &[&str], stdin: &[u8], keep_stderr: bool| {
        let out = engine.run(args, stdin);
        let mut seen = text(&out.stdout);
        if keep_stderr {
            seen.push_str(&format!(" | stderr: {}", text(&out.stderr).trim()));
        }
        steps.push((name.to_owned(), out.status.code(), seen.trim().to_owned()));
        out
    };
    let run = |extra: &[&'static str], cmd: &[&'static str]| run_args(&flags, extra, cmd);
    step(
        "run --rm: output and exit code",
        &run(&["--rm"], &["sh", "-c", "echo out; echo err >&2; exit 3"]),
        b"",
        true,
    );
    step(
        "run --rm -i: stdin",
        &run(&["--rm", "-i"], &["sh", "-c", "cat; exit 5"]),
        b"hello\n",
        false,
    );
    // Accepted as runc accepts them (swap twice the memory, CPU quota, pids); what the guest
    // makes of them is checked by `husk_applies_engine_limits` (this host's cgroup v1 shows
    // runc's containers another layout).
    step(
        "run --memory --cpus --pids-limit",
        &run(
            &[
                "--rm",
                "--memory",
                "64m",
                "--cpus",
                "1",
                "--pids-limit",
                "50",
            ],
            &["echo", "ok"],
        ),
        b"",
        false,
    );
    step(
        "run --user --workdir --env --hostname",
        &run(
            &[
                "--rm",
                "--user",
                "1000:1000",
                "--workdir",
                "/tmp",
                "-e",
                "A=b",
                "--hostname",
                "hh",
            ],
            &["sh", "-c", "id -u; id -g; pwd; echo $A; hostname"],
        ),
        b"",
        false,
    );
    step(
        "run --read-only",
        &run(
            &["--rm", "--read-only"],
            &["sh", "-c", "touch /x 2>/dev/null; echo $?"],
        ),
        b"",
        false,
    );
    let host = tempfile::tempdir().expect("volume dir");
    std::fs::write(host.path().join("f"), "from host\n").expect("write");
    let rw = format!("{}:/v", host.path().display());
    let ro = format!("{}:/r:ro", host.path().display());
    let volumes = [
        "--rm",
        "-v",
        &rw,
        "-v",
        &ro,
        "-v",
        "husk-vol:/data",
        "--tmpfs",
        "/scratch",
    ];
    let script = "cat /v/f; echo w > /v/g; echo x 2>/dev/null > /r/h || echo ro refused; \
                  echo kept > /data/k; grep -c ' /scratch tmpfs ' /proc/mounts; ls /v";
    step(
        "run -v dir -v dir:ro -v named --tmpfs",
        &run_args(&flags, &volumes, &["sh", "-c", script]),
        b"",
        false,
    );
    step(
        "the named volume and the host directory keep the writes",
        &run_args(
            &flags,
            &["--rm", "-v", "husk-vol:/data", "-v", &rw],
            &["cat", "/data/k", "/v/g"],
        ),
        b"",
        false,
    );
    // Docker's client sets the size once the process started: the process waits a moment.
    steps.push(terminal_step(
        engine,
        "run -t: a terminal of the user's size",
        &run(
            &["--rm", "-t"],
            &["sh", "-c", "tty; sleep 1; stty size; exit 4"],
        ),
        (33, 101),
    ));
    let started = engine.run(
        &run(
            &["-d", "--name", "d1"],
            &["sh", "-c", "echo logged; exec sleep 60"],
        ),
        b"",
    );
    steps.push(("run -d".into(), started.status.code(), String::new()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text(&engine.run(&["logs", "d1"], b"").stdout).contains("logged")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    steps.push(terminal_step(
        engine,
        "exec -t: a terminal of the user's size",
        &[
            "exec",
            "-t",
            "d1",
            "sh",
            "-c",
            "tty; sleep 1; stty size; exit 5",
        ],
        (20, 70),
    ));
    let mut step = |name: &str, args: &[&str], stdin: &[u8]| {
        let out = engine.run(args, stdin);
        steps.push((
            name.to_owned(),
            out.status.code(),
            text(&out.stdout).trim().to_owned(),
        ));
    };
    step("logs", &["logs", "d1"], b"");
    step(
        "exec: exit code",
        &["exec", "d1", "sh", "-c", "echo e; exit 4"],
        b"",
    );
    step("exec -i", &["exec", "-i", "d1", "cat"], b"x\n");
    step(
        "exec -u -w -e",
        &[
            "exec",
            "-u",
            "1000",
            "-w",
            "/tmp",
            "-e",
            "B=c",
            "d1",
            "sh",
            "-c",
            "id -u; pwd; echo $B",
        ],
        b"",
    );
    step("pause", &["pause", "d1"], b"");
    step("paused", &["inspect", "-f", "{{.State.Status}}", "d1"], b"");
    step("unpause", &["unpause", "d1"], b"");
    step("restart -t 1", &["restart", "-t", "1", "d1"], b"");
    // The restarted container ran its command again (in a new VM, for husk).
    let deadline = Instant::now() + Duration::from_secs(20);
    while text(&engine.run(&["logs", "d1"], b"").stdout)
        .matches("logged")
        .count()
        < 2
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    step("logs after restart", &["logs", "d1"], b"");
    // The numbers differ (a VM's memory is its own); that it answers is compared.
    step(
        "stats --no-stream",
        &["stats", "--no-stream", "--format", "{{.Name}}", "d1"],
        b"",
    );
    step("stop -t 1", &["stop", "-t", "1", "d1"], b"");
    step(
        "stopped: exit code",
        &["inspect", "-f", "{{.State.ExitCode}}", "d1"],
        b"",
    );
    step("rm", &["rm", "d1"], b"");
    let started = engine.run(&run(&["-d", "--name", "d2"], &["sleep", "60"]), b"");
    steps.push(("run -d (2)".into(), started.status.code(), String::new()));
    let mut step = |name: &str, args: &[&str]| {
        let out = engine.run(args, b"");
        steps.push((
            name.to_owned(),
            out.status.code(),
            text(&out.stdout).trim().to_owned(),
        ));
    };
    step("kill -s KILL", &["kill", "-s", "KILL", "d2"]);
    step("wait: exit code", &["wait", "d2"]);
    step("rm", &["rm", "d2"]);
    step(
        "run --init",
        &run(
            &["--rm", "--init"],
            &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"],
        ),
    );
    // Healthchecks are execs the engine runs: Docker on its interval, Podman on its systemd
    // timer (none here) or on `podman healthcheck run`, which Docker's client does not know.
    let health = [
        "-d",
        "--name",
        "d3",
        "--health-cmd",
        "test -f /tmp/ok",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
    ];
    let started = engine.run(
        &run(&health, &["sh", "-c", "touch /tmp/ok; exec sleep 60"]),
        b"",
    );
    steps.push((
        "run -d --health-cmd".into(),
        started.status.code(),
        String::new(),
    ));
    for (name, status, cmd) in [
        ("healthcheck: healthy", "healthy", ["true", ""]),
        ("healthcheck: unhealthy", "unhealthy", ["rm", "/tmp/ok"]),
    ] {
        let cmd: Vec<&str> = ["exec", "d3"]
            .into_iter()
            .chain(cmd.into_iter().filter(|a| !a.is_empty()))
            .collect();
        engine.run(&cmd, b"");
        steps.push((name.into(), None, health_status(engine, "d3", status)));
    }
    let removed = engine.run(&["rm", "-f", "d3"], b"");
    steps.push(("rm -f".into(), removed.status.code(), String::new()));
    // Several at once: each in its own VM, each with its own output and status.
    let args: Vec<Vec<String>> = (1..=3)
        .map(|n| {
            run(&["--rm"], &["sh", "-c", "echo $0; exit $0"])
                .into_iter()
                .map(str::to_owned)
                .chain([n.to_string()])
                .collect()
        })
        .collect();
    let outs: Vec<Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = args
            .iter()
            .map(|a| {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                scope.spawn(move || engine.run(&a, b""))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("engine thread"))
            .collect()
    });
    for (n, out) in outs.iter().enumerate() {
        steps.push((
            format!("three at once: #{}", n + 1),
            out.status.code(),
            text(&out.stdout).trim().to_owned(),
        ));
    }
    let left = engine.run(&["ps", "-a", "-q"], b"");
    steps.push((
        "ps -a: nothing left".into(),
        left.status.code(),
        text(&left.stdout).trim().to_owned(),
    ));
    steps
}

/// The health status of `container` once it is `want`, or the last one seen within 40 s;
/// the engine is asked to run the check (Podman's `healthcheck run`) on every look.
fn health_status(engine: &dyn Engine, container: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        engine.run(&["healthcheck", "run", container], b"");
        let out = engine.run(
            &["inspect", "-f", "{{.State.Health.Status}}", container],
            b"",
        );
        let seen = text(&out.stdout).trim().to_owned();
        if seen == want || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Podman with husk as its runtime (`podman --runtime`) behaves as with runc for the daily
/// commands: output, stdin, exit codes (the pid conmon waits for exits with the container's
/// status), limits, user, read-only, detached containers with logs, exec, pause, stop, kill and
/// wait; nothing of husk is left after `rm`. Podman's ids are 64 hex characters.
#[test]
fn test_podman_daily_commands_same_as_runc() {
    daily_commands_same_as_runc("test_podman_daily_commands_same_as_runc", Podman::get);
}

/// The daily commands on the engine `get` makes, with runc and then with husk: the same step
/// by step, nothing of husk's left, and husk's limits applied in the guest.
fn daily_commands_same_as_runc<E: Engine>(name: &str, get: fn(&str, EngineRuntime) -> Option<E>) {
    let Some(runc) = get(name, EngineRuntime::Runc) else {
        return;
    };
    let Some(husk) = get(name, EngineRuntime::Husk) else {
        return;
    };
    same_as_runc(&runc, &husk);
    husk_applies_engine_limits(&husk);
}

/// `--memory`, `--cpus` and `--pids-limit` are the container's cgroup limits in the guest.
fn husk_applies_engine_limits(husk: &dyn Engine) {
    let flags = husk.run_flags();
    let limits = [
        "--rm",
        "--memory",
        "64m",
        "--cpus",
        "1",
        "--pids-limit",
        "50",
    ];
    let cmd = [
        "sh",
        "-c",
        "cd /sys/fs/cgroup; cat memory.max cpu.max pids.max",
    ];
    let args = run_args(&flags, &limits, &cmd);
    let out = husk.run(&args, b"");
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "67108864\n100000 100000\n50\n".to_owned()),
        "{}",
        text(&out.stderr)
    );
}

/// Runs the daily commands on `runc`'s engine, then on `husk`'s, and compares them step by
/// step; nothing of husk's containers may be left.
fn same_as_runc(runc: &dyn Engine, husk: &dyn Engine) {
    let expected = daily_commands(runc);
    // The oracle's volumes work on this host, so the comparison means something.
    let volumes: Vec<_> = expected
        .iter()
        .filter(|(name, ..)| name.contains("-v") || name.contains("volume"))
        .map(|(_, code, seen)| (*code, seen.as_str()))
        .collect();
    assert_eq!(
        volumes,
        [
            (Some(0), "from host\nro refused\n1\nf\ng"),
            (Some(0), "kept\nw")
        ]
    );
    // Healthchecks ran under the oracle, so their comparison means something.
    let health: Vec<_> = expected
        .iter()
        .filter(|(name, ..)| name.starts_with("healthcheck:"))
        .map(|(.., seen)| seen.as_str())
        .collect();
    assert_eq!(health, ["healthy", "unhealthy"]);
    same_steps(&expected, &daily_commands(husk), husk);
}

/// husk's steps (`got`) are runc's (`expected`), one by one, and nothing of `husk`'s containers
/// is left.
fn same_steps(expected: &[Step], got: &[Step], husk: &dyn Engine) {
    for (want, have) in expected.iter().zip(got) {
        assert_eq!(have, want, "husk differs from runc");
    }
    assert_eq!(got.len(), expected.len());
    let left = husk.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Docker with husk among its `runtimes` (`docker run --runtime husk`, through containerd's
/// runc shim calling husk's CLI) behaves as with runc for the same daily commands.
#[test]
fn test_docker_daily_commands_same_as_runc() {
    daily_commands_same_as_runc("test_docker_daily_commands_same_as_runc", Docker::get);
}

/// A network the engine makes on `subnet` (a /24 of which `.1` is the engine's bridge on this
/// host), a server container on it, and who reaches it: the engine's own network scenario.
fn network_scenario(engine: &dyn Engine, subnet: &str) -> Vec<Step> {
    let flags = engine.run_flags();
    let net = format!("husk-net-{}", std::process::id());
    let mut steps = Vec::new();
    let mut record = |name: &str, code: Option<i32>, seen: String| {
        steps.push((name.to_owned(), code, seen));
    };
    let made = engine.run(
        &[
            "network",
            "create",
            "--subnet",
            &format!("{subnet}.0/24"),
            &net,
        ],
        b"",
    );
    assert!(made.status.success(), "network create: {}", stderr(&made));
    let server = "mkdir -p /tmp/w && echo hello >/tmp/w/x && exec httpd -f -p 7777 -h /tmp/w";
    let started = engine.run(
        &run_args_on(
            &net,
            &flags,
            &["-d", "--name", "srv"],
            &["sh", "-c", server],
        ),
        b"",
    );
    if !started.status.success() {
        eprintln!("run -d on the network: {}", stderr(&started));
    }
    record(
        "run -d on the network",
        started.status.code(),
        String::new(),
    );
    let template = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    let inspected = engine.run(&["inspect", "-f", &template, "srv"], b"");
    let address = text(&inspected.stdout).trim().to_owned();
    record(
        "inspect: an address on the subnet",
        inspected.status.code(),
        address.starts_with(&format!("{subnet}.")).to_string(),
    );
    let inside = engine.run(
        &["exec", "srv", "ip", "-4", "addr", "show", "dev", "eth0"],
        b"",
    );
    record(
        "the address inspect reports is the container's",
        inside.status.code(),
        text(&inside.stdout)
            .contains(&format!("inet {address}/24"))
            .to_string(),
    );
    let mtu = engine.run(&["exec", "srv", "cat", "/sys/class/net/eth0/mtu"], b"");
    record(
        "MTU",
        mtu.status.code(),
        text(&mtu.stdout).trim().to_owned(),
    );
    let route = engine.run(&["exec", "srv", "ip", "route", "show", "default"], b"");
    record(
        "default route via the bridge",
        route.status.code(),
        text(&route.stdout)
            .contains(&format!("via {subnet}.1"))
            .to_string(),
    );
    let url = format!("http://{address}:7777/x");
    // The server may still be starting: a few tries.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = engine.run(
            &run_args_on(
                &net,
                &flags,
                &["--rm"],
                &["wget", "-q", "-T", "5", "-O", "-", &url],
            ),
            b"",
        );
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        eprintln!(
            "wget from another container: {:?}: {}",
            out.status.code(),
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let seen = text(&out.stdout).trim().to_owned();
    record(
        "another container on the network reaches the server",
        out.status.code(),
        seen,
    );
    let body = http_get(
        None,
        &format!("{address}:7777"),
        "x",
        Duration::from_secs(10),
    );
    record(
        "the host reaches the server at its address",
        None,
        format!("{body:?}"),
    );
    let removed = engine.run(&["rm", "-f", "srv"], b"");
    record("rm -f", removed.status.code(), String::new());
    let gone = engine.run(&["network", "rm", &net], b"");
    record("network rm", gone.status.code(), String::new());
    // Podman's CNI address bookkeeping outlives `network rm`; the test's network leaves nothing.
    let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&net));
    steps
}

/// The first step of `steps` that failed (an engine command's non-zero exit).
fn failed_step(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .find(|(_, code, _)| !matches!(code, None | Some(0)))
}

/// The engine's own bridge network with husk as with runc: the address the engine reports is
/// the one inside the VM, with its MTU and default route; a server in one container answers
/// another container on the network and the host at that address; nothing is left after `rm`.
/// `subnets` are runc's and husk's (each engine's test its own: the tests run side by side and
/// an engine refuses a subnet already routed on the host).
fn network_same_as_runc<E: Engine>(
    name: &str,
    get: fn(&str, EngineRuntime) -> Option<E>,
    subnets: [&str; 2],
) {
    let Some(runc) = get(name, EngineRuntime::Runc) else {
        return;
    };
    let Some(husk) = get(name, EngineRuntime::Husk) else {
        return;
    };
    // The oracle first: where the engine with runc cannot run its own network scenario (twice),
    // this host cannot run the test.
    let mut expected = network_scenario(&runc, subnets[0]);
    if failed_step(&expected).is_some() {
        expected = network_scenario(&runc, subnets[0]);
    }
    if let Some(step) = failed_step(&expected) {
        println!(
            "SKIPPED: {name}: the engine with runc fails its own network scenario here: {step:?}"
        );
        return;
    }
    let got = network_scenario(&husk, subnets[1]);
    if got != expected {
        // Did the host's networking break meanwhile? Ask the oracle again.
        let again = network_scenario(&runc, subnets[0]);
        if let Some(step) = failed_step(&again) {
            println!("SKIPPED: {name}: the engine with runc failed its network scenario right after husk's ({got:?}): {step:?}");
            return;
        }
    }
    same_steps(&expected, &got, &husk);
}

/// Podman's network (a namespace it made and names by path in `linux.namespaces`).
#[test]
fn test_podman_network_same_as_runc() {
    network_same_as_runc(
        "test_podman_network_same_as_runc",
        Podman::get,
        ["10.216.0", "10.217.0"],
    );
}

/// Docker's network (libnetwork connects the namespace of `state.pid` from its prestart hook).
#[test]
fn test_docker_network_same_as_runc() {
    network_same_as_runc(
        "test_docker_network_same_as_runc",
        Docker::get,
        ["10.218.0", "10.219.0"],
    );
}
