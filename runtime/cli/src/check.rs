//! `husk check`: what this host can run, which door `--hypervisor auto` picks, and the boot
//! snapshots it keeps.

use std::path::Path;

use husk_sandbox::{find_program, probe_kvm};

use crate::Cli;

/// Prints one line per requirement; exit 0 when some door can run a container here.
pub fn check(cli: &Cli) -> i32 {
    let kvm = Path::new("/dev/kvm").exists();
    line(
        "kvm",
        if kvm {
            "/dev/kvm present".to_owned()
        } else {
            "/dev/kvm missing".to_owned()
        },
    );
    let probe = probe_kvm();
    let verdict = if probe.passed { "passed" } else { "failed" };
    line(
        "kvm probe",
        format!(
            "{verdict} in {:.1} ms: {}",
            probe.elapsed.as_secs_f64() * 1e3,
            probe.detail
        ),
    );
    let qemu = found("qemu", find_program("qemu-system-x86_64"));
    let virtiofsd = found("virtiofsd", find_program("virtiofsd"));
    let kernel = exists(
        "kernel",
        &husk_sandbox::artifacts::locate(cli.kernel.as_deref(), "vmlinux"),
    );
    let initramfs = exists(
        "initramfs",
        &husk_sandbox::artifacts::locate(cli.initramfs.as_deref(), "initramfs.cpio"),
    );
    let runnable = qemu && virtiofsd && kernel && initramfs;
    let door = match (runnable, probe.passed) {
        (true, true) => "kvm (the built-in VMM)".to_owned(),
        (true, false) => "qemu (tcg): this host's KVM cannot run a full guest".to_owned(),
        (false, _) => "none: install what is missing above (make deps build)".to_owned(),
    };
    line("auto door", door);
    snapshots(probe.passed);
    i32::from(!runnable)
}

/// Whether VMs start from boot snapshots here, and the snapshots kept.
fn snapshots(kvm_runs_guests: bool) {
    let qemu = husk_sandbox::find_program("qemu-system-x86_64").map(|qemu| {
        crate::lifecycle::runtime().map_or_else(
            |e| Err(e.to_string()),
            |rt| rt.block_on(husk_sandbox::qemu_major(&qemu)),
        )
    });
    let min = husk_sandbox::MIN_QEMU_MAJOR;
    let restore = match (kvm_runs_guests, qemu) {
        (true, _) => "the built-in VMM restores boot snapshots (the first VM of a shape makes one)"
            .to_owned(),
        (false, Some(Ok(major))) if major >= min => format!(
            "the QEMU door restores boot snapshots with QEMU {major} (the first VM of a \
             shape makes one)"
        ),
        (false, Some(Ok(major))) => format!(
            "none: the QEMU door boots cold (QEMU {major} cannot save a VM with virtio-fs; \
             {min} or later can: make deps)"
        ),
        (false, _) => "none: no QEMU that runs".to_owned(),
    };
    line("snapshots", restore);
    let kept = husk_sandbox::snapshot::Store::path()
        .exists()
        .then(husk_sandbox::snapshot::Store::open)
        .and_then(Result::ok)
        .map(|store| store.list())
        .unwrap_or_default();
    if kept.is_empty() {
        line("snapshot", "none kept".to_owned());
    }
    for (key, bytes) in kept {
        line(
            "snapshot",
            format!("{key}: {} MiB of guest memory", bytes >> 20),
        );
    }
}

fn line(what: &str, text: String) {
    println!("{:<11}{text}", format!("{what}:"));
}

fn found(what: &str, path: Option<std::path::PathBuf>) -> bool {
    match &path {
        Some(p) => line(what, p.display().to_string()),
        None => line(what, "not found in PATH".to_owned()),
    }
    path.is_some()
}

fn exists(what: &str, path: &Path) -> bool {
    let ok = path.is_file();
    line(
        what,
        format!("{}{}", path.display(), if ok { "" } else { " (missing)" }),
    );
    ok
}
