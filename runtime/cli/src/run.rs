//! `husk run`: create, start and wait for a container in a new micro-VM.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use husk_sandbox::{HypervisorKind, RunOptions};

use crate::{artifacts, Cli};

/// `husk run [--bundle DIR] [--hypervisor auto|kvm|qemu] ID`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path to the bundle directory.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Hypervisor door: auto picks the fastest this host can run.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "qemu"])]
    hypervisor: String,
    /// Print boot, start and total times to stderr when the container exits.
    #[arg(long)]
    timings: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory: u32,
    /// Guest vCPUs (the guest kernel is built for up to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    vcpus: u32,
    /// Seconds the guest may take to boot to its agent.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Container id.
    id: String,
}

/// Runs the container; returns its exit code.
pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<i32> {
    let opts = RunOptions {
        id: args.id.clone(),
        bundle: args.bundle.clone(),
        root: cli.root.clone(),
        hypervisor: args.hypervisor.parse::<HypervisorKind>()?,
        kernel: artifacts::locate(cli.kernel.as_deref(), "vmlinux"),
        initramfs: artifacts::locate(cli.initramfs.as_deref(), "initramfs.cpio"),
        memory_mib: args.memory,
        vcpus: args.vcpus,
        boot_timeout: Duration::from_secs(args.boot_timeout),
    };
    // One thread: the VMM and its helpers die with the thread that spawned them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(husk_sandbox::run(&opts))?;
    if args.timings {
        let t = outcome.timings;
        eprintln!(
            "husk: timings: boot_to_agent_ms={} container_start_ms={} total_ms={}",
            t.boot_to_agent.as_millis(),
            t.container_start.as_millis(),
            t.total.as_millis()
        );
    }
    if outcome.oom_killed {
        eprintln!(
            "husk: container {} was killed by the OOM killer: its memory limit was reached",
            args.id
        );
    }
    Ok(outcome.exit_code)
}
