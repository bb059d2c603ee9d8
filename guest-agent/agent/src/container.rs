//! Containers of this VM: create (namespaces + container-init), start, wait, signal, stdio.
//!
//! A pod is several containers of one VM: each has its own rootfs (a directory of a shared
//! virtio-fs tag, `Rootfs::VirtioFs::path`) and mount namespace, and may enter namespaces of
//! a container created before it (`ContainerSpec::join_namespaces`, usually the sandbox's net,
//! ipc and uts) instead of getting its own.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use husk_protocol::{
    read_message, write_message, Capabilities, ContainerSpec, ErrorKind, Namespace, ProcessInfo,
    Response, Rootfs, StdioStream,
};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{pipe2, Pid};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::cgroup::Cgroup;
use crate::init::{ctx, mkdir_p, CONTAINERS_DIR};
use crate::reaper::Exits;
use crate::{namespaces, sys};

/// A request's failure, as it goes back to the host.
pub type Failure = (ErrorKind, String);

/// Where container `id`'s rootfs (its virtio-fs share) is mounted in the agent's namespace.
pub fn rootfs_path(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id).join("rootfs")
}

/// Where container `id`'s rootfs share is mounted while a directory of it is bound onto
/// [`rootfs_path`] (`Rootfs::VirtioFs` with a `path`); detached right afterwards.
fn rootfs_share_path(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id).join("share")
}

/// clone(2) flags for the spec's namespaces; the cgroup namespace is made by container-init
/// itself, once it is in its cgroup.
fn clone_flags(namespaces: &[Namespace]) -> CloneFlags {
    namespaces.iter().fold(CloneFlags::empty(), |flags, ns| {
        flags
            | match ns {
                Namespace::Pid => CloneFlags::CLONE_NEWPID,
                Namespace::Net => CloneFlags::CLONE_NEWNET,
                Namespace::Ipc => CloneFlags::CLONE_NEWIPC,
                Namespace::Uts => CloneFlags::CLONE_NEWUTS,
                Namespace::Mount => CloneFlags::CLONE_NEWNS,
                Namespace::User => CloneFlags::CLONE_NEWUSER,
                Namespace::Cgroup => CloneFlags::empty(),
            }
    })
}

/// Where container `id`'s bind-mount shares are mounted, each in a directory named by its tag.
pub fn shares_path(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id).join("shares")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug)]
struct Container {
    pid: Pid,
    /// `pid` entered another container's pid namespace: it is not that namespace's init, so
    /// the container's processes are those of its cgroup, not of the whole namespace.
    joined_pid: bool,
    cgroup: Cgroup,
    state: State,
    sync: Option<UnixStream>,
    io: ProcessIo,
    exit: watch::Receiver<Option<i32>>,
    /// What an exec process takes from the first process's spec.
    exec_defaults: ExecDefaults,
    /// Its rootfs is a disk's file system, which holds writes in the guest's page cache.
    disk_rootfs: bool,
}

/// What an exec process gets from its container's first process unless it asks otherwise (as
/// runc): its capability sets and rlimits, and always its `oom_score_adj` and seccomp profile.
#[derive(Debug, Clone, Default)]
pub struct ExecDefaults {
    /// Given to an exec process without sets of its own.
    pub capabilities: Option<Capabilities>,
    /// Given to an exec process without rlimits of its own (not the agent's limits).
    pub rlimits: Vec<husk_protocol::Rlimit>,
    /// Given to every exec process.
    pub seccomp: Option<husk_protocol::Seccomp>,
    /// Given to every exec process.
    pub oom_score_adj: Option<i32>,
}

/// A running container, as an exec needs it.
#[derive(Debug)]
pub struct Running {
    /// Its first process (whose namespaces the exec joins).
    pub pid: Pid,
    /// Its cgroup (where the exec goes).
    pub cgroup: Cgroup,
    /// What the exec takes from the first process.
    pub exec_defaults: ExecDefaults,
}

/// All containers of the VM.
#[derive(Debug, Clone, Default)]
pub struct Containers {
    map: Arc<Mutex<HashMap<String, Container>>>,
    exits: Exits,
    spare: Arc<Mutex<Option<Spare>>>,
    /// Detaches of waited-for containers' file systems, by container id, each saying when it
    /// is done: a container created again under the id waits for it.
    detaching: Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>,
}

/// The new namespaces of a [`Spare`]: those of a container that runc's, Docker's and Podman's
/// default configurations give (a cgroup namespace is made by container-init itself).
const SPARE_FLAGS: CloneFlags = CloneFlags::CLONE_NEWPID
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWNS);

/// Whether a container of `spec`, joining `joins`, may take the [`Spare`]: it joins nothing
/// and asks for the spare's new namespaces, with or without the network one (the VM's, as
/// Docker, Podman and a pod's sandbox have it: the spare enters it, [`crate::container_init`]).
fn fits_spare(spec: &ContainerSpec, joins: &[(Namespace, Pid)]) -> bool {
    let flags = clone_flags(&spec.namespaces);
    let vm_network = SPARE_FLAGS.difference(CloneFlags::CLONE_NEWNET);
    joins.is_empty() && (flags == SPARE_FLAGS || flags == vm_network)
}

/// A container-init started before any request, in new namespaces ([`SPARE_FLAGS`]), waiting
/// for a spec: the first container that asks for exactly those namespaces and joins none takes
/// it instead of starting its own. The clone, the new namespaces and the exec of the agent are
/// the costliest part of a create in an emulated guest; in a boot snapshot they were paid when
/// the snapshot was made. Its mount namespace, copied before any rootfs existed, receives the
/// container's mounts through [`CONTAINERS_DIR`]'s propagation until container-init makes its
/// mounts private; its uts namespace holds the guest's hostname, as a fresh copy would; its
/// loopback is up already ([`crate::container_init::main_spare`]). Seen from the container,
/// its first process started when the spare did (in a restored VM, before the save).
#[derive(Debug)]
struct Spare {
    pid: Pid,
    sync: OwnedFd,
    io: ProcessIo,
    exit: watch::Receiver<Option<i32>>,
    /// Already its group ([`Cgroup::spare`]), which a container with a cgroup namespace keeps
    /// (it sees the group as `/`): moving a process costs about as much as a clone.
    cgroup: Cgroup,
}

impl Spare {
    /// SIGKILLs the spare unless the reaper has it (its pid may be another process's now).
    fn kill(&self) {
        if self.exit.borrow().is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }

    /// Kills the spare and removes its group.
    async fn end(self) {
        self.kill();
        self.cgroup.remove().await;
    }

    /// The group of container `id` of `spec`, with the spare in it and `spec`'s limits: the
    /// spare's own, or, without a cgroup namespace (the name shows in `/proc/self/cgroup`),
    /// `containers/<id>` as any container's, the spare's own removed. On error `self.cgroup`
    /// names whichever group holds the spare.
    async fn adopt_cgroup(&mut self, id: &str, spec: &ContainerSpec) -> std::io::Result<Cgroup> {
        if spec.namespaces.contains(&Namespace::Cgroup) {
            self.cgroup.set(&spec.resources)?;
            return Ok(self.cgroup.clone());
        }
        let own = Cgroup::create(id, &spec.resources)?;
        let moved = own.add(self.pid);
        if moved.is_err() {
            self.kill();
        }
        let left = std::mem::replace(&mut self.cgroup, own);
        left.remove().await;
        moved.map(|()| self.cgroup.clone())
    }
}

impl Containers {
    /// The exit registry the reaper publishes into.
    pub fn exits(&self) -> Exits {
        self.exits.clone()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        lock(&self.map)
    }

    /// Starts the [`Spare`] container-init in its cgroup (and with it the containers' parent
    /// cgroup), before the agent serves, so that a boot snapshot holds them. A failure only
    /// costs the first create the time it would have saved.
    pub async fn prepare(&self) {
        let cgroup = match Cgroup::spare() {
            Ok(cgroup) => cgroup,
            Err(e) => return eprintln!("husk-agent: spare container-init: {e}"),
        };
        let (pid, sync, gate, io) =
            match spawn_helper(crate::container_init::SPARE_ARG_C, SPARE_FLAGS) {
                Ok(spawned) => spawned,
                Err((_, e)) => {
                    eprintln!("husk-agent: spare container-init: {e}");
                    cgroup.remove().await;
                    return;
                }
            };
        // Registered before any await: the reaper cannot miss its exit.
        let exit = self.exits.watch(pid);
        let placed = cgroup.add(pid).and_then(|()| {
            nix::unistd::write(&gate, &[1])
                .map(drop)
                .map_err(|e| ctx(e, "open the exec gate"))
        });
        let spare = Spare {
            pid,
            sync,
            io,
            exit,
            cgroup,
        };
        match placed {
            Ok(()) => *lock(&self.spare) = Some(spare),
            Err(e) => {
                eprintln!("husk-agent: spare container-init: {e}");
                spare.end().await;
            }
        }
    }

    /// The [`Spare`] if `spec` can take it ([`fits_spare`]) and it has not been stopped or
    /// killed (by a process of the VM's pid namespace); such a one is ended and its group
    /// removed.
    async fn take_spare(&self, spec: &ContainerSpec, joins: &[(Namespace, Pid)]) -> Option<Spare> {
        if !fits_spare(spec, joins) {
            return None;
        }
        let spare = lock(&self.spare).take()?;
        // Still starting (running, paging in) counts as waiting: the spec waits in its socket.
        let stopped = matches!(
            process_state(spare.pid),
            None | Some('T' | 't' | 'Z' | 'X' | 'x')
        );
        if !stopped && spare.exit.borrow().is_none() {
            return Some(spare);
        }
        spare.end().await;
        None
    }

    /// Mounts the rootfs, starts container-init in new namespaces and waits until it is set up.
    pub async fn create(&self, spec: ContainerSpec) -> Result<(), Failure> {
        spec.validate()
            .map_err(|e| (ErrorKind::InvalidRequest, e))?;
        let id = spec.id.clone();
        if self.lock().contains_key(&id) {
            return Err((
                ErrorKind::AlreadyExists,
                format!("container {id:?} already exists"),
            ));
        }
        let joins = self.join_targets(&spec)?;
        let detaching = lock(&self.detaching).get(&id).cloned();
        if let Some(mut detached) = detaching {
            // Done, or its thread is gone.
            let _ = detached.wait_for(|done| *done).await;
        }
        let root = rootfs_path(&id);
        mount_rootfs(&id, &spec.rootfs, spec.rootfs_readonly, &root).map_err(internal)?;
        if let Err(e) = mount_shares(&spec) {
            unmount_all(&id);
            return Err(internal(e));
        }
        let mut spare = self.take_spare(&spec, &joins).await;
        let cgroup = match &mut spare {
            Some(spare) => spare.adopt_cgroup(&id, &spec).await,
            None => Cgroup::create(&id, &spec.resources),
        };
        let cgroup = match cgroup {
            Ok(cgroup) => cgroup,
            Err(e) => {
                if let Some(spare) = spare {
                    spare.end().await;
                }
                unmount_all(&id);
                return Err(internal(e));
            }
        };
        let result = self.spawn(&spec, &joins, spare, cgroup.clone()).await;
        if let Err(e) = &result {
            if let Some(c) = self.lock().remove(&id) {
                let _ = kill(c.pid, Signal::SIGKILL);
            }
            cgroup.remove().await;
            unmount_all(&id);
            return Err(e.clone());
        }
        result
    }

    /// The first process of each container whose namespace `spec` joins, with the namespace:
    /// the container must exist and its first process must not have exited.
    fn join_targets(&self, spec: &ContainerSpec) -> Result<Vec<(Namespace, Pid)>, Failure> {
        let map = self.lock();
        let live = |c: &&Container| c.state != State::Stopped && c.exit.borrow().is_none();
        spec.join_namespaces
            .iter()
            .map(|join| match map.get(&join.container).filter(live) {
                Some(c) => Ok((join.kind, c.pid)),
                None => Err((
                    ErrorKind::InvalidRequest,
                    format!(
                        "cannot join the {:?} namespace of container {:?}: it does not exist or has exited",
                        join.kind, join.container
                    ),
                )),
            })
            .collect()
    }

    async fn spawn(
        &self,
        spec: &ContainerSpec,
        joins: &[(Namespace, Pid)],
        spare: Option<Spare>,
        cgroup: Cgroup,
    ) -> Result<(), Failure> {
        let (pid, sync_parent, io, exit, placed) = match spare {
            Some(spare) => (spare.pid, spare.sync, spare.io, spare.exit, Ok(())),
            None => {
                let (pid, sync_parent, gate_w, io) = spawn_joined(
                    joins,
                    crate::container_init::ARG_C,
                    clone_flags(&spec.namespaces),
                )?;
                // Registered before the next await: the reaper cannot miss this child's exit.
                let exit = self.exits.watch(pid);
                // Before container-init has its spec: it must not run anything outside its
                // cgroup.
                let placed = open_gate(pid, spec, gate_w).and(cgroup.add(pid));
                (pid, sync_parent, io, exit, placed)
            }
        };
        self.lock().insert(
            spec.id.clone(),
            Container {
                pid,
                joined_pid: joins.iter().any(|(ns, _)| *ns == Namespace::Pid),
                cgroup,
                state: State::Creating,
                sync: None,
                io,
                exit,
                exec_defaults: ExecDefaults {
                    capabilities: spec.capabilities.clone(),
                    rlimits: spec.rlimits.clone(),
                    seccomp: spec.seccomp.clone(),
                    oom_score_adj: spec.oom_score_adj,
                },
                disk_rootfs: matches!(spec.rootfs, Rootfs::Block { .. }),
            },
        );
        placed.map_err(internal)?;
        let std_sync = std::os::unix::net::UnixStream::from(sync_parent);
        std_sync.set_nonblocking(true).map_err(internal)?;
        let mut sync = UnixStream::from_std(std_sync).map_err(internal)?;
        write_message(&mut sync, spec)
            .await
            .map_err(|e| internal(format!("send spec: {e}")))?;
        match read_message::<Response, _>(&mut sync).await {
            Ok(Some(Response::Ok)) => {}
            Ok(Some(Response::Error { kind, message })) => return Err((kind, message)),
            Ok(_) => return Err(internal("container init exited during setup".to_owned())),
            Err(e) => return Err(internal(format!("container init: {e}"))),
        }
        let master = match spec.terminal {
            true => Some(receive_terminal(&sync).await?),
            false => None,
        };
        let mut map = self.lock();
        if let Some(c) = map.get_mut(&spec.id) {
            if let Some(master) = master {
                c.io.use_terminal(master)?;
            }
            c.sync = Some(sync);
            c.state = State::Created;
        }
        Ok(())
    }

    /// Lets the container's process run; returns its pid (in the agent's pid namespace).
    pub async fn start(&self, id: &str) -> Result<u32, Failure> {
        let (mut sync, pid, exit) = {
            let mut map = self.lock();
            let c = map.get_mut(id).ok_or_else(|| not_found(id))?;
            if c.state != State::Created {
                return Err((
                    ErrorKind::InvalidState,
                    format!("container {id:?} is not created"),
                ));
            }
            let sync = c.sync.take().ok_or_else(|| not_found(id))?;
            c.state = State::Running;
            // Whatever the host did not attach is closed or drained.
            c.io.discard();
            (sync, c.pid, c.exit.clone())
        };
        sync.write_all(&[1])
            .await
            .map_err(|e| internal(format!("start: {e}")))?;
        match read_message::<Response, _>(&mut sync).await {
            Ok(None) => {
                settle(pid, exit).await;
                u32::try_from(pid.as_raw()).map_err(|e| internal(e.to_string()))
            }
            Ok(Some(Response::Error { kind, message })) => Err((kind, message)),
            Ok(Some(other)) => Err(internal(format!("unexpected start reply {other:?}"))),
            Err(e) => Err(internal(format!("start: {e}"))),
        }
    }

    /// Waits for the process to exit and its output to be delivered; returns the exit code
    /// and whether the OOM killer struck in the container's cgroup.
    pub async fn wait(&self, id: &str) -> Result<(i32, bool), Failure> {
        let (mut exit, mut outputs, cgroup, disk_rootfs) = {
            let map = self.lock();
            let c = map.get(id).ok_or_else(|| not_found(id))?;
            (
                c.exit.clone(),
                c.io.outputs(),
                c.cgroup.clone(),
                c.disk_rootfs,
            )
        };
        let code = match exit.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or_default(),
            Err(_) => return Err(internal("exit status lost".to_owned())),
        };
        // The container ends with its first process: what outlives it (in a pid namespace it
        // shares with another container, or an exec) is killed, as runc's shim does, and no
        // longer holds the output open.
        cgroup.kill_all();
        let _ = outputs.wait_for(|open| *open == 0).await;
        // Only the wait that stops the container detaches its virtio-fs file systems.
        let stopping = match self.lock().get_mut(id) {
            Some(c) => std::mem::replace(&mut c.state, State::Stopped) != State::Stopped,
            None => false,
        };
        let oom_killed = cgroup.oom_killed();
        // The host may end the VM once the exit is reported. A disk's file system holds the
        // container's writes in the guest's page cache: its last detach writes them back, so
        // it is detached first. virtio-fs holds nothing once the container's processes are
        // gone (virtiofsd offers no writeback cache, so a write reaches the host before it
        // returns, and a shared mapping is written back when it is unmapped): its detach,
        // which waits for virtiofsd, runs after the reply. A process that outlived the
        // cgroup's end would keep a file system alive, unwritten: then each is written back
        // first (a `syncfs`, which virtiofsd passes on to the host's file system, so not on
        // every exit).
        if !cgroup.remove().await {
            sync_mounts(id);
        }
        match (disk_rootfs, stopping) {
            (true, _) => unmount_all(id),
            (false, true) => self.detach_later(id),
            (false, false) => {}
        }
        Ok((code, oom_killed))
    }

    /// Detaches container `id`'s file systems on a thread of its own ([`Containers::detaching`]).
    fn detach_later(&self, id: &str) {
        let owned = id.to_owned();
        let (done, detached) = watch::channel(false);
        let mut pending = lock(&self.detaching);
        pending.retain(|_, detached| !*detached.borrow());
        pending.insert(id.to_owned(), detached);
        drop(pending);
        tokio::task::spawn_blocking(move || {
            unmount_all(&owned);
            let _ = done.send(true);
        });
    }

    /// Forgets a container whose exit was waited for ([`Containers::wait`] removed its cgroup
    /// and mounts).
    pub fn delete(&self, id: &str) -> Result<(), Failure> {
        let mut map = self.lock();
        let c = map.get(id).ok_or_else(|| not_found(id))?;
        if c.state != State::Stopped {
            return Err((
                ErrorKind::InvalidState,
                format!("container {id:?} has not been waited for after its exit"),
            ));
        }
        map.remove(id);
        Ok(())
    }

    /// Freezes (`pause`) or thaws the container's cgroup.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), Failure> {
        let (from, to) = match pause {
            true => (State::Running, State::Paused),
            false => (State::Paused, State::Running),
        };
        let cgroup = {
            let map = self.lock();
            let c = map.get(id).ok_or_else(|| not_found(id))?;
            if c.state != from {
                let what = if pause { "running" } else { "paused" };
                return Err((
                    ErrorKind::InvalidState,
                    format!("container {id:?} is not {what}"),
                ));
            }
            c.cgroup.clone()
        };
        cgroup.freeze(pause).await.map_err(internal)?;
        if let Some(c) = self.lock().get_mut(id) {
            if c.state == from {
                c.state = to;
            }
        }
        Ok(())
    }

    /// Sets the window size of the container's terminal.
    pub fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), Failure> {
        let map = self.lock();
        let c = map.get(id).ok_or_else(|| not_found(id))?;
        c.io.resize(rows, cols).unwrap_or_else(|| {
            Err((
                ErrorKind::InvalidState,
                format!("container {id:?} has no terminal"),
            ))
        })
    }

    /// Changes the container's cgroup limits.
    pub fn update(&self, id: &str, resources: &husk_protocol::Resources) -> Result<(), Failure> {
        resources
            .validate()
            .map_err(|e| (ErrorKind::InvalidRequest, e))?;
        let cgroup = self
            .lock()
            .get(id)
            .ok_or_else(|| not_found(id))?
            .cgroup
            .clone();
        cgroup.set(resources).map_err(internal)
    }

    /// The container's cgroup counters.
    pub fn stats(&self, id: &str) -> Result<husk_protocol::Stats, Failure> {
        let cgroup = self
            .lock()
            .get(id)
            .ok_or_else(|| not_found(id))?
            .cgroup
            .clone();
        Ok(cgroup.stats())
    }

    /// What an exec in the running container `id` needs of it.
    pub fn running(&self, id: &str) -> Result<Running, Failure> {
        let map = self.lock();
        let c = map.get(id).ok_or_else(|| not_found(id))?;
        match c.state {
            State::Running => Ok(Running {
                pid: c.pid,
                cgroup: c.cgroup.clone(),
                exec_defaults: c.exec_defaults.clone(),
            }),
            _ => Err((
                ErrorKind::InvalidState,
                format!("container {id:?} is not running"),
            )),
        }
    }

    /// The container's first process and its others: everything in its pid namespace, or in
    /// its cgroup when it joined another container's pid namespace.
    fn members(&self, id: &str) -> Result<Vec<Pid>, Failure> {
        let (pid, joined_pid, cgroup) = {
            let map = self.lock();
            let c = map.get(id).ok_or_else(|| not_found(id))?;
            (c.pid, c.joined_pid, c.cgroup.clone())
        };
        let mut pids = vec![pid];
        match joined_pid {
            true => pids.extend(cgroup.pids().into_iter().filter(|&p| p != pid)),
            false => pids.extend(same_pid_namespace(pid)),
        }
        Ok(pids)
    }

    /// The container's processes (see [`Containers::members`]).
    pub fn processes(&self, id: &str) -> Result<Vec<ProcessInfo>, Failure> {
        let mut pids = self.members(id)?;
        pids.sort_by_key(|p| p.as_raw());
        Ok(pids.into_iter().filter_map(process_info).collect())
    }

    /// Sends `signal` to the container's first process, or with `all` to every process of
    /// the container (see [`Containers::members`]).
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), Failure> {
        let sig = parse_signal(signal)?;
        let pids = match all {
            true => self.members(id)?,
            false => vec![self.lock().get(id).ok_or_else(|| not_found(id))?.pid],
        };
        for pid in pids {
            match kill(pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(internal(ctx(e, "kill"))),
            }
        }
        Ok(())
    }

    /// Hands out one stdio stream of a created container, once.
    pub fn attach(&self, id: &str, stream: StdioStream) -> Result<Attached, Failure> {
        let mut map = self.lock();
        let c = map.get_mut(id).ok_or_else(|| not_found(id))?;
        c.io.attach(stream).ok_or_else(|| {
            (
                ErrorKind::InvalidState,
                format!("{stream:?} of {id:?} is attached already or gone"),
            )
        })
    }
}

/// A stdio stream handed to a host connection.
#[derive(Debug)]
pub enum Attached {
    /// Write end of the container's stdin pipe.
    Stdin(OwnedFd),
    /// Read end of an output pipe, and the count to decrement at its end.
    Output(OwnedFd, Arc<watch::Sender<usize>>),
}

/// Copies host bytes into the container's stdin until the host closes its side.
pub async fn copy_stdin<R: tokio::io::AsyncRead + Unpin>(mut from: R, fd: OwnedFd) {
    if is_fifo(&fd) {
        let Ok(mut to) = pipe::Sender::from_owned_fd(fd) else {
            return;
        };
        let _ = tokio::io::copy(&mut from, &mut to).await;
    } else {
        // A terminal's master: blocking writes on tokio's blocking threads.
        let mut to = tokio::fs::File::from_std(std::fs::File::from(fd));
        let _ = tokio::io::copy(&mut from, &mut to).await;
    }
}

fn is_fifo(fd: &OwnedFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFIFO
    })
}

/// A terminal master as a reader: EIO (the terminal's last holder closed it) is the end.
struct PtyReader(tokio::fs::File);

impl tokio::io::AsyncRead for PtyReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// The agent's ends of a process's stdio, each handed to the host once (or drained).
#[derive(Debug)]
pub(crate) struct ProcessIo {
    /// Write end of stdin (a terminal: the master).
    stdin: Option<OwnedFd>,
    /// Read end of stdout (a terminal: the master).
    stdout: Option<OwnedFd>,
    /// Read end of stderr; none with a terminal.
    stderr: Option<OwnedFd>,
    /// The terminal's master, for its window size.
    pty: Option<OwnedFd>,
    /// How many output streams still have output to deliver.
    open_outputs: Arc<watch::Sender<usize>>,
}

impl ProcessIo {
    /// The process's terminal master replaces the pipes: stdin and stdout are the master,
    /// there is no stderr stream.
    pub(crate) fn use_terminal(&mut self, master: OwnedFd) -> Result<(), Failure> {
        self.stdin = Some(master.try_clone().map_err(internal)?);
        self.stdout = Some(master.try_clone().map_err(internal)?);
        self.stderr = None;
        self.pty = Some(master);
        self.open_outputs.send_replace(1);
        Ok(())
    }

    /// Hands out `stream`; `None` when it was handed out already.
    pub(crate) fn attach(&mut self, stream: StdioStream) -> Option<Attached> {
        match stream {
            StdioStream::Stdin => self.stdin.take().map(Attached::Stdin),
            StdioStream::Stdout => self
                .stdout
                .take()
                .map(|fd| Attached::Output(fd, self.open_outputs.clone())),
            StdioStream::Stderr => self
                .stderr
                .take()
                .map(|fd| Attached::Output(fd, self.open_outputs.clone())),
        }
    }

    /// Nobody will attach: stdin reads EOF, output is drained so the process never blocks.
    pub(crate) fn discard(&mut self) {
        self.stdin = None;
        for fd in [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
        {
            tokio::spawn(copy_output(
                fd,
                None::<tokio::io::Sink>,
                self.open_outputs.clone(),
            ));
        }
    }

    /// Watches how many output streams are still open (0: all output delivered).
    pub(crate) fn outputs(&self) -> watch::Receiver<usize> {
        self.open_outputs.subscribe()
    }

    /// Sets the terminal's window size; `None` when the process has no terminal.
    pub(crate) fn resize(&self, rows: u16, cols: u16) -> Option<Result<(), Failure>> {
        self.pty.as_ref().map(|pty| set_winsize(pty, rows, cols))
    }
}

/// Three close-on-exec pipes: the child's ends (its 0, 1, 2) and the agent's. A process with a
/// terminal gets them too, until it replaces them with the terminal it allocates inside the
/// container ([`receive_terminal`], [`ProcessIo::use_terminal`]).
fn stdio_pipes() -> Result<([OwnedFd; 3], ProcessIo), Failure> {
    let (stdin_r, stdin_w) = pipe_pair().map_err(internal)?;
    let (stdout_r, stdout_w) = pipe_pair().map_err(internal)?;
    let (stderr_r, stderr_w) = pipe_pair().map_err(internal)?;
    let (open_outputs, _) = watch::channel(2usize);
    let io = ProcessIo {
        stdin: Some(stdin_w),
        stdout: Some(stdout_r),
        stderr: Some(stderr_r),
        pty: None,
        open_outputs: Arc::new(open_outputs),
    };
    Ok(([stdin_r, stdout_w, stderr_w], io))
}

/// Starts `/proc/self/exe <mode>` (container-init, exec-init) on fresh stdio pipes and a sync
/// socket; it waits at its gate. Returns its pid, the agent's end of the sync socket, the
/// gate's write end and the agent's ends of its stdio.
pub(crate) fn spawn_helper(
    mode: &'static std::ffi::CStr,
    flags: CloneFlags,
) -> Result<(Pid, OwnedFd, OwnedFd, ProcessIo), Failure> {
    let (child, io) = stdio_pipes()?;
    let (sync_parent, sync_child) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| internal(ctx(e, "socketpair")))?;
    let [child_in, child_out, child_err] = &child;
    let fds = [
        child_in.as_fd(),
        child_out.as_fd(),
        child_err.as_fd(),
        sync_child.as_fd(),
    ];
    let (gate_r, gate_w) = pipe_pair().map_err(internal)?;
    let pid = sys::spawn_self(mode, fds, gate_r.as_fd(), flags)
        .map_err(|e| internal(format!("clone: {e}")))?;
    // The child has its own copies now.
    drop(child);
    Ok((pid, sync_parent, gate_w, io))
}

/// [`spawn_helper`] in the namespaces `joins` names (of other containers' first processes).
/// setns(2) changes only the calling thread, so a thread of its own enters them and clones
/// the helper, which inherits them (a pid namespace too: it applies to children); the thread
/// ends right after, so no agent thread ever leaves the agent's namespaces.
fn spawn_joined(
    joins: &[(Namespace, Pid)],
    mode: &'static std::ffi::CStr,
    flags: CloneFlags,
) -> Result<(Pid, OwnedFd, OwnedFd, ProcessIo), Failure> {
    if joins.is_empty() {
        return spawn_helper(mode, flags);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                for (ns, pid) in joins {
                    namespaces::join(*pid, &[*ns]).map_err(internal)?;
                }
                spawn_helper(mode, flags)
            })
            .join()
            .unwrap_or_else(|_| Err(internal("the namespace-joining thread panicked")))
    })
}

/// Receives the terminal master the container's process allocated (after its setup reply).
pub(crate) async fn receive_terminal(sync: &UnixStream) -> Result<OwnedFd, Failure> {
    loop {
        sync.readable().await.map_err(internal)?;
        match sync.try_io(tokio::io::Interest::READABLE, || {
            sys::recv_fd(std::os::fd::AsFd::as_fd(sync))
        }) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(internal(format!("container terminal: {e}"))),
        }
    }
}

/// Copies an output pipe to `to` until EOF (then shuts `to` down), draining into the void if
/// `to` fails, so that the container never blocks on a full pipe; then marks the output done.
pub async fn copy_output<W: tokio::io::AsyncWrite + Unpin>(
    fd: OwnedFd,
    to: Option<W>,
    open_outputs: Arc<watch::Sender<usize>>,
) {
    let mut from: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if is_fifo(&fd) {
        match pipe::Receiver::from_owned_fd(fd) {
            Ok(from) => Box::new(from),
            Err(_) => {
                open_outputs.send_modify(|open| *open = open.saturating_sub(1));
                return;
            }
        }
    } else {
        Box::new(PtyReader(tokio::fs::File::from_std(std::fs::File::from(
            fd,
        ))))
    };
    let delivered = match to {
        Some(mut to) => {
            tokio::io::copy(&mut from, &mut to).await.is_ok() && to.shutdown().await.is_ok()
        }
        None => false,
    };
    if !delivered {
        let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
    }
    open_outputs.send_modify(|open| *open = open.saturating_sub(1));
}

/// Mounts container `id`'s rootfs on `root` (read-only is applied by container-init, except
/// for a disk, which may not be writable at all).
fn mount_rootfs(id: &str, rootfs: &Rootfs, readonly: bool, root: &Path) -> std::io::Result<()> {
    mkdir_p(root)?;
    match rootfs {
        Rootfs::VirtioFs { tag, path: None } => mount_virtiofs(tag, root),
        Rootfs::VirtioFs {
            tag,
            path: Some(path),
        } => mount_share_dir(tag, path, &rootfs_share_path(id), root),
        Rootfs::Block { serial } => {
            let device = block_device(serial)?;
            // A read-only disk cannot be mounted read-write at all.
            let flags = match readonly {
                true => MsFlags::MS_RDONLY,
                false => MsFlags::empty(),
            };
            mount(Some(&device), root, Some("ext4"), flags, None::<&str>).map_err(|e| {
                ctx(
                    e,
                    &format!("mount {} (disk {serial:?}) as ext4", device.display()),
                )
            })
        }
    }
}

fn mount_virtiofs(tag: &str, target: &Path) -> std::io::Result<()> {
    mount(
        Some(tag),
        target,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| ctx(e, &format!("mount virtio-fs {tag:?}")))
}

/// Binds directory `path` of virtio-fs share `tag` onto `root`. The share is mounted on
/// `staging` only until the bind is made, then detached (the bind keeps the file system; a tag
/// mounted again, for another container of the pod, shares its superblock). `path` is opened
/// beneath the share without following symlinks, so that the rootfs is never outside it.
fn mount_share_dir(tag: &str, path: &str, staging: &Path, root: &Path) -> std::io::Result<()> {
    mkdir_p(staging)?;
    mount_virtiofs(tag, staging)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let bound = std::fs::File::open(staging)
        .and_then(|share| {
            openat2(&share, path, how)
                .map_err(|e| ctx(e, &format!("open {path:?} in virtio-fs share {tag:?}")))
        })
        .and_then(|dir| {
            use std::os::fd::AsRawFd;
            let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(
                Some(source.as_str()),
                root,
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(|e| ctx(e, &format!("bind {path:?} of virtio-fs share {tag:?}")))
        });
    let detached =
        umount2(staging, MntFlags::MNT_DETACH).map_err(|e| ctx(e, "detach the rootfs share"));
    bound.and(detached)
}

/// Mounts the virtio-fs share of every bind mount under [`shares_path`], each tag once.
fn mount_shares(spec: &ContainerSpec) -> std::io::Result<()> {
    let dir = shares_path(&spec.id);
    let mut tags: Vec<&str> = spec
        .mounts
        .iter()
        .filter_map(|m| m.source.as_ref().map(|s| s.tag.as_str()))
        .collect();
    tags.sort_unstable();
    tags.dedup();
    for tag in tags {
        let target = dir.join(tag);
        mkdir_p(&target)?;
        mount(
            Some(tag),
            &target,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| ctx(e, &format!("mount virtio-fs share {tag:?}")))?;
    }
    Ok(())
}

/// The mount points of container `id`'s shares in the agent's namespace.
fn share_mounts(id: &str) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(shares_path(id))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
}

/// `syncfs` of container `id`'s rootfs and each of its shares (best effort). Only a directory
/// or a regular file is opened for it (never a FIFO or a device node a share may be).
fn sync_mounts(id: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    for path in std::iter::once(rootfs_path(id)).chain(share_mounts(id)) {
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() || m.is_file()) {
            continue;
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path);
        if let Ok(file) = opened {
            let _ = nix::unistd::syncfs(&file);
        }
    }
}

/// Detaches container `id`'s shares and rootfs from the agent's namespace.
fn unmount_all(id: &str) {
    for share in share_mounts(id) {
        let _ = umount2(&share, MntFlags::MNT_DETACH);
    }
    // Detached right after the bind already; again in case that failed.
    let _ = umount2(&rootfs_share_path(id), MntFlags::MNT_DETACH);
    let _ = umount2(&rootfs_path(id), MntFlags::MNT_DETACH);
}

/// The device node of the virtio-blk disk `serial`. A disk of 0 sectors is probed again
/// first: a VM restored from a boot snapshot knows the saved VM's disk, an empty stand-in,
/// until its driver reads the restored VM's own (its size, its read-only flag).
fn block_device(serial: &str) -> std::io::Result<PathBuf> {
    let mut name = disk_named(serial)?;
    let sectors = std::fs::read_to_string(Path::new("/sys/block").join(&name).join("size"));
    if sectors.is_ok_and(|s| s.trim() == "0") {
        probe_again(&name)?;
        name = disk_named(serial)?;
    }
    Ok(Path::new("/dev").join(name))
}

/// The name (`vda`) of the virtio-blk disk `serial`.
fn disk_named(serial: &str) -> std::io::Result<std::ffi::OsString> {
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let path = Path::new("/sys/block").join(&name).join("serial");
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim_end() == serial) {
            return Ok(name);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no virtio-blk disk with serial {serial:?}"),
    ))
}

/// Unbinds the virtio device of disk `name` from virtio_blk and binds it again: the driver
/// resets the device and reads its size and features anew (the disk is re-added, under the
/// same name while no other disk came meanwhile).
fn probe_again(name: &std::ffi::OsStr) -> std::io::Result<()> {
    let link = std::fs::read_link(Path::new("/sys/block").join(name).join("device"))?;
    let device = link.file_name().ok_or_else(|| {
        std::io::Error::other(format!("disk {name:?}: no virtio device in {link:?}"))
    })?;
    let driver = Path::new("/sys/bus/virtio/drivers/virtio_blk");
    for action in ["unbind", "bind"] {
        std::fs::write(driver.join(action), device.as_encoded_bytes()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{action} {device:?} (virtio_blk): {e}"))
        })?;
    }
    Ok(())
}

/// A signal number from the host: 0 (`None`) only checks that the process exists (kill(2)).
pub(crate) fn parse_signal(signal: i32) -> Result<Option<Signal>, Failure> {
    match signal {
        0 => Ok(None),
        n => Signal::try_from(n).map(Some).map_err(|_| {
            (
                ErrorKind::InvalidRequest,
                format!("invalid signal {signal}"),
            )
        }),
    }
}

/// What /proc says of `pid`; `None` when it is gone.
fn process_info(pid: Pid) -> Option<ProcessInfo> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let name = status
        .lines()
        .find_map(|l| l.strip_prefix("Name:"))
        .map(str::trim)
        .unwrap_or("?");
    Some(ProcessInfo {
        pid: u32::try_from(pid.as_raw()).ok()?,
        ppid: field("PPid:")?,
        uid: field("Uid:")?,
        cmd: if cmd.is_empty() {
            format!("[{name}]")
        } else {
            cmd
        },
    })
}

/// The other processes in `init`'s pid namespace.
fn same_pid_namespace(init: Pid) -> Vec<Pid> {
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(target) = ns(init.as_raw()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != init.as_raw() && ns(pid).as_ref() == Some(&target))
        .map(Pid::from_raw)
        .collect()
}

/// Sets a terminal's window size.
pub(crate) fn set_winsize(pty: &OwnedFd, rows: u16, cols: u16) -> Result<(), Failure> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(pty, size).map_err(|e| internal(format!("set window size: {e}")))
}

/// Lets the cloned child exec container-init, after writing its id maps.
fn open_gate(pid: Pid, spec: &ContainerSpec, gate: OwnedFd) -> std::io::Result<()> {
    write_id_maps(pid, spec)?;
    nix::unistd::write(&gate, &[1])
        .map(drop)
        .map_err(|e| ctx(e, "open the exec gate"))
}

/// Writes `/proc/<pid>/{uid,gid}_map` for a container with a user namespace.
fn write_id_maps(pid: Pid, spec: &ContainerSpec) -> std::io::Result<()> {
    if !spec.namespaces.contains(&Namespace::User) {
        return Ok(());
    }
    for (file, mappings) in [
        ("uid_map", &spec.uid_mappings),
        ("gid_map", &spec.gid_mappings),
    ] {
        let lines: String = mappings
            .iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
            .collect();
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, lines)
            .map_err(|e| std::io::Error::new(e.kind(), format!("write {path}: {e}")))?;
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| ctx(e, "pipe2"))
}

pub(crate) fn not_found(id: &str) -> Failure {
    (
        ErrorKind::NotFound,
        format!("container {id:?} does not exist"),
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn internal(e: impl ToString) -> Failure {
    (ErrorKind::Internal, e.to_string())
}

/// How long `start` waits for the process to settle after its exec.
const SETTLE_LIMIT: Duration = Duration::from_millis(100);
/// The longest pause between two looks at a settling process's state.
const SETTLE_POLL_MAX: Duration = Duration::from_millis(8);

/// Waits until the just-exec'd `pid` first sleeps interruptibly (waiting for a child, a read,
/// a timer) or ends (`exit`, from the reaper), for at most [`SETTLE_LIMIT`]: by then it has run
/// its start-up (such as a shell installing its signal traps), as it would have long before
/// runc's `start` returned on a host CPU; an emulated guest is slower. A busy process costs
/// `start` the limit. The looks grow apart (1, 2, 4, then every 8 ms): each takes the guest's
/// one CPU from the process it waits for.
async fn settle(pid: Pid, mut exit: watch::Receiver<Option<i32>>) {
    let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
    let mut pause = Duration::from_millis(1);
    loop {
        if matches!(
            process_state(pid),
            Some('S' | 'Z' | 'X' | 'x' | 't' | 'T') | None
        ) {
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::select! {
            _ = exit.wait_for(Option::is_some) => return,
            () = tokio::time::sleep(pause.min(deadline - now)) => {}
        }
        pause = (pause * 2).min(SETTLE_POLL_MAX);
    }
}

/// The state letter of process `pid` (`/proc/<pid>/stat`), if it exists.
fn process_state(pid: Pid) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the state follows the last `)` (comm may hold anything).
    let (_, rest) = text.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joining(container: &str) -> ContainerSpec {
        serde_json::from_value(serde_json::json!({
            "id": "app", "rootfs": {"kind": "virtio_fs", "tag": "pod", "path": "app"},
            "rootfs_readonly": false, "hostname": null, "args": ["sh"], "env": [], "cwd": "/",
            "user": {"uid": 0, "gid": 0}, "namespaces": ["mount"],
            "join_namespaces": [{"kind": "net", "container": container}],
        }))
        .unwrap()
    }

    #[test]
    fn test_join_targets_unknown_container_invalid_request() {
        let containers = Containers::default();
        let (kind, message) = containers.join_targets(&joining("sandbox")).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidRequest);
        assert!(message.contains("\"sandbox\""), "{message}");
    }

    #[test]
    fn test_fits_spare_only_its_namespaces_and_no_joins() {
        let with = |namespaces: serde_json::Value| {
            let mut spec = joining("sandbox");
            spec.namespaces = serde_json::from_value(namespaces).unwrap();
            spec
        };
        let defaults = with(serde_json::json!([
            "pid", "net", "ipc", "uts", "mount", "cgroup"
        ]));
        assert!(fits_spare(&defaults, &[]));
        assert!(!fits_spare(
            &defaults,
            &[(Namespace::Net, Pid::from_raw(7))]
        ));
        let user = with(serde_json::json!([
            "pid", "net", "ipc", "uts", "mount", "user"
        ]));
        assert!(!fits_spare(&user, &[]));
        let vm_net = with(serde_json::json!(["pid", "ipc", "uts", "mount"]));
        assert!(fits_spare(&vm_net, &[]));
        let no_pid = with(serde_json::json!(["net", "ipc", "uts", "mount"]));
        assert!(!fits_spare(&no_pid, &[]));
    }

    #[test]
    fn test_clone_flags_joined_kinds_not_new() {
        let flags = clone_flags(&joining("sandbox").namespaces);
        assert_eq!(flags, CloneFlags::CLONE_NEWNS);
    }
}
