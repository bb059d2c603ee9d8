//! A guest whose agent stops answering, and a guest that sends hostile strings.
//!
//! The threat model assumes a privileged container: this one has every capability and shares
//! the guest's pid namespace with the agent (PID 1). It mounts cgroup2 itself, moves PID 1
//! into a cgroup of its own and freezes it (`cgroup.freeze`); the guest kernel goes on
//! answering vsock connections, the agent never answers a request again. Every host command
//! and shim call must still return within its bound, and those that end a container must end
//! the VM and leave nothing behind: `husk kill` (TERM: a timeout error; KILL: the VM ends),
//! `husk state`, `husk delete --force` while another `husk kill` is stuck on the guest, `husk
//! run` given SIGTERM (it escalates and exits), and under containerd `ctr task kill`, `ctr task
//! delete --force` and the shim's shutdown. The bounds are generous (the host is slow under
//! load) but bounded; the measured times are printed.
//!
//! A process's command line is the guest's to choose: `husk ps` shows one holding ESC and a
//! newline escaped, on one line.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime};
use husk_e2e::harness::procs::{self, Proc};
use husk_e2e::harness::{processes_mentioning, stderr, stdout, text, Env, Husk, TestBundle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The longest any command may take against a frozen agent.
const BOUND: Duration = Duration::from_secs(60);

/// The container's program: freeze the agent, say so in the rootfs (the host sees it through
/// virtio-fs, not through the frozen agent), then live on.
const STALL: &str = "set -e; mkdir -p /dev/cg; mount -t cgroup2 none /dev/cg; \
    mkdir /dev/cg/stall; echo 1 > /dev/cg/stall/cgroup.procs; \
    echo 1 > /dev/cg/stall/cgroup.freeze; \
    while ! grep -q 'frozen 1' /dev/cg/stall/cgroup.events; do sleep 0.1; done; \
    touch /frozen; exec sleep 1000";

/// A privileged container in the guest's pid and cgroup namespaces running `args`.
fn privileged_bundle(husk: &Husk, args: &[&str]) -> TestBundle {
    let bundle = TestBundle::busybox(husk, args);
    bundle.edit(|c| {
        c["root"]["readonly"] = false.into();
        let caps: Value = husk_sandbox::features::CAPABILITIES
            .iter()
            .map(|c| Value::from(*c))
            .collect();
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            c["process"]["capabilities"][set] = caps.clone();
        }
        c["linux"]["namespaces"] = json!([
            {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}
        ]);
        c["linux"]["maskedPaths"] = json!([]);
        c["linux"]["readonlyPaths"] = json!([]);
    });
    bundle
}

/// Waits until the container says the agent is frozen.
fn wait_frozen(rootfs: &Path) {
    let deadline = Instant::now() + BOUND;
    while !rootfs.join("frozen").exists() {
        assert!(
            Instant::now() < deadline,
            "the agent was not frozen in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` to its end within [`BOUND`] (killed and failing otherwise); prints the time.
fn timed(what: &str, mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    finish(what, child, Instant::now())
}

/// Waits for `child` (started at `t0`) within [`BOUND`]; prints the time.
fn finish(what: &str, mut child: Child, t0: Instant) -> Output {
    while child.try_wait().expect("wait").is_none() {
        if t0.elapsed() > BOUND {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{what} took over {BOUND:?} against a frozen agent: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    println!("{what}: {:?} after {:.1?}", out.status.code(), t0.elapsed());
    out
}

/// `husk create` + `husk start` of `bundle` as `id`; the VMM's pid.
fn create_and_start(husk: &Husk, bundle: &TestBundle, id: &str) -> Proc {
    let path = bundle.path().to_str().expect("utf-8 path");
    // The container's stdio (the monitor's) goes to a file: a pipe would stay open with it.
    let log = bundle.path().join("create.out");
    let file = std::fs::File::create(&log).expect("output file");
    let created = husk
        .command(&["create", "--bundle", path, id])
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .status()
        .expect("husk create");
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(created.success(), "create: {said}");
    let started = husk.command(&["start", id]).output().expect("husk start");
    assert!(started.status.success(), "start: {}", stderr(&started));
    vmm_of(husk, id)
}

fn state(husk: &Husk, id: &str) -> Value {
    let out = timed("husk state", husk.command(&["state", id]));
    assert!(out.status.success(), "state: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("state JSON")
}

fn vmm_of(husk: &Husk, id: &str) -> Proc {
    let pid = state(husk, id)["pid"].as_u64().expect("pid");
    Proc::read(u32::try_from(pid).expect("pid")).expect("the VMM runs")
}

/// Waits (within [`BOUND`]) until `p` and every process naming the state root are gone.
fn wait_gone(husk: &Husk, p: &Proc) {
    let deadline = Instant::now() + BOUND;
    while p.alive() || !processes_mentioning(husk.root()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: VMM alive {}, {:?}",
            p.alive(),
            processes_mentioning(husk.root())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_frozen_agent_kill_state_and_delete_force_bounded_and_clean() {
    let Some(env) = Env::get("test_frozen_agent_kill_state_and_delete_force_bounded_and_clean")
    else {
        return;
    };
    let husk = env.husk();
    let bundle = privileged_bundle(&husk, &["sh", "-c", STALL]);
    let vmm = create_and_start(&husk, &bundle, "frozen");
    wait_frozen(&bundle.path().join("rootfs"));
    let out = timed("husk kill TERM", husk.command(&["kill", "frozen"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    assert_eq!(state(&husk, "frozen")["status"], "running");
    // A second kill is stuck on the guest while `delete --force` runs: it must not wait for it.
    let stuck = husk
        .command(&["kill", "frozen"])
        .stderr(Stdio::piped())
        .spawn();
    let (stuck, t_stuck) = (stuck.expect("spawn kill"), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let out = timed(
        "husk delete --force",
        husk.command(&["delete", "--force", "frozen"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = finish("concurrent husk kill", stuck, t_stuck);
    wait_gone(&husk, &vmm);
    husk.assert_clean();
}

#[test]
fn test_frozen_agent_kill_sigkill_ends_vm() {
    let Some(env) = Env::get("test_frozen_agent_kill_sigkill_ends_vm") else {
        return;
    };
    let husk = env.husk();
    let bundle = privileged_bundle(&husk, &["sh", "-c", STALL]);
    let vmm = create_and_start(&husk, &bundle, "frozenkill");
    wait_frozen(&bundle.path().join("rootfs"));
    let out = timed(
        "husk kill KILL",
        husk.command(&["kill", "frozenkill", "KILL"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state(&husk, "frozenkill")["status"], "stopped");
    let out = timed("husk delete", husk.command(&["delete", "frozenkill"]));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_gone(&husk, &vmm);
    husk.assert_clean();
}

#[test]
fn test_frozen_agent_run_sigterm_escalates_and_exits() {
    let Some(env) = Env::get("test_frozen_agent_run_sigterm_escalates_and_exits") else {
        return;
    };
    let husk = env.husk();
    let bundle = privileged_bundle(&husk, &["sh", "-c", STALL]);
    let child = husk.spawn_run(&bundle, "frozenrun", &[]);
    wait_frozen(&bundle.path().join("rootfs"));
    let vmm = vmm_of(&husk, "frozenrun");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let t0 = Instant::now();
    kill(pid, Signal::SIGTERM).expect("SIGTERM husk run");
    let out = finish("husk run after SIGTERM", child, t0);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    wait_gone(&husk, &vmm);
    husk.assert_clean();
}

#[test]
fn test_ps_hostile_command_line_one_escaped_row() {
    let Some(env) = Env::get("test_ps_hostile_command_line_one_escaped_row") else {
        return;
    };
    let husk = env.husk();
    let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2J\nUID PID PPID CMD";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "sleep 1000; true", hostile]);
    let vmm = create_and_start(&husk, &bundle, "hostileps");
    let out = timed("husk ps", husk.command(&["ps", "hostileps"]));
    let shown = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!shown.contains('\u{1b}'), "{shown:?}");
    let headers = shown.lines().filter(|l| l.starts_with("UID")).count();
    assert_eq!(headers, 1, "a row was split: {shown:?}");
    assert!(
        shown.contains("\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\nUID"),
        "{shown:?}"
    );
    let out = timed(
        "husk delete --force",
        husk.command(&["delete", "-f", "hostileps"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_gone(&husk, &vmm);
    husk.assert_clean();
}

/// `ctr run -d --config <spec>` of the privileged bundle: containerd passes the spec as is
/// (its rootfs path absolute, no snapshot).
fn ctr_run_config(ctr: &Ctr<'_>, bundle: &TestBundle, id: &str) {
    let rootfs = bundle.path().join("rootfs");
    bundle.edit(|c| c["root"]["path"] = rootfs.to_str().expect("utf-8").into());
    let spec = bundle.path().join("config.json");
    let args = [
        "run",
        "-d",
        "--runtime",
        ctr.runtime().type_name(),
        "--config",
        spec.to_str().expect("utf-8"),
        id,
    ];
    let out = ctr.ctr(&args);
    assert!(out.status.success(), "ctr run: {}", text(&out.stderr));
}

#[test]
fn test_containerd_frozen_agent_kill_delete_shutdown_bounded_and_clean() {
    let test = "test_containerd_frozen_agent_kill_delete_shutdown_bounded_and_clean";
    let Some(env) = Env::get(test) else {
        return;
    };
    let Some(containerd) = Containerd::get(test) else {
        return;
    };
    if let Some(reason) = Runtime::Husk.missing() {
        println!("SKIPPED: {test}: {reason}");
        return;
    }
    let ctr = containerd.ctr(Runtime::Husk, "frozen");
    let husk = env.husk();
    let bundle = privileged_bundle(&husk, &["sh", "-c", STALL]);
    let id = format!("frozen-{}", std::process::id());
    ctr_run_config(&ctr, &bundle, &id);
    let shim = ctr.shim(&id).expect("the task's shim");
    let spawned = procs::descendants(shim.pid);
    wait_frozen(&bundle.path().join("rootfs"));
    let out = timed("ctr task kill", ctr.command(&["task", "kill", &id]));
    println!("ctr task kill: {}", text(&out.stderr).trim());
    let out = timed(
        "ctr task delete --force",
        ctr.command(&["task", "delete", "--force", &id]),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = timed(
        "ctr container delete",
        ctr.command(&["container", "delete", &id]),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + BOUND;
    let left = || {
        let mut left: Vec<String> = spawned
            .iter()
            .chain(std::iter::once(&shim))
            .filter(|p| p.alive())
            .map(|p| format!("process {} {}", p.pid, p.name))
            .collect();
        left.extend(procs::mounts_mentioning(&id));
        left
    };
    while !left().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", left());
        std::thread::sleep(Duration::from_millis(100));
    }
}
