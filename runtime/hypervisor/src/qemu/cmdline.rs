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

/// Added under TCG: the emulated CPU has no TSC-deadline timer, so the kernel would calibrate
/// the local APIC timer against the PIT, about 0.25 s of an emulated boot of 0.9 s (measured
/// from the guest's printk times). The PIT is the clock event device instead. (Under KVM the
/// TSC-deadline timer needs no calibration.)
/// `init_on_alloc=1`: the guest's CPU zeroes every page it allocates, so that TCG drops what
/// it translated from the page's old contents. Without it, a page virtiofsd fills (a file's
/// data read again after the guest dropped it: memory pressure, or an open with
/// `--cache auto` of a program that runs) could run as the code it held before: QEMU 10's
/// TCG does not see the writes of a vhost-user process, and the guest's programs die of
/// SIGSEGV.
const TCG_CMDLINE: &str = " noapictimer init_on_alloc=1";

/// Added on this door: the agent's channel is the virtio-serial port, not vsock
/// (`husk_vmm::relay`).
const SERIAL_CMDLINE: &str = " husk.channel=serial";

/// The agent's virtio-serial port, as the agent looks it up.
const AGENT_PORT_NAME: &str = "husk.agent";

/// Descriptor of the serial relay's socket, connected by the jail (QEMU itself may not
/// `connect(2)`); virtiofsd's sockets follow in `VmConfig::shares` order, then the tap.
const SERIAL_FD: i32 = husk_vmm::jail::FIRST_PASSED_FD;

/// Descriptor of share `i`'s virtiofsd socket.
fn fs_fd(i: usize) -> String {
    (SERIAL_FD as usize + 1 + i).to_string()
}

/// QEMU's own seccomp filter on top of the jail's: no obsolete syscalls, no setuid, no
/// fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// How a VM that is saved or restored differs from a cold one: its memory is a named file,
/// not part of QEMU's migration stream (`x-ignore-shared`), and QEMU's monitor is on the
/// descriptor after the shares'.
#[derive(Debug, Clone)]
pub enum SnapshotArgs {
    /// The VM boots to be saved; its memory is the file `memory`.
    Save {
        /// The memory file.
        memory: PathBuf,
    },
    /// QEMU waits for the saved state (`-incoming defer`) instead of booting; its memory is a
    /// copy of the saved one, a memfd the jail passes as the descriptor after the tap (named
    /// by its `/proc/self/fd` path).
    Restore,
}

/// The kernel command line of a guest on this door.
pub fn kernel_cmdline(accel: Accel) -> String {
    match accel {
        Accel::Kvm => format!("{KERNEL_CMDLINE}{SERIAL_CMDLINE}"),
        Accel::Tcg => format!("{KERNEL_CMDLINE}{TCG_CMDLINE}{SERIAL_CMDLINE}"),
    }
}

/// Arguments for `qemu-system-x86_64` run in its jail: sockets and tap as descriptors (see
/// [`SERIAL_FD`]), files by their host paths. `tsc_khz`: the guest's TSC frequency, given
/// to a TCG guest's kernel (`super::tsc`); not part of a snapshot's key, since every guest
/// on this host has the same.
pub fn args(
    config: &VmConfig,
    accel: Accel,
    console: &Path,
    snapshot: Option<&SnapshotArgs>,
    tsc_khz: Option<u64>,
) -> Vec<OsString> {
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
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-sandbox",
        SANDBOX,
    ]);
    // Passed descriptors after the shares': the monitor (with a snapshot), the tap (with a
    // plugged network), a restored VM's memory.
    let monitor_fd = config.shares.len();
    let tap_fd = monitor_fd + usize::from(snapshot.is_some());
    let plugged = config.net.as_ref().is_some_and(|n| !n.is_unplugged());
    let memory_fd = tap_fd + usize::from(plugged);
    // Shared memory: virtiofsd maps guest memory over vhost-user.
    a.push("-object".into());
    let file_backend = format!("memory-backend-file,id=mem,size={mem},share=on,mem-path=");
    match snapshot {
        None => a.push(format!("memory-backend-memfd,id=mem,size={mem},share=on").into()),
        Some(SnapshotArgs::Save { memory }) => {
            a.push(prefixed(&file_backend, &escape_commas(memory)));
        }
        Some(SnapshotArgs::Restore) => {
            a.push(format!("{file_backend}/proc/self/fd/{}", fs_fd(memory_fd)).into());
        }
    }
    a.push("-kernel".into());
    a.push(config.kernel.clone().into());
    a.push("-initrd".into());
    a.push(config.initramfs.clone().into());
    a.push("-append".into());
    let mut line = kernel_cmdline(accel);
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    a.push(line.into());
    // The console file is appended to, so that `ConsoleCap` can cut its old part off while
    // QEMU writes (QEMU's own offset would leave a hole); no pipe (see `crate::console`).
    a.push("-chardev".into());
    a.push(prefixed(
        "file,id=console0,append=on,path=",
        &escape_commas(console),
    ));
    push_strs(&mut a, &["-serial", "chardev:console0"]);
    // The agent's channel: one port, QEMU's end handed to the serial relay.
    a.push("-device".into());
    a.push("virtio-serial-device,max_ports=2".into());
    a.push("-chardev".into());
    a.push(format!("socket,id=agent0,fd={SERIAL_FD}").into());
    a.push("-device".into());
    a.push(format!("virtserialport,chardev=agent0,name={AGENT_PORT_NAME}").into());
    for (i, share) in config.shares.iter().enumerate() {
        a.push("-chardev".into());
        a.push(format!("socket,id=fs{i},fd={}", fs_fd(i)).into());
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag).into());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        // `,` in a -blockdev value is escaped by doubling it.
        let path = disk.path.to_string_lossy().replace(',', ",,");
        let read_only = if disk.read_only { "on" } else { "off" };
        a.push("-blockdev".into());
        a.push(match disk.is_unplugged() {
            // No host file: a device of 0 bytes.
            true => format!("driver=null-co,node-name=disk{i},size=0").into(),
            false => format!("driver=file,node-name=disk{i},filename={path},read-only={read_only}")
                .into(),
        });
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i},serial={}", disk.serial).into());
    }
    if let Some(s) = snapshot {
        a.push("-chardev".into());
        a.push(format!("socket,id=qmp,fd={}", fs_fd(monitor_fd)).into());
        push_strs(&mut a, &["-mon", "chardev=qmp,mode=control"]);
        if matches!(s, SnapshotArgs::Restore) {
            push_strs(&mut a, &["-incoming", "defer"]);
        }
    }
    if let Some(net) = &config.net {
        a.push("-netdev".into());
        match net.is_unplugged() {
            // A hub port alone on its hub: frames go nowhere, no host resource.
            true => a.push("hubport,id=net0,hubid=0".into()),
            // The jail opens the pod's tap in the pod's network namespace.
            false => a.push(format!("tap,id=net0,fd={}", fs_fd(tap_fd)).into()),
        }
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
                export: crate::Export::Dir {
                    path: "/b/rootfs".into(),
                    read_only: false,
                },
                keep_cache: false,
            }],
            disks: vec![crate::Disk {
                serial: "husk-rootfs".into(),
                path: "/b/a,b.img".into(),
                read_only: true,
            }],
            net: None,
            run_dir: "/run/husk/x".into(),
            cgroup: None,
            snapshot: true,
            ready_port: 1024,
            save_port: None,
        }
    }

    fn joined(accel: Accel) -> String {
        joined_with(&config(), accel, None, None)
    }

    /// The arguments for `config` (console `/r/console.log`) as one string.
    fn joined_with(
        config: &VmConfig,
        accel: Accel,
        snapshot: Option<&SnapshotArgs>,
        tsc_khz: Option<u64>,
    ) -> String {
        let console = Path::new("/r/console.log");
        let a = args(config, accel, console, snapshot, tsc_khz);
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn test_args_unplugged_disk_is_an_empty_null_device_with_its_serial() {
        let mut config = config();
        config.disks[0] = crate::Disk::unplugged("husk-rootfs");
        assert!(joined_with(&config, Accel::Tcg, None, None).contains(
            "-blockdev driver=null-co,node-name=disk0,size=0 \
             -device virtio-blk-device,drive=disk0,serial=husk-rootfs"
        ));
    }

    #[test]
    fn test_args_tcg_guest_gets_the_tsc_frequency_given() {
        let s = joined_with(&config(), Accel::Tcg, None, Some(2_600_000));
        assert!(s.contains("husk.channel=serial tsc_early_khz=2600000 -chardev"));
        assert!(!joined(Accel::Tcg).contains("tsc_early_khz"));
    }

    #[test]
    fn test_args_tcg_has_devices_memory_and_kernel() {
        let s = joined(Accel::Tcg);
        assert!(s.contains("-accel tcg -cpu max"));
        assert!(s.contains("memory-backend-memfd,id=mem,size=128M,share=on"));
        assert!(s.contains("-smp 2"));
        assert!(s.contains("-kernel /k/vmlinux -initrd /k/initramfs.cpio"));
        assert!(s.contains("-device virtio-serial-device,max_ports=2 -chardev socket,id=agent0,fd=3 -device virtserialport,chardev=agent0,name=husk.agent"));
        assert!(s.contains("husk.channel=serial"));
        assert!(
            s.contains("socket,id=fs0,fd=4 -device vhost-user-fs-device,chardev=fs0,tag=rootfs")
        );
        assert!(s.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
        assert!(s.contains(
            "-chardev file,id=console0,append=on,path=/r/console.log -serial chardev:console0"
        ));
        assert!(s.contains(
            "-blockdev driver=file,node-name=disk0,filename=/b/a,,b.img,read-only=on \
             -device virtio-blk-device,drive=disk0,serial=husk-rootfs"
        ));
        assert!(s.contains("-no-reboot"));
        assert!(
            s.contains("no_timer_check noapictimer init_on_alloc=1 husk.channel=serial -chardev")
        );
    }

    #[test]
    fn test_args_snapshot_memory_file_monitor_and_incoming() {
        let snap = SnapshotArgs::Save {
            memory: "/v/m,em".into(),
        };
        let s = joined_with(&config(), Accel::Tcg, Some(&snap), None);
        assert!(s.contains("memory-backend-file,id=mem,size=128M,share=on,mem-path=/v/m,,em"));
        assert!(!s.contains("memfd"));
        // The monitor's descriptor follows the one share's.
        assert!(s.contains("-chardev socket,id=qmp,fd=5 -mon chardev=qmp,mode=control"));
        assert!(!s.contains("-incoming"));
        // Restored: the memory is the descriptor after the monitor's.
        let s = joined_with(&config(), Accel::Tcg, Some(&SnapshotArgs::Restore), None);
        assert!(
            s.contains("memory-backend-file,id=mem,size=128M,share=on,mem-path=/proc/self/fd/6 ")
        );
        assert!(s.contains("-chardev socket,id=qmp,fd=5 -mon chardev=qmp,mode=control"));
        assert!(s.contains("-incoming defer"));
        // With a plugged tap, after the tap's.
        let mut config = config();
        config.net = Some(crate::NetDevice {
            netns: "/run/netns/pod".into(),
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: None,
        });
        let s = joined_with(&config, Accel::Tcg, Some(&SnapshotArgs::Restore), None);
        assert!(s.contains("-netdev tap,id=net0,fd=6 "), "{s}");
        assert!(s.contains("mem-path=/proc/self/fd/7 "), "{s}");
    }

    #[test]
    fn test_args_kvm_uses_host_cpu_and_apic_timer() {
        let s = joined(Accel::Kvm);
        assert!(s.contains("-accel kvm -cpu host"));
        assert!(!s.contains("noapictimer"));
    }
}
