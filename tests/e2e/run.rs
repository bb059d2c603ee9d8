//! `husk run` end to end: a busybox bundle runs in a real guest (kernel from kernel-config/,
//! husk-agent as PID 1, our vsock device, virtiofsd) through the QEMU door; output, exit codes,
//! stdin, isolation and teardown are checked as a user sees them.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::io::{BufRead, BufReader};

use husk_e2e::harness::{stderr, stdout, which, Env, TestBundle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn test_run_echo_output_and_exit_0() {
    let Some(env) = Env::get("test_run_echo_output_and_exit_0") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(
        &husk,
        &["sh", "-c", "echo hello from the guest; echo oops >&2"],
    );
    let out = husk.run(&bundle, "echo", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello from the guest\n");
    assert_eq!(stderr(&out), "oops\n");
    husk.assert_clean();
}

#[test]
fn test_run_exit_3_exit_code_3() {
    let Some(env) = Env::get("test_run_exit_3_exit_code_3") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "exit 3"]);
    let out = husk.run(&bundle, "three", b"");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    husk.assert_clean();
}

#[test]
fn test_run_sigterm_to_husk_forwarded_then_killed_137() {
    let Some(env) = Env::get("test_run_sigterm_to_husk_forwarded_then_killed_137") else {
        return;
    };
    let husk = env.husk();
    // PID 1 of a pid namespace ignores SIGTERM without a handler (as under runc), so husk
    // escalates to SIGKILL after its grace period: the agent reports death by signal 9.
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo ready; exec sleep 60"]);
    let mut child = husk.spawn_run(&bundle, "sig", &[]);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 9));
    husk.assert_clean();
}

#[test]
fn test_run_trapped_sigterm_container_exits_by_itself() {
    let Some(env) = Env::get("test_run_trapped_sigterm_container_exits_by_itself") else {
        return;
    };
    let husk = env.husk();
    let script = "trap 'echo got TERM; exit 42' TERM; echo ready; sleep 60 & wait";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    let mut child = husk.spawn_run(&bundle, "trap", &[]);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("kill");
    assert_eq!(lines.next().expect("a line").expect("read"), "got TERM");
    assert_eq!(child.wait().expect("wait").code(), Some(42));
    husk.assert_clean();
}

#[test]
fn test_run_stdin_piped_reaches_process() {
    let Some(env) = Env::get("test_run_stdin_piped_reaches_process") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "tr a-z A-Z; echo done"]);
    let out = husk.run(&bundle, "stdin", b"piped into the vm\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "PIPED INTO THE VM\ndone\n");
    husk.assert_clean();
}

#[test]
fn test_run_pid1_is_bundle_process_and_ps_sees_only_container() {
    let Some(env) = Env::get("test_run_pid1_is_bundle_process_and_ps_sees_only_container") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo pid=$$; exec ps -o pid,comm"]);
    let out = husk.run(&bundle, "pid1", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("pid=1"));
    assert_eq!(
        lines
            .next()
            .map(str::split_whitespace)
            .map(Iterator::collect),
        Some(vec!["PID", "COMMAND"])
    );
    let procs: Vec<&str> = lines.map(str::trim).collect();
    assert_eq!(
        procs,
        ["1 ps"],
        "ps (exec'd by the bundle's sh, PID 1) sees only itself"
    );
    husk.assert_clean();
}

#[test]
fn test_run_hostname_from_config() {
    let Some(env) = Env::get("test_run_hostname_from_config") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["hostname"]);
    bundle.edit(|c| c["hostname"] = "inside-husk".into());
    let out = husk.run(&bundle, "host", b"");
    assert_eq!(stdout(&out), "inside-husk\n", "stderr: {}", stderr(&out));
    husk.assert_clean();
}

#[test]
fn test_run_guest_kernel_differs_from_host() {
    let Some(env) = Env::get("test_run_guest_kernel_differs_from_host") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["uname", "-r"]);
    let out = husk.run(&bundle, "uname", b"");
    let guest = stdout(&out);
    let host = nix::sys::utsname::uname()
        .expect("uname")
        .release()
        .to_string_lossy()
        .into_owned();
    assert!(
        guest.starts_with("6.12"),
        "guest release {guest:?}, stderr: {}",
        stderr(&out)
    );
    assert_ne!(guest.trim(), host);
    husk.assert_clean();
}

/// Each guest gets its identity from the host before the container runs: its wall clock is
/// within the host's, to the nanosecond, while the container ran (a guest restored from a
/// snapshot would be at the snapshot's time without it), and its random state and boot id are
/// its own.
#[test]
fn test_run_guest_clock_set_from_host_and_random_state_own() {
    let Some(env) = Env::get("test_run_guest_clock_set_from_host_and_random_state_own") else {
        return;
    };
    let husk = env.husk();
    // busybox's date has no %N: a new file's modification time has the clock's nanoseconds.
    let script = "touch /dev/now; stat -c '%Y %y' /dev/now; cat /proc/sys/kernel/random/boot_id; \
                  head -c 16 /dev/urandom | od -An -tx1";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    let mut seen = Vec::new();
    for id in ["ident1", "ident2"] {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let out = husk.run(&bundle, id, b"");
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        let text = stdout(&out);
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        assert!(!first.is_empty(), "stderr: {}", stderr(&out));
        let guest = guest_ns(first);
        assert!(
            (before..=after).contains(&guest),
            "guest clock {guest} outside the host's {before}..={after}"
        );
        seen.push(lines.collect::<Vec<_>>().join("\n"));
    }
    assert_ne!(seen[0], seen[1], "boot id and random bytes of two guests");
    husk.assert_clean();
}

/// `stat -c '%Y %y'` (`1796617000 2026-12-07 04:30:00.123456789 +0000`) in nanoseconds.
fn guest_ns(line: &str) -> u128 {
    let mut parts = line.split_whitespace();
    let secs: u128 = parts.next().and_then(|s| s.parse().ok()).expect(line);
    let frac = parts.nth(1).and_then(|t| t.split_once('.')).expect(line).1;
    secs * 1_000_000_000 + frac.parse::<u128>().expect(line)
}

#[test]
fn test_run_10mib_output_arrives_intact() {
    let Some(env) = Env::get("test_run_10mib_output_arrives_intact") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["seq", "1", "1500000"]);
    let out = husk.run(&bundle, "big", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let expected: String = (1..=1_500_000).map(|n| format!("{n}\n")).collect();
    assert!(expected.len() > 10 << 20);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes(), "10 MiB output differs");
    husk.assert_clean();
}

#[test]
fn test_run_four_concurrent_streams_not_mixed() {
    let Some(env) = Env::get("test_run_four_concurrent_streams_not_mixed") else {
        return;
    };
    let husk = env.husk();
    let ids = ["c0", "c1", "c2", "c3"];
    let bundles: Vec<_> = ids
        .iter()
        .map(|id| {
            TestBundle::busybox(
                &husk,
                &[
                    "sh",
                    "-c",
                    &format!("for i in $(seq 1 3000); do echo {id}-$i; done"),
                ],
            )
        })
        .collect();
    let children: Vec<_> = ids
        .iter()
        .zip(&bundles)
        .map(|(id, b)| husk.spawn_run(b, id, &[]))
        .collect();
    for (id, child) in ids.iter().zip(children) {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{id}: {}", stderr(&out));
        let expected: String = (1..=3000).map(|i| format!("{id}-{i}\n")).collect();
        assert!(stdout(&out) == expected, "{id}: output mixed or incomplete");
    }
    husk.assert_clean();
}

#[test]
fn test_run_timings_flag_reports_phases() {
    let Some(env) = Env::get("test_run_timings_flag_reports_phases") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = husk
        .spawn_run(&bundle, "timings", &["--timings"])
        .wait_with_output()
        .expect("wait");
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    for key in ["boot_to_agent_ms=", "container_start_ms=", "total_ms="] {
        assert!(err.contains(key), "{key} missing in {err:?}");
    }
    husk.assert_clean();
}

#[test]
fn test_run_disk_image_rootfs_ext4_on_virtio_blk_persists_and_unmounts_clean() {
    let Some(env) =
        Env::get("test_run_disk_image_rootfs_ext4_on_virtio_blk_persists_and_unmounts_clean")
    else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(
        &husk,
        &[
            "sh",
            "-c",
            "grep ' / ' /proc/mounts; echo written-in-guest > /data.txt",
        ],
    )
    .into_disk_image(16);
    bundle.edit(|c| c["root"]["readonly"] = false.into());
    let out = husk.run(&bundle, "disk1", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stdout(&out).starts_with("/dev/vda / ext4 rw"),
        "rootfs is not the virtio-blk disk: {}",
        stdout(&out)
    );
    husk.assert_clean();
    // The guest unmounted the filesystem cleanly: no journal left to replay.
    let image = bundle.path().join("rootfs.img");
    let fsck = std::process::Command::new(which("e2fsck"))
        .arg("-fn")
        .arg(&image)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // A second VM sees what the first wrote.
    bundle.edit(|c| c["process"]["args"] = serde_json::json!(["cat", "/data.txt"]));
    let out = husk.run(&bundle, "disk2", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "written-in-guest\n");
    husk.assert_clean();
}

#[test]
fn test_run_disk_image_rootfs_readonly_write_fails() {
    let Some(env) = Env::get("test_run_disk_image_rootfs_readonly_write_fails") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(
        &husk,
        &["sh", "-c", "grep ' / ' /proc/mounts; touch /new || exit 7"],
    )
    .into_disk_image(16);
    bundle.edit(|c| c["root"]["readonly"] = true.into());
    let before = std::fs::read(bundle.path().join("rootfs.img")).expect("image");
    let out = husk.run(&bundle, "diskro", b"");
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert!(
        stdout(&out).starts_with("/dev/vda / ext4 ro"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    let after = std::fs::read(bundle.path().join("rootfs.img")).expect("image");
    assert!(before == after, "the read-only disk image changed");
    husk.assert_clean();
}

#[test]
fn test_run_vm_size_annotations_reach_guest() {
    let Some(env) = Env::get("test_run_vm_size_annotations_reach_guest") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]);
    bundle.edit(|c| {
        c["annotations"] = serde_json::json!({"io.husk.vm.vcpus": "2", "io.husk.vm.memory": "128"});
    });
    let out = husk.run(&bundle, "annot", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"), "{text}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        (64 * 1024..=128 * 1024).contains(&kib),
        "MemTotal {kib} kB for a 128 MiB VM"
    );
    husk.assert_clean();
}

#[test]
fn test_run_vm_sized_from_resources() {
    let Some(env) = Env::get("test_run_vm_sized_from_resources") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]);
    bundle.edit(|c| {
        c["linux"]["resources"] = serde_json::json!({
            "memory": {"limit": 400 * 1024 * 1024},
            "cpu": {"quota": 200000, "period": 100000},
        });
    });
    let out = husk.run(&bundle, "sized", b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"), "vCPUs from the CPU quota: {text}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    // 400 MiB limit + 64 MiB guest overhead = a 464 MiB VM (more than the 256 MiB default).
    assert!(
        (400 * 1024..=464 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
    husk.assert_clean();
}
