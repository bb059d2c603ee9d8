//! `husk run`: create, start and wait for a container in a new micro-VM; `--detach` leaves it
//! running (create + start).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use husk_sandbox::{HypervisorKind, RunOptions, VmOptions, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};

use crate::{lifecycle, Cli};

/// What sizes and boots the VM: shared by `run` and `create`.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Path to the bundle directory.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Hypervisor door: auto picks the fastest this host can run.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "qemu"])]
    pub hypervisor: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub memory: u32,
    /// Guest vCPUs (the guest kernel is built for up to 32).
    #[arg(long, default_value_t = DEFAULT_VCPUS, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub vcpus: u32,
    /// Seconds the guest may take to boot to its agent.
    #[arg(long, default_value_t = 60)]
    pub boot_timeout: u64,
    /// Boot the guest's kernel instead of starting from a boot snapshot.
    #[arg(long)]
    pub no_snapshot: bool,
}

impl VmArgs {
    /// The sandbox's options for container `id`.
    pub fn options(&self, cli: &Cli, id: &str) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            id: id.to_owned(),
            bundle: self.bundle.clone(),
            root: cli.root.clone(),
            vm: VmOptions {
                hypervisor: self.hypervisor.parse::<HypervisorKind>()?,
                kernel: husk_sandbox::artifacts::locate(cli.kernel.as_deref(), "vmlinux"),
                initramfs: husk_sandbox::artifacts::locate(
                    cli.initramfs.as_deref(),
                    "initramfs.cpio",
                ),
                memory_mib: self.memory,
                vcpus: self.vcpus,
                boot_timeout: Duration::from_secs(self.boot_timeout),
                snapshot: !self.no_snapshot,
            },
            console_socket: None,
        })
    }
}

/// `husk run [--bundle DIR] [--detach] [--keep] [--pid-file F] ID`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Create and start the container, then return (the container runs on).
    #[arg(short, long)]
    detach: bool,
    /// Keep the container's state after it exits (remove it with `husk delete`).
    #[arg(long)]
    keep: bool,
    /// Write the VM's host pid (the OCI state's `pid`) to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// With `--detach`: where the master of the container's terminal (process.terminal) goes.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility: the guest always pivots into the rootfs.
    #[arg(long)]
    no_pivot: bool,
    /// Print boot, start and total times to stderr when the container exits.
    #[arg(long)]
    timings: bool,
    /// Descriptors 3..3+N of the caller the container's process would inherit, as runc: only
    /// 0 (a host descriptor cannot cross into the VM).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
}

/// Runs the container; returns its exit code.
pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<i32> {
    crate::lifecycle::no_preserved_fds(args.preserve_fds)?;
    let mut opts = args.vm.options(cli, &args.id)?;
    opts.console_socket = args.console_socket.clone();
    // One thread: the VMM and its helpers die with the thread that spawned them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.detach || args.keep {
        return runtime.block_on(run_separately(cli, args, &opts));
    }
    let outcome = runtime.block_on(husk_sandbox::run(&opts, args.pid_file.as_deref()))?;
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

/// `run --detach` (create + start, return) and `run --keep` (create + start, wait, keep).
async fn run_separately(cli: &Cli, args: &RunArgs, opts: &RunOptions) -> anyhow::Result<i32> {
    lifecycle::create_with(cli, &args.vm, opts, args.pid_file.as_deref()).await?;
    if let Err(e) = husk_sandbox::lifecycle::start(&opts.root, &opts.id).await {
        let _ = husk_sandbox::lifecycle::delete(&opts.root, &opts.id, true).await;
        return Err(e.into());
    }
    if args.detach {
        return Ok(0);
    }
    Ok(wait_stopped(&opts.root, &opts.id).await)
}

/// Waits until the container stopped; its exit code (1 when unknown, as a crashed VM).
async fn wait_stopped(root: &Path, id: &str) -> i32 {
    loop {
        match husk_sandbox::lifecycle::exit_code(root, id) {
            Ok(Some(code)) => return code,
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => return 1,
        }
    }
}
