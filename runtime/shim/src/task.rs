//! containerd's Task service over one pod VM.
//!
//! The first container created boots the pod's VM (sized by its bundle); later ones of the
//! same sandbox are created in it by the agent. Each process (a container's own, or an exec)
//! has its stdio relays and a waiter that records its exit and publishes `TaskExit` once its
//! output was written out. Deleting the pod's first container, or the last one, powers the
//! VM off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups::metrics as cg;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageFull};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use husk_protocol::ProcessSpec;
use husk_sandbox::agent::unresponsive;
use husk_sandbox::bundle::{Bundle, PodRole};
use husk_sandbox::pod::PodVm;
use husk_sandbox::SandboxError;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use crate::io::{Relays, StdioPaths};
use crate::logger::Owner;
use crate::shim::{record_launcher_pid, Annotations, ShimConfig};

/// SIGKILL's number: a kill the agent does not take ends the pod's VM instead.
const SIGKILL: i32 = 9;
/// Exit status of a process whose VM went away under it (as SIGKILL).
const EXIT_VM_GONE: u32 = 128 + 9;
/// How long a process that was killed, or could not be started, may take to be seen exited.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// How long the outputs of a process whose VM ended may take to drain.
const DRAIN_AFTER_VM_END: Duration = Duration::from_secs(2);

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    config: ShimConfig,
    /// Held only for a moment, never while the guest is waited for.
    state: Mutex<State>,
    /// Serializes creates (the first boots the pod); held across the guest's work (within its
    /// deadlines), by nothing else.
    creating: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The pod's VM and its first container's id.
    pod: Option<(Arc<PodVm>, String)>,
    containers: HashMap<String, Arc<Container>>,
    /// A container's exit was recorded without its agent's wait (the wait failed, or the
    /// VM seemed gone): its file systems may still be mounted, so the pod powers off through
    /// its agent (which syncs them) rather than being ended at once.
    unwaited: bool,
}

struct Container {
    id: String,
    bundle: PathBuf,
    pod: Arc<PodVm>,
    init: Arc<Process>,
    execs: SyncMutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    /// The started execs that have not exited, by pid.
    fn running_execs(&self) -> HashMap<u32, String> {
        let Ok(execs) = self.execs.lock() else {
            return HashMap::new();
        };
        execs
            .iter()
            .filter(|(_, p)| p.phase() == Phase::Running)
            .map(|(exec_id, p)| (p.pid(), exec_id.clone()))
            .collect()
    }
}

/// How a process ended.
#[derive(Debug, Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

struct Process {
    /// `None` for the container's own process.
    exec_id: Option<String>,
    stdio: StdioPaths,
    /// An exec's process until it is started.
    spec: SyncMutex<Option<ProcessSpec>>,
    phase: SyncMutex<Phase>,
    pid: SyncMutex<u32>,
    relays: Mutex<Option<Relays>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    fn new(exec_id: Option<String>, stdio: StdioPaths, spec: Option<ProcessSpec>) -> Self {
        Self {
            exec_id,
            stdio,
            spec: SyncMutex::new(spec),
            phase: SyncMutex::new(Phase::Created),
            pid: SyncMutex::new(0),
            relays: Mutex::new(None),
            exit: watch::Sender::new(None),
        }
    }

    fn phase(&self) -> Phase {
        self.phase.lock().map_or(Phase::Stopped, |p| *p)
    }

    fn set_phase(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            // Nothing brings a stopped process back.
            if *p != Phase::Stopped {
                *p = phase;
            }
        }
    }

    fn pid(&self) -> u32 {
        self.pid.lock().map_or(0, |p| *p)
    }

    fn set_pid(&self, pid: u32) {
        if let Ok(mut p) = self.pid.lock() {
            *p = pid;
        }
    }

    fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }
}

impl TaskService {
    /// The service of a shim in containerd namespace `namespace`.
    pub fn new(
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        config: ShimConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                publisher,
                exit,
                config,
                state: Mutex::new(State::default()),
                creating: Mutex::new(()),
            }),
        }
    }
}

impl Inner {
    /// What a `binary://` logger of container `id` is told.
    fn owner<'a>(&'a self, id: &'a str) -> Owner<'a> {
        Owner {
            container_id: id,
            namespace: &self.namespace,
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!(topic, error = %e, "event not published");
        }
    }

    async fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.state
            .lock()
            .await
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| error(Code::NOT_FOUND, format!("container {id:?} does not exist")))
    }

    async fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> TtrpcResult<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id).await?;
        let p = match exec_id.is_empty() {
            true => c.init.clone(),
            false => c
                .execs
                .lock()
                .ok()
                .and_then(|e| e.get(exec_id).cloned())
                .ok_or_else(|| {
                    error(
                        Code::NOT_FOUND,
                        format!("process {exec_id:?} of container {id:?} does not exist"),
                    )
                })?,
        };
        Ok((c, p))
    }

    /// The pod to create container `id` (`annotations` from its bundle) in, booting it for
    /// the first container; with the container's role in it.
    async fn pod_for(
        &self,
        id: &str,
        bundle: &Path,
        annotations: &Annotations,
    ) -> TtrpcResult<(Arc<PodVm>, Bundle)> {
        let existing = self.state.lock().await.pod.clone();
        if let Some((pod, sandbox)) = &existing {
            if pod.has_ended() {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("the pod's VM has ended; container {id:?} cannot join it"),
                ));
            }
            let role = PodRole::Member { sandbox };
            let bundle = Bundle::load_in_pod(bundle, id, role).map_err(sandbox_error)?;
            return Ok((pod.clone(), bundle));
        }
        let role = match annotations.is_sandbox {
            true => PodRole::Sandbox,
            false => PodRole::Alone,
        };
        let loaded = Bundle::load_in_pod(bundle, id, role).map_err(sandbox_error)?;
        let grouping = annotations.sandbox_id.as_deref().unwrap_or(id);
        let opts = self.config.pod(&self.namespace, grouping);
        let pod = Arc::new(PodVm::boot(&opts, &loaded).await.map_err(sandbox_error)?);
        record_launcher_pid(&opts.run_dir, pod.launcher_pid());
        self.state.lock().await.pod = Some((pod.clone(), id.to_owned()));
        Ok((pod, loaded))
    }

    async fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> TtrpcResult<u32> {
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .check()
            .map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        if !req.checkpoint.is_empty() {
            return Err(error(
                Code::UNIMPLEMENTED,
                "checkpoint/restore is not supported",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        let annotations =
            Annotations::read(&bundle).map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        let _creating = self.creating.lock().await;
        if self.state.lock().await.containers.contains_key(&req.id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("container {:?} already exists", req.id),
            ));
        }
        for m in &req.rootfs {
            if let Err(e) = containerd_shim::util::mount_rootfs(m, &rootfs).await {
                husk_sandbox::pod::unmount_under(&rootfs);
                return Err(error(
                    Code::INTERNAL,
                    format!("mount {} rootfs at {}: {e}", m.type_, rootfs.display()),
                ));
            }
        }
        let created = self
            .create_in_pod(&req.id, &bundle, &annotations, stdio)
            .await;
        match created {
            Ok(container) => {
                let pid = container.init.pid();
                let mut state = self.state.lock().await;
                state.containers.insert(req.id.clone(), container);
                Ok(pid)
            }
            Err(e) => {
                husk_sandbox::pod::unmount_under(&rootfs);
                let pod = {
                    let mut state = self.state.lock().await;
                    let first = state.pod.as_ref().is_some_and(|(_, s)| *s == req.id);
                    first.then(|| state.pod.take()).flatten()
                };
                if let Some((pod, _)) = pod {
                    // Its first container never came to be: nothing ran in the pod.
                    pod.shutdown(true).await;
                }
                Err(e)
            }
        }
    }

    async fn create_in_pod(
        self: &Arc<Self>,
        id: &str,
        bundle_dir: &Path,
        annotations: &Annotations,
        stdio: StdioPaths,
    ) -> TtrpcResult<Arc<Container>> {
        let (pod, mut bundle) = self.pod_for(id, bundle_dir, annotations).await?;
        bundle.spec.terminal = stdio.terminal;
        pod.create(&mut bundle).await.map_err(sandbox_error)?;
        let process = Arc::new(Process::new(None, stdio, None));
        process.set_pid(pod.vmm_pid().unwrap_or(0));
        let container = Arc::new(Container {
            id: id.to_owned(),
            bundle: bundle_dir.to_owned(),
            pod: pod.clone(),
            init: process.clone(),
            execs: SyncMutex::new(HashMap::new()),
        });
        let streams = pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .attach_streams(id, None, process.stdio.terminal)
            .await
            .map_err(sandbox_error)?;
        let relays = Relays::start(&process.stdio, self.owner(id), streams)
            .await
            .map_err(|e| error(Code::INTERNAL, format!("stdio of {id:?}: {e}")))?;
        *process.relays.lock().await = Some(relays);
        tokio::spawn(watch_exit(self.clone(), container.clone(), process));
        Ok(container)
    }
}

impl Inner {
    async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let (c, p) = self.process(id, exec_id).await?;
        if p.phase() != Phase::Created {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("process {:?} of {id:?} was already started", p.exec_id),
            ));
        }
        let Some(exec_id) = p.exec_id.clone() else {
            let started = async { c.pod.agent().await?.start(id).await }.await;
            if let Err(e) = started {
                // A process that could not be started exits: its task is STOPPED by the time
                // the error returns, as containerd's clients refuse to delete a CREATED one.
                let mut exit = p.exit.subscribe();
                let _ = tokio::time::timeout(EXIT_WAIT, exit.wait_for(Option::is_some)).await;
                return Err(sandbox_error(e));
            }
            p.set_phase(Phase::Running);
            let pid = p.pid();
            let event = ev::TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
            return Ok(pid);
        };
        let spec = p
            .spec
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| error(Code::FAILED_PRECONDITION, "exec already started"))?;
        let pid = c
            .pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .exec(id, &exec_id, &spec, false)
            .await
            .map_err(sandbox_error)?;
        p.set_pid(pid);
        p.set_phase(Phase::Running);
        let streams = c
            .pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .attach_streams(id, Some(&exec_id), spec.terminal)
            .await
            .map_err(sandbox_error)?;
        let relays = Relays::start(&p.stdio, self.owner(id), streams)
            .await
            .map_err(|e| error(Code::INTERNAL, format!("stdio of exec {exec_id:?}: {e}")))?;
        *p.relays.lock().await = Some(relays);
        tokio::spawn(watch_exit(self.clone(), c.clone(), p.clone()));
        let event = ev::TaskExecStarted {
            container_id: id.to_owned(),
            exec_id,
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(pid)
    }

    async fn kill(&self, req: &api::KillRequest) -> TtrpcResult<()> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let signal = i32::try_from(req.signal)
            .map_err(|_| error(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        if p.exited().is_some() && !req.all {
            return Err(error(Code::NOT_FOUND, "process already finished"));
        }
        let sent = async {
            let mut agent = c.pod.agent().await?;
            match &p.exec_id {
                None => agent.signal_all(&req.id, signal, req.all).await,
                Some(exec_id) => agent.signal_process(&req.id, exec_id, signal).await,
            }
        }
        .await;
        match sent {
            Err(_) if p.exited().is_some() || c.pod.has_ended() => Ok(()),
            Err(e) if signal == SIGKILL && unresponsive(&e) => {
                end_unresponsive_pod(&c.pod, &req.id, &e).await;
                Ok(())
            }
            other => other.map_err(sandbox_error),
        }
    }

    async fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(id, exec_id).await?;
        if !exec_id.is_empty() {
            let Some(exit) = p.exited() else {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id:?} of {id:?} is still running"),
                ));
            };
            if let Ok(mut execs) = c.execs.lock() {
                execs.remove(exec_id);
            }
            release_stdio(&p).await;
            return Ok(delete_response(p.pid(), &exit));
        }
        let exit = match (p.exited(), p.phase()) {
            (Some(exit), _) => exit,
            (None, Phase::Created) => {
                // Never started: its process goes, as with runc.
                let killed = async { c.pod.agent().await?.signal_all(id, SIGKILL, true).await };
                if let Err(e) = killed.await {
                    if unresponsive(&e) && !c.pod.has_ended() {
                        end_unresponsive_pod(&c.pod, id, &e).await;
                    }
                }
                let mut rx = p.exit.subscribe();
                let waited = tokio::time::timeout(EXIT_WAIT, rx.wait_for(Option::is_some)).await;
                let seen = waited
                    .ok()
                    .and_then(|r| r.ok().and_then(|exit| exit.clone()));
                match seen {
                    Some(exit) => exit,
                    None => {
                        self.state.lock().await.unwaited = true;
                        vm_gone()
                    }
                }
            }
            (None, _) => {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("container {id:?} is still running"),
                ))
            }
        };
        release_stdio(&p).await;
        // The state lock is not held while the guest is talked to.
        let ending = {
            let mut state = self.state.lock().await;
            state.containers.remove(id);
            let first = state.pod.as_ref().is_some_and(|(_, s)| s == id);
            let waited = state.containers.is_empty() && !state.unwaited;
            match first || waited {
                true => state.pod.take().map(|(pod, _)| (pod, waited)),
                false => None,
            }
        };
        c.pod.remove(id);
        husk_sandbox::pod::unmount_under(&c.bundle.join("rootfs"));
        if let Some((pod, waited)) = ending {
            info!(id, "last or first container of the pod deleted: VM off");
            pod.shutdown(waited).await;
        } else if !c.pod.has_ended() {
            // The pod goes on: its agent forgets the container, so that the id is free again.
            let deleted = async { c.pod.agent().await?.delete(id).await };
            if let Err(e) = deleted.await {
                warn!(id, error = %e, "the agent kept the deleted container");
            }
        }
        let event = ev::TaskDelete {
            container_id: id.to_owned(),
            pid: p.pid(),
            exit_status: exit.status,
            exited_at: Some(exit.at.clone()).into(),
            id: id.to_owned(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(delete_response(p.pid(), &exit))
    }

    async fn exec(&self, req: &api::ExecProcessRequest) -> TtrpcResult<()> {
        let c = self.container(&req.id).await?;
        if c.init.phase() != Phase::Running {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {:?} is not running", req.id),
            ));
        }
        let value = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        // containerd derives an exec's process from the container's, whose host LSM labels
        // (CRI's AppArmor profile on such hosts) were dropped for a pod's container.
        let mut spec = husk_sandbox::bundle::process_from_json(value, true).map_err(|e| {
            error(
                Code::INVALID_ARGUMENT,
                format!("exec {:?}: {e}", req.exec_id),
            )
        })?;
        spec.terminal = req.terminal;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .check()
            .map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        let mut execs = c
            .execs
            .lock()
            .map_err(|_| error(Code::INTERNAL, "exec table poisoned"))?;
        if execs.contains_key(&req.exec_id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("exec {:?} already exists", req.exec_id),
            ));
        }
        let process = Process::new(Some(req.exec_id.clone()), stdio, Some(spec));
        execs.insert(req.exec_id.clone(), Arc::new(process));
        Ok(())
    }

    async fn state(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.process(id, exec_id).await?;
        let status = match p.phase() {
            Phase::Created => Status::CREATED,
            Phase::Running => Status::RUNNING,
            Phase::Paused => Status::PAUSED,
            Phase::Stopped => Status::STOPPED,
        };
        let mut response = api::StateResponse {
            id: id.to_owned(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid(),
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        if let Some(exit) = p.exited() {
            response.exit_status = exit.status;
            response.exited_at = Some(exit.at).into();
        }
        Ok(response)
    }

    async fn pause(&self, id: &str, pause: bool) -> TtrpcResult<()> {
        let c = self.container(id).await?;
        c.pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .pause(id, pause)
            .await
            .map_err(sandbox_error)?;
        let container_id = id.to_owned();
        match pause {
            true => {
                c.init.set_phase(Phase::Paused);
                let event = ev::TaskPaused {
                    container_id,
                    ..Default::default()
                };
                self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
                    .await;
            }
            false => {
                c.init.set_phase(Phase::Running);
                let event = ev::TaskResumed {
                    container_id,
                    ..Default::default()
                };
                self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
                    .await;
            }
        }
        Ok(())
    }

    async fn stats(&self, id: &str) -> TtrpcResult<Any> {
        let c = self.container(id).await?;
        let mut agent = c.pod.agent().await.map_err(sandbox_error)?;
        let stats = agent.stats(id).await.map_err(sandbox_error)?;
        // cgroup v1's message: what containerd 1.6's clients decode, whatever the host's
        // cgroups; the guest's cgroup v2 counters fill it.
        let metrics = cg::Metrics {
            pids: Some(cg::PidsStat {
                current: stats.pids_current,
                limit: stats.pids_max.unwrap_or(0),
                ..Default::default()
            })
            .into(),
            cpu: Some(cg::CPUStat {
                usage: Some(cg::CPUUsage {
                    total: stats.cpu_usage_usec.saturating_mul(1000),
                    user: stats.cpu_user_usec.saturating_mul(1000),
                    kernel: stats.cpu_system_usec.saturating_mul(1000),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            memory: Some(cg::MemoryStat {
                usage: Some(cg::MemoryEntry {
                    usage: stats.memory_current,
                    limit: stats.memory_max.unwrap_or(u64::MAX),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            memory_oom_control: Some(cg::MemoryOomControl {
                oom_kill: stats.oom_kills,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let value = metrics
            .write_to_bytes()
            .map_err(|e| error(Code::INTERNAL, e.to_string()))?;
        Ok(Any {
            type_url: "io.containerd.cgroups.v1.Metrics".to_owned(),
            value,
            ..Default::default()
        })
    }

    async fn shutdown(&self) {
        let pod = {
            let mut state = self.state.lock().await;
            if !state.containers.is_empty() {
                return;
            }
            let waited = !state.unwaited;
            state.pod.take().map(|(pod, _)| (pod, waited))
        };
        if let Some((pod, waited)) = pod {
            // Every container of the pod was deleted: waited for, unless one's wait failed.
            pod.shutdown(waited).await;
        }
        self.exit.signal();
    }
}

/// A deleted process's stdio: its `binary://` logger, if any, ends (or is stopped).
async fn release_stdio(p: &Process) {
    if let Some(relays) = p.relays.lock().await.as_mut() {
        if let Some(status) = relays.release().await {
            debug!(exec_id = ?p.exec_id, %status, "binary logger ended");
        }
    }
}

/// Waits for `p`'s exit (or its VM's end), lets its output drain, records the exit and
/// publishes it (`TaskOOM` first when the OOM killer struck).
async fn watch_exit(inner: Arc<Inner>, c: Arc<Container>, p: Arc<Process>) {
    let id = c.id.as_str();
    let waited =
        async {
            let mut conn = c.pod.agent().await?;
            match &p.exec_id {
                None => conn.wait(id).await,
                Some(exec_id) => conn.wait_process(id, exec_id).await.map(|code| {
                    husk_sandbox::agent::ExitStatus {
                        code,
                        oom_killed: false,
                    }
                }),
            }
        };
    let (status, oom, vm_ended): (u32, bool, bool) = tokio::select! {
        r = waited => match r {
            Ok(exit) => (u32::try_from(exit.code).unwrap_or(EXIT_VM_GONE), exit.oom_killed, false),
            Err(e) => {
                warn!(id, exec_id = ?p.exec_id, error = %e, "exit status lost");
                (EXIT_VM_GONE, false, true)
            }
        },
        reason = c.pod.ended() => {
            warn!(id, exec_id = ?p.exec_id, %reason, "the pod's VM ended");
            (EXIT_VM_GONE, false, true)
        }
    };
    if let Some(relays) = p.relays.lock().await.as_mut() {
        match vm_ended {
            false => relays.delivered().await,
            true => {
                if tokio::time::timeout(DRAIN_AFTER_VM_END, relays.delivered())
                    .await
                    .is_err()
                {
                    relays.abort();
                }
            }
        }
    }
    if vm_ended && p.exec_id.is_none() {
        inner.state.lock().await.unwaited = true;
    }
    let exit = Exit { status, at: now() };
    debug!(id, exec_id = ?p.exec_id, status, "process exited");
    if oom {
        let event = ev::TaskOOM {
            container_id: id.to_owned(),
            ..Default::default()
        };
        inner
            .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
            .await;
    }
    if let Ok(mut phase) = p.phase.lock() {
        *phase = Phase::Stopped;
    }
    p.exit.send_replace(Some(exit.clone()));
    let event = ev::TaskExit {
        container_id: id.to_owned(),
        id: p.exec_id.clone().unwrap_or_else(|| id.to_owned()),
        pid: p.pid(),
        exit_status: exit.status,
        exited_at: Some(exit.at).into(),
        ..Default::default()
    };
    inner
        .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
        .await;
}

/// SIGKILL cannot be refused: when the agent does not take it, the pod's VM ends (every
/// container of the pod with it, as their processes cannot be reached either).
async fn end_unresponsive_pod(pod: &PodVm, id: &str, e: &SandboxError) {
    warn!(id, error = %e, "the agent did not take SIGKILL: ending the pod's VM");
    pod.end_vm().await;
}

/// A `Pids` entry's `info` for exec `exec_id`: runc's shim's `ProcessDetails`, under the type
/// URL containerd's clients decode (the message's full name, without a prefix).
fn process_details(exec_id: &str) -> TtrpcResult<Any> {
    let details = ProcessDetails {
        exec_id: exec_id.to_owned(),
        ..Default::default()
    };
    let value = details
        .write_to_bytes()
        .map_err(|e| error(Code::INTERNAL, e.to_string()))?;
    Ok(Any {
        type_url: ProcessDetails::descriptor().full_name().to_owned(),
        value,
        ..Default::default()
    })
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn vm_gone() -> Exit {
    Exit {
        status: EXIT_VM_GONE,
        at: now(),
    }
}

fn delete_response(pid: u32, exit: &Exit) -> api::DeleteResponse {
    api::DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: Some(exit.at.clone()).into(),
        ..Default::default()
    }
}

fn error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// A sandbox error as containerd's status: what the request asked for is wrong, or not.
fn sandbox_error(e: SandboxError) -> ttrpc::Error {
    let code = match &e {
        SandboxError::InvalidConfig { .. }
        | SandboxError::ReadConfig { .. }
        | SandboxError::MissingRootfs { .. }
        | SandboxError::InvalidId(_) => Code::INVALID_ARGUMENT,
        SandboxError::NotFound { .. } => Code::NOT_FOUND,
        SandboxError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
        SandboxError::InvalidState(_) => Code::FAILED_PRECONDITION,
        SandboxError::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
        _ => Code::INTERNAL,
    };
    error(code, e.to_string())
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!(id = %req.id, bundle = %req.bundle, terminal = req.terminal, "create");
        let event = ev::TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(ev::TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            ..Default::default()
        };
        let pid = self.inner.create(req).await?;
        let event = ev::TaskCreate { pid, ..event };
        self.inner
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.inner.start(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.inner.state(&req.id, &req.exec_id).await
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id).await?;
        let mut rx = p.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| error(Code::INTERNAL, "exit status lost"))?
            .clone()
            .unwrap_or_else(vm_gone);
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        debug!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        self.inner.kill(&req).await?;
        Ok(api::Empty::default())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        info!(id = %req.id, exec_id = %req.exec_id, "delete");
        self.inner.delete(&req.id, &req.exec_id).await
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.exec(&req).await?;
        let event = ev::TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id).await?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        c.pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .resize(&req.id, p.exec_id.as_deref(), rows, cols)
            .await
            .map_err(sandbox_error)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id).await?;
        if req.stdin {
            if let Some(relays) = p.relays.lock().await.as_ref() {
                relays.close_stdin();
            }
        }
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.inner.container(&req.id).await?;
        let processes = c
            .pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .processes(&req.id)
            .await
            .map_err(sandbox_error)?;
        // An exec's pid (from the agent) and the listed ones are both the agent's.
        let execs = c.running_execs();
        let processes = processes
            .into_iter()
            .map(|p| {
                let info = execs.get(&p.pid).map(|e| process_details(e)).transpose()?;
                Ok(ProcessInfo {
                    pid: p.pid,
                    info: info.into(),
                    ..Default::default()
                })
            })
            .collect::<TtrpcResult<_>>()?;
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.inner.pause(&req.id, true).await?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.pause(&req.id, false).await?;
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id).await?;
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let resources = husk_sandbox::bundle::resources_from_json(value)
            .map_err(|e| error(Code::INVALID_ARGUMENT, format!("update {:?}: {e}", req.id)))?;
        c.pod
            .agent()
            .await
            .map_err(sandbox_error)?
            .update(&req.id, &resources)
            .await
            .map_err(sandbox_error)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.inner.stats(&req.id).await?;
        Ok(api::StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match &self.inner.state.lock().await.pod {
            Some((pod, _)) => pod.vmm_pid().unwrap_or(0),
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.shutdown().await;
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_process_details_exec_id_as_runc_shim() {
        let any = process_details("e1").unwrap();

        assert_eq!(any.type_url, "containerd.runc.v1.ProcessDetails");
        let details = ProcessDetails::parse_from_bytes(&any.value).unwrap();
        assert_eq!(details.exec_id, "e1");
    }
}
