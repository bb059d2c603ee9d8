//! The built-in VMM booting the real guest, inside an emulated test host: QEMU TCG with
//! `-cpu max` exposes AMD SVM, the test-host kernel (kernel-config/test-host/) has KVM_AMD, so
//! the built-in VMM gets a working /dev/kvm there even where this machine's own KVM cannot run
//! Linux. The test host's root is this machine's / over virtio-9p, read-only. Slow (a guest
//! under KVM under TCG): only the cases that prove boot, vsock, the exit path, the disk, the
//! network device and boot snapshots.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::time::Instant;

use husk_e2e::harness::nested::{canonical, run_nested};
use husk_e2e::harness::Env;

#[test]
fn test_builtin_vmm_boots_guest_to_agent_in_emulated_test_host() {
    let Some(env) = Env::get("test_builtin_vmm_boots_guest_to_agent_in_emulated_test_host") else {
        return;
    };
    let args = [
        canonical(env.husk.with_file_name("husk-vmm")),
        env!("CARGO_BIN_EXE_husk-agent-ping").to_owned(),
        canonical(env.share.join("vmlinux")),
        canonical(env.share.join("initramfs.cpio")),
    ];
    let start = Instant::now();
    let text = run_nested(&env, "vmm-boot.sh", &args);
    let summary = text
        .lines()
        .find(|l| l.starts_with("VMM-EXIT"))
        .unwrap_or("no VMM-EXIT line");
    println!(
        "nested: {summary}; whole nest {} ms",
        start.elapsed().as_millis()
    );
    assert!(
        text.contains("agent: handshake after"),
        "guest agent never answered:\n{text}"
    );
    assert!(
        text.contains("NESTED-EXIT 0"),
        "built-in VMM run failed:\n{text}"
    );
}

/// Boots the emulated test host with `husk-run.sh HUSK [only]`; prints its runs and timings.
fn husk_run_nest(env: &Env, only: Option<&str>) -> String {
    let start = Instant::now();
    let mut args = vec![canonical(env.husk.clone())];
    args.extend(only.map(str::to_owned));
    let text = run_nested(env, "husk-run.sh", &args);
    let lines =
        |prefix: &str| -> Vec<&str> { text.lines().filter(|l| l.starts_with(prefix)).collect() };
    println!(
        "nested: {:?}; {:?}; whole nest {} ms",
        lines("HUSK-RUN "),
        lines("husk: timings:"),
        start.elapsed().as_millis()
    );
    text
}

/// Asserts each `(what, expected)`: `expected` is in `text`.
fn assert_lines(text: &str, expected: &[(&str, &str)]) {
    for (what, expected) in expected {
        assert!(
            text.contains(expected),
            "{what}: no `{expected}` in:\n{text}"
        );
    }
}

#[test]
fn test_husk_run_through_builtin_vmm_in_emulated_test_host() {
    let Some(env) = Env::get("test_husk_run_through_builtin_vmm_in_emulated_test_host") else {
        return;
    };
    let text = husk_run_nest(&env, None);
    // c1 (2 vCPUs), c2 (1) and c3 (a disk) are each the first VM of their shape: a VM is
    // booted and saved, then theirs restored from it (c3's with its own disk, where the saved
    // VM had an empty one).
    assert_eq!(
        text.matches("built-in VMM started").count(),
        6,
        "every run on the built-in VMM:\n{text}"
    );
    assert_eq!(
        text.matches("VM restored from its boot snapshot").count(),
        3,
        "c1, c2 and c3 restored:\n{text}"
    );
    assert_lines(
        &text,
        &[
            (
                "auto picks the built-in VMM",
                "auto door: kvm (the built-in VMM)",
            ),
            ("container output with stdin", "built-in VMM: kernel 6.12"),
            ("stdin relayed", "stdin=from-host-stdin"),
            ("two vCPUs from the MP table", "cpus=2"),
            ("exit code", "HUSK-RUN c1 EXIT 3 "),
            ("exit by signal", "HUSK-RUN c2 EXIT 137 "),
            (
                "husk-vmm jailed",
                "JAIL CapEff: 0000000000000000 CapBnd: 0000000000000000 NoNewPrivs: 1 Seccomp: 2 \
                 own-mnt own-pid own-ipc own-uts own-net",
            ),
            ("disk-image rootfs on virtio-blk", "/dev/vda / ext4 rw"),
            ("written to the disk", "disk-ok"),
            ("disk image exit", "HUSK-RUN c3 EXIT 0 "),
            ("disk image clean after the run", "FSCK 0"),
            ("nothing left behind", "LEFT-BEHIND []"),
            ("the whole job", "NESTED-EXIT 0"),
        ],
    );
}

/// A network namespace wired as Podman wires one, through the built-in VMM's virtio-net
/// device (husk-run.sh's c4).
#[test]
fn test_builtin_vmm_network_in_emulated_test_host() {
    let Some(env) = Env::get("test_builtin_vmm_network_in_emulated_test_host") else {
        return;
    };
    let text = husk_run_nest(&env, Some("net"));
    assert_eq!(
        text.matches("built-in VMM started").count(),
        1,
        "auto picks the built-in VMM for a networked container:\n{text}"
    );
    let md5 = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let host = md5("NET-BIG-HOST ");
    assert!(host.is_some(), "no NET-BIG-HOST line:\n{text}");
    assert_eq!(
        md5("NET-BIG "),
        host,
        "3 MB in jumbo frames through the built-in VMM's virtio-net:\n{text}"
    );
    assert_lines(
        &text,
        &[
            ("network run exit", "HUSK-RUN c4 EXIT 0 "),
            (
                "the engine's address on the VM's virtio-net device",
                "inet 10.77.0.2/24",
            ),
            ("the engine's MTU", "NET-MTU 9000"),
            ("a file fetched from the host", "NET-GOT net-ok"),
            ("fetched again over a raw TCP stream", "NET-NC 1"),
            ("the tap removed", "NET-TAP-LEFT 0"),
            ("nothing left behind", "LEFT-BEHIND []"),
            ("the whole job", "NESTED-EXIT 0"),
        ],
    );
}

/// The `ID <run> <boot id> <random bytes>` line of run `run`.
fn identity<'a>(text: &'a str, run: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("ID {run} ")))
}

/// Boot snapshots on the built-in VMM (husk-run.sh's s1-s4): the first VM of a shape makes
/// the snapshot and is restored from it, the next is restored at once and cannot change the
/// snapshot however much memory it writes, restored guests have their own boot id and random
/// bytes, `--no-snapshot` boots cold, and a truncated snapshot is refused with the reason
/// logged and the VM booted cold. Prints cold and restored boot-to-agent times.
#[test]
fn test_builtin_vmm_boot_snapshot_in_emulated_test_host() {
    let Some(env) = Env::get("test_builtin_vmm_boot_snapshot_in_emulated_test_host") else {
        return;
    };
    let text = husk_run_nest(&env, Some("snapshot"));
    // HUSK_NEST_DUMP=1 prints the whole nest (the runs' logs and timings) even when it passes.
    if std::env::var_os("HUSK_NEST_DUMP").is_some() {
        eprintln!("{text}");
    }
    for run in ["s1", "s2", "s3", "s4"] {
        assert!(
            text.contains(&format!("HUSK-RUN {run} EXIT 0 ")),
            "run {run}:\n{text}"
        );
    }
    let ids: Vec<&str> = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|run| identity(&text, run).unwrap_or_else(|| panic!("no ID {run}:\n{text}")))
        .collect();
    let boot_ids: std::collections::HashSet<_> = ids
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let bytes: std::collections::HashSet<_> = ids
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        boot_ids.len(),
        4,
        "a boot id of its own for each guest:\n{text}"
    );
    assert_eq!(
        bytes.len(),
        4,
        "random bytes of its own for each guest:\n{text}"
    );
    assert_eq!(
        text.matches("boot snapshot made").count(),
        1,
        "made once, by s1:\n{text}"
    );
    assert_eq!(
        text.matches("VM restored from its boot snapshot").count(),
        2,
        "s1 and s2 restored, s3 and s4 not:\n{text}"
    );
    let md5 = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_owned)
    };
    assert!(md5("SNAP-MD5-BEFORE ").is_some(), "no snapshot:\n{text}");
    assert_eq!(
        md5("SNAP-MD5-BEFORE "),
        md5("SNAP-MD5-AFTER "),
        "a restored guest filling its memory never writes the snapshot:\n{text}"
    );
    assert_lines(
        &text,
        &[
            ("root's alone", "SNAP-MODE 600 700"),
            ("the guest wrote its memory", "FILLED"),
            (
                "a truncated snapshot is refused with the reason, then a cold boot",
                "restoring the boot snapshot failed: booting cold",
            ),
            ("the reason", "memory file has 4096 bytes"),
            ("nothing left behind", "LEFT-BEHIND []"),
            ("the whole job", "NESTED-EXIT 0"),
        ],
    );
}
