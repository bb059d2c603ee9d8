//! `husk-vmm`: one built-in-VMM virtual machine as a process of its own (the door spawns it, so
//! that the VM has its own pid, lifetime and, later, seccomp filter).
//!
//! `husk-vmm --kernel K --initramfs I --console LOG --vsock-uds SOCK [--fs TAG=SOCK]... [--memory-mib N] [--cmdline S]`
//! boots the Linux guest with a serial console to LOG and the vsock device (hybrid vsock on
//! SOCK). Exit status: 0 when the guest reset the machine (its power-off), 2 for any other end of
//! the guest (the reason on stderr), 1 when the VM could not be built.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use husk_devices::{VhostUserFs, VirtioMmioDevice, VsockConfig, VsockMmio};
use husk_vmm::{Entry, ExitReason, Vm, VmConfig};

/// Guest CID of every husk VM (each VM has its own vsock device).
const GUEST_CID: u64 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's built-in VMM: one micro-VM"
)]
struct Args {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs.
    #[arg(long)]
    initramfs: PathBuf,
    /// File the serial console is written to.
    #[arg(long)]
    console: PathBuf,
    /// Host side of the hybrid vsock.
    #[arg(long)]
    vsock_uds: PathBuf,
    /// A virtio-fs device: `TAG=SOCKET`, SOCKET being virtiofsd's vhost-user socket
    /// (repeatable).
    #[arg(long = "fs", value_parser = parse_fs)]
    fs: Vec<(String, PathBuf)>,
    /// Guest RAM.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Kernel command line (the VMM appends its virtio-mmio devices).
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=-1 quiet loglevel=4"
    )]
    cmdline: String,
    /// Stop the guest after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(ExitReason::Reset) => ExitCode::SUCCESS,
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
    let console = std::fs::File::create(&args.console)
        .map_err(|e| format!("console {}: {e}", args.console.display()))?;
    let vsock = VsockMmio::new(&VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: args.vsock_uds.clone(),
    })?;
    let mut virtio: Vec<Box<dyn VirtioMmioDevice>> = vec![Box::new(vsock)];
    for (tag, socket) in &args.fs {
        virtio.push(Box::new(VhostUserFs::new(tag, socket)?));
    }
    let config = VmConfig {
        memory_mib: args.memory_mib,
        irqchip: true,
        console: Box::new(console),
        virtio,
        entry: Entry::Linux {
            kernel: args.kernel.clone(),
            initramfs: args.initramfs.clone(),
            cmdline: args.cmdline.clone(),
        },
    };
    let timeout = match args.timeout_secs {
        0 => Duration::MAX / 4,
        secs => Duration::from_secs(secs),
    };
    Ok(Vm::new(config)?.run(timeout)?)
}

fn parse_fs(value: &str) -> Result<(String, PathBuf), String> {
    let (tag, socket) = value.split_once('=').ok_or("expected TAG=SOCKET")?;
    Ok((tag.to_owned(), PathBuf::from(socket)))
}
