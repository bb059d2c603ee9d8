//! The OCI lifecycle across separate commands (`create`, `start`, `state`, `kill`, `delete`,
//! `list`, `run --detach`), through real guests (QEMU door), with runc as the oracle: the same
//! bundle and the same commands under both, compared step by step.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::harness::{http_get, processes_mentioning, stderr, stdout, Env, Husk, TestBundle};
use serde_json::Value;

/// One runtime under test: husk, or runc with a root of its own.
enum Runtime<'a> {
    Husk(&'a Husk),
    Runc(&'a Path),
}

impl Runtime<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Husk(_) => "husk",
            Self::Runc(_) => "runc",
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        match self {
            Self::Husk(h) => h.command(args),
            Self::Runc(root) => {
                let mut cmd = Command::new("runc");
                cmd.arg("--root").arg(root).args(args);
                cmd
            }
        }
    }

    /// Runs a command to completion (stdio of the container: null, or `out` for `create`).
    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("runtime command")
    }

    /// `create --bundle B ID` with the container's output going to `out`.
    fn create(&self, bundle: &Path, id: &str, out: &Path) -> Output {
        let file = std::fs::File::create(out).expect("output file");
        let mut cmd = self.command(&["create", "--bundle", bundle.to_str().expect("utf-8"), id]);
        let status = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .status()
            .expect("create");
        Output {
            status,
            stdout: Vec::new(),
            stderr: std::fs::read(out).unwrap_or_default(),
        }
    }

    /// [`Runtime::create`] then `start ID`, each asserted to succeed.
    fn create_and_start(&self, bundle: &Path, id: &str, out: &Path) {
        let created = self.create(bundle, id, out);
        assert!(
            created.status.success(),
            "{}: {}",
            self.name(),
            stderr(&created)
        );
        let started = self.run(&["start", id]);
        assert!(
            started.status.success(),
            "{} start: {}",
            self.name(),
            stderr(&started)
        );
    }

    fn state(&self, id: &str) -> Option<Value> {
        let out = self.run(&["state", id]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("state JSON"))
    }

    fn status(&self, id: &str) -> String {
        self.state(id).map_or_else(
            || "gone".to_owned(),
            |s| s["status"].as_str().unwrap_or("?").to_owned(),
        )
    }

    /// Waits (up to 20 s) for `status`.
    fn await_status(&self, id: &str, status: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.status(id);
            if now == status || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The lifecycle as a list of (step, succeeded, status afterwards).
fn lifecycle(rt: &Runtime<'_>, bundle: &Path, out: &Path, id: &str) -> Vec<(String, bool, String)> {
    let mut steps = Vec::new();
    let mut step = |name: &str, ok: bool, status: String| {
        steps.push((name.to_owned(), ok, status));
    };
    let created = rt.create(bundle, id, out);
    assert!(
        created.status.success(),
        "{} create: {}",
        rt.name(),
        stderr(&created)
    );
    step("create", true, rt.status(id));
    let state = rt.state(id).expect("state");
    let pid = state["pid"].as_i64().unwrap_or(0);
    step("created pid > 0", pid > 0, rt.status(id));
    step(
        "start",
        rt.run(&["start", id]).status.success(),
        rt.status(id),
    );
    // The process runs: its first output reaches create's stdout.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(out).unwrap_or_default() != "started\n"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    step(
        "start again",
        rt.run(&["start", id]).status.success(),
        rt.status(id),
    );
    step(
        "delete running",
        rt.run(&["delete", id]).status.success(),
        rt.status(id),
    );
    step(
        "kill NOPE",
        rt.run(&["kill", id, "NOPE"]).status.success(),
        rt.status(id),
    );
    step(
        "kill KILL",
        rt.run(&["kill", id, "KILL"]).status.success(),
        rt.await_status(id, "stopped"),
    );
    let state = rt.state(id).expect("state");
    step("stopped pid 0", state["pid"] == 0, rt.status(id));
    step(
        "kill stopped",
        rt.run(&["kill", id, "KILL"]).status.success(),
        rt.status(id),
    );
    step(
        "start stopped",
        rt.run(&["start", id]).status.success(),
        rt.status(id),
    );
    step(
        "delete",
        rt.run(&["delete", id]).status.success(),
        rt.status(id),
    );
    step(
        "delete again",
        rt.run(&["delete", id]).status.success(),
        rt.status(id),
    );
    step(
        "delete --force gone",
        rt.run(&["delete", "--force", id]).status.success(),
        rt.status(id),
    );
    steps
}

fn busybox_sleeper(husk: &Husk) -> TestBundle {
    let bundle = TestBundle::busybox(husk, &["sh", "-c", "echo started; exec sleep 60"]);
    bundle.edit(|c| c["process"]["terminal"] = false.into());
    bundle
}

#[test]
fn test_lifecycle_create_start_kill_delete_same_as_runc() {
    let Some(env) = Env::get("test_lifecycle_create_start_kill_delete_same_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let expected = lifecycle(
        &Runtime::Runc(runc_root.path()),
        bundle.path(),
        &outs.path().join("runc"),
        "lc",
    );
    let got = lifecycle(
        &Runtime::Husk(&husk),
        bundle.path(),
        &outs.path().join("husk"),
        "lc",
    );
    assert_eq!(got, expected, "husk's lifecycle differs from runc's");
    let output = std::fs::read_to_string(outs.path().join("husk")).expect("output");
    assert_eq!(
        output, "started\n",
        "the container's output reaches create's stdout"
    );
    husk.assert_clean();
}

/// A `start` sent while `create` still boots the VM (as tools that start a fixed moment after
/// launching `create` do) waits for it and starts the container, as runc's (whose create is
/// quick) does.
#[test]
fn test_start_during_create_waits_for_it_as_runc() {
    let Some(env) = Env::get("test_start_during_create_waits_for_it_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo started"]);
    bundle.edit(|c| c["process"]["terminal"] = false.into());
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let early_start = |rt: &Runtime<'_>, id: &str| {
        let out = outs.path().join(rt.name());
        let file = std::fs::File::create(&out).expect("output file");
        let bundle = bundle.path().to_str().expect("utf-8");
        let mut create = rt
            .command(&["create", "--bundle", bundle, id])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("create");
        // Once `create` has taken the id (runc's state directory appears at once too).
        let deadline = Instant::now() + Duration::from_secs(10);
        while rt.state(id).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = rt.run(&["start", id]);
        let created = create.wait().expect("wait create");
        let stopped = rt.await_status(id, "stopped");
        let deleted = rt.run(&["delete", id]);
        (
            created.success(),
            started.status.success(),
            stderr(&started),
            stopped,
            deleted.status.success(),
            std::fs::read_to_string(&out).unwrap_or_default(),
        )
    };
    let expected = early_start(&Runtime::Runc(runc_root.path()), "early");
    let got = early_start(&Runtime::Husk(&husk), "early");
    assert_eq!(got, expected);
    assert_eq!(got.5, "started\n");
    husk.assert_clean();
}

/// Engines' ids (64 hex characters) under long state roots (Docker's
/// `/run/docker/runtime-runc/moby`, Podman's): the lifecycle goes as with runc, whatever the
/// length of the socket paths under the state directory would be.
#[test]
fn test_engine_ids_under_long_roots_same_as_runc() {
    let Some(env) = Env::get("test_engine_ids_under_long_roots_same_as_runc") else {
        return;
    };
    let husk = env.husk_long_root();
    assert!(
        husk.root().as_os_str().len() > 130,
        "{}",
        husk.root().display()
    );
    let id = "0123456789abcdef".repeat(4);
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::Builder::new()
        .prefix(&"runc".repeat(30))
        .tempdir()
        .expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let expected = lifecycle(
        &Runtime::Runc(runc_root.path()),
        bundle.path(),
        &outs.path().join("runc"),
        &id,
    );
    let got = lifecycle(
        &Runtime::Husk(&husk),
        bundle.path(),
        &outs.path().join("husk"),
        &id,
    );
    assert_eq!(got, expected, "husk's lifecycle differs from runc's");
    husk.assert_clean();
    let vm_dir = husk_sandbox::vm_dir(&husk.root().join(&id));
    assert!(!vm_dir.exists(), "{} left behind", vm_dir.display());
}

/// A signal sent right after `start` finds the handlers the process installs first thing (a
/// shell's `trap`), as on runc: `start` returns once the process has run its start-up
/// (runtime-tools' killsig sends USR1, TERM and USR2 this way).
#[test]
fn test_signal_right_after_start_reaches_the_trap_as_runc() {
    let Some(env) = Env::get("test_signal_right_after_start_reaches_the_trap_as_runc") else {
        return;
    };
    let husk = env.husk();
    let script = "trap 'echo got USR1; exit 3' USR1; sleep 10 & wait $!";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| c["process"]["terminal"] = false.into());
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let attempt = |rt: &Runtime, n: u32| -> String {
        let out = outs.path().join(format!("{}-{n}", rt.name()));
        rt.create_and_start(bundle.path(), "sig", &out);
        let kill = rt.run(&["kill", "sig", "USR1"]);
        assert!(
            kill.status.success(),
            "{} kill: {}",
            rt.name(),
            stderr(&kill)
        );
        // Caught, the shell exits at once; missed (PID 1 ignores it), it waits out the sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        while rt.status("sig") != "stopped" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(rt.run(&["delete", "--force", "sig"]).status.success());
        std::fs::read_to_string(&out).unwrap_or_default()
    };
    // runc's `start` returns when the process has been released, not when it has run its
    // start-up, so under load its signal can still beat the trap: the oracle gets three tries.
    let runc = Runtime::Runc(runc_root.path());
    let runc_said = (1..=3)
        .map(|n| attempt(&runc, n))
        .find(|said| said == "got USR1\n")
        .unwrap_or_default();
    assert_eq!(
        runc_said, "got USR1\n",
        "runc: the trap missed the signal 3 times"
    );
    // husk's `start` waits for the start-up: one try.
    let said = attempt(&Runtime::Husk(&husk), 1);
    assert_eq!(said, "got USR1\n", "husk: the trap missed the signal");
    husk.assert_clean();
}

#[test]
fn test_state_json_fields_match_runc() {
    let Some(env) = Env::get("test_state_json_fields_match_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let mut states = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "st", &outs.path().join(rt.name()));
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        states.push(rt.state("st").expect("state"));
        let listed = rt.run(&["list", "--format", "json"]);
        let listed: Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
        assert_eq!(listed[0]["id"], "st", "{} list: {listed}", rt.name());
        assert_eq!(listed[0]["owner"], "root", "{} list: {listed}", rt.name());
        let table = stdout(&rt.run(&["list"]));
        assert!(table.starts_with("ID   "), "{}: {table}", rt.name());
        assert!(rt.run(&["delete", "--force", "st"]).status.success());
    }
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&states[1]), keys(&states[0]));
    for field in ["id", "status", "bundle", "rootfs", "owner"] {
        assert_eq!(states[1][field], states[0][field], "field {field}");
    }
    husk.assert_clean();
}

#[test]
fn test_bad_input_fails_where_runc_fails() {
    let Some(env) = Env::get("test_bad_input_fails_where_runc_fails") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let b = bundle.path().to_str().expect("utf-8").to_owned();
    let runc_root = tempfile::tempdir().expect("runc root");
    let empty = tempfile::tempdir().expect("no config");
    let e = empty.path().to_str().expect("utf-8").to_owned();
    let outs = tempfile::tempdir().expect("outputs");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("state of a missing container", vec!["state", "nope"]),
        ("start of a missing container", vec!["start", "nope"]),
        ("kill of a missing container", vec!["kill", "nope", "KILL"]),
        ("delete of a missing container", vec!["delete", "nope"]),
        (
            "delete --force of a missing container",
            vec!["delete", "--force", "nope"],
        ),
        (
            "create without config.json",
            vec!["create", "--bundle", &e, "x1"],
        ),
        (
            "create with a bad id",
            vec!["create", "--bundle", &b, "../x"],
        ),
        (
            "create with an id in use",
            vec!["create", "--bundle", &b, "used"],
        ),
        (
            "kill with an unknown signal",
            vec!["kill", "used", "SIGNOPE"],
        ),
        ("kill with signal 0", vec!["kill", "used", "0"]),
        ("list", vec!["list"]),
    ];
    let mut differ = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let used = rt.create(bundle.path(), "used", &outs.path().join(rt.name()));
        assert!(used.status.success(), "{}: {}", rt.name(), stderr(&used));
        for (what, args) in &cases {
            let out = rt.run(args);
            differ.push((rt.name(), *what, out.status.success(), stderr(&out)));
        }
        assert!(rt.run(&["delete", "--force", "used"]).status.success());
    }
    let (runc, husk_results) = differ.split_at(cases.len());
    for (r, h) in runc.iter().zip(husk_results) {
        assert_eq!(
            h.2,
            r.2,
            "{}: runc ok={} ({}), husk ok={} ({})",
            r.1,
            r.2,
            r.3.trim(),
            h.2,
            h.3.trim()
        );
        if !h.2 {
            assert_eq!(
                h.3.lines().count(),
                1,
                "{}: husk's error is one line: {}",
                h.1,
                h.3
            );
        }
    }
    husk.assert_clean();
}

#[test]
fn test_run_detach_then_kill_and_delete_clean() {
    let Some(env) = Env::get("test_run_detach_then_kill_and_delete_clean") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let pid_file = bundle.path().join("vm.pid");
    let out = husk
        .command(&[
            "run",
            "--detach",
            "--pid-file",
            pid_file.to_str().expect("utf-8"),
            "--bundle",
            bundle.path().to_str().expect("utf-8"),
            "det",
        ])
        // Not a pipe: the container keeps its stdio open, `output()` would wait for it.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(bundle.path().join("err")).expect("err file"))
        .status()
        .expect("run --detach");
    let err = std::fs::read_to_string(bundle.path().join("err")).unwrap_or_default();
    assert!(out.success(), "{err}");
    let rt = Runtime::Husk(&husk);
    let state = rt.state("det").expect("state");
    assert_eq!(state["status"], "running");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(state["pid"], pid);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the VM's pid is live"
    );
    assert!(rt.run(&["kill", "det"]).status.success(), "SIGTERM");
    // PID 1 of the container ignores SIGTERM (no handler): still running.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt.status("det"), "running");
    assert!(rt.run(&["kill", "--all", "det", "9"]).status.success());
    assert_eq!(rt.await_status("det", "stopped"), "stopped");
    assert!(rt.run(&["delete", "det"]).status.success());
    husk.assert_clean();
}

#[test]
fn test_vmm_killed_state_stopped_delete_clean() {
    let Some(env) = Env::get("test_vmm_killed_state_stopped_delete_clean") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let rt = Runtime::Husk(&husk);
    let outs = tempfile::tempdir().expect("outputs");
    assert!(rt
        .create(bundle.path(), "vk", &outs.path().join("o"))
        .status
        .success());
    assert!(rt.run(&["start", "vk"]).status.success());
    let vm_dir = husk_sandbox::vm_dir(&husk.root().join("vk"));
    let qemu = processes_mentioning(&vm_dir)
        .into_iter()
        .find(|p| p.contains("qemu-system"))
        .expect("the container's QEMU");
    let pid: i32 = qemu
        .split(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill VMM");
    assert_eq!(rt.await_status("vk", "stopped"), "stopped");
    assert!(rt.run(&["delete", "vk"]).status.success());
    husk.assert_clean();
}

#[test]
fn test_monitor_killed_state_stopped_nothing_left_after_delete() {
    let Some(env) = Env::get("test_monitor_killed_state_stopped_nothing_left_after_delete") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let rt = Runtime::Husk(&husk);
    let outs = tempfile::tempdir().expect("outputs");
    assert!(rt
        .create(bundle.path(), "mk", &outs.path().join("o"))
        .status
        .success());
    assert!(rt.run(&["start", "mk"]).status.success());
    let record: Value =
        serde_json::from_slice(&std::fs::read(husk.root().join("mk/state.json")).expect("record"))
            .expect("record JSON");
    let owner = record["husk"]["owner_pid"].as_i64().expect("owner pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(owner).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill monitor");
    assert_eq!(rt.await_status("mk", "stopped"), "stopped");
    // The VMM and virtiofsd died with their owner.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(husk.root()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rt.run(&["delete", "mk"]).status.success());
    husk.assert_clean();
}

#[test]
fn test_exec_same_output_and_exit_codes_as_runc_and_ps_lists_it() {
    let Some(env) = Env::get("test_exec_same_output_and_exit_codes_as_runc_and_ps_lists_it") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let cases: Vec<Vec<&str>> = vec![
        vec!["sh", "-c", "echo out; echo err >&2; exit 5"],
        vec!["--user", "1000:1000", "id"],
        vec!["--cwd", "/bin", "pwd"],
        vec!["--env", "FOO=bar", "sh", "-c", "echo $FOO"],
        vec!["sh", "-c", "read line; echo got $line"],
        vec!["sh", "-c", "kill -9 $$"],
    ];
    let mut results = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "ex", &outs.path().join(rt.name()));
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        assert!(rt.run(&["start", "ex"]).status.success());
        for case in &cases {
            let (flags, cmd): (Vec<&str>, Vec<&str>) = match case[0].starts_with("--") {
                true => (case[..2].to_vec(), case[2..].to_vec()),
                false => (Vec::new(), case.clone()),
            };
            let mut args = vec!["exec"];
            args.extend(flags);
            args.push("ex");
            args.extend(cmd);
            let mut child = rt
                .command(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("exec");
            use std::io::Write as _;
            let _ = child.stdin.take().expect("stdin").write_all(b"hello\n");
            let out = child.wait_with_output().expect("exec output");
            results.push((
                rt.name(),
                case.join(" "),
                out.status.code(),
                stdout(&out),
                stderr(&out),
            ));
        }
        let missing = rt.run(&["exec", "ex", "no-such-program"]);
        results.push((
            rt.name(),
            "missing".into(),
            Some(i32::from(missing.status.success())),
            String::new(),
            String::new(),
        ));
        if let Runtime::Husk(_) = rt {
            let ps = rt.run(&["ps", "--format", "json", "ex"]);
            let pids: Vec<u32> = serde_json::from_slice(&ps.stdout).expect("ps JSON");
            assert_eq!(pids.len(), 1, "one process: {pids:?}");
            // Not piped: the detached process keeps exec's stdio, as under runc.
            let detached = rt
                .command(&["exec", "-d", "ex", "sleep", "100"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("exec -d");
            assert!(detached.success());
            let table = stdout(&rt.run(&["ps", "ex"]));
            assert!(table.contains("sleep 100"), "ps lists the exec: {table}");
        }
        assert!(rt.run(&["delete", "--force", "ex"]).status.success());
    }
    let (runc, husk_results) = results.split_at(cases.len() + 1);
    for (r, h) in runc.iter().zip(husk_results) {
        assert_eq!(
            (h.2, &h.3),
            (r.2, &r.3),
            "exec {}: husk stderr {:?}, runc stderr {:?}",
            r.1,
            h.4,
            r.4
        );
    }
    husk.assert_clean();
}

/// What an exec'd process reports of its privileges: capability sets, no_new_privs, the
/// NOFILE limits, its ids and its oom_score_adj.
const SHOW_PRIVILEGES: &str = "grep -E '^(Cap|NoNewPrivs)' /proc/self/status; ulimit -n; \
    ulimit -Hn; id; cat /proc/self/oom_score_adj";

/// An OCI process running [`SHOW_PRIVILEGES`] with `extra` fields (every one sets an rlimit:
/// without one runc's exec keeps the caller's, husk's the guest's).
fn privileges_process(dir: &Path, name: &str, extra: &Value) -> String {
    let mut process = serde_json::json!({
        "args": ["sh", "-c", SHOW_PRIVILEGES],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 512}],
    });
    for (key, value) in extra.as_object().expect("object") {
        process[key] = value.clone();
    }
    let path = dir.join(name);
    std::fs::write(&path, process.to_string()).expect("process.json");
    path.to_str().expect("utf-8").to_owned()
}

#[test]
fn test_exec_privileges_same_as_runc() {
    let Some(env) = Env::get("test_exec_privileges_same_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    bundle.edit(|c| {
        c["process"]["noNewPrivileges"] = false.into();
        c["process"]["oomScoreAdj"] = 100.into();
        // The container's profile holds for its execs too.
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
        });
    });
    let runc_root = tempfile::tempdir().expect("runc root");
    let dir = tempfile::tempdir().expect("process files");
    let two_caps = serde_json::json!(["CAP_NET_BIND_SERVICE", "CAP_KILL"]);
    let only_two = privileges_process(
        dir.path(),
        "two-caps.json",
        &serde_json::json!({
            "capabilities": {"bounding": two_caps, "effective": two_caps, "permitted": two_caps},
            "noNewPrivileges": true,
        }),
    );
    let user = privileges_process(
        dir.path(),
        "user.json",
        &serde_json::json!({
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            // soft == hard: runc 1.1's exec races its Go runtime, which raises the soft
            // NOFILE limit to the hard one, against its parent's prlimit (77/88 or 88/88).
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 77}],
        }),
    );
    let no_caps = privileges_process(
        dir.path(),
        "no-caps.json",
        &serde_json::json!({"capabilities": {}}),
    );
    let show = ["sh", "-c", SHOW_PRIVILEGES];
    let mkdir = [
        "sh",
        "-c",
        "mkdir /tmp/x 2>/dev/null && echo made || echo refused",
    ];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--process", only_two.as_str()], vec![]),
        (vec!["--process", user.as_str()], vec![]),
        (vec!["--process", no_caps.as_str()], vec![]),
        (vec!["--cap", "CAP_SYS_ADMIN"], show.to_vec()),
        (
            vec!["--no-new-privs", "--user", "1000", "-g", "5"],
            show.to_vec(),
        ),
        (vec![], show.to_vec()),
        (vec![], mkdir.to_vec()),
        (vec!["--no-new-privs"], mkdir.to_vec()),
    ];
    let mut results: Vec<Vec<(String, Option<i32>, String)>> = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "priv", &dir.path().join(rt.name()));
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        assert!(rt.run(&["start", "priv"]).status.success());
        let mut outputs = Vec::new();
        for (flags, cmd) in &cases {
            let mut args = vec!["exec"];
            args.extend(flags);
            args.push("priv");
            args.extend(cmd);
            let out = rt.run(&args);
            let what = format!("{} exec {}", rt.name(), flags.join(" "));
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            outputs.push((what, out.status.code(), stdout(&out)));
        }
        assert!(rt.run(&["delete", "--force", "priv"]).status.success());
        results.push(outputs);
    }
    for (runc, husk_out) in results[0].iter().zip(&results[1]) {
        assert_eq!(
            (husk_out.1, &husk_out.2),
            (runc.1, &runc.2),
            "{} vs {}",
            husk_out.0,
            runc.0
        );
    }
    // Not vacuous: the seccomp profile refused the execs' mkdir.
    assert_eq!(results[1][6].2, "refused\n", "{}", results[1][6].0);
    assert_eq!(results[1][7].2, "refused\n", "{}", results[1][7].0);
    // Not vacuous: the two-capability exec has exactly those, and no_new_privs.
    assert!(
        results[1][0].2.contains("CapEff:\t0000000000000420")
            && results[1][0].2.contains("NoNewPrivs:\t1"),
        "{}",
        results[1][0].2
    );
    husk.assert_clean();
}

/// A hook that writes its stdin (the state) to `<dir>/<phase>-<runtime>.json`.
fn recording_hook(dir: &Path, phase: &str, runtime: &str) -> Value {
    let file = dir.join(format!("{phase}-{runtime}.json"));
    serde_json::json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {}", file.display())],
        "env": ["PATH=/usr/bin:/bin"],
    })
}

/// The hooks' state follows the runtime spec where runc 1.1 does not (runc says `creating` to
/// createRuntime/prestart and `created` to poststart, and fails on a failing poststart hook);
/// id and bundle as runc. A created container is not deleted without `--force` (runc deletes it).
#[test]
fn test_hooks_run_with_the_spec_state_and_failing_prestart_fails_create() {
    let Some(env) =
        Env::get("test_hooks_run_with_the_spec_state_and_failing_prestart_fails_create")
    else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::tempdir().expect("runc root");
    let dir = tempfile::tempdir().expect("hook outputs");
    let phases = [
        ("createRuntime", "created"),
        ("prestart", "created"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ];
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let husk_only = matches!(rt, Runtime::Husk(_));
        bundle.edit(|c| {
            for (phase, _) in phases {
                let mut list = vec![recording_hook(dir.path(), phase, rt.name())];
                if husk_only && matches!(phase, "poststart" | "poststop") {
                    // A failing hook before it: logged, and the next one still runs.
                    list.insert(0, serde_json::json!({"path": "/bin/false"}));
                }
                c["hooks"][phase] = serde_json::json!(list);
            }
        });
        let out = rt.create(
            bundle.path(),
            "hk",
            &dir.path().join(format!("out-{}", rt.name())),
        );
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        if husk_only {
            let delete = rt.run(&["delete", "hk"]);
            assert!(!delete.status.success(), "husk deleted a created container");
            assert_eq!(rt.status("hk"), "created", "{}", stderr(&delete));
        }
        assert!(rt.run(&["start", "hk"]).status.success());
        assert!(rt.run(&["kill", "hk", "KILL"]).status.success());
        assert_eq!(rt.await_status("hk", "stopped"), "stopped");
        assert!(rt.run(&["delete", "hk"]).status.success());
    }
    for (phase, status) in phases {
        let read = |rt: &str| -> Value {
            let path = dir.path().join(format!("{phase}-{rt}.json"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{rt} did not run {phase}: {e}"));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rt} {phase}: {e}: {text}"))
        };
        let (runc, husk_state) = (read("runc"), read("husk"));
        assert_eq!(husk_state["id"], "hk", "{phase}: {husk_state}");
        assert_eq!(husk_state["status"], status, "{phase}: status");
        assert_eq!(husk_state["bundle"], runc["bundle"], "{phase}: bundle");
    }
    // A failing prestart hook fails create and leaves nothing.
    bundle.edit(|c| {
        c["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/false"}]});
    });
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "bad", &dir.path().join("bad-out"));
        assert!(!out.status.success(), "{}: create succeeded", rt.name());
        let _ = rt.run(&["delete", "--force", "bad"]);
    }
    husk.assert_clean();
}

/// `createContainer` and `startContainer` hooks run in the guest, in the container's
/// namespaces, their paths resolved in the container's rootfs (runc resolves them on the
/// host, where a VM's container has none of its files): the first at `create`, in the rootfs
/// before it is the root, the second at `start`, with the container's mounts; each with its
/// argv, its environment and the state on stdin. A failing one fails `create` or `start` as
/// under runc, and a failed `create` leaves nothing.
#[test]
fn test_container_hooks_run_in_the_guest_and_failing_ones_fail_as_runc() {
    let Some(env) = Env::get("test_container_hooks_run_in_the_guest_and_failing_ones_fail_as_runc")
    else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let rootfs = bundle.path().join("rootfs");
    let hook = |script: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script], "env": ["PHASE_ENV=set"]});
    bundle.edit(|c| {
        c["root"]["readonly"] = false.into();
        c["hooks"] = serde_json::json!({
            "createContainer": [hook("cat > /create.json; echo $PHASE_ENV > /create.env")],
            "startContainer": [hook("cat > /start.json; grep -c ' /proc proc ' /proc/mounts > /start.proc")],
        });
    });
    let outs = tempfile::tempdir().expect("outputs");
    let rt = Runtime::Husk(&husk);
    let out = rt.create(bundle.path(), "gh", &outs.path().join("out"));
    assert!(out.status.success(), "create: {}", stderr(&out));
    let read = |name: &str| std::fs::read_to_string(rootfs.join(name)).unwrap_or_default();
    assert_eq!(read("create.env"), "set\n", "createContainer's env");
    assert!(
        read("start.json").is_empty(),
        "startContainer ran at create"
    );
    let state: Value = serde_json::from_str(&read("create.json")).expect("createContainer's state");
    assert_eq!(state["id"], "gh");
    assert_eq!(state["status"], "created");
    assert!(state["pid"].as_u64().is_some(), "{state}");
    let absolute = std::path::absolute(bundle.path()).expect("bundle path");
    assert_eq!(state["bundle"], absolute.to_string_lossy().as_ref());
    assert!(rt.run(&["start", "gh"]).status.success());
    let state: Value = serde_json::from_str(&read("start.json")).expect("startContainer's state");
    assert_eq!(state["id"], "gh");
    assert_eq!(
        read("start.proc"),
        "1\n",
        "startContainer sees the container's /proc"
    );
    assert!(rt.run(&["kill", "gh", "KILL"]).status.success());
    assert_eq!(rt.await_status("gh", "stopped"), "stopped");
    assert!(rt.run(&["delete", "gh"]).status.success());

    // A failing createContainer hook fails `create` as under runc (the same program exists on
    // the host and in the rootfs) and leaves nothing.
    let runc_root = tempfile::tempdir().expect("runc root");
    let failing = hook("echo no >&2; exit 3");
    bundle.edit(|c| c["hooks"] = serde_json::json!({ "createContainer": [failing] }));
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "bad", &outs.path().join("bad-out"));
        assert!(!out.status.success(), "{}: create succeeded", rt.name());
        if rt.name() == "husk" {
            let message = stderr(&out);
            assert!(
                message.contains("createContainer hook /bin/sh"),
                "{message}"
            );
        }
        let _ = rt.run(&["delete", "--force", "bad"]);
    }
    // A failing startContainer hook: the process never runs and the container is stopped, as
    // under runc; husk's `start` also fails, as the runtime spec asks (runc 1.1's succeeds).
    bundle.edit(|c| c["hooks"] = serde_json::json!({ "startContainer": [failing] }));
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let out = rt.create(bundle.path(), "bad", &outs.path().join("bad-out"));
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        let start = rt.run(&["start", "bad"]);
        if rt.name() == "husk" {
            assert!(!start.status.success(), "husk: start succeeded");
            let message = stderr(&start);
            assert!(message.contains("startContainer hook /bin/sh"), "{message}");
        }
        assert_eq!(
            rt.await_status("bad", "stopped"),
            "stopped",
            "{}",
            rt.name()
        );
        let started = std::fs::read_to_string(outs.path().join("bad-out")).unwrap_or_default();
        assert!(
            !started.contains("started"),
            "{}: the process ran",
            rt.name()
        );
        let _ = rt.run(&["delete", "--force", "bad"]);
    }
    husk.assert_clean();
}

/// A network namespace the test makes, the far end of a container's link; removed on drop.
struct PeerNetns(String);

impl PeerNetns {
    fn new() -> Self {
        let name = format!("husk-peer-{}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        assert!(
            made.is_ok_and(|o| o.status.success()),
            "ip netns add {name}"
        );
        Self(name)
    }

    /// `ip -n <ns> <args>` succeeded.
    fn ip(&self, args: &[&str]) -> bool {
        let mut cmd = Command::new("ip");
        cmd.arg("-n")
            .arg(&self.0)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }

    /// The body the server at `addr` answers for `path`, from the namespace (at most `within`).
    fn fetch(&self, addr: &str, path: &str, within: Duration) -> String {
        let ns = Path::new("/run/netns").join(&self.0);
        http_get(Some(&ns), addr, path, within).unwrap_or_default()
    }
}

impl Drop for PeerNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A prestart hook that connects `state.pid`'s network namespace to a network, as Docker's
/// libnetwork does from its hook (a veth moved in, an address, a default route, an MTU): the
/// container sees that interface's hardware address, MTU, address and routes as under runc, a
/// server in it answers at that address from the far end, and the link goes with the container.
#[test]
fn test_prestart_hook_network_reaches_the_container_as_runc() {
    let Some(env) = Env::get("test_prestart_hook_network_reaches_the_container_as_runc") else {
        return;
    };
    let husk = env.husk();
    let peer = PeerNetns::new();
    assert!(peer.ip(&["link", "set", "lo", "up"]));
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; \
                  ip -4 addr show dev eth0 | grep inet; ip route; \
                  mkdir -p /dev/shm/www && echo hello >/dev/shm/www/x && exec httpd -f -p 7777 -h /dev/shm/www";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    let runc_root = tempfile::tempdir().expect("runc root");
    let mut seen = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let far = format!("hkp-{}", rt.name());
        let mac_file = dir.path().join(format!("mac-{}", rt.name()));
        let hook = format!(
            "set -e; pid=$(sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); ns=/proc/$pid/ns/net; \
             ip link add eth0 netns $pid mtu 1400 type veth peer name {far} netns {peer}; \
             nsenter --net=$ns ip addr add 10.215.0.2/24 brd + dev eth0; \
             nsenter --net=$ns ip link set eth0 up; \
             nsenter --net=$ns ip route add default via 10.215.0.1; \
             ip -n {peer} addr add 10.215.0.1/24 dev {far}; ip -n {peer} link set {far} mtu 1400 up; \
             nsenter --net=$ns ip link show eth0 | sed -n 's/.*ether \\([^ ]*\\).*/\\1/p' > {mac}",
            peer = peer.0,
            mac = mac_file.display(),
        );
        bundle.edit(|c| {
            c["process"]["terminal"] = false.into();
            c["hooks"] =
                serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]});
        });
        let out_file = dir.path().join(format!("out-{}", rt.name()));
        rt.create_and_start(bundle.path(), "net", &out_file);
        let answer = peer.fetch("10.215.0.2:7777", "x", Duration::from_secs(30));
        let said = std::fs::read_to_string(&out_file).unwrap_or_default();
        let mac = std::fs::read_to_string(&mac_file).unwrap_or_default();
        let killed = rt.run(&["kill", "net", "KILL"]);
        assert!(
            killed.status.success(),
            "{} kill: {} (container said {said:?})",
            rt.name(),
            stderr(&killed)
        );
        assert_eq!(rt.await_status("net", "stopped"), "stopped");
        assert!(rt.run(&["delete", "net"]).status.success());
        assert!(
            !mac.trim().is_empty(),
            "{}: the hook saw no eth0",
            rt.name()
        );
        // The hardware address is the veth's, which differs per run.
        let said = said.replacen(mac.trim(), "<the veth's>", 1);
        seen.push((rt.name(), said, answer));
        // The container's namespace (and with it the link) is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while peer.ip(&["link", "show", &far]) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !peer.ip(&["link", "show", &far]),
            "{}: {far} left",
            rt.name()
        );
    }
    assert_eq!(
        seen[0].2, "hello\n",
        "runc: the server did not answer: {seen:?}"
    );
    assert_eq!(
        seen[1].1, seen[0].1,
        "husk's container sees another network than runc's"
    );
    assert_eq!(
        seen[1].2, seen[0].2,
        "husk's server did not answer as runc's"
    );
    husk.assert_clean();
    assert!(!husk_sandbox::vm_dir(&husk.root().join("net")).exists());
}

#[test]
fn test_pause_resume_update_events_as_runc() {
    let Some(env) = Env::get("test_pause_resume_update_events_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let runc_root = tempfile::tempdir().expect("runc root");
    let outs = tempfile::tempdir().expect("outputs");
    let mut seen = Vec::new();
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let mut steps = Vec::new();
        let out = rt.create(bundle.path(), "pr", &outs.path().join(rt.name()));
        assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
        steps.push((
            "resume created",
            rt.run(&["resume", "pr"]).status.success(),
            rt.status("pr"),
        ));
        assert!(rt.run(&["start", "pr"]).status.success());
        steps.push((
            "pause",
            rt.run(&["pause", "pr"]).status.success(),
            rt.status("pr"),
        ));
        steps.push((
            "pause again",
            rt.run(&["pause", "pr"]).status.success(),
            rt.status("pr"),
        ));
        steps.push((
            "exec paused",
            rt.run(&["exec", "pr", "true"]).status.success(),
            rt.status("pr"),
        ));
        steps.push((
            "resume",
            rt.run(&["resume", "pr"]).status.success(),
            rt.status("pr"),
        ));
        steps.push((
            "exec resumed",
            rt.run(&["exec", "pr", "true"]).status.success(),
            rt.status("pr"),
        ));
        let update = rt.run(&["update", "--memory", "64m", "--pids-limit", "20", "pr"]);
        steps.push(("update", update.status.success(), stderr(&update)));
        if let Runtime::Husk(_) = rt {
            // The guest has cgroup v2 only; the host's runc may be on v1, so only husk's view.
            let limits = rt.run(&[
                "exec",
                "pr",
                "cat",
                "/sys/fs/cgroup/memory.max",
                "/sys/fs/cgroup/pids.max",
            ]);
            assert_eq!(stdout(&limits), "67108864\n20\n", "{}", stderr(&limits));
        }
        let event = rt.run(&["events", "--stats", "pr"]);
        let event: Value = serde_json::from_slice(&event.stdout).expect("events JSON");
        steps.push((
            "events --stats",
            event["type"] == "stats" && event["id"] == "pr",
            event["data"]["memory"]["usage"]["limit"].to_string(),
        ));
        assert!(rt.run(&["delete", "--force", "pr"]).status.success());
        seen.push(steps);
    }
    assert_eq!(seen[1], seen[0], "husk differs from runc");
    husk.assert_clean();
}

/// Accepts one connection on `listener` and takes the terminal master sent over it.
fn receive_master(listener: &std::os::unix::net::UnixListener) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let (conn, _) = listener.accept().expect("console socket connection");
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .expect("recvmsg");
    for cmsg in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let fd = *fds.first().expect("one fd");
            // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing else owns it.
            #[allow(unsafe_code)]
            return unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        }
    }
    panic!("no fd on the console socket");
}

/// Reads `master` until `want` appears (or 20 s pass); what was read.
fn read_until(master: &mut std::fs::File, want: &str) -> String {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    let mut buf = [0u8; 1024];
    while !text.contains(want) && Instant::now() < deadline {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => break,
        }
    }
    text
}

#[test]
fn test_console_socket_gets_working_pty_as_runc() {
    let Some(env) = Env::get("test_console_socket_gets_working_pty_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(
        &husk,
        &["sh", "-c", "tty; stty size; read x; echo got:$x; exit 4"],
    );
    bundle.edit(|c| c["process"]["terminal"] = true.into());
    let runc_root = tempfile::tempdir().expect("runc root");
    let dir = tempfile::tempdir().expect("sockets");
    for rt in [Runtime::Runc(runc_root.path()), Runtime::Husk(&husk)] {
        let socket = dir.path().join(format!("{}.sock", rt.name()));
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let receiver = std::thread::spawn(move || receive_master(&listener));
        let created = rt
            .command(&[
                "create",
                "--console-socket",
                socket.to_str().expect("utf-8"),
                "--bundle",
                bundle.path().to_str().expect("utf-8"),
                "tt",
            ])
            // Not a pipe: the monitor keeps create's stderr open.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("err")).expect("err file"))
            .status()
            .expect("create");
        let err = std::fs::read_to_string(dir.path().join("err")).unwrap_or_default();
        assert!(created.success(), "{}: {err}", rt.name());
        let master = receiver.join().expect("master");
        let size = rustix::termios::Winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size).expect("set size");
        nix::fcntl::fcntl(
            &master,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("nonblocking");
        // Let the size reach the guest terminal before the process reads it.
        std::thread::sleep(Duration::from_millis(600));
        assert!(rt.run(&["start", "tt"]).status.success());
        let mut master = std::fs::File::from(master);
        let first = read_until(&mut master, "30 100");
        assert!(first.contains("/dev/pts/"), "{}: tty: {first:?}", rt.name());
        assert!(first.contains("30 100"), "{}: size: {first:?}", rt.name());
        use std::io::Write as _;
        master.write_all(b"hello\r").expect("type");
        let rest = read_until(&mut master, "got:hello");
        assert!(rest.contains("got:hello"), "{}: {rest:?}", rt.name());
        assert_eq!(rt.await_status("tt", "stopped"), "stopped", "{}", rt.name());
        assert!(rt.run(&["delete", "tt"]).status.success());
    }
    husk.assert_clean();
}

#[test]
fn test_exec_tty_console_socket_working_pty_and_exit_code() {
    let Some(env) = Env::get("test_exec_tty_console_socket_working_pty_and_exit_code") else {
        return;
    };
    let husk = env.husk();
    let bundle = busybox_sleeper(&husk);
    let dir = tempfile::tempdir().expect("sockets");
    // runc hands an exec terminal over differently (it returns at once); husk keeps the
    // process attached and exits with its code, as `exec -t` without a console socket.
    let rt = Runtime::Husk(&husk);
    let out = rt.create(bundle.path(), "et", &dir.path().join(rt.name()));
    assert!(out.status.success(), "{}: {}", rt.name(), stderr(&out));
    assert!(rt.run(&["start", "et"]).status.success());
    let socket = dir.path().join(format!("{}-exec.sock", rt.name()));
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let receiver = std::thread::spawn(move || receive_master(&listener));
    let exec = rt
        .command(&[
            "exec",
            "-t",
            "--console-socket",
            socket.to_str().expect("utf-8"),
            "et",
            "sh",
            "-c",
            "tty; read x; echo got:$x; exit 4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("exec-err")).expect("err file"))
        .spawn()
        .expect("exec");
    let master = receiver.join().expect("master");
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("nonblocking");
    let mut master = std::fs::File::from(master);
    let first = read_until(&mut master, "/dev/pts/");
    assert!(first.contains("/dev/pts/"), "{}: {first:?}", rt.name());
    use std::io::Write as _;
    master.write_all(b"hi\r").expect("type");
    let rest = read_until(&mut master, "got:hi");
    assert!(rest.contains("got:hi"), "{}: {rest:?}", rt.name());
    let status = exec.wait_with_output().expect("exec exit").status;
    assert_eq!(status.code(), Some(4), "{}", rt.name());
    assert!(rt.run(&["delete", "--force", "et"]).status.success());
    husk.assert_clean();
}
