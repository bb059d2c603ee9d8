//! The emulated test host: QEMU TCG with `-cpu max` exposes AMD SVM, the test-host kernel
//! (kernel-config/test-host/) has KVM_AMD, so the built-in VMM gets a working /dev/kvm there
//! even where this machine's own KVM cannot run Linux. The test host's root is this machine's
//! / over virtio-9p, read-only; its job is a script from tests/nested/.

use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::Env;

/// One nest at a time: a TCG test host wants a whole core, and a starved one misjudges time.
static ONE_NEST: Mutex<()> = Mutex::new(());

/// Seconds a nest may take before it counts as hung.
const NEST_TIMEOUT_SECS: &str = "240";

/// Boots the emulated test host with `script args...` as its job; returns its console output.
/// A nest that hangs (TCG emulating nested SVM wedges now and then: no job result at all
/// within [`NEST_TIMEOUT_SECS`]) is booted once more, with its console printed first.
pub fn run_nested(env: &Env, script: &str, args: &[String]) -> String {
    let _one = ONE_NEST.lock().unwrap_or_else(PoisonError::into_inner);
    let first = boot_nest(env, script, args);
    if first.contains("NESTED-EXIT") {
        return first;
    }
    println!("RETRY: the emulated test host hung (no NESTED-EXIT within {NEST_TIMEOUT_SECS} s); its console:\n{first}");
    boot_nest(env, script, args)
}

fn boot_nest(env: &Env, script: &str, args: &[String]) -> String {
    let test_host_kernel = env.share.join("test-host-vmlinux");
    assert!(
        test_host_kernel.is_file(),
        "{} is missing: run `make test-host-kernel`",
        test_host_kernel.display()
    );
    let dir = env!("CARGO_MANIFEST_DIR");
    // The job goes in a file: kernel command-line words with a '.' never reach init.
    let job_dir = tempfile::Builder::new()
        .prefix("nested")
        .rand_bytes(8)
        .tempdir()
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
    // is too jittery), and under load its clocksource watchdog finds the TSC skewed against
    // late timer ticks; either way the TSC is marked unstable and its KVM's guests hang. The
    // host's TSC rate is what TCG exposes, and it is reliable.
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 tsc_early_khz={} tsc=reliable root=host rootfstype=9p rootflags=trans=virtio,version=9p2000.L ro \
         init={dir}/nested/init.sh husk_job={job}",
        host_tsc_khz()
    );
    // A hung nest must not hang the suite: coreutils' timeout ends it (a whole nest takes
    // about 30 s).
    let output = Command::new("timeout")
        .args([NEST_TIMEOUT_SECS, "qemu-system-x86_64"])
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
#[allow(unsafe_code)]
fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (cycles, elapsed) = (tsc() - c0, t0.elapsed());
    u64::try_from(u128::from(cycles) * 1_000_000 / elapsed.as_micros().max(1) / 1000)
        .unwrap_or(u64::MAX)
}

/// `path` made absolute and free of symlinks, as a string for a job's command line.
pub fn canonical(path: std::path::PathBuf) -> String {
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}; run `make build`", path.display()));
    path.display().to_string()
}
