//! `run`: bundle in, exit code out; a VM booted for the container and torn down after it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_hypervisor::cgroup::{vm_memory_limit_bytes, CgroupSpec};
use husk_hypervisor::{
    new_door, Disk, Export, FsShare, Hypervisor, HypervisorError, HypervisorKind, VmConfig, VmExit,
};
use nix::sys::signal::Signal as NixSignal;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{debug, info, warn};

use crate::agent::{AgentClient, ExitStatus};
use crate::bundle::{Bundle, Rootfs, BINDS_TAG, ROOTFS_SERIAL, ROOTFS_TAG};
use crate::pod_net::VmNetwork;
use crate::state::{now_rfc3339, CommandLock, OciState, Private, Record, Status, OCI_VERSION};
use crate::state_dir::StateDir;
use crate::stdio::{relay_output, relay_stdin, HostOutput};
use crate::SandboxError;

/// How long a forwarded signal may take to end the container before husk ends its VM.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// What `husk run` asks for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// State root (`--root`).
    pub root: PathBuf,
    /// How its VM is made.
    pub vm: VmOptions,
    /// Where the master of the container's terminal goes (`process.terminal`; `create` only).
    pub console_socket: Option<PathBuf>,
}

/// Guest memory in MiB when the bundle does not size the VM (the CLI's `--memory`, the shim's).
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Guest vCPUs when the bundle does not size the VM (the CLI's `--vcpus`, the shim's).
pub const DEFAULT_VCPUS: u32 = 1;

/// How a VM is made, where the bundle's annotations and resources do not say.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Which door.
    pub hypervisor: HypervisorKind,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent.
    pub initramfs: PathBuf,
    /// Guest memory.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Longest time from VM start to the agent's answer.
    pub boot_timeout: Duration,
    /// Start from a boot snapshot where the door can (see `husk_hypervisor::snapshot`).
    pub snapshot: bool,
}

/// The console socket a container with a terminal needs when it is created to run detached.
fn console_socket<'a>(
    opts: &'a RunOptions,
    bundle: &Bundle,
) -> Result<Option<&'a Path>, SandboxError> {
    match (bundle.spec.terminal, &opts.console_socket) {
        (true, None) => Err(SandboxError::Terminal(
            "process.terminal needs --console-socket for a container that is created to run detached".into(),
        )),
        (true, Some(path)) => Ok(Some(path)),
        (false, _) => Ok(None),
    }
}

/// Where the time of a run went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// VMM start until the agent answered the handshake.
    pub boot_to_agent: Duration,
    /// Agent ready until the container's process runs (create, attach, start).
    pub container_start: Duration,
    /// `run` entry until the VM was torn down.
    pub total: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, Copy)]
pub struct RunOutcome {
    /// The container's exit code (128+N when killed by signal N).
    pub exit_code: i32,
    /// The OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// Where the time went.
    pub timings: Timings,
}

/// Runs the bundle's process in a fresh VM, relaying husk's stdio, and tears everything down.
/// While it runs, the container has a state directory like any other (`husk state`, `kill`,
/// `exec` work on it); it goes with the run.
///
/// # Errors
/// Every [`SandboxError`]; nothing made by the run is left behind on error.
pub async fn run(opts: &RunOptions, pid_file: Option<&Path>) -> Result<RunOutcome, SandboxError> {
    let t0 = Instant::now();
    let bundle = Bundle::load(&opts.bundle, &opts.id)?;
    bundle.prepare_mountpoints()?;
    let state = StateDir::create(&opts.root, &opts.id)?;
    let mut record = new_record(&bundle, Status::Creating);
    record.husk.ephemeral = true;
    record.write(state.path())?;
    let mut network = VmNetwork::prepare(&bundle, state.path())?;
    let config = vm_config(opts, &bundle, state.path(), network.as_ref());
    let mut vm = new_door(door(opts, &bundle), config)?;
    let result = run_in_vm(
        vm.as_mut(),
        &bundle,
        network.as_mut(),
        opts.vm.boot_timeout,
        state.path(),
        pid_file,
    )
    .await;
    let stopped = vm.stop().await;
    drop(network);
    drop(state);
    let mut outcome = result?;
    stopped?;
    outcome.timings.total = t0.elapsed();
    info!(id = %opts.id, exit_code = outcome.exit_code, timings = ?outcome.timings, "container exited");
    Ok(outcome)
}

/// The owner of a container made by `husk create`: in the state directory `create` made, boots
/// the VM and builds the container (its process waits for `husk start`), records `created`,
/// then waits for the process to exit, records `stopped` with the exit code and powers the VM
/// off; the directory stays for `delete`. SIGTERM (from `delete`) ends the VM at once.
///
/// # Errors
/// Every [`SandboxError`] before the container is created; the VM is torn down.
pub async fn monitor(opts: &RunOptions) -> Result<(), SandboxError> {
    let state = StateDir::adopt(&opts.root, &opts.id, Duration::from_secs(10))?;
    let result = own_vm(opts, state.path()).await;
    state.hold_until_exit();
    result
}

/// The monitor's work, in its state directory `dir`.
async fn own_vm(opts: &RunOptions, dir: &Path) -> Result<(), SandboxError> {
    let dir = dir.to_owned();
    let bundle = Bundle::load(&opts.bundle, &opts.id)?;
    bundle.prepare_mountpoints()?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut network = VmNetwork::prepare(&bundle, &dir)?;
    let config = vm_config(opts, &bundle, &dir, network.as_ref());
    let mut vm = new_door(door(opts, &bundle), config)?;
    let result = tokio::select! {
        r = monitor_vm(vm.as_mut(), &bundle, network.as_mut(), opts, &dir) => r,
        _ = terminate.recv() => {
            info!("terminated: ending the VM");
            Ok(())
        }
    };
    let stopped = vm.stop().await;
    drop(network);
    if result.is_err() || stopped.is_err() {
        // The container never came to be (or its record is past saving): stopped for sure.
        let _ = update_record(&dir, |r| {
            r.oci.status = Status::Stopped;
        });
    }
    result?;
    stopped?;
    Ok(())
}

async fn monitor_vm(
    vm: &mut dyn Hypervisor,
    bundle: &Bundle,
    network: Option<&mut VmNetwork>,
    opts: &RunOptions,
    dir: &Path,
) -> Result<(), SandboxError> {
    let boot_timeout = opts.vm.boot_timeout;
    vm.start().await?;
    let mut agent = boot(vm, boot_timeout).await?;
    let id = bundle.spec.id.as_str();
    let console = console_socket(opts, bundle)?;
    let outputs = guard(vm, create_container(&mut agent, bundle, console)).await?;
    // The container's process as engines see it: `state.pid`, exiting with the container.
    let sentinel = vm.sentinel().await?;
    let pid = i32::try_from(sentinel.pid()).unwrap_or(0);
    create_runtime_hooks(dir, bundle, pid)?;
    guard(vm, configure_network(&mut agent, network)).await?;
    update_record(dir, |r| {
        r.oci.status = Status::Created;
        r.oci.pid = pid;
    })?;
    debug!("container created");
    let exit_code = {
        let mut waiter = guard(vm, agent.reconnect()).await?;
        let wait = guard(vm, waiter.wait(id));
        tokio::pin!(wait);
        let waited = tokio::select! {
            r = &mut wait => r,
            () = sentinel.ended() => {
                // Killed on the host (`kill -9 <state.pid>`), as runc's container process can
                // be: so is the container.
                warn!("the container's host process was killed: killing the container");
                if let Err(e) = agent.signal_all(id, nix::sys::signal::Signal::SIGKILL as i32, true).await {
                    warn!(error = %e, "cannot kill the container");
                }
                wait.await
            }
        };
        match waited {
            Ok(exit) => Some(exit.code),
            Err(e) => {
                warn!(error = %e, "container's VM ended");
                None
            }
        }
    };
    debug!(?exit_code, "container exited");
    outputs.delivered().await;
    update_record(dir, |r| {
        r.oci.status = Status::Stopped;
        r.husk.exit_code = exit_code;
    })?;
    // Recorded first: the engine that reaps the sentinel finds the container stopped.
    sentinel.exit(exit_code.unwrap_or(1)).await;
    // The caller ends the VM: the agent cleaned up before it reported the exit (see
    // `run_in_vm`).
    drop(agent);
    Ok(())
}

/// After the hooks: gives the VM's device the network the engine connected, if any.
async fn configure_network(
    agent: &mut AgentClient,
    network: Option<&mut VmNetwork>,
) -> Result<(), SandboxError> {
    let Some(network) = network else {
        return Ok(());
    };
    match network.connect()? {
        Some(n) => agent.configure_network(&n).await,
        None => Ok(()),
    }
}

/// Runs the createRuntime (and prestart) hooks with the container's state, its VM up and its
/// process waiting.
fn create_runtime_hooks(dir: &Path, bundle: &Bundle, pid: i32) -> Result<(), SandboxError> {
    if bundle.hooks.create_runtime.is_empty() {
        return Ok(());
    }
    // The runtime environment exists and the process waits: `created` (runtime spec,
    // runtime.md "State"; runc 1.1 says `creating`).
    let mut state = Record::read(dir)?.oci;
    (state.pid, state.status) = (pid, Status::Created);
    crate::hooks::run("createRuntime", &bundle.hooks.create_runtime, &state)
}

/// The record of a container being made from `bundle` by this process.
pub(crate) fn new_record(bundle: &Bundle, status: Status) -> Record {
    Record {
        oci: OciState {
            oci_version: OCI_VERSION.to_owned(),
            id: bundle.spec.id.clone(),
            pid: 0,
            status,
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.path().to_owned(),
            created: now_rfc3339(),
            owner: String::new(),
            annotations: bundle.annotations.clone(),
        },
        husk: Private {
            owner_pid: i32::try_from(std::process::id()).unwrap_or(0),
            exit_code: None,
            ephemeral: false,
            hooks: bundle.hooks.clone(),
            create_deadline_ms: 0,
        },
    }
}

/// Read-modify-write of `dir`'s record under its command lock. A command holding the lock for
/// long (it never does) does not stall the owner: after [`LOCK_PATIENCE`] it writes anyway.
pub(crate) fn update_record(dir: &Path, f: impl FnOnce(&mut Record)) -> Result<(), SandboxError> {
    let _lock = CommandLock::take_within(dir, LOCK_PATIENCE)?;
    let mut record = Record::read(dir)?;
    f(&mut record);
    record.write(dir)
}

/// How long the owner waits for a command's lock before updating the record anyway.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// The door: the bundle's annotation, else the command line's.
fn door(opts: &RunOptions, bundle: &Bundle) -> HypervisorKind {
    bundle.vm.hypervisor.unwrap_or(opts.vm.hypervisor)
}

/// The VM for `bundle`: its annotations size it, else its resources (memory limit plus the
/// guest's own overhead, vCPUs from the CPU quota or cpuset), else the command line.
fn vm_config(
    opts: &RunOptions,
    bundle: &Bundle,
    run_dir: &Path,
    network: Option<&VmNetwork>,
) -> VmConfig {
    let (memory_mib, vcpus) = vm_size(bundle, &opts.vm);
    VmConfig {
        kernel: opts.vm.kernel.clone(),
        initramfs: opts.vm.initramfs.clone(),
        memory_mib,
        vcpus,
        shares: match &bundle.rootfs {
            Rootfs::Dir(dir) => vec![FsShare {
                tag: ROOTFS_TAG.to_owned(),
                export: Export::Dir {
                    path: dir.clone(),
                    read_only: bundle.spec.rootfs_readonly,
                },
                keep_cache: true,
            }],
            Rootfs::Image(_) => Vec::new(),
        }
        .into_iter()
        .chain((!bundle.bind_entries.is_empty()).then(|| FsShare {
            tag: BINDS_TAG.to_owned(),
            export: Export::Entries(bundle.bind_entries.clone()),
            keep_cache: false,
        }))
        .collect(),
        disks: match &bundle.rootfs {
            Rootfs::Image(path) => vec![Disk {
                serial: ROOTFS_SERIAL.to_owned(),
                path: path.clone(),
                read_only: bundle.spec.rootfs_readonly,
            }],
            Rootfs::Dir(_) => Vec::new(),
        },
        net: network.map(VmNetwork::device),
        run_dir: run_dir.to_owned(),
        cgroup: host_cgroup(bundle, memory_mib),
        snapshot: snapshot_allowed(&opts.vm, bundle),
        ready_port: husk_protocol::AGENT_PORT,
        save_port: Some(husk_protocol::SAVE_PORT),
    }
}

/// Whether the VM may start from a boot snapshot: unless `--no-snapshot` (or the shim's
/// `HUSK_SNAPSHOT=0`) or the bundle's `io.husk.snapshot` says no.
pub(crate) fn snapshot_allowed(vm: &VmOptions, bundle: &Bundle) -> bool {
    vm.snapshot && bundle.vm.snapshot.unwrap_or(true)
}

/// The host cgroup of `bundle`'s VM of `memory_mib`, when it names one (`linux.cgroupsPath`):
/// limited to the VM's memory plus the VMM's overhead (the guest cannot use more than its
/// RAM; the container's own memory limit holds inside the guest), to the container's CPU
/// quota and period, and to its cpuset on the host's CPUs.
pub(crate) fn host_cgroup(bundle: &Bundle, memory_mib: u32) -> Option<CgroupSpec> {
    let resources = &bundle.spec.resources;
    Some(CgroupSpec {
        path: bundle.cgroups_path.clone()?,
        memory_limit_bytes: Some(vm_memory_limit_bytes(memory_mib)),
        cpu_quota_us: resources.cpu_quota_us.and_then(|q| i64::try_from(q).ok()),
        cpu_period_us: resources.cpu_period_us,
        cpuset_cpus: resources.cpuset_cpus.clone(),
        cpuset_mems: resources.cpuset_mems.clone(),
        cpu_shares: bundle.cpu_shares,
        cpu_weight: resources.cpu_weight,
    })
}

/// Guest memory (MiB) and vCPUs for `bundle`: its annotations, else its resources, else the
/// defaults given.
pub(crate) fn vm_size(bundle: &Bundle, defaults: &VmOptions) -> (u32, u32) {
    (
        bundle
            .vm
            .memory_mib
            .or_else(|| bundle.sized_memory_mib())
            .unwrap_or(defaults.memory_mib),
        bundle
            .vm
            .vcpus
            .or_else(|| bundle.sized_vcpus())
            .unwrap_or(defaults.vcpus),
    )
}

/// The relays of a container's stdio to the host; done when its output has been delivered.
pub(crate) struct Outputs {
    handles: Vec<tokio::task::JoinHandle<std::io::Result<u64>>>,
    _terminal: Option<crate::terminal::Relay>,
}

impl Outputs {
    /// Waits until every output stream was delivered.
    pub(crate) async fn delivered(self) {
        for handle in self.handles {
            let _ = handle.await;
        }
    }
}

/// Creates the container and connects its stdio to the host: this process's stdio (stdin
/// relayed on a thread of its own, outputs until the agent ends them), or with a terminal the
/// console socket's (`console_socket`) or this process's terminal.
async fn create_container(
    agent: &mut AgentClient,
    bundle: &Bundle,
    console_socket: Option<&Path>,
) -> Result<Outputs, SandboxError> {
    let id = bundle.spec.id.as_str();
    agent.create(&bundle.spec).await?;
    attach_stdio(agent, id, None, bundle.spec.terminal, console_socket).await
}

/// Attaches the stdio streams of `id` (or its exec `exec_id`) and relays them.
pub(crate) async fn attach_stdio(
    agent: &AgentClient,
    id: &str,
    exec_id: Option<&str>,
    terminal: bool,
    console_socket: Option<&Path>,
) -> Result<Outputs, SandboxError> {
    let streams = agent.attach_streams(id, exec_id, terminal).await?;
    let (stdin, stdout) = (streams.stdin, streams.stdout);
    let Some(stderr) = streams.stderr else {
        let end = match console_socket {
            Some(path) => crate::terminal::HostEnd::ConsoleSocket(path.to_owned()),
            None => crate::terminal::HostEnd::OwnStdio,
        };
        let mut relay = crate::terminal::connect(agent, id, exec_id, stdin, stdout, &end)?;
        let output = std::mem::replace(&mut relay.output, tokio::spawn(async { Ok(0) }));
        return Ok(Outputs {
            handles: vec![output],
            _terminal: Some(relay),
        });
    };
    let handles = vec![
        relay_output(stdout, HostOutput::Stdout)?,
        relay_output(stderr, HostOutput::Stderr)?,
    ];
    relay_stdin(stdin)?;
    Ok(Outputs {
        handles,
        _terminal: None,
    })
}

async fn run_in_vm(
    vm: &mut dyn Hypervisor,
    bundle: &Bundle,
    network: Option<&mut VmNetwork>,
    boot_timeout: Duration,
    dir: &Path,
    pid_file: Option<&Path>,
) -> Result<RunOutcome, SandboxError> {
    // From here on a termination signal is caught, not fatal: one that arrives while the VM
    // boots or the container starts is forwarded once the container runs (as runc's run).
    let mut signals = ForwardedSignals::new()?;
    let t_boot = Instant::now();
    vm.start().await?;
    let mut agent = boot(vm, boot_timeout).await?;
    let t_ready = Instant::now();
    debug!("agent ready");
    let id = bundle.spec.id.as_str();
    let pid = vm.pid().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let (outputs, waiting) = guard(vm, async {
        let outputs = create_container(&mut agent, bundle, None).await?;
        create_runtime_hooks(dir, bundle, pid)?;
        configure_network(&mut agent, network).await?;
        // The wait for the exit is asked, on a connection of its own, while the process starts.
        let waiting = Waiting::ask(agent.uds(), id);
        agent.start(id).await?;
        Ok((outputs, waiting))
    })
    .await?;
    update_record(dir, |r| {
        r.oci.status = Status::Running;
        r.oci.pid = pid;
    })?;
    crate::hooks::run_logged(
        "poststart",
        &bundle.hooks.poststart,
        &Record::read(dir)?.oci,
    );
    if let Some(path) = pid_file {
        std::fs::write(path, pid.to_string()).map_err(|source| SandboxError::StateDir {
            path: path.to_owned(),
            source,
        })?;
    }
    let t_started = Instant::now();
    debug!("container started");
    let (exit, ended) = match supervise(vm, &mut agent, waiting, id, &mut signals).await? {
        Supervised::Exited(exit) => (exit, false),
        Supervised::GaveUp(exit) => (exit, true),
    };
    debug!(
        exit_code = exit.code,
        oom_killed = exit.oom_killed,
        "container exited"
    );
    // Given up on: its output may never end. Either way the caller ends the VM: the agent
    // removed the container's cgroup and wrote back what its file systems held (a disk's by
    // unmounting it; virtio-fs writes through) before it reported the exit, so the guest
    // holds nothing left to flush, and a power-off through the agent would only cost its
    // time.
    if !ended {
        outputs.delivered().await;
    }
    update_record(dir, |r| {
        r.oci.status = Status::Stopped;
        r.husk.exit_code = Some(exit.code);
    })?;
    let mut state = Record::read(dir)?.oci;
    state.pid = 0;
    crate::hooks::run_logged("poststop", &bundle.hooks.poststop, &state);
    let timings = Timings {
        boot_to_agent: t_ready - t_boot,
        container_start: t_started - t_ready,
        total: Duration::ZERO,
    };
    Ok(RunOutcome {
        exit_code: exit.code,
        oom_killed: exit.oom_killed,
        timings,
    })
}

/// Waits for the agent's first answer and gives the guest its identity (host entropy and
/// time, before any container), or reports why the guest never answered.
pub(crate) async fn boot(
    vm: &mut dyn Hypervisor,
    timeout: Duration,
) -> Result<AgentClient, SandboxError> {
    let deadline = Instant::now() + timeout;
    let vsock = vm.vsock_path();
    let ready = vm.take_ready_connection();
    let connect = async {
        match ready {
            Some(stream) => AgentClient::handshake(&vsock, stream).await,
            None => AgentClient::connect(&vsock, deadline).await,
        }
    };
    let mut agent = tokio::select! {
        agent = connect => match agent {
            Err(SandboxError::AgentIo(e)) => Err(SandboxError::BootFailed {
                reason: format!("agent did not answer within {}s: {e}", timeout.as_secs()),
                diagnostics: vm.diagnostics(),
            }),
            other => other,
        },
        exit = vm.wait() => Err(SandboxError::BootFailed { reason: exit_reason(vm, exit), diagnostics: vm.diagnostics() }),
    }?;
    guard(vm, agent.set_identity()).await?;
    Ok(agent)
}

/// Runs `fut` unless the VM ends first.
async fn guard<T>(
    vm: &mut dyn Hypervisor,
    fut: impl std::future::Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    let result = tokio::select! {
        r = fut => r,
        exit = vm.wait() => return Err(SandboxError::VmDied { reason: exit_reason(vm, exit), diagnostics: vm.diagnostics() }),
    };
    match result {
        Err(e) => Err(explain(vm, e).await),
        ok => ok,
    }
}

/// How long a lost agent connection waits for the VMM's exit, the likelier root cause.
const VM_EXIT_GRACE: Duration = Duration::from_secs(1);

/// A lost agent connection usually means the VM went down (guest panic, VMM killed): report
/// that instead when the VMM exits within [`VM_EXIT_GRACE`].
async fn explain(vm: &mut dyn Hypervisor, err: SandboxError) -> SandboxError {
    if !matches!(err, SandboxError::Protocol(_) | SandboxError::AgentIo(_)) {
        return err;
    }
    match tokio::time::timeout(VM_EXIT_GRACE, vm.wait()).await {
        Ok(exit) => SandboxError::VmDied {
            reason: exit_reason(vm, exit),
            diagnostics: vm.diagnostics(),
        },
        Err(_) => err,
    }
}

/// Waits for the container's exit code, forwarding husk's termination signals to it (as
/// runc). A container still running [`SIGNAL_GRACE`] after a forwarded signal gets SIGKILL
/// (PID 1 of a pid namespace ignores signals it has no handler for); if even that does not
/// end it in time, or the agent does not take a signal within its deadline, husk gives up on
/// the guest and the caller ends the VM.
async fn supervise(
    vm: &mut dyn Hypervisor,
    agent: &mut AgentClient,
    waiting: Waiting,
    id: &str,
    signals: &mut ForwardedSignals,
) -> Result<Supervised, SandboxError> {
    match wait_forwarding_signals(vm, agent, waiting, id, signals).await {
        Err(e) => Err(explain(vm, e).await),
        ok => ok,
    }
}

/// How [`supervise`] ended.
#[derive(Debug, Clone, Copy)]
enum Supervised {
    /// The container exited and its agent reported it.
    Exited(ExitStatus),
    /// husk gave up on the guest (container killed by the VM's end, as by SIGKILL).
    GaveUp(ExitStatus),
}

/// The status of a container husk gave up on: killed, as by SIGKILL.
const GIVEN_UP: ExitStatus = ExitStatus {
    code: 128 + NixSignal::SIGKILL as i32,
    oom_killed: false,
};

async fn wait_forwarding_signals(
    vm: &mut dyn Hypervisor,
    agent: &mut AgentClient,
    mut waiting: Waiting,
    id: &str,
    signals: &mut ForwardedSignals,
) -> Result<Supervised, SandboxError> {
    let wait = &mut waiting.0;
    let mut escalation = Escalation::None;
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    loop {
        let signo = tokio::select! {
            code = &mut *wait => {
                let code = code.map_err(|e| SandboxError::AgentIo(std::io::Error::other(e)))?;
                return code.map(Supervised::Exited);
            }
            exit = vm.wait() => {
                return Err(SandboxError::VmDied { reason: exit_reason(vm, exit), diagnostics: vm.diagnostics() })
            }
            signo = signals.recv() => {
                info!(signal = signo, "forwarding signal to the container");
                if escalation == Escalation::None {
                    escalation = Escalation::Forwarded;
                    grace.as_mut().reset((Instant::now() + SIGNAL_GRACE).into());
                }
                signo
            }
            () = &mut grace => {
                if escalation == Escalation::Killed {
                    warn!("container survived SIGKILL; ending its VM");
                    return Ok(Supervised::GaveUp(GIVEN_UP));
                }
                warn!("container outlived a forwarded signal; sending SIGKILL");
                escalation = Escalation::Killed;
                grace.as_mut().reset((Instant::now() + SIGNAL_GRACE).into());
                NixSignal::SIGKILL as i32
            }
        };
        match agent.signal(id, signo).await {
            Err(e) if crate::agent::unresponsive(&e) => {
                warn!(error = %e, "the agent did not take a signal; ending the container's VM");
                return Ok(Supervised::GaveUp(GIVEN_UP));
            }
            other => other?,
        }
    }
}

/// The wait for a container's exit, asked on a connection of its own as soon as that opens
/// (before the process starts: the agent answers once it exited); ended if dropped.
struct Waiting(tokio::task::JoinHandle<Result<ExitStatus, SandboxError>>);

impl Waiting {
    fn ask(uds: &Path, id: &str) -> Self {
        let (uds, id) = (uds.to_owned(), id.to_owned());
        Self(tokio::spawn(async move {
            AgentClient::open(&uds).await?.wait(&id).await
        }))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How far [`supervise`] went in ending a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escalation {
    None,
    Forwarded,
    Killed,
}

pub(crate) fn exit_reason(vm: &dyn Hypervisor, exit: Result<VmExit, HypervisorError>) -> String {
    match (husk_hypervisor::kernel_panic(&vm.console_path()), exit) {
        (Some(reason), _) => format!("guest kernel panic: {reason}"),
        (None, Ok(exit)) => format!("VMM exited with {}", exit.status),
        (None, Err(e)) => e.to_string(),
    }
}

/// The signals `husk run` (and `exec`) forward to the container, as runc does.
pub(crate) struct ForwardedSignals {
    int: Signal,
    term: Signal,
    hup: Signal,
    quit: Signal,
}

impl ForwardedSignals {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// The next signal's number.
    pub(crate) async fn recv(&mut self) -> i32 {
        let sig = tokio::select! {
            _ = self.int.recv() => NixSignal::SIGINT,
            _ = self.term.recv() => NixSignal::SIGTERM,
            _ = self.hup.recv() => NixSignal::SIGHUP,
            _ = self.quit.recv() => NixSignal::SIGQUIT,
        };
        sig as i32
    }
}
