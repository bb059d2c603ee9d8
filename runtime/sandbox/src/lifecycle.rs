//! The OCI lifecycle across separate commands, as runc's: `create` leaves a monitor process
//! owning the VM (see [`crate::monitor`]) with the container's process waiting; `start`,
//! `kill`, `state`, `delete` and `list` find it through its state directory, talk to its agent
//! over the VM's vsock socket, and update its record under the command lock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::agent::AgentClient;
use husk_protocol::ProcessInfo;

use crate::bundle::Bundle;
use crate::state::{CommandLock, OciState, Record, Status};
use crate::state_dir::{container_dir, owner_alive, pid_alive, remove_run_dir, StateDir};
use crate::{RunOptions, SandboxError};

/// Name of the VM's hybrid vsock socket in a state directory (both doors use it).
/// File the monitor writes its one-line error to when it fails before `created`.
pub const MONITOR_ERROR: &str = "monitor.err";
/// How long a command retries reaching the agent (each request then has its own deadline,
/// [`crate::agent::deadline`]).
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `delete --force` waits for another command's lock before it goes on without it.
const FORCE_LOCK_PATIENCE: Duration = Duration::from_secs(2);
/// How long `delete` lets the owner end the VM after SIGTERM before it kills it.
const OWNER_GRACE: Duration = Duration::from_secs(3);

/// `create`, first half: checks the bundle, takes the id and records `creating`. The caller
/// then starts the monitor and hands the directory over with [`hand_over`].
///
/// # Errors
/// An invalid bundle or id, or an id in use; nothing is left behind.
pub fn prepare_create(opts: &RunOptions) -> Result<StateDir, SandboxError> {
    let bundle = Bundle::load(&opts.bundle, &opts.id)?;
    let state = StateDir::create(&opts.root, &opts.id)?;
    let mut record = crate::run::new_record(&bundle, Status::Creating);
    record.husk.create_deadline_ms = unix_ms(SystemTime::now() + create_timeout(opts));
    record.write(state.path())?;
    Ok(state)
}

/// How long `create` may take: booting the VM and building the container.
pub fn create_timeout(opts: &RunOptions) -> Duration {
    opts.vm.boot_timeout * 2
}

/// `time` in milliseconds since the Unix epoch.
fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `create`, second half: the monitor (pid `monitor`) takes the directory over; waits until it
/// recorded `created`, or reports its error and removes the directory.
///
/// # Errors
/// The monitor's own error line, or that it ended without one.
pub async fn hand_over(
    mut state: StateDir,
    monitor: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<OciState, SandboxError> {
    let dir = state.path().to_owned();
    let pid = monitor
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or(0);
    crate::run::update_record(&dir, |r| r.husk.owner_pid = pid)?;
    state.keep();
    drop(state);
    let deadline = Instant::now() + timeout;
    let failed = |reason: String| {
        let _ = remove_run_dir(&dir);
        Err(SandboxError::CreateFailed(reason))
    };
    loop {
        if let Ok(record) = Record::read(&dir) {
            if record.oci.status == Status::Created {
                return Ok(record.oci);
            }
        }
        if let Some(status) = monitor.try_wait()? {
            let reason = std::fs::read_to_string(dir.join(MONITOR_ERROR))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("husk's monitor exited with {status}"));
            return failed(reason);
        }
        if Instant::now() >= deadline {
            let _ = monitor.start_kill();
            let _ = monitor.wait().await;
            return failed(format!("not created within {}s", timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `state`: the container's OCI state as it is now.
///
/// # Errors
/// An invalid id or no such container.
pub fn state(root: &Path, id: &str) -> Result<OciState, SandboxError> {
    let dir = container_dir(root, id)?;
    Ok(Record::read(&dir)?.current(&dir).oci)
}

/// The exit code of a stopped container (1 when its VM ended without one), `None` while it
/// has not stopped.
///
/// # Errors
/// An invalid id or no such container.
pub fn exit_code(root: &Path, id: &str) -> Result<Option<i32>, SandboxError> {
    let dir = container_dir(root, id)?;
    let record = Record::read(&dir)?.current(&dir);
    Ok(match record.oci.status {
        Status::Stopped => Some(record.husk.exit_code.unwrap_or(1)),
        _ => None,
    })
}

/// `list`: every container under `root`, sorted by id.
///
/// # Errors
/// `root` exists but cannot be read.
pub fn list(root: &Path) -> Result<Vec<OciState>, SandboxError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SandboxError::StateDir {
                path: root.to_owned(),
                source,
            })
        }
    };
    let mut states: Vec<OciState> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            Record::read(&e.path())
                .ok()
                .map(|r| r.current(&e.path()).oci)
        })
        .collect();
    states.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(states)
}

/// `start`: lets the created container's process run.
///
/// # Errors
/// No such container, a status other than `created` (runc's messages), or the agent's error.
pub async fn start(root: &Path, id: &str) -> Result<(), SandboxError> {
    let dir = container_dir(root, id)?;
    // A VM takes longer to create than runc's container: a `start` sent while `create` still
    // runs waits for it, until the create's own deadline.
    let (_lock, record) = loop {
        let lock = CommandLock::take(&dir)?;
        let record = Record::read(&dir)?.current(&dir);
        let creating = record.oci.status == Status::Creating
            && unix_ms(SystemTime::now()) < record.husk.create_deadline_ms;
        if !creating {
            break (lock, record);
        }
        drop(lock);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    match record.oci.status {
        Status::Created => {}
        Status::Running => return invalid("cannot start an already running container"),
        Status::Stopped => return invalid("cannot start a container that has stopped"),
        Status::Creating => return invalid("cannot start a container that is being created"),
        Status::Paused => return invalid("cannot start a paused container"),
    }
    let mut agent = agent(&dir).await?;
    agent.start(id).await?;
    let mut record = Record::read(&dir)?;
    record.oci.status = Status::Running;
    record.write(&dir)?;
    // The process runs: poststart hooks get `running` (runc 1.1 still says `created`).
    crate::hooks::run_logged("poststart", &record.husk.hooks.poststart, &record.oci);
    Ok(())
}

/// `kill`: sends `signal` to the container's process (`all`: to every process of the
/// container). The command lock is not held: the record is only read, and a stalled guest must
/// not keep `delete --force` waiting. SIGKILL cannot be refused: when the agent does not take
/// it within its deadline, the container's VM is ended instead.
///
/// # Errors
/// No such container, a container that is not created or running, or the agent's error
/// ([`SandboxError::AgentTimeout`] for a signal other than SIGKILL it did not take in time).
pub async fn kill(root: &Path, id: &str, signal: i32, all: bool) -> Result<(), SandboxError> {
    let dir = container_dir(root, id)?;
    require_live(&dir)?;
    let sent = async { agent(&dir).await?.signal_all(id, signal, all).await }.await;
    match sent {
        Err(e) if signal == Signal::SIGKILL as i32 && crate::agent::unresponsive(&e) => {
            warn!(id, error = %e, "the agent did not take SIGKILL: ending the container's VM");
            end_owner(&dir, &Record::read(&dir)?).await;
            Ok(())
        }
        other => other,
    }
}

/// `delete`: removes a stopped container; `force` also ends a created, running or paused one.
///
/// # Errors
/// No such container (not an error with `force`), or one that is not stopped without `force`.
pub async fn delete(root: &Path, id: &str, force: bool) -> Result<(), SandboxError> {
    let dir = container_dir(root, id)?;
    if !dir.exists() && force {
        return Ok(());
    }
    // A command stalled on a silent guest holds the lock (within its deadlines): `--force`
    // waits for it only a moment and goes on, as it ends the VM anyway.
    let lock = match force {
        true => CommandLock::take_within(&dir, FORCE_LOCK_PATIENCE)?,
        false => Some(CommandLock::take(&dir)?),
    };
    let record = match Record::read(&dir) {
        Ok(record) => record.current(&dir),
        // A directory without a record is debris of a create that died early.
        Err(SandboxError::NotFound { .. }) if force || !owner_alive(&dir) => {
            drop(lock);
            return remove(&dir);
        }
        Err(e) => return Err(e),
    };
    // A created container is not stopped either: the runtime spec's `delete` fails for it
    // without `--force` (runc 1.1 deletes it).
    match record.oci.status {
        Status::Stopped => {}
        status if force => debug!(%status, "deleting by force"),
        status => {
            return invalid(&format!(
                "cannot delete container {id} that is not stopped: {status}"
            ))
        }
    }
    drop(lock);
    end_owner(&dir, &record).await;
    let mut state = record.oci.clone();
    (state.status, state.pid) = (Status::Stopped, 0);
    crate::hooks::run_logged("poststop", &record.husk.hooks.poststop, &state);
    remove(&dir)
}

/// How `exec` builds the process: from a `process.json` (OCI `process` object), or from the
/// container's own config.json with these overrides.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// An OCI `process` JSON file; the other fields are ignored when set.
    pub process_file: Option<PathBuf>,
    /// argv (when no process file).
    pub args: Vec<String>,
    /// `KEY=VALUE` added to the container's env.
    pub env: Vec<String>,
    /// Working directory instead of the container's.
    pub cwd: Option<String>,
    /// `uid[:gid]` instead of the container's user (a missing gid keeps the container's).
    pub user: Option<String>,
    /// Supplementary groups added to the container's user's.
    pub additional_gids: Vec<u32>,
    /// `CAP_*` names added to the container's bounding, effective, permitted and ambient sets.
    pub caps: Vec<String>,
    /// Set `no_new_privs` even if the container's process does not.
    pub no_new_privileges: bool,
    /// Accept a paused container (runc's `--ignore-paused`; husk still refuses it, saying so).
    pub ignore_paused: bool,
    /// Return once started; stdin closed, output discarded.
    pub detach: bool,
    /// A terminal for the process (`--tty`).
    pub terminal: bool,
    /// Where the terminal's master goes; husk's own terminal when `None`.
    pub console_socket: Option<PathBuf>,
}

/// `exec`: runs another process in the running container, with this process's stdio; its exit
/// code (0 for `detach`, the pid then going to `pid_out`).
///
/// # Errors
/// No such container, one not running, an invalid process, or the agent's error (an exec
/// failure names the program).
pub async fn exec(
    root: &Path,
    id: &str,
    request: &ExecRequest,
    on_started: &mut dyn FnMut(u32),
) -> Result<i32, SandboxError> {
    let dir = container_dir(root, id)?;
    let record = Record::read(&dir)?.current(&dir);
    match record.oci.status {
        Status::Running => {}
        Status::Stopped => return invalid("cannot exec in a stopped container"),
        Status::Paused if !request.ignore_paused => {
            return invalid("cannot exec in a paused container (use --ignore-paused to override)")
        }
        // The agent's exec helper would be frozen in the container's cgroup before it could
        // report the process started (runc's exec waits for the thaw).
        Status::Paused => {
            return invalid("husk cannot exec in a paused container, even with --ignore-paused")
        }
        _ => return invalid("cannot exec in a container that is not running"),
    }
    let process = match &request.process_file {
        Some(path) => crate::bundle::process_from_file(path)?,
        None => crate::bundle::exec_process(&record.oci.bundle, id, request)?,
    };
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let mut agent = agent(&dir).await?;
    let pid = agent.exec(id, &exec_id, &process, request.detach).await?;
    if request.detach {
        on_started(pid);
        return Ok(0);
    }
    let outputs = crate::run::attach_stdio(
        &agent,
        id,
        Some(&exec_id),
        process.terminal,
        request.console_socket.as_deref(),
    )
    .await?;
    // Started once its stdio is wired: a terminal's master is then with the console socket,
    // where engines look for it as soon as `exec --detach` returned (conmon).
    on_started(pid);
    let mut waiter = agent.reconnect().await?;
    let wait = waiter.wait_process(id, &exec_id);
    tokio::pin!(wait);
    let mut signals = crate::run::ForwardedSignals::new()?;
    let code = loop {
        tokio::select! {
            code = &mut wait => break code?,
            signo = signals.recv() => agent.signal_process(id, &exec_id, signo).await?,
        }
    };
    outputs.delivered().await;
    Ok(code)
}

/// `pause` (`true`) or `resume`: freezes or thaws the container's processes.
///
/// # Errors
/// No such container, one not running (pause) or not paused (resume), or the agent's error.
pub async fn pause(root: &Path, id: &str, pause: bool) -> Result<(), SandboxError> {
    let dir = container_dir(root, id)?;
    let _lock = CommandLock::take(&dir)?;
    let record = Record::read(&dir)?.current(&dir);
    let (from, to) = match pause {
        true => (Status::Running, Status::Paused),
        false => (Status::Paused, Status::Running),
    };
    if record.oci.status != from {
        return invalid(if pause {
            "container not running"
        } else {
            "container not paused"
        });
    }
    agent(&dir).await?.pause(id, pause).await?;
    let mut record = Record::read(&dir)?;
    record.oci.status = to;
    record.write(&dir)
}

/// `update`: new cgroup limits for a created, running or paused container.
///
/// # Errors
/// No such container, a stopped one, invalid limits, or the agent's error.
pub async fn update(
    root: &Path,
    id: &str,
    resources: &husk_protocol::Resources,
) -> Result<(), SandboxError> {
    resources
        .validate()
        .map_err(|e| SandboxError::InvalidState(format!("invalid resources: {e}")))?;
    let dir = container_dir(root, id)?;
    let _lock = CommandLock::take(&dir)?;
    require_live(&dir)?;
    agent(&dir).await?.update(id, resources).await
}

/// The container's cgroup counters; `None` once it stopped.
///
/// # Errors
/// No such container, or the agent's error.
pub async fn stats(root: &Path, id: &str) -> Result<Option<husk_protocol::Stats>, SandboxError> {
    let dir = container_dir(root, id)?;
    let record = Record::read(&dir)?.current(&dir);
    if !matches!(
        record.oci.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        return Ok(None);
    }
    match agent(&dir).await?.stats(id).await {
        Ok(stats) => Ok(Some(stats)),
        // The container ended while we asked.
        Err(SandboxError::Agent { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `ps`: the container's processes (pids as the guest sees them).
///
/// # Errors
/// No such container, one not running, or the agent's error.
pub async fn processes(root: &Path, id: &str) -> Result<Vec<ProcessInfo>, SandboxError> {
    let dir = container_dir(root, id)?;
    let record = Record::read(&dir)?.current(&dir);
    if !matches!(
        record.oci.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        return invalid("container is not running");
    }
    agent(&dir).await?.processes(id).await
}

/// Ends the process owning the container's VM (its monitor, or a `husk run`): SIGTERM, then
/// SIGKILL to it and to the VMM after [`OWNER_GRACE`].
async fn end_owner(dir: &Path, record: &Record) {
    let owner = record.husk.owner_pid;
    if !owner_alive(dir) && !pid_alive(owner) {
        return;
    }
    if owner > 0 {
        let _ = send_signal(Pid::from_raw(owner), Signal::SIGTERM);
    }
    let deadline = Instant::now() + OWNER_GRACE;
    while owner_alive(dir) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if owner_alive(dir) {
        // Its VM's jails die with it (their launchers' parent-death signal); `state.pid`, a
        // guest-controlled process the host does not reap, is never signalled by number.
        warn!(owner, "owner of the VM did not end; killing it");
        if owner > 0 {
            let _ = send_signal(Pid::from_raw(owner), Signal::SIGKILL);
        }
        let deadline = Instant::now() + OWNER_GRACE;
        while owner_alive(dir) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn remove(dir: &Path) -> Result<(), SandboxError> {
    remove_run_dir(dir).map_err(|source| SandboxError::StateDir {
        path: dir.to_owned(),
        source,
    })
}

async fn agent(dir: &Path) -> Result<AgentClient, SandboxError> {
    AgentClient::connect(
        &husk_hypervisor::vsock_path(dir),
        Instant::now() + AGENT_TIMEOUT,
    )
    .await
}

/// Fails unless the container in `dir` is created, running or paused (its VM is up).
fn require_live(dir: &Path) -> Result<(), SandboxError> {
    let record = Record::read(dir)?.current(dir);
    match record.oci.status {
        Status::Created | Status::Running | Status::Paused => Ok(()),
        _ => invalid("container not running"),
    }
}

fn invalid<T>(message: &str) -> Result<T, SandboxError> {
    Err(SandboxError::InvalidState(message.to_owned()))
}
