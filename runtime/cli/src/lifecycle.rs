//! The lifecycle commands, as runc's: `create`, `start`, `state`, `kill`, `delete`, `list`, and
//! the hidden `monitor` that `create` leaves behind to own the container's VM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use clap::Args;
use husk_sandbox::lifecycle;
use husk_sandbox::state::OciState;
use husk_sandbox::RunOptions;

use crate::run::VmArgs;
use crate::Cli;

/// `husk create [--bundle DIR] [--pid-file F] ID`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Write the VM's host pid (the OCI state's `pid`) to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Where the master of the container's terminal (process.terminal) goes, as runc.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility: the guest always pivots into the rootfs.
    #[arg(long)]
    no_pivot: bool,
    /// Descriptors 3..3+N of the caller the container's process would inherit, as runc: only
    /// 0 (a host descriptor cannot cross into the VM).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
}

/// `husk monitor ID` (internal).
#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Where the master of the container's terminal goes.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Container id.
    id: String,
}

/// `ID` alone.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Container id.
    id: String,
}

/// `husk kill [--all] ID [SIGNAL]`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Send the signal to every process of the container.
    #[arg(short, long)]
    all: bool,
    /// Container id.
    id: String,
    /// Signal name (`KILL`, `SIGKILL`) or number.
    #[arg(default_value = "SIGTERM")]
    signal: String,
}

/// `husk delete [--force] ID`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Also delete a running container (its VM is ended).
    #[arg(short, long)]
    force: bool,
    /// Container id.
    id: String,
}

/// `husk exec [-p process.json | ARGS...] [--env K=V]... [--cwd DIR] [--user UID[:GID]]
/// [--detach] [--pid-file F] ID`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// An OCI process JSON file (instead of ARGS).
    #[arg(short, long)]
    process: Option<PathBuf>,
    /// Environment variable `KEY=VALUE` to add (repeatable).
    #[arg(short, long)]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    cwd: Option<String>,
    /// `uid[:gid]` to run as (without gid: the container's).
    #[arg(short, long)]
    user: Option<String>,
    /// A supplementary group added to the container's user's (repeatable).
    #[arg(short = 'g', long = "additional-gids")]
    additional_gids: Vec<u32>,
    /// A capability added to the container's bounding, effective, permitted and ambient sets
    /// (repeatable), as runc.
    #[arg(short, long)]
    cap: Vec<String>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    no_new_privs: bool,
    /// AppArmor profile: refused when set (the guest kernel has no LSM), as
    /// `process.apparmorProfile`.
    #[arg(long)]
    apparmor: Option<String>,
    /// SELinux process label: refused when set, as `process.selinuxLabel`.
    #[arg(long)]
    process_label: Option<String>,
    /// Accept a paused container (husk still cannot exec into one; the error says so).
    #[arg(long)]
    ignore_paused: bool,
    /// Return once the process started.
    #[arg(short, long)]
    detach: bool,
    /// Write the process's pid (in the guest) to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// A terminal for the process (husk's own, or the console socket's).
    #[arg(short, long)]
    tty: bool,
    /// With `--tty`: where the master of the process's terminal goes.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Descriptors 3..3+N of the caller the container's process would inherit, as runc: only
    /// 0 (a host descriptor cannot cross into the VM).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true)]
    args: Vec<String>,
}

/// `husk ps [--format table|json] ID`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
    /// Container id.
    id: String,
}

/// `husk update [--memory B] [--memory-reservation B] [--pids-limit N] [--cpu-shares N]
/// [--cpu-quota US] [--cpu-period US] [--cpuset-cpus L] [--cpuset-mems L] ID`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Memory limit in bytes (suffixes k, m, g), or -1 for none.
    #[arg(long, allow_hyphen_values = true)]
    memory: Option<String>,
    /// Memory soft limit (`memory.low`) in bytes (suffixes k, m, g).
    #[arg(long)]
    memory_reservation: Option<String>,
    /// Most processes, or -1 for none.
    #[arg(long, allow_hyphen_values = true)]
    pids_limit: Option<i64>,
    /// CPU shares (relative weight, converted to cpu.weight as runc does).
    #[arg(long)]
    cpu_shares: Option<u64>,
    /// CPU time in microseconds per period.
    #[arg(long)]
    cpu_quota: Option<u64>,
    /// CPU period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPUs the container may use (`0-1,3`).
    #[arg(long)]
    cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long)]
    cpuset_mems: Option<String>,
    /// Container id.
    id: String,
}

/// `husk events [--stats] [--interval SECS] ID`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print one stats event and exit.
    #[arg(long)]
    stats: bool,
    /// Seconds between stats events.
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    interval: std::time::Duration,
    /// Container id.
    id: String,
}

/// `husk list [--format table|json] [--quiet]`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
    /// Only the ids.
    #[arg(short, long)]
    quiet: bool,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `create`: boots the VM, builds the container, returns with its process waiting.
pub fn create(cli: &Cli, args: &CreateArgs) -> anyhow::Result<i32> {
    no_preserved_fds(args.preserve_fds)?;
    let mut opts = args.vm.options(cli, &args.id)?;
    opts.console_socket = args.console_socket.clone();
    runtime()?.block_on(create_with(cli, &args.vm, &opts, args.pid_file.as_deref()))?;
    Ok(0)
}

/// `--preserve-fds N`: the caller's descriptors 3..3+N would be the container process's. That
/// process runs in the VM, where no host descriptor can be handed: any N but 0 is refused.
///
/// # Errors
/// N is not 0.
pub fn no_preserved_fds(n: u32) -> anyhow::Result<()> {
    if n > 0 {
        anyhow::bail!(
            "--preserve-fds {n}: host descriptors cannot be passed into the VM (only 0 is supported)"
        );
    }
    Ok(())
}

/// Starts `husk monitor` with this process's stdio (the container's), waits until it created
/// the container, writes the pid file.
pub async fn create_with(
    cli: &Cli,
    vm: &VmArgs,
    opts: &RunOptions,
    pid_file: Option<&Path>,
) -> anyhow::Result<OciState> {
    let state = lifecycle::prepare_create(opts)?;
    let exe = std::env::current_exe().context("cannot find the husk executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--root").arg(&cli.root);
    if let Some(log) = &cli.log {
        cmd.arg("--log").arg(log);
    }
    cmd.args(["--log-format", &cli.log_format]);
    if cli.debug {
        cmd.arg("--debug");
    }
    cmd.arg("--kernel").arg(&opts.vm.kernel);
    cmd.arg("--initramfs").arg(&opts.vm.initramfs);
    cmd.arg("monitor").arg("--bundle").arg(&vm.bundle);
    if let Some(socket) = &opts.console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    cmd.args([
        "--hypervisor",
        &vm.hypervisor,
        "--memory",
        &vm.memory.to_string(),
        "--vcpus",
        &vm.vcpus.to_string(),
        "--boot-timeout",
        &vm.boot_timeout.to_string(),
    ]);
    if vm.no_snapshot {
        cmd.arg("--no-snapshot");
    }
    cmd.args(["--", &opts.id]);
    // The container's stdio is this process's, unless it has a terminal (then the console
    // socket's): the monitor keeps no copy of the caller's pipes, whose end a caller may wait
    // for (containerd's runc shim reads `create`'s output to its end).
    let stdio = || match opts.console_socket {
        Some(_) => Stdio::null(),
        None => Stdio::inherit(),
    };
    cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
    let mut monitor = cmd.spawn().context("cannot start husk's monitor")?;
    let timeout = lifecycle::create_timeout(opts);
    let oci = lifecycle::hand_over(state, &mut monitor, timeout).await?;
    if let Some(path) = pid_file {
        write_pid_file(path, oci.pid)?;
    }
    Ok(oci)
}

/// Writes `pid` to `path` atomically, as runc.
pub fn write_pid_file(path: &Path, pid: i32) -> anyhow::Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pid file {}", path.display()))
}

/// The monitor: owns the VM of a created container until it stopped (or `delete`).
pub fn monitor(cli: &Cli, args: &MonitorArgs) -> anyhow::Result<i32> {
    // Out of the caller's session: a terminal's signals are not the container's end.
    let _ = nix::unistd::setsid();
    let mut opts = args.vm.options(cli, &args.id)?;
    opts.console_socket = args.console_socket.clone();
    match runtime()?.block_on(husk_sandbox::monitor(&opts)) {
        Ok(()) => Ok(0),
        Err(e) => {
            let line = format!("{:#}", anyhow::Error::from(e));
            // `create` reports the line on the same stderr: log it only to a log file.
            if cli.log.is_some() {
                tracing::error!("{line}");
            }
            let path = cli.root.join(&args.id).join(lifecycle::MONITOR_ERROR);
            let _ = std::fs::write(path, &line);
            Ok(1)
        }
    }
}

/// `start`.
pub fn start(cli: &Cli, args: &IdArgs) -> anyhow::Result<i32> {
    runtime()?.block_on(lifecycle::start(&cli.root, &args.id))?;
    Ok(0)
}

/// `state`: the OCI state as JSON (indented, as runc).
pub fn state(cli: &Cli, args: &IdArgs) -> anyhow::Result<i32> {
    let state = lifecycle::state(&cli.root, &args.id)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?;
    Ok(0)
}

/// `kill`.
pub fn kill(cli: &Cli, args: &KillArgs) -> anyhow::Result<i32> {
    let signal = parse_signal(&args.signal)?;
    runtime()?.block_on(lifecycle::kill(&cli.root, &args.id, signal, args.all))?;
    Ok(0)
}

/// `delete`.
pub fn delete(cli: &Cli, args: &DeleteArgs) -> anyhow::Result<i32> {
    runtime()?.block_on(lifecycle::delete(&cli.root, &args.id, args.force))?;
    Ok(0)
}

/// `exec`: exits with the process's exit code.
pub fn exec(cli: &Cli, args: &ExecArgs) -> anyhow::Result<i32> {
    if args.process.is_none() && args.args.is_empty() {
        anyhow::bail!("exec needs a process: -p process.json or a command");
    }
    no_preserved_fds(args.preserve_fds)?;
    // An empty value sets nothing, as runc.
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    if set(&args.apparmor) {
        anyhow::bail!("--apparmor is not supported by husk (the guest has no LSM); remove it");
    }
    if set(&args.process_label) {
        anyhow::bail!("--process-label is not supported by husk (the guest has no LSM); remove it");
    }
    let request = lifecycle::ExecRequest {
        process_file: args.process.clone(),
        args: args.args.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        additional_gids: args.additional_gids.clone(),
        caps: args.cap.clone(),
        no_new_privileges: args.no_new_privs,
        ignore_paused: args.ignore_paused,
        detach: args.detach,
        terminal: args.tty,
        console_socket: args.console_socket.clone(),
    };
    let relay = std::env::var_os(EXEC_RELAY).map(PathBuf::from);
    if args.detach && relay.is_none() {
        return exec_detached(args);
    }
    let mut request = request;
    // A detached exec's relay runs attached: its output and exit status are the process's.
    request.detach &= relay.is_none();
    let mut pid = None;
    let mut on_started = |p: u32| {
        pid = Some(p);
        if let Some(started) = &relay {
            let _ = std::fs::write(started, b"started\n");
        }
    };
    let result = runtime()?.block_on(lifecycle::exec(
        &cli.root,
        &args.id,
        &request,
        &mut on_started,
    ));
    if let (Some(path), Some(pid), None) = (&args.pid_file, pid, &relay) {
        write_pid_file(path, i32::try_from(pid).unwrap_or(0))?;
    }
    Ok(result?)
}

/// Environment variable naming the file a detached exec's relay writes once the process
/// started.
const EXEC_RELAY: &str = "HUSK_EXEC_RELAY";

/// `exec --detach`: as runc's, returns once the process started, its pid in `--pid-file`; the
/// process then still writes to the stdio `exec` was given and its exit status is that of the
/// pid-file process (engines wait for it as their subreaper: conmon, containerd's runc shim).
/// With the process in the guest, that is a relay: this same `exec`, run attached as a child
/// that outlives us (our caller's subreaper adopts it), holding our stdio and exiting with the
/// process's status. Its start (or its failure, with its error on our stderr) is awaited here.
fn exec_detached(args: &ExecArgs) -> anyhow::Result<i32> {
    let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("husk-exec-XXXXXX"))?;
    let started = dir.join("started");
    let errors = dir.join("stderr");
    let result = (|| {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(std::env::args_os().skip(1))
            .env(EXEC_RELAY, &started);
        if args.console_socket.is_some() {
            // The process's stdio is the console socket's terminal: the relay keeps none of
            // our caller's pipes, whose end a caller may wait for (containerd's runc shim reads
            // our output to its end before it takes the terminal); its error goes to a file.
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&errors)?);
        }
        let mut child = cmd.spawn()?;
        loop {
            if started.exists() {
                if let Some(path) = &args.pid_file {
                    write_pid_file(path, i32::try_from(child.id()).unwrap_or(0))?;
                }
                return Ok(0);
            }
            // It failed before the process started; its error is on the shared stderr (or in
            // the file).
            if let Some(status) = child.try_wait()? {
                if let Ok(error) = std::fs::read(&errors) {
                    let _ = std::io::stderr().write_all(&error);
                }
                return Ok(status.code().unwrap_or(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `ps`: the container's processes, a table (`UID PID PPID CMD`, pids as the guest sees them)
/// or a JSON array of pids.
pub fn ps(cli: &Cli, args: &PsArgs) -> anyhow::Result<i32> {
    let processes = runtime()?.block_on(lifecycle::processes(&cli.root, &args.id))?;
    let mut out = std::io::stdout().lock();
    if args.format == "json" {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        writeln!(out, "{}", serde_json::to_string(&pids)?)?;
        return Ok(0);
    }
    writeln!(out, "{:<8} {:>7} {:>7} CMD", "UID", "PID", "PPID")?;
    for p in processes {
        writeln!(out, "{:<8} {:>7} {:>7} {}", p.uid, p.pid, p.ppid, p.cmd)?;
    }
    Ok(0)
}

/// `pause` / `resume`.
pub fn pause(cli: &Cli, args: &IdArgs, pause: bool) -> anyhow::Result<i32> {
    runtime()?.block_on(lifecycle::pause(&cli.root, &args.id, pause))?;
    Ok(0)
}

/// `update`: the given limits, applied to the container's cgroup in the guest. The VM's own
/// memory and vCPUs stay as they were booted (no hotplug).
pub fn update(cli: &Cli, args: &UpdateArgs) -> anyhow::Result<i32> {
    let bytes = |v: &Option<String>| -> anyhow::Result<Option<u64>> {
        v.as_deref()
            .filter(|v| *v != "-1")
            .map(parse_bytes)
            .transpose()
    };
    let resources = husk_sandbox::Resources {
        memory_max: bytes(&args.memory)?,
        memory_low: bytes(&args.memory_reservation)?,
        pids_max: args.pids_limit.and_then(|n| u64::try_from(n).ok()),
        cpu_weight: args.cpu_shares.and_then(husk_sandbox::cpu_shares_to_weight),
        cpu_quota_us: args.cpu_quota,
        cpu_period_us: args.cpu_period,
        cpuset_cpus: args.cpuset_cpus.clone(),
        cpuset_mems: args.cpuset_mems.clone(),
        ..husk_sandbox::Resources::default()
    };
    runtime()?.block_on(lifecycle::update(&cli.root, &args.id, &resources))?;
    Ok(0)
}

/// `events`: stats events as JSON lines (runc's shape: `{"type":"stats","id":..,"data":..}`),
/// one with `--stats`, else one per interval until the container stops.
pub fn events(cli: &Cli, args: &EventsArgs) -> anyhow::Result<i32> {
    let rt = runtime()?;
    loop {
        let Some(stats) = rt.block_on(lifecycle::stats(&cli.root, &args.id))? else {
            return Ok(0);
        };
        let event = serde_json::json!({
            "type": "stats",
            "id": args.id,
            "data": {
                "cpu": {"usage": {
                    "total": stats.cpu_usage_usec * 1000,
                    "user": stats.cpu_user_usec * 1000,
                    "kernel": stats.cpu_system_usec * 1000,
                }},
                "memory": {
                    "usage": {"usage": stats.memory_current, "limit": stats.memory_max.unwrap_or(u64::MAX)},
                    "oom_kill": stats.oom_kills,
                },
                "pids": {"current": stats.pids_current, "limit": stats.pids_max.unwrap_or(0)},
            },
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{event}")?;
        out.flush()?;
        if args.stats {
            return Ok(0);
        }
        std::thread::sleep(args.interval);
    }
}

/// `100`, `64k`, `256m`, `1g` (powers of 1024) as bytes.
fn parse_bytes(value: &str) -> anyhow::Result<u64> {
    let lower = value.to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        _ => (lower, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| anyhow::anyhow!("invalid size {value:?}"))
}

/// `5s`, `500ms`, `2m` or plain seconds.
fn parse_interval(value: &str) -> Result<std::time::Duration, String> {
    let parse = |n: &str| {
        n.parse::<u64>()
            .map_err(|_| format!("invalid interval {value:?}"))
    };
    if let Some(ms) = value.strip_suffix("ms") {
        return parse(ms).map(std::time::Duration::from_millis);
    }
    if let Some(m) = value.strip_suffix('m') {
        return parse(m).map(|m| std::time::Duration::from_secs(m * 60));
    }
    parse(value.strip_suffix('s').unwrap_or(value)).map(std::time::Duration::from_secs)
}

/// `list`: a table as runc's (`ID PID STATUS BUNDLE CREATED OWNER`), JSON, or ids.
pub fn list(cli: &Cli, args: &ListArgs) -> anyhow::Result<i32> {
    let states = lifecycle::list(&cli.root)?;
    let mut out = std::io::stdout().lock();
    if args.quiet {
        for s in &states {
            writeln!(out, "{}", s.id)?;
        }
    } else if args.format == "json" {
        let owned: Vec<OciState> = states.into_iter().map(with_owner).collect();
        writeln!(out, "{}", serde_json::to_string(&owned)?)?;
    } else {
        let rows: Vec<[String; 6]> = std::iter::once(
            ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from),
        )
        .chain(states.into_iter().map(with_owner).map(|s| {
            [
                s.id,
                s.pid.to_string(),
                s.status.to_string(),
                s.bundle.display().to_string(),
                s.created,
                s.owner,
            ]
        }))
        .collect();
        // runc's tabwriter: cells at least 12 wide, 3 spaces of padding.
        let widths: Vec<usize> = (0..6)
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].len() + 3)
                    .max()
                    .unwrap_or(0)
                    .max(12)
            })
            .collect();
        for row in rows {
            let line: String = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| match c {
                    5 => cell.clone(),
                    _ => format!("{cell:<w$}"),
                })
                .collect();
            writeln!(out, "{}", line.trim_end())?;
        }
    }
    Ok(0)
}

/// `list` names the owning user, as runc's (root: the state directories are root's).
fn with_owner(mut s: OciState) -> OciState {
    if s.owner.is_empty() {
        s.owner = "root".to_owned();
    }
    s
}

/// A signal by name (`KILL`, `SIGKILL`, case-insensitive) or number (0: only check that the
/// process exists, as kill(2)).
///
/// # Errors
/// An unknown name or a number outside 0..=64 (`invalid signal`, as runc).
pub fn parse_signal(value: &str) -> anyhow::Result<i32> {
    if let Ok(n) = value.parse::<i32>() {
        if (0..=64).contains(&n) {
            return Ok(n);
        }
        anyhow::bail!("invalid signal {value:?}");
    }
    let upper = value.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow::anyhow!("invalid signal {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_signal_names_and_numbers() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), 10);
        assert_eq!(parse_signal("9").unwrap(), 9);
    }

    #[test]
    fn test_parse_bytes_suffixes() {
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("64k").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("256M").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn test_parse_interval_units() {
        assert_eq!(parse_interval("5s").unwrap().as_secs(), 5);
        assert_eq!(parse_interval("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_interval("2m").unwrap().as_secs(), 120);
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn test_parse_signal_unknown_rejected() {
        for bad in ["NOPE", "65", "-1", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}
