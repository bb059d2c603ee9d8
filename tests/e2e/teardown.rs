//! Teardown when things go wrong: the VMM dies, the guest kernel panics, husk itself is
//! SIGKILLed. Each time: a clear error (where husk lives to give one) and nothing left behind.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

use husk_e2e::harness::{stderr, Env, Husk, TestBundle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Waits for the container's first stdout line, "ready".
fn wait_ready(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line, "ready\n");
    out
}

/// The pid of the process of container `id` whose program's name contains `needle`.
fn pid_of(needle: &str, husk: &Husk, id: &str) -> Pid {
    let procs = husk.processes_of(id);
    let line = procs
        .iter()
        .find(|p| {
            let program = p.split_once(": ").map_or("", |(_, cmd)| cmd);
            program
                .split_whitespace()
                .next()
                .is_some_and(|prog| prog.contains(needle))
        })
        .unwrap_or_else(|| panic!("no {needle} in {procs:?}"));
    let pid = line
        .split(':')
        .next()
        .expect("pid")
        .parse()
        .expect("numeric pid");
    Pid::from_raw(pid)
}

/// Waits until no process of container `id` is left (helpers die by PDEATHSIG,
/// asynchronously).
fn wait_no_processes(husk: &Husk, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !husk.processes_of(id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            husk.processes_of(id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn test_run_vmm_killed_error_and_clean() {
    let Some(env) = Env::get("test_run_vmm_killed_error_and_clean") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo ready; sleep 60"]);
    let mut child = husk.spawn_run(&bundle, "vmmkill", &[]);
    let _out = wait_ready(&mut child);
    kill(pid_of("qemu-system", &husk, "vmmkill"), Signal::SIGKILL).expect("kill qemu");
    let out = child.wait_with_output().expect("wait");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        // The jail's launcher mirrors its pid 1's end: 128 + SIGKILL.
        err.starts_with("husk: VM ended unexpectedly (VMM exited with exit status: 137"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    husk.assert_clean();
}

#[test]
fn test_run_virtiofsd_killed_error_and_clean() {
    let Some(env) = Env::get("test_run_virtiofsd_killed_error_and_clean") else {
        return;
    };
    let husk = env.husk();
    // The rootfs share gone mid-run: the guest's next file access would wait forever; husk
    // notices the helper's exit, names it and ends the VM.
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo ready; sleep 60"]);
    let mut child = husk.spawn_run(&bundle, "fskill", &[]);
    let _out = wait_ready(&mut child);
    kill(pid_of("virtiofsd", &husk, "fskill"), Signal::SIGKILL).expect("kill virtiofsd");
    let out = child.wait_with_output().expect("wait");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("husk: VM ended unexpectedly (virtiofsd exited with signal: 9"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    wait_no_processes(&husk, "fskill");
    husk.assert_clean();
}

#[test]
fn test_run_guest_panic_mid_run_error_and_clean() {
    let Some(env) = Env::get("test_run_guest_panic_mid_run_error_and_clean") else {
        return;
    };
    let husk = env.husk();
    // A hostile container crashes its own guest kernel: only its VM ends.
    let bundle = TestBundle::busybox(
        &husk,
        &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"],
    );
    // As under runc, the default spec makes /proc/sysrq-trigger read-only: a privileged
    // container (no read-only paths) is what can reach it.
    bundle.edit(|c| c["linux"]["readonlyPaths"] = serde_json::json!([]));
    let out = husk.run(&bundle, "panic", b"");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("husk: VM ended unexpectedly (guest kernel panic: sysrq triggered crash)"),
        "{err}"
    );
    assert!(err.contains("last console lines: "), "{err}");
    husk.assert_clean();
}

#[test]
fn test_run_husk_sigkilled_no_process_left_and_id_reusable() {
    let Some(env) = Env::get("test_run_husk_sigkilled_no_process_left_and_id_reusable") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo ready; sleep 60"]);
    let mut child = husk.spawn_run(&bundle, "sigkill", &[]);
    let _out = wait_ready(&mut child);
    child.kill().expect("SIGKILL husk");
    child.wait().expect("wait");
    // QEMU and virtiofsd die with husk; the next run of the same id clears the stale state.
    wait_no_processes(&husk, "sigkill");
    bundle.edit(|config| config["process"]["args"] = serde_json::json!(["true"]));
    let again = husk.run(&bundle, "sigkill", b"");
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    husk.assert_clean();
}
