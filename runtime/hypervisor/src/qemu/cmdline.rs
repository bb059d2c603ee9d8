//! The QEMU command line for a husk guest, built as plain data so it can be unit-tested.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::VmConfig;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (slow, works everywhere).
    Tcg,
}

/// Kernel command line of every husk guest.
/// - `reboot=t panic=-1` + QEMU `-no-reboot`: a guest reboot (the agent's power-off) or a
///   panic ends QEMU at once instead of restarting the guest.
/// - `8250.nr_uarts=1`, `quiet`: fewer devices to probe, less console output to emulate.
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 quiet loglevel=4 tsc=reliable no_timer_check";

/// Paths of the sockets that QEMU connects to, made by the door before QEMU starts.
#[derive(Debug, Clone)]
pub struct Sockets {
    /// vhost-user socket of our vsock device.
    pub vsock: PathBuf,
    /// vhost-user sockets of virtiofsd, one per share, in `VmConfig::shares` order.
    pub fs: Vec<PathBuf>,
}

/// Arguments for `qemu-system-x86_64`.
pub fn args(config: &VmConfig, accel: Accel, sockets: &Sockets, console: &Path) -> Vec<OsString> {
    let mem = format!("{}M", config.memory_mib);
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    // rtc=on: without a CMOS clock the guest kernel waits 1 s for one at boot (and has no
    // wall-clock time).
    push(&[
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=on,memory-backend=mem",
    ]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-m", &mem, "-smp", &config.vcpus.to_string()]);
    // Shared memfd: our vsock device and virtiofsd map guest memory over vhost-user.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    a.push("-kernel".into());
    a.push(config.kernel.clone().into());
    a.push("-initrd".into());
    a.push(config.initramfs.clone().into());
    a.push("-append".into());
    a.push(KERNEL_CMDLINE.into());
    // The console file is appended to, so that `ConsoleCap` can cut its old part off while
    // QEMU writes (QEMU's own offset would leave a hole); no pipe (see `crate::console`).
    a.push("-chardev".into());
    a.push(prefixed(
        "file,id=console0,append=on,path=",
        &escape_commas(console),
    ));
    push_strs(&mut a, &["-serial", "chardev:console0"]);
    a.push("-chardev".into());
    a.push(prefixed("socket,id=vsock0,path=", &sockets.vsock));
    a.push("-device".into());
    a.push("vhost-user-vsock-device,chardev=vsock0".into());
    for (i, (share, socket)) in config.shares.iter().zip(&sockets.fs).enumerate() {
        a.push("-chardev".into());
        a.push(prefixed(&format!("socket,id=fs{i},path="), socket));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag).into());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        // `,` in a -blockdev value is escaped by doubling it.
        let path = disk.path.to_string_lossy().replace(',', ",,");
        let read_only = if disk.read_only { "on" } else { "off" };
        a.push("-blockdev".into());
        a.push(
            format!("driver=file,node-name=disk{i},filename={path},read-only={read_only}").into(),
        );
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i},serial={}", disk.serial).into());
    }
    if let Some(net) = &config.net {
        // QEMU runs in the pod's network namespace, where the tap is.
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap).into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac).into());
    }
    a
}

fn push_strs(a: &mut Vec<OsString>, items: &[&str]) {
    a.extend(items.iter().map(OsString::from));
}

/// `path` as a QEMU option value: a `,` is doubled.
fn escape_commas(path: &Path) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

fn prefixed(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsShare;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            memory_mib: 128,
            vcpus: 2,
            shares: vec![FsShare {
                tag: "rootfs".into(),
                host_dir: "/b/rootfs".into(),
                file: None,
                read_only: false,
            }],
            disks: vec![crate::Disk {
                serial: "husk-rootfs".into(),
                path: "/b/a,b.img".into(),
                read_only: true,
            }],
            net: None,
            run_dir: "/run/husk/x".into(),
        }
    }

    fn joined(accel: Accel) -> String {
        let sockets = Sockets {
            vsock: "/r/v.sock".into(),
            fs: vec!["/r/fs0.sock".into()],
        };
        let a = args(&config(), accel, &sockets, Path::new("/r/console.log"));
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn test_args_tcg_has_devices_memory_and_kernel() {
        let s = joined(Accel::Tcg);
        assert!(s.contains("-accel tcg -cpu max"));
        assert!(s.contains("memory-backend-memfd,id=mem,size=128M,share=on"));
        assert!(s.contains("-smp 2"));
        assert!(s.contains("-kernel /k/vmlinux -initrd /k/initramfs.cpio"));
        assert!(s.contains(
            "socket,id=vsock0,path=/r/v.sock -device vhost-user-vsock-device,chardev=vsock0"
        ));
        assert!(s.contains(
            "socket,id=fs0,path=/r/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=rootfs"
        ));
        assert!(s.contains(
            "-chardev file,id=console0,append=on,path=/r/console.log -serial chardev:console0"
        ));
        assert!(s.contains(
            "-blockdev driver=file,node-name=disk0,filename=/b/a,,b.img,read-only=on \
             -device virtio-blk-device,drive=disk0,serial=husk-rootfs"
        ));
        assert!(s.contains("-no-reboot"));
    }

    #[test]
    fn test_args_kvm_uses_host_cpu() {
        assert!(joined(Accel::Kvm).contains("-accel kvm -cpu host"));
    }
}
