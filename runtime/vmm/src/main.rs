//! `husk-vmm`: one built-in-VMM virtual machine as a process of its own, and the jail every
//! VM host process starts in.
//!
//! - `husk-vmm --config DOC` boots the Linux guest a [`husk_vmm::document::VmmDocument`]
//!   describes (what the door runs); `husk-vmm --kernel K --initramfs I --console LOG
//!   [--vsock-uds SOCK] [--fs TAG=SOCK]... [--disk[-ro] SERIAL=IMG]... [--memory-mib N]
//!   [--vcpus N] [--cmdline S]` the same by flags (a network device only by document), and `--payload FILE` raw 64-bit code
//!   instead (tests and benches); `--report` prints one JSON line of measurements at the end.
//!   A document may ask to save the booted VM when the process gets SIGUSR1 (exit status 0
//!   once saved) or to restore a saved one instead of booting (`SnapshotMode`).
//!   The process drops every capability first and, once the VM is built, runs under a seccomp
//!   allowlist (`husk_vmm::confine`). Exit status: 0 when the guest reset the machine (its
//!   power-off) or wrote 'O' to the debug-exit port, 2 for any other end of the guest (the
//!   reason on stderr), 1 when the VM could not be built.
//! - `husk-vmm jail --spec FILE`: starts a program in its jail (`husk_vmm::jail`).
//! - `husk-vmm sentinel --pid PID [--cgroup-procs FILE]...`: the container's process as
//!   engines see it, in the namespaces of the jail's pid 1 (`husk_vmm::sentinel`).
//! - `husk-vmm serial-relay --socket SERIAL --uds UDS`: the QEMU door's guest channel
//!   (`husk_vmm::relay`).
//! - `husk-vmm copy-memory [--cgroup-procs FILE]...`: a restore's copy of a snapshot's memory
//!   into a memfd, in the VM's host cgroup (`husk_vmm::snapshot::copy_passed`).
//! - `husk-vmm probe-syscall vmm|none NAME`: for the confinement tests only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use husk_devices::{BlockMmio, NetMmio, VhostUserFs, VirtioMmioDevice, VsockConfig, VsockMmio};
use husk_vmm::document::SnapshotMode;
use husk_vmm::snapshot::SnapshotFiles;
use husk_vmm::{CpuMode, Entry, ExitReason, RestoreConfig, RunReport, Vm, VmConfig};

/// Guest CID of every husk VM (each VM has its own vsock device).
const GUEST_CID: u64 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's built-in VMM: one micro-VM"
)]
struct Args {
    /// The whole Linux guest as one JSON document (`husk_vmm::document::VmmDocument`), as the
    /// door writes it; replaces the guest's flags below.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "payload", "console", "vsock_uds", "fs", "disks", "disks_ro"])]
    config: Option<PathBuf>,
    /// Guest kernel (ELF vmlinux).
    #[arg(long, required_unless_present_any = ["payload", "config"], requires = "initramfs")]
    kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long, requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Raw 64-bit code loaded at 0x10000 and entered in long mode instead of a kernel.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs"])]
    payload: Option<PathBuf>,
    /// File the serial console is written to.
    #[arg(long, required_unless_present = "config")]
    console: Option<PathBuf>,
    /// Host side of the hybrid vsock (no vsock device without it).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// A virtio-fs device: `TAG=SOCKET`, SOCKET being virtiofsd's vhost-user socket
    /// (repeatable).
    #[arg(long = "fs", value_parser = parse_fs)]
    fs: Vec<(String, PathBuf)>,
    /// A virtio-blk disk on a raw image: `SERIAL=FILE`, SERIAL (at most 20 bytes) being how
    /// the guest finds it (repeatable).
    #[arg(long = "disk", value_parser = parse_fs)]
    disks: Vec<(String, PathBuf)>,
    /// A read-only virtio-blk disk: `SERIAL=FILE` (repeatable).
    #[arg(long = "disk-ro", value_parser = parse_fs)]
    disks_ro: Vec<(String, PathBuf)>,
    /// Guest RAM.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// vCPUs of the Linux guest (a payload runs on one).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(husk_vmm::mptable::MAX_VCPUS)))]
    vcpus: u8,
    /// Kernel command line (the VMM appends its virtio-mmio devices).
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=-1 quiet loglevel=4"
    )]
    cmdline: String,
    /// Stop the guest after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
    /// At the end print one JSON line to stdout: the exit reason, `CLOCK_MONOTONIC` of the
    /// guest's first exit, and the process's memory (KiB) with guest RAM still mapped.
    #[arg(long)]
    report: bool,
    /// Run without the seccomp filter and with the capabilities it was started with (for
    /// debugging the VMM; never what husk starts).
    #[arg(long)]
    no_confine: bool,
    /// The network device, from a `--config` document only (its tap is a passed descriptor).
    #[arg(skip)]
    net: Option<husk_vmm::document::NetDevice>,
    /// Save or restore, from a `--config` document only.
    #[arg(skip)]
    snapshot: Option<SnapshotMode>,
}

impl Args {
    /// Takes the guest from a `--config` document.
    fn apply(&mut self, doc: husk_vmm::document::VmmDocument) {
        self.kernel = Some(doc.kernel);
        self.initramfs = Some(doc.initramfs);
        self.console = Some(doc.console);
        self.vsock_uds = Some(doc.vsock_uds);
        self.fs = doc.fs.into_iter().map(|f| (f.tag, f.socket)).collect();
        for disk in doc.disks {
            let list = if disk.read_only {
                &mut self.disks_ro
            } else {
                &mut self.disks
            };
            list.push((disk.serial, disk.path));
        }
        self.net = doc.net;
        self.memory_mib = doc.memory_mib;
        self.vcpus = doc.vcpus;
        self.cmdline = doc.cmdline;
        self.snapshot = doc.snapshot;
    }
}

/// Guest-physical address where `--payload` code is loaded and entered.
const PAYLOAD_ADDR: u64 = 0x1_0000;

fn main() -> ExitCode {
    let _ = husk_devices::install_log_bridge(); // virtio-queue's `log` records, rate-limited
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("jail") => return jail(&argv[2..]),
        Some("sentinel") => return sentinel(&argv[2..]),
        Some("copy-memory") => return copy_memory(&argv[2..]),
        _ => init_logging(),
    }
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("serial-relay") => return serial_relay(&argv[2..]),
        Some("probe-syscall") => return probe_syscall(&argv[2..]),
        _ => {}
    }
    let mut args = Args::parse();
    if let Some(path) = args.config.take() {
        match husk_vmm::document::VmmDocument::read(&path) {
            Ok(doc) => args.apply(doc),
            Err(e) => {
                eprintln!("husk-vmm: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(&args) {
        Ok(ExitReason::Reset | ExitReason::DebugExit(b'O') | ExitReason::Paused) => {
            ExitCode::SUCCESS
        }
        Ok(reason) => {
            eprintln!("husk-vmm: guest ended: {reason:?}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitReason, Box<dyn std::error::Error>> {
    // While the process has one thread: capabilities are per thread.
    if !args.no_confine {
        husk_vmm::confine::drop_capabilities()?;
    }
    let console_path = args.console.as_deref().ok_or("--console is required")?;
    let console =
        husk_vmm::console::CappedFile::create(console_path, husk_vmm::console::CONSOLE_CAP)
            .map_err(|e| format!("console {}: {e}", console_path.display()))?;
    let mut virtio: Vec<Box<dyn VirtioMmioDevice>> = Vec::new();
    if let Some(uds) = &args.vsock_uds {
        virtio.push(Box::new(VsockMmio::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })?));
    }
    for (tag, socket) in &args.fs {
        virtio.push(Box::new(VhostUserFs::new(tag, socket)?));
    }
    let disks = args.disks.iter().map(|d| (d, false));
    for ((serial, path), read_only) in disks.chain(args.disks_ro.iter().map(|d| (d, true))) {
        virtio.push(Box::new(BlockMmio::new(path, read_only, serial)?));
    }
    if let Some(net) = &args.net {
        virtio.push(Box::new(NetMmio::new(net.tap_fd, &net.mac, net.mtu)?));
    }
    let (entry, irqchip) = match (&args.payload, &args.kernel, &args.initramfs) {
        (Some(payload), _, _) => {
            let code = std::fs::read(payload)
                .map_err(|e| format!("payload {}: {e}", payload.display()))?;
            let mode = CpuMode::Long;
            (
                Entry::Payload {
                    code,
                    addr: PAYLOAD_ADDR,
                    mode,
                },
                false,
            )
        }
        (None, Some(kernel), Some(initramfs)) => {
            let (kernel, initramfs) = (kernel.clone(), initramfs.clone());
            let cmdline = args.cmdline.clone();
            (
                Entry::Linux {
                    kernel,
                    initramfs,
                    cmdline,
                    vcpus: args.vcpus,
                },
                true,
            )
        }
        _ => return Err("--kernel and --initramfs, or --payload, are required".into()),
    };
    let config = VmConfig {
        memory_mib: args.memory_mib,
        irqchip,
        console: Box::new(console),
        virtio,
        entry,
    };
    let timeout = match args.timeout_secs {
        0 => Duration::MAX / 4,
        secs => Duration::from_secs(secs),
    };
    let report = match &args.snapshot {
        None => {
            let vm = Vm::new(config)?;
            confine(args, &[])?;
            vm.run_report(timeout)?
        }
        Some(SnapshotMode::Save { dir }) => {
            let files = SnapshotFiles::create(dir)
                .map_err(|e| format!("snapshot {}: {e}", dir.display()))?;
            let vm = Vm::new(config)?;
            pause_on_sigusr1(vm.pauser())?;
            confine(args, &[libc::SYS_rt_sigtimedwait])?;
            vm.run_to_snapshot(timeout, files)?
        }
        Some(SnapshotMode::Restore { dir }) => {
            let started = std::time::Instant::now();
            let vm = Vm::restore(RestoreConfig {
                snapshot: dir.clone(),
                console: config.console,
                virtio: config.virtio,
                memory_mib: args.memory_mib,
                vcpus: args.vcpus,
            })?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "VM rebuilt from its snapshot"
            );
            confine(args, &[])?;
            vm.run_report(timeout)?
        }
    };
    if args.report {
        print_report(&report);
    }
    Ok(report.reason)
}

/// The seccomp filter, with the syscalls `extra`, unless `--no-confine`.
fn confine(args: &Args, extra: &[i64]) -> Result<(), husk_vmm::VmmError> {
    match args.no_confine {
        true => Ok(()),
        false => husk_vmm::confine::install_filter_with(extra),
    }
}

/// Pauses the VM when the process gets SIGUSR1 (the door's "save it now", sent once the
/// guest's agent answers): SIGUSR1 is blocked in this thread, so in every thread it starts
/// (vCPUs, devices), and one thread waits for it.
fn pause_on_sigusr1(pauser: husk_vmm::Pauser) -> Result<(), Box<dyn std::error::Error>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block()?;
    std::thread::Builder::new()
        .name("snapshot-signal".into())
        .spawn(move || {
            if set.wait().is_ok() {
                pauser.pause();
            }
        })?;
    Ok(())
}

/// The `--report` line: nanoseconds and KiB.
fn print_report(report: &RunReport) {
    let m = report.memory;
    let line = serde_json::json!({
        "reason": format!("{:?}", report.reason),
        "first_exit_monotonic_ns": report.first_exit.map_or(0, |t| t.as_nanos()),
        "hwm_kib": m.hwm_kib,
        "rss_anon_kib": m.rss_anon_kib,
        "rss_file_kib": m.rss_file_kib,
        "rss_shmem_kib": m.rss_shmem_kib,
    });
    println!("{line}");
}

/// `NAME=PATH` (a virtio-fs tag and its socket, a disk serial and its image).
fn parse_fs(value: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = value.split_once('=').ok_or("expected NAME=PATH")?;
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// Device warnings, metrics and lifecycle events as text lines on stderr, which the door
/// collects into the run directory's log (`vmm.log`, `vsock.log`, capped); `HUSK_LOG` filters
/// (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `husk-vmm jail --spec FILE`: runs the program of a [`husk_vmm::jail::JailSpec`] in its jail.
fn jail(args: &[std::ffi::OsString]) -> ExitCode {
    let spec = match args {
        [flag, path] if flag == "--spec" => husk_vmm::jail::read_spec(std::path::Path::new(path)),
        _ => Err(husk_vmm::VmmError::Confine(
            "usage: husk-vmm jail --spec FILE".into(),
        )),
    };
    let err = match spec.and_then(|spec| husk_vmm::jail::launch(&spec)) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("husk-vmm: {err}");
    ExitCode::FAILURE
}

/// `husk-vmm sentinel --pid PID [--cgroup-procs FILE]...` (`husk_vmm::sentinel`).
fn sentinel(args: &[std::ffi::OsString]) -> ExitCode {
    let usage = || {
        husk_vmm::VmmError::Confine(
            "usage: husk-vmm sentinel --pid PID [--cgroup-procs FILE]...".into(),
        )
    };
    let mut pid = None;
    let mut procs = Vec::new();
    let mut rest = args.iter();
    let parsed = loop {
        match (rest.next().and_then(|a| a.to_str()), rest.next()) {
            (None, _) => break pid.ok_or_else(usage),
            (Some("--pid"), Some(v)) => match v.to_str().and_then(|v| v.parse::<i32>().ok()) {
                Some(p) if p > 0 => pid = Some(p),
                _ => break Err(usage()),
            },
            (Some("--cgroup-procs"), Some(v)) => procs.push(PathBuf::from(v)),
            _ => break Err(usage()),
        }
    };
    let err = match parsed.and_then(|pid| husk_vmm::sentinel::launch(pid, &procs)) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("husk-vmm: {err}");
    ExitCode::FAILURE
}

/// `husk-vmm copy-memory [--cgroup-procs FILE]...` (`husk_vmm::snapshot::copy_passed`).
fn copy_memory(args: &[std::ffi::OsString]) -> ExitCode {
    let mut procs = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (arg.to_str(), rest.next()) {
            (Some("--cgroup-procs"), Some(v)) => procs.push(PathBuf::from(v)),
            _ => {
                eprintln!("husk-vmm: usage: husk-vmm copy-memory [--cgroup-procs FILE]...");
                return ExitCode::FAILURE;
            }
        }
    }
    match husk_vmm::snapshot::copy_passed(&procs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `husk-vmm serial-relay --socket SERIAL --uds UDS`: the QEMU door's guest channel
/// (`husk_vmm::relay`), until QEMU closes the port.
fn serial_relay(args: &[std::ffi::OsString]) -> ExitCode {
    let (Some(socket), Some(uds)) = (flag(args, "--socket"), flag(args, "--uds")) else {
        eprintln!("husk-vmm: usage: husk-vmm serial-relay --socket SERIAL --uds UDS");
        return ExitCode::FAILURE;
    };
    // Once both sockets listen the guest can reach this process, which keeps only what
    // relaying needs (the VMM's allowlist) and `unlink` for its socket files at the end.
    let confine = || {
        husk_vmm::confine::install_filter_with(&[libc::SYS_unlink, libc::SYS_unlinkat])
            .map_err(std::io::Error::other)
    };
    match husk_vmm::relay::run(&socket, &uds, confine) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-vmm: serial relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `name` in `args`.
fn flag(args: &[std::ffi::OsString], name: &str) -> Option<PathBuf> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).map(PathBuf::from)
}

/// `husk-vmm probe-syscall vmm|none NAME`: installs the VMM's filter (`none`: no filter of its
/// own, for a probe run inside a jail) and makes the syscall NAME as a guest that took the
/// process over would; a filter that holds kills the process with SIGSYS. For the tests of
/// the confinement, never used by husk.
fn probe_syscall(args: &[std::ffi::OsString]) -> ExitCode {
    let (Some(which), Some(name)) = (
        args.first().and_then(|a| a.to_str()),
        args.get(1).and_then(|a| a.to_str()),
    ) else {
        eprintln!("husk-vmm: usage: husk-vmm probe-syscall vmm|none NAME");
        return ExitCode::FAILURE;
    };
    if which == "vmm" {
        if let Err(e) = husk_vmm::confine::install_filter() {
            eprintln!("husk-vmm: {e}");
            return ExitCode::FAILURE;
        }
    }
    let rc = husk_vmm::confine::attempt(name);
    println!("{name}: returned {rc}");
    ExitCode::SUCCESS
}
