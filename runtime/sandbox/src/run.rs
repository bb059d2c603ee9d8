//! `run`: bundle in, exit code out; a VM booted for the container and torn down after it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_hypervisor::{
    new_door, Disk, FsShare, Hypervisor, HypervisorError, HypervisorKind, VmConfig, VmExit,
};
use husk_protocol::StdioStream;
use nix::sys::signal::Signal as NixSignal;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{debug, info, warn};

use crate::agent::{AgentClient, ExitStatus};
use crate::bundle::{Bundle, Rootfs, ROOTFS_SERIAL, ROOTFS_TAG};
use crate::state_dir::StateDir;
use crate::stdio::{relay_output, relay_stdin, HostOutput};
use crate::SandboxError;

/// How long a forwarded signal may take to end the container before husk ends its VM.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);
/// How long a guest may take to power off after the agent's shutdown.
const POWEROFF_GRACE: Duration = Duration::from_secs(2);

/// What `husk run` asks for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// State root (`--root`).
    pub root: PathBuf,
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
///
/// # Errors
/// Every [`SandboxError`]; nothing made by the run is left behind on error.
pub async fn run(opts: &RunOptions) -> Result<RunOutcome, SandboxError> {
    let t0 = Instant::now();
    let bundle = Bundle::load(&opts.bundle, &opts.id)?;
    let state = StateDir::create(&opts.root, &opts.id)?;
    let config = VmConfig {
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
        shares: match &bundle.rootfs {
            Rootfs::Dir(dir) => vec![FsShare {
                tag: ROOTFS_TAG.to_owned(),
                host_dir: dir.clone(),
            }],
            Rootfs::Image(_) => Vec::new(),
        }
        .into_iter()
        .chain(bundle.bind_shares.iter().map(|b| FsShare {
            tag: b.tag.clone(),
            host_dir: b.dir.clone(),
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
        run_dir: state.path().to_owned(),
    };
    let mut vm = new_door(opts.hypervisor, config)?;
    let result = run_in_vm(vm.as_mut(), &bundle, opts.boot_timeout).await;
    let stopped = vm.stop().await;
    drop(state);
    let mut outcome = result?;
    stopped?;
    outcome.timings.total = t0.elapsed();
    info!(id = %opts.id, exit_code = outcome.exit_code, timings = ?outcome.timings, "container exited");
    Ok(outcome)
}

async fn run_in_vm(
    vm: &mut dyn Hypervisor,
    bundle: &Bundle,
    boot_timeout: Duration,
) -> Result<RunOutcome, SandboxError> {
    let t_boot = Instant::now();
    vm.start().await?;
    let mut agent = boot(vm, boot_timeout).await?;
    let t_ready = Instant::now();
    debug!("agent ready");
    let id = bundle.spec.id.as_str();
    let outputs = guard(vm, async {
        agent.create(&bundle.spec).await?;
        let stdin = agent.attach(id, StdioStream::Stdin).await?;
        let outputs = [
            relay_output(
                agent.attach(id, StdioStream::Stdout).await?,
                HostOutput::Stdout,
            )?,
            relay_output(
                agent.attach(id, StdioStream::Stderr).await?,
                HostOutput::Stderr,
            )?,
        ];
        relay_stdin(stdin)?;
        agent.start(id).await?;
        Ok(outputs)
    })
    .await?;
    let t_started = Instant::now();
    debug!("container started");
    let exit = supervise(vm, &mut agent, id).await?;
    debug!(
        exit_code = exit.code,
        oom_killed = exit.oom_killed,
        "container exited"
    );
    for output in outputs {
        let _ = output.await;
    }
    power_off(vm, agent).await;
    debug!("VM powered off");
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

/// Waits for the agent's first answer, or reports why the guest never gave one.
async fn boot(vm: &mut dyn Hypervisor, timeout: Duration) -> Result<AgentClient, SandboxError> {
    let deadline = Instant::now() + timeout;
    let vsock = vm.vsock_path();
    tokio::select! {
        agent = AgentClient::connect(&vsock, deadline) => match agent {
            Err(SandboxError::AgentIo(e)) => Err(SandboxError::BootFailed {
                reason: format!("agent did not answer within {}s: {e}", timeout.as_secs()),
                diagnostics: vm.diagnostics(),
            }),
            other => other,
        },
        exit = vm.wait() => Err(SandboxError::BootFailed { reason: exit_reason(vm, exit), diagnostics: vm.diagnostics() }),
    }
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
/// end it in time, husk gives up on the guest and the caller ends the VM.
async fn supervise(
    vm: &mut dyn Hypervisor,
    agent: &mut AgentClient,
    id: &str,
) -> Result<ExitStatus, SandboxError> {
    match wait_forwarding_signals(vm, agent, id).await {
        Err(e) => Err(explain(vm, e).await),
        ok => ok,
    }
}

async fn wait_forwarding_signals(
    vm: &mut dyn Hypervisor,
    agent: &mut AgentClient,
    id: &str,
) -> Result<ExitStatus, SandboxError> {
    let mut waiter = agent.reconnect().await?;
    let wait = waiter.wait(id);
    tokio::pin!(wait);
    let mut signals = ForwardedSignals::new()?;
    let mut escalation = Escalation::None;
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            code = &mut wait => return code,
            exit = vm.wait() => {
                return Err(SandboxError::VmDied { reason: exit_reason(vm, exit), diagnostics: vm.diagnostics() })
            }
            signo = signals.recv() => {
                info!(signal = signo, "forwarding signal to the container");
                agent.signal(id, signo).await?;
                if escalation == Escalation::None {
                    escalation = Escalation::Forwarded;
                    grace.as_mut().reset((Instant::now() + SIGNAL_GRACE).into());
                }
            }
            () = &mut grace => {
                let sigkill = NixSignal::SIGKILL as i32;
                if escalation == Escalation::Killed {
                    warn!("container survived SIGKILL; ending its VM");
                    return Ok(ExitStatus { code: 128 + sigkill, oom_killed: false });
                }
                warn!("container outlived a forwarded signal; sending SIGKILL");
                agent.signal(id, sigkill).await?;
                escalation = Escalation::Killed;
                grace.as_mut().reset((Instant::now() + SIGNAL_GRACE).into());
            }
        }
    }
}

/// How far [`supervise`] went in ending a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escalation {
    None,
    Forwarded,
    Killed,
}

/// Asks the agent to power the guest off and gives it a moment; the door kills what remains.
async fn power_off(vm: &mut dyn Hypervisor, agent: AgentClient) {
    if agent.shutdown().await.is_ok() {
        let _ = tokio::time::timeout(POWEROFF_GRACE, vm.wait()).await;
    }
}

fn exit_reason(vm: &dyn Hypervisor, exit: Result<VmExit, HypervisorError>) -> String {
    match (husk_hypervisor::kernel_panic(&vm.console_path()), exit) {
        (Some(reason), _) => format!("guest kernel panic: {reason}"),
        (None, Ok(exit)) => format!("VMM exited with {}", exit.status),
        (None, Err(e)) => e.to_string(),
    }
}

/// The signals `husk run` forwards to the container, as runc does.
struct ForwardedSignals {
    int: Signal,
    term: Signal,
    hup: Signal,
    quit: Signal,
}

impl ForwardedSignals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        let sig = tokio::select! {
            _ = self.int.recv() => NixSignal::SIGINT,
            _ = self.term.recv() => NixSignal::SIGTERM,
            _ = self.hup.recv() => NixSignal::SIGHUP,
            _ = self.quit.recv() => NixSignal::SIGQUIT,
        };
        sig as i32
    }
}
