//! `husk snapshot prepare`: make the boot snapshots of the usual VM shapes ahead of time.

use clap::{Args, Subcommand};
use husk_sandbox::{HypervisorKind, VmOptions, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};

use crate::{lifecycle, Cli};

/// `husk snapshot <command>`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Make the boot snapshots a container, a container with bind mounts (Docker, Podman)
    /// and a pod of the shim start from, where missing; then list those kept.
    Prepare(PrepareArgs),
}

/// The VM size the snapshots are made for (the defaults are `run`'s and the shim's).
#[derive(Debug, Args)]
struct PrepareArgs {
    /// Hypervisor door: auto picks the fastest this host can run.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "qemu"])]
    hypervisor: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS, value_parser = clap::value_parser!(u32).range(1..=32))]
    vcpus: u32,
}

/// Runs `husk snapshot ...`.
pub fn snapshot(cli: &Cli, args: &SnapshotArgs) -> anyhow::Result<i32> {
    let SnapshotCommand::Prepare(prepare) = &args.command;
    let opts = VmOptions {
        hypervisor: prepare.hypervisor.parse::<HypervisorKind>()?,
        kernel: husk_sandbox::artifacts::locate(cli.kernel.as_deref(), "vmlinux"),
        initramfs: husk_sandbox::artifacts::locate(cli.initramfs.as_deref(), "initramfs.cpio"),
        memory_mib: prepare.memory,
        vcpus: prepare.vcpus,
        boot_timeout: std::time::Duration::from_secs(60),
        snapshot: true,
    };
    let store = husk_sandbox::snapshot::Store::open().map_err(anyhow::Error::msg)?;
    let before: Vec<String> = store.list().into_iter().map(|(key, _)| key).collect();
    lifecycle::runtime()?.block_on(husk_sandbox::prepare_snapshots(&opts, &cli.root))?;
    for (key, bytes) in store.list() {
        let how = if before.contains(&key) {
            "kept"
        } else {
            "made"
        };
        println!("{key}: {how}, {} MiB of guest memory", bytes >> 20);
    }
    Ok(0)
}
