//! Bad input and broken hosts: each gets one clear stderr line naming what is wrong, a
//! non-zero exit, and nothing left behind (state directory, sockets, processes).

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::process::Output;

use husk_e2e::harness::{stderr, Env, Husk, TestBundle};

/// Asserts exit 1, a single `husk: ...` line containing `needle`, and a clean state root.
fn assert_one_line_error(husk: &Husk, out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        err.starts_with("husk: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
    husk.assert_clean();
}

fn run_with(
    husk: &Husk,
    bundle: &TestBundle,
    extra_env: &[(&str, &str)],
    global: &[&str],
) -> Output {
    let mut args: Vec<&str> = global.to_vec();
    args.extend([
        "run",
        "--bundle",
        bundle.path().to_str().expect("utf-8"),
        "bad",
    ]);
    let mut cmd = husk.command(&args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null())
        .output()
        .expect("husk")
}

/// `--preserve-fds N` is accepted as runc accepts it; a VM's process cannot inherit host
/// descriptors, so only 0 runs and any other N is one clear line.
#[test]
fn test_run_preserve_fds_zero_runs_other_refused() {
    let Some(env) = Env::get("test_run_preserve_fds_zero_runs_other_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let bundle_path = bundle.path().to_str().expect("utf-8");
    let zero = husk
        .command(&["run", "--preserve-fds", "0", "--bundle", bundle_path, "pf0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("husk");
    assert!(zero.status.success(), "{}", stderr(&zero));
    let two = husk
        .command(&["run", "--preserve-fds", "2", "--bundle", bundle_path, "pf2"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("husk");
    assert_one_line_error(
        &husk,
        &two,
        "--preserve-fds 2: host descriptors cannot be passed",
    );
}

#[test]
fn test_run_missing_config_json_error() {
    let Some(env) = Env::get("test_run_missing_config_json_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    std::fs::remove_file(bundle.path().join("config.json")).expect("rm");
    assert_one_line_error(&husk, &run_with(&husk, &bundle, &[], &[]), "config.json");
}

#[test]
fn test_run_invalid_config_json_error() {
    let Some(env) = Env::get("test_run_invalid_config_json_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    std::fs::write(bundle.path().join("config.json"), "{ not json").expect("write");
    assert_one_line_error(&husk, &run_with(&husk, &bundle, &[], &[]), "config.json");
}

#[test]
fn test_run_empty_args_error() {
    let Some(env) = Env::get("test_run_empty_args_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &[]);
    assert_one_line_error(&husk, &run_with(&husk, &bundle, &[], &[]), "process.args");
}

#[test]
fn test_run_missing_rootfs_error() {
    let Some(env) = Env::get("test_run_missing_rootfs_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| c["root"]["path"] = "no-such-rootfs".into());
    assert_one_line_error(&husk, &run_with(&husk, &bundle, &[], &[]), "no-such-rootfs");
}

#[test]
fn test_run_missing_kernel_error() {
    let Some(env) = Env::get("test_run_missing_kernel_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = run_with(
        &husk,
        &bundle,
        &[("HUSK_KERNEL", "/nonexistent/vmlinux")],
        &[],
    );
    assert_one_line_error(
        &husk,
        &out,
        "guest kernel not found at /nonexistent/vmlinux",
    );
}

#[test]
fn test_run_missing_initramfs_error() {
    let Some(env) = Env::get("test_run_missing_initramfs_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = run_with(
        &husk,
        &bundle,
        &[("HUSK_INITRAMFS", "/nonexistent/initramfs.cpio")],
        &[],
    );
    assert_one_line_error(
        &husk,
        &out,
        "initramfs not found at /nonexistent/initramfs.cpio",
    );
}

#[test]
fn test_run_qemu_not_installed_error() {
    let Some(env) = Env::get("test_run_qemu_not_installed_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = run_with(&husk, &bundle, &[("PATH", "/nonexistent")], &[]);
    assert_one_line_error(&husk, &out, "qemu-system-x86_64 not found");
}

#[test]
fn test_run_virtiofsd_not_installed_error() {
    let Some(env) = Env::get("test_run_virtiofsd_not_installed_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let qemu_dir = "/usr/bin:/bin";
    assert!(
        !std::path::Path::new("/usr/bin/virtiofsd").exists(),
        "this test hides virtiofsd by PATH"
    );
    let out = run_with(&husk, &bundle, &[("PATH", qemu_dir)], &[]);
    assert_one_line_error(&husk, &out, "virtiofsd not found");
}

#[test]
fn test_run_virtiofsd_fails_to_start_error_names_it() {
    let Some(env) = Env::get("test_run_virtiofsd_fails_to_start_error_names_it") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    // A virtiofsd that fails at start: the VMM finds no one behind the socket husk bound for
    // it and fails too; the error names virtiofsd and its words, not the VMM (restored or
    // booted cold alike), and a boot snapshot is not blamed.
    let dir = tempfile::tempdir().expect("tmp");
    let fake = dir.path().join("virtiofsd");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'cannot serve the share: boom' >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    // With the real virtiofsd first: the VM's boot snapshot exists, and the next run restores.
    let ok = run_with(&husk, &bundle, &[], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    for _ in 0..2 {
        let out = run_with(&husk, &bundle, &[("PATH", path.as_str())], &[]);
        assert_one_line_error(&husk, &out, "virtiofsd exited with exit status: 1");
        assert!(stderr(&out).contains("boom"), "{}", stderr(&out));
    }
}

#[test]
fn test_run_guest_fails_to_boot_shows_console() {
    let Some(env) = Env::get("test_run_guest_fails_to_boot_shows_console") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    // An initramfs without /init: the kernel finds no init and panics.
    let bogus = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(bogus.path(), b"this is not a cpio archive").expect("write");
    let out = run_with(
        &husk,
        &bundle,
        &[("HUSK_INITRAMFS", bogus.path().to_str().expect("utf-8"))],
        &[],
    );
    assert_one_line_error(&husk, &out, "guest failed to boot (guest kernel panic: ");
    assert!(
        stderr(&out).contains("last console lines: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn test_run_invalid_id_error() {
    let Some(env) = Env::get("test_run_invalid_id_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = husk
        .command(&[
            "run",
            "--bundle",
            bundle.path().to_str().expect("utf-8"),
            "../escape",
        ])
        .output()
        .expect("husk");
    assert_one_line_error(&husk, &out, "invalid container id");
}

#[test]
fn test_run_id_in_use_error() {
    let Some(env) = Env::get("test_run_id_in_use_error") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "echo ready; read line"]);
    let mut first = husk.spawn_run(&bundle, "same", &[]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line, "ready\n");
    let second = husk
        .command(&[
            "run",
            "--bundle",
            bundle.path().to_str().expect("utf-8"),
            "same",
        ])
        .output()
        .expect("husk");
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("container \"same\" already exists"),
        "{}",
        stderr(&second)
    );
    let mut stdin = first.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"go\n").expect("write");
    drop(stdin);
    assert_eq!(first.wait().expect("wait").code(), Some(0));
    husk.assert_clean();
}

#[test]
fn test_run_hypervisor_kvm_runs_or_names_probe_failure() {
    let Some(env) = Env::get("test_run_hypervisor_kvm_runs_or_names_probe_failure") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    let out = run_with(&husk, &bundle, &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "auto runs here: {}",
        stderr(&out)
    );
    let mut cmd = husk.command(&[
        "run",
        "--hypervisor",
        "kvm",
        "--bundle",
        bundle.path().to_str().expect("utf-8"),
        "kvm",
    ]);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("husk");
    // Where the KVM probe fails (this project's machines), the error names the probe's finding;
    // where it passes, the built-in VMM runs the container.
    let check = husk.command(&["check"]).output().expect("husk check");
    if stdout_of(&check).contains("kvm probe: passed") {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        husk.assert_clean();
        return;
    }
    assert_one_line_error(
        &husk,
        &out,
        "the built-in VMM cannot run a guest on this host: KVM probe: ",
    );
}

#[test]
fn test_check_reports_probe_and_auto_door() {
    let Some(env) = Env::get("test_check_reports_probe_and_auto_door") else {
        return;
    };
    let husk = env.husk();
    let out = husk.command(&["check"]).output().expect("husk check");
    let text = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for label in [
        "kvm:",
        "kvm probe:",
        "qemu:",
        "virtiofsd:",
        "kernel:",
        "initramfs:",
        "auto door: ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(label)),
            "{label:?} missing in {text}"
        );
    }
    let door = if text.contains("kvm probe: passed") {
        "auto door: kvm"
    } else {
        "auto door: qemu"
    };
    assert!(text.contains(door), "{door:?} expected in {text}");
    // Without virtiofsd no door can run: exit 1 and it says what is missing.
    // virtiofsd lives in /usr/local/bin (cargo install); qemu in /usr/bin.
    let out = husk
        .command(&["check"])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("husk check");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout_of(&out).contains("virtiofsd: not found in PATH"),
        "{}",
        stdout_of(&out)
    );
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
