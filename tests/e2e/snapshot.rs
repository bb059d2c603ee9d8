//! Boot snapshots on the QEMU door (TCG here; the built-in VMM's are in nested.rs): the first
//! VM of a shape makes a snapshot and every later one is restored from it through QEMU's own
//! migration, over the serial channel. Each test has a store of its own
//! (`HUSK_SNAPSHOT_STORE`), so that what it breaks breaks no other test.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use husk_e2e::harness::{stderr, stdout, Env, Husk, TestBundle};

const MADE: &str = "boot snapshot made";
const RESTORED: &str = "VM restored from its boot snapshot";
const FAILED: &str = "restoring the boot snapshot failed";

/// A private store for one test.
fn store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    dir
}

/// `husk --debug run [extra] --bundle B ID` with the store `store` and `env` added.
fn run(
    husk: &Husk,
    store: &Path,
    bundle: &TestBundle,
    id: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Output {
    let mut args = vec!["--debug", "run"];
    args.extend_from_slice(extra);
    args.extend(["--bundle", bundle.path().to_str().expect("utf-8"), id]);
    let mut cmd = husk.command(&args);
    cmd.env("HUSK_SNAPSHOT_STORE", store)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("husk run")
}

/// The snapshot directories in `store`.
fn snapshots(store: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(store)
        .expect("store")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "hashes"))
        .collect();
    found.sort();
    found
}

/// MD5-free fingerprint of a snapshot: every file's bytes.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("snapshot")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("read"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn test_snapshot_qemu_restored_runs_as_cold_and_guests_differ() {
    let Some(env) = Env::get("test_snapshot_qemu_restored_runs_as_cold_and_guests_differ") else {
        return;
    };
    let husk = env.husk();
    let store = store();
    let bundle = TestBundle::busybox(
        &husk,
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; cat /proc/sys/kernel/random/boot_id; \
             head -c 16 /dev/urandom | od -An -tx1; exit 3",
        ],
    );
    let first = run(&husk, store.path(), &bundle, "s1", &[], &[]);
    let log = stderr(&first);
    assert_eq!(first.status.code(), Some(3), "{log}");
    assert!(log.contains(MADE) && log.contains(RESTORED), "{log}");
    let second = run(&husk, store.path(), &bundle, "s2", &[], &[]);
    let log2 = stderr(&second);
    assert_eq!(second.status.code(), Some(3), "{log2}");
    assert!(log2.contains(RESTORED) && !log2.contains(MADE), "{log2}");
    let cold = run(&husk, store.path(), &bundle, "s3", &["--no-snapshot"], &[]);
    let log3 = stderr(&cold);
    assert_eq!(cold.status.code(), Some(3), "{log3}");
    assert!(!log3.contains(RESTORED), "{log3}");
    let lines = |o: &Output| stdout(o).lines().map(str::to_owned).collect::<Vec<_>>();
    let (a, b, c) = (lines(&first), lines(&second), lines(&cold));
    for out in [&a, &b, &c] {
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0], "out");
    }
    assert!(log.contains("err\n") && log2.contains("err\n") && log3.contains("err\n"));
    // Two guests restored from one snapshot: their own boot id and random bytes.
    assert_ne!(a[1], b[1], "boot ids");
    assert_ne!(a[2], b[2], "random bytes");
    // Root's alone: the store 0700, its files 0600.
    let saved = snapshots(store.path());
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(
        std::fs::metadata(&saved[0]).expect("dir").mode() & 0o777,
        0o700
    );
    for f in std::fs::read_dir(&saved[0]).expect("snapshot").flatten() {
        assert_eq!(f.metadata().expect("file").mode() & 0o777, 0o600, "{f:?}");
    }
    husk.assert_clean();
}

#[test]
fn test_snapshot_qemu_new_kernel_new_snapshot_damaged_one_falls_back_cold() {
    let test = "test_snapshot_qemu_new_kernel_new_snapshot_damaged_one_falls_back_cold";
    let Some(env) = Env::get(test) else {
        return;
    };
    let husk = env.husk();
    let store = store();
    let bundle = TestBundle::busybox(&husk, &["echo", "hi"]);
    let out = run(&husk, store.path(), &bundle, "k1", &[], &[]);
    assert!(stderr(&out).contains(MADE), "{}", stderr(&out));
    let first = snapshots(store.path());
    // Another kernel (the same one with bytes appended): another key, a snapshot of its own.
    let kernels = tempfile::tempdir().expect("tempdir");
    let kernel = kernels.path().join("vmlinux");
    let mut bytes = std::fs::read(env.share.join("vmlinux")).expect("kernel");
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&kernel, bytes).expect("write kernel");
    let out = run(
        &husk,
        store.path(),
        &bundle,
        "k2",
        &[],
        &[("HUSK_KERNEL", &kernel)],
    );
    let log = stderr(&out);
    assert_eq!(stdout(&out), "hi\n", "{log}");
    assert!(log.contains(MADE) && log.contains(RESTORED), "{log}");
    assert_eq!(snapshots(store.path()).len(), 2);
    // The first snapshot's state cut short: refused with its reason, the VM boots cold.
    let state = first[0].join("state");
    let len = std::fs::metadata(&state).expect("state").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let out = run(&husk, store.path(), &bundle, "k3", &[], &[]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(stdout(&out), "hi\n", "{log}");
    assert!(log.contains(FAILED), "{log}");
    assert!(!first[0].exists(), "the damaged snapshot is removed");
    husk.assert_clean();
}

#[test]
fn test_snapshot_qemu_privileged_guest_leaves_snapshot_unchanged() {
    let test = "test_snapshot_qemu_privileged_guest_leaves_snapshot_unchanged";
    let Some(env) = Env::get(test) else {
        return;
    };
    let husk = env.husk();
    let store = store();
    let quiet = TestBundle::busybox(&husk, &["true"]);
    let out = run(&husk, store.path(), &quiet, "p1", &[], &[]);
    assert!(stderr(&out).contains(MADE), "{}", stderr(&out));
    let saved = snapshots(store.path());
    let before = contents(&saved[0]);
    // Every capability, all devices: it fills its memory, and mounts and writes what it can.
    let bundle = TestBundle::busybox(
        &husk,
        &[
            "sh",
            "-c",
            "mount -t tmpfs -o size=64m t /mnt && dd if=/dev/urandom of=/mnt/f bs=1M count=48 \
             2>/dev/null; mkdir -p /v && mount -t virtiofs rootfs /v && echo x > /v/written; \
             for d in /dev/vport* /dev/vda /dev/mem; do [ -e $d ] && dd if=/dev/zero of=$d \
             bs=4k count=16 2>/dev/null; done; echo done",
        ],
    );
    bundle.edit(|c| {
        c["process"]["capabilities"] = serde_json::json!({});
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = husk_sandbox::features::CAPABILITIES
                .iter()
                .map(|s| serde_json::Value::from(*s))
                .collect();
        }
        c["linux"]["maskedPaths"] = serde_json::json!([]);
        c["linux"]["readonlyPaths"] = serde_json::json!([]);
        c["linux"]["devices"] = serde_json::json!([]);
        c["linux"]["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "rwm"}]);
    });
    let out = run(&husk, store.path(), &bundle, "p2", &[], &[]);
    assert!(stderr(&out).contains(RESTORED), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("done\n"), "{}", show(&out));
    assert!(before == contents(&saved[0]), "the snapshot changed");
    // And it still restores.
    let out = run(&husk, store.path(), &quiet, "p3", &[], &[]);
    assert!(stderr(&out).contains(RESTORED), "{}", stderr(&out));
    husk.assert_clean();
}

/// A disk image rootfs: the restored VM mounts its own disk, whatever the size, read-only
/// as the bundle says (the host refuses writes too), or read-write with the writes kept in
/// the image; as a cold boot.
#[test]
fn test_snapshot_qemu_disk_rootfs_restored_with_its_own_disk() {
    let Some(env) = Env::get("test_snapshot_qemu_disk_rootfs_restored_with_its_own_disk") else {
        return;
    };
    let husk = env.husk();
    let store = store();
    let script = "cat /sys/block/vda/size; grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; \
                  echo kept > /written && echo wrote";
    let disk = |mib: u32, read_only: bool| {
        let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]).into_disk_image(mib);
        bundle.edit(|c| c["root"]["readonly"] = read_only.into());
        bundle
    };
    let (small, large, writable) = (disk(24, true), disk(48, true), disk(32, false));
    let first = run(&husk, store.path(), &small, "d1", &[], &[]);
    let log = stderr(&first);
    assert!(log.contains(MADE) && log.contains(RESTORED), "{log}");
    // 512-byte sectors; mounted read-only; the write fails (sh's exit code 1).
    assert_eq!(stdout(&first), format!("{}\nro\n", 24 * 2048), "{log}");
    assert_eq!(first.status.code(), Some(1), "{log}");
    for (bundle, id, sectors, mode) in [
        (&large, "d2", 48 * 2048, "ro"),
        (&writable, "d3", 32 * 2048, "rw"),
    ] {
        let out = run(&husk, store.path(), bundle, id, &[], &[]);
        let log = stderr(&out);
        assert!(log.contains(RESTORED) && !log.contains(MADE), "{log}");
        let wrote = if mode == "rw" { "wrote\n" } else { "" };
        assert_eq!(stdout(&out), format!("{sectors}\n{mode}\n{wrote}"), "{log}");
        let cold = run(
            &husk,
            store.path(),
            bundle,
            &format!("{id}c"),
            &["--no-snapshot"],
            &[],
        );
        assert!(!stderr(&cold).contains(RESTORED));
        assert_eq!(
            stdout(&cold),
            stdout(&out),
            "cold as restored: {}",
            stderr(&cold)
        );
        assert_eq!(cold.status.code(), out.status.code());
    }
    // The write reached the image on the host.
    let image = writable.path().join("rootfs.img");
    let debugfs = std::process::Command::new(husk_e2e::harness::which("debugfs"))
        .args(["-R", "cat /written"])
        .arg(&image)
        .output()
        .expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&debugfs.stdout), "kept\n");
    assert_eq!(snapshots(store.path()).len(), 1);
    husk.assert_clean();
}

fn show(out: &Output) -> String {
    format!("stdout: {} stderr: {}", stdout(out), stderr(out))
}

#[test]
fn test_snapshot_prepare_makes_the_usual_shapes_then_runs_restore_without_making() {
    let test = "test_snapshot_prepare_makes_the_usual_shapes_then_runs_restore_without_making";
    let Some(env) = Env::get(test) else {
        return;
    };
    let husk = env.husk();
    let store = store();
    let prepare = || {
        let mut cmd = husk.command(&["snapshot", "prepare"]);
        cmd.env("HUSK_SNAPSHOT_STORE", store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.output().expect("husk snapshot prepare")
    };
    let out = prepare();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // A container's, one with bind mounts without and with a network, one on a disk image,
    // a pod's without and with a network.
    assert_eq!(stdout(&out).matches(": made,").count(), 6, "{}", show(&out));
    assert_eq!(snapshots(store.path()).len(), 6);
    let again = prepare();
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    assert_eq!(
        stdout(&again).matches(": kept,").count(),
        6,
        "{}",
        show(&again)
    );
    let bundle = TestBundle::busybox(&husk, &["echo", "hi"]);
    let out = run(&husk, store.path(), &bundle, "r1", &[], &[]);
    let log = stderr(&out);
    assert_eq!(stdout(&out), "hi\n", "{log}");
    assert!(log.contains(RESTORED) && !log.contains(MADE), "{log}");
    let disk = TestBundle::busybox(&husk, &["echo", "disk"]).into_disk_image(32);
    let out = run(&husk, store.path(), &disk, "r2", &[], &[]);
    let log = stderr(&out);
    assert_eq!(stdout(&out), "disk\n", "{log}");
    assert!(log.contains(RESTORED) && !log.contains(MADE), "{log}");
    assert_eq!(snapshots(store.path()).len(), 6);
    husk.assert_clean();
}
