//! The built-in VMM booting the real guest, inside an emulated test host: QEMU TCG with
//! `-cpu max` exposes AMD SVM, the test-host kernel (kernel-config/test-host/) has KVM_AMD, so
//! the built-in VMM gets a working /dev/kvm there even where this machine's own KVM cannot run
//! Linux. The test host's root is this machine's / over virtio-9p, read-only. Slow (a guest
//! under KVM under TCG): only the cases that prove boot, vsock and the exit path.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::process::{Command, Stdio};
use std::time::Instant;

use husk_e2e::harness::Env;

/// Boots the emulated test host with `script args...` as its job; returns its console output.
fn run_nested(env: &Env, script: &str, args: &[String]) -> String {
    let test_host_kernel = env.share.join("test-host-vmlinux");
    assert!(
        test_host_kernel.is_file(),
        "{} is missing: run `make build`",
        test_host_kernel.display()
    );
    let dir = env!("CARGO_MANIFEST_DIR");
    // The job goes in a file: kernel command-line words with a '.' never reach init.
    let job_dir = tempfile::Builder::new()
        .prefix("nested")
        .rand_bytes(8)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("job dir");
    let job = job_dir.path().join("job");
    std::fs::write(
        &job,
        format!("exec {dir}/nested/{script} {}\n", args.join(" ")),
    )
    .expect("job file");
    let job = job.display().to_string();
    assert!(
        !job.contains('.'),
        "job path {job} must have no '.' to pass the kernel command line"
    );
    // Under TCG the test host's PIT calibration of the TSC fails now and then (the emulation
    // is too jittery); its KVM then runs no guest. The host's TSC rate is what TCG exposes.
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 tsc_early_khz={} root=host rootfstype=9p rootflags=trans=virtio,version=9p2000.L ro \
         init={dir}/nested/init.sh husk_job={job}",
        host_tsc_khz()
    );
    // A hung nest must not hang the suite: coreutils' timeout ends it.
    let output = Command::new("timeout")
        .args(["600", "qemu-system-x86_64"])
        .args([
            "-M",
            "microvm,acpi=off,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&test_host_kernel)
        .args(["-append", &append])
        .args([
            "-fsdev",
            "local,id=root,path=/,readonly=on,security_model=none",
        ])
        .args([
            "-device",
            "virtio-9p-device,fsdev=root,mount_tag=host",
            "-serial",
            "stdio",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// This host's TSC rate in kHz, measured over 100 ms.
fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (cycles, elapsed) = (tsc() - c0, t0.elapsed());
    u64::try_from(u128::from(cycles) * 1_000_000 / elapsed.as_micros().max(1) / 1000)
        .unwrap_or(u64::MAX)
}

fn canonical(path: std::path::PathBuf) -> String {
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}; run `make build`", path.display()));
    path.display().to_string()
}

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

#[test]
fn test_husk_run_through_builtin_vmm_in_emulated_test_host() {
    let Some(env) = Env::get("test_husk_run_through_builtin_vmm_in_emulated_test_host") else {
        return;
    };
    let start = Instant::now();
    let text = run_nested(&env, "husk-run.sh", &[canonical(env.husk.clone())]);
    let lines =
        |prefix: &str| -> Vec<&str> { text.lines().filter(|l| l.starts_with(prefix)).collect() };
    println!(
        "nested: {:?}; {:?}; whole nest {} ms",
        lines("HUSK-RUN "),
        lines("husk: timings:"),
        start.elapsed().as_millis()
    );
    for (what, expected) in [
        (
            "auto picks the built-in VMM",
            "auto door: kvm (the built-in VMM)",
        ),
        ("container output with stdin", "built-in VMM: kernel 6.12"),
        ("stdin relayed", "stdin=from-host-stdin"),
        ("exit code", "HUSK-RUN c1 EXIT 3 "),
        ("exit by signal", "HUSK-RUN c2 EXIT 137 "),
        ("nothing left behind", "LEFT-BEHIND []"),
        ("the whole job", "NESTED-EXIT 0"),
    ] {
        assert!(
            text.contains(expected),
            "{what}: no `{expected}` in:\n{text}"
        );
    }
}
