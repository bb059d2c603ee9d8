//! `husk`: an OCI runtime whose containers each run in their own micro-VM.
//!
//! The command line follows runc's; each command is a module with a clap struct and one call
//! into `husk-sandbox`. Errors become one stderr line (`husk: <error chain>`) and exit 1.
#![forbid(unsafe_code)]

mod check;
mod lifecycle;
mod logging;
mod run;
mod snapshot;
mod spec;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `husk --version`, as runc's: the runtime, then the OCI runtime spec it implements.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.3.0");

/// Run OCI containers, each in its own micro-VM.
#[derive(Debug, Parser)]
#[command(name = "husk", version = VERSION, about)]
struct Cli {
    /// Directory for container state.
    #[arg(long, global = true, default_value = "/run/husk")]
    root: PathBuf,
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Log debug detail.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility: a `slice:prefix:name` cgroups path is recognized by
    /// its form; the container's own cgroups live in its guest, where there is no systemd.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Guest kernel (ELF vmlinux); default: share/husk/vmlinux beside the husk binary.
    #[arg(long, global = true, env = "HUSK_KERNEL")]
    kernel: Option<PathBuf>,
    /// Initramfs holding husk-agent; default: share/husk/initramfs.cpio beside the husk binary.
    #[arg(long, global = true, env = "HUSK_INITRAMFS")]
    initramfs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what this host can run: KVM and its capability probe, QEMU, virtiofsd, guest
    /// kernel and initramfs, and the door `--hypervisor auto` picks.
    Check,
    /// Create and run a container in a new micro-VM, then tear it down (`--detach`: leave it
    /// running).
    Run(run::RunArgs),
    /// Create a container in a new micro-VM; its process waits for `start`.
    Create(lifecycle::CreateArgs),
    /// Start the process of a created container.
    Start(lifecycle::IdArgs),
    /// Print a container's OCI state (JSON).
    State(lifecycle::IdArgs),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(lifecycle::KillArgs),
    /// Delete a stopped container (`--force`: any container) and its VM.
    Delete(lifecycle::DeleteArgs),
    /// Run another process in a running container.
    Exec(lifecycle::ExecArgs),
    /// List the processes of a container.
    Ps(lifecycle::PsArgs),
    /// Freeze every process of a running container.
    Pause(lifecycle::IdArgs),
    /// Thaw a paused container.
    Resume(lifecycle::IdArgs),
    /// Change a container's cgroup limits (in its guest).
    Update(lifecycle::UpdateArgs),
    /// Print a container's stats as JSON events.
    Events(lifecycle::EventsArgs),
    /// Print what this runtime supports (OCI features JSON).
    Features,
    /// List containers.
    #[command(alias = "ls")]
    List(lifecycle::ListArgs),
    /// Owns the VM of a created container (started by `create`; not for direct use).
    #[command(hide = true)]
    Monitor(lifecycle::MonitorArgs),
    /// Write a default config.json (as `runc spec`).
    Spec(spec::SpecArgs),
    /// Boot snapshots: `prepare` makes those of the usual VM shapes ahead of time.
    Snapshot(snapshot::SnapshotArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match logging::init(cli.log.as_deref(), &cli.log_format, cli.debug) {
        Ok(()) => dispatch(&cli),
        Err(e) => Err(e),
    };
    let code = code.unwrap_or_else(|err| {
        let line = format!("{err:#}");
        if cli.log.is_some() {
            tracing::error!("{line}");
        }
        eprintln!("husk: {line}");
        1
    });
    // Exit now: a stdin relay may still be blocked reading a terminal.
    std::process::exit(code);
}

fn dispatch(cli: &Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Check => Ok(check::check(cli)),
        Command::Features => {
            println!(
                "{}",
                serde_json::to_string_pretty(&husk_sandbox::features::features())?
            );
            Ok(0)
        }
        Command::Run(args) => run::run(cli, args),
        Command::Create(args) => lifecycle::create(cli, args),
        Command::Start(args) => lifecycle::start(cli, args),
        Command::State(args) => lifecycle::state(cli, args),
        Command::Kill(args) => lifecycle::kill(cli, args),
        Command::Delete(args) => lifecycle::delete(cli, args),
        Command::List(args) => lifecycle::list(cli, args),
        Command::Exec(args) => lifecycle::exec(cli, args),
        Command::Pause(args) => lifecycle::pause(cli, args, true),
        Command::Resume(args) => lifecycle::pause(cli, args, false),
        Command::Update(args) => lifecycle::update(cli, args),
        Command::Events(args) => lifecycle::events(cli, args),
        Command::Ps(args) => lifecycle::ps(cli, args),
        Command::Monitor(args) => lifecycle::monitor(cli, args),
        Command::Spec(args) => spec::spec(args).map(|()| 0),
        Command::Snapshot(args) => snapshot::snapshot(cli, args),
    }
}
