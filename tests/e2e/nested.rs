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

#[test]
fn test_builtin_vmm_boots_guest_to_agent_in_emulated_test_host() {
    let test = "test_builtin_vmm_boots_guest_to_agent_in_emulated_test_host";
    let Some(env) = Env::get(test) else {
        return;
    };
    let out = env.share.join("../..");
    let test_host_kernel = env.share.join("test-host-vmlinux");
    let vmm = out.join("bin/husk-vmm");
    for file in [&test_host_kernel, &vmm] {
        assert!(file.is_file(), "{} is missing: run `make build`", file.display());
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 root=host rootfstype=9p rootflags=trans=virtio,version=9p2000.L ro \
         init={dir}/nested/init.sh -- {dir}/nested/vmm-boot.sh {} {} {} {}",
        vmm.canonicalize().expect("husk-vmm").display(),
        env!("CARGO_BIN_EXE_husk-agent-ping"),
        env.share.join("vmlinux").canonicalize().expect("vmlinux").display(),
        env.share.join("initramfs.cpio").canonicalize().expect("initramfs").display(),
    );
    let start = Instant::now();
    let output = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,rtc=on", "-accel", "tcg", "-cpu", "max", "-m", "1024M"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&test_host_kernel)
        .args(["-append", &append])
        .args(["-fsdev", "local,id=root,path=/,readonly=on,security_model=none"])
        .args(["-device", "virtio-9p-device,fsdev=root,mount_tag=host", "-serial", "stdio"])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    let summary = text.lines().find(|l| l.starts_with("VMM-EXIT")).unwrap_or("no VMM-EXIT line");
    println!("nested: {summary}; whole nest {} ms", start.elapsed().as_millis());
    assert!(text.contains("agent: handshake after"), "guest agent never answered:\n{text}");
    assert!(text.contains("NESTED-EXIT 0"), "built-in VMM run failed:\n{text}");
}
