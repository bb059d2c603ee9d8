//! Exec processes: more processes in a running container's namespaces, each started by an
//! `exec-init` helper ([`crate::exec_init`]) that joins the namespaces and spawns it.
//!
//! The helper stays the process's parent and exits with its exit code (128+N for signal N):
//! the reaper reports the helper's exit, and signals go straight to the process.
//! An exec process without capability sets of its own gets the first process's, and every one
//! gets its `oom_score_adj` (as runc's: the container's are the defaults of its execs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use husk_protocol::{
    read_message, validate_id, write_message, ErrorKind, ExecInit, ProcessSpec, Response,
    StdioStream,
};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::container::{
    internal, receive_terminal, spawn_helper, Attached, Containers, Failure, ProcessIo,
};
use crate::init::ctx;

#[derive(Debug)]
struct Exec {
    /// The process itself (signals go here).
    pid: Pid,
    io: ProcessIo,
    /// The helper's exit code, which is the process's.
    exit: watch::Receiver<Option<i32>>,
}

/// All exec processes of the VM, by (container id, exec id).
#[derive(Debug, Clone, Default)]
pub struct Execs {
    map: Arc<Mutex<HashMap<(String, String), Exec>>>,
}

impl Execs {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Exec>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `process` in container `id`'s namespaces; returns its pid.
    pub async fn exec(
        &self,
        containers: &Containers,
        id: &str,
        exec_id: &str,
        mut process: ProcessSpec,
        detach: bool,
    ) -> Result<u32, Failure> {
        validate_id(exec_id).map_err(|e| (ErrorKind::InvalidRequest, format!("exec id: {e}")))?;
        process
            .validate()
            .map_err(|e| (ErrorKind::InvalidRequest, e))?;
        let running = containers.running(id)?;
        let (init_pid, cgroup) = (running.pid, running.cgroup);
        let key = (id.to_owned(), exec_id.to_owned());
        if self.lock().contains_key(&key) {
            return Err((
                ErrorKind::AlreadyExists,
                format!("exec {exec_id:?} exists in container {id:?}"),
            ));
        }
        let terminal = process.terminal;
        let (helper, sync_parent, gate_w, mut io) =
            spawn_helper(crate::exec_init::ARG_C, CloneFlags::empty())?;
        // Registered before the next await: the reaper cannot miss the helper's exit.
        let exit = containers.exits().watch(helper);
        // In the container's cgroup before it runs anything: its limits hold the exec too.
        cgroup
            .add(helper)
            .map_err(|e| internal(format!("move exec into the container's cgroup: {e}")))?;
        // No namespace of its own to prepare: let it run at once.
        nix::unistd::write(&gate_w, &[1]).map_err(|e| internal(ctx(e, "open the exec gate")))?;
        drop(gate_w);
        let std_sync = std::os::unix::net::UnixStream::from(sync_parent);
        std_sync.set_nonblocking(true).map_err(internal)?;
        let mut sync = UnixStream::from_std(std_sync).map_err(internal)?;
        let defaults = running.exec_defaults;
        if process.capabilities.is_none() {
            process.capabilities = defaults.capabilities;
        }
        if process.rlimits.is_empty() {
            process.rlimits = defaults.rlimits;
        }
        let init = ExecInit {
            init_pid: init_pid.as_raw(),
            process,
            oom_score_adj: defaults.oom_score_adj,
            seccomp: defaults.seccomp,
        };
        write_message(&mut sync, &init)
            .await
            .map_err(|e| internal(format!("send exec spec: {e}")))?;
        let pid = match read_message::<Response, _>(&mut sync).await {
            Ok(Some(Response::Started { pid })) => pid,
            Ok(Some(Response::Error { kind, message })) => return Err((kind, message)),
            Ok(_) => return Err(internal("exec-init exited during setup")),
            Err(e) => return Err(internal(format!("exec-init: {e}"))),
        };
        if terminal {
            io.use_terminal(receive_terminal(&sync).await?)?;
        }
        if detach {
            io.discard();
        }
        let entry = Exec {
            pid: Pid::from_raw(i32::try_from(pid).map_err(internal)?),
            io,
            exit,
        };
        self.lock().insert(key, entry);
        Ok(pid)
    }

    /// Hands out one stdio stream of an exec process, once.
    pub fn attach(
        &self,
        id: &str,
        exec_id: &str,
        stream: StdioStream,
    ) -> Result<Attached, Failure> {
        let mut map = self.lock();
        let e = map
            .get_mut(&(id.to_owned(), exec_id.to_owned()))
            .ok_or_else(|| not_found(id, exec_id))?;
        e.io.attach(stream).ok_or_else(|| {
            (
                ErrorKind::InvalidState,
                format!("{stream:?} of exec {exec_id:?} is already attached"),
            )
        })
    }

    /// Waits for the exec process to exit and its output to be delivered; its exit code. The
    /// process is forgotten afterwards.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32, Failure> {
        let key = (id.to_owned(), exec_id.to_owned());
        let (mut exit, mut outputs) = {
            let map = self.lock();
            let e = map.get(&key).ok_or_else(|| not_found(id, exec_id))?;
            (e.exit.clone(), e.io.outputs())
        };
        let code = match exit.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or_default(),
            Err(_) => return Err(internal("exit status lost")),
        };
        let _ = outputs.wait_for(|open| *open == 0).await;
        self.lock().remove(&key);
        Ok(code)
    }

    /// Forgets every exec process of container `id` (it was deleted; they ended with it).
    pub fn forget(&self, id: &str) {
        self.lock().retain(|(container, _), _| container != id);
    }

    /// Sets the window size of the exec process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), Failure> {
        let map = self.lock();
        let e = map
            .get(&(id.to_owned(), exec_id.to_owned()))
            .ok_or_else(|| not_found(id, exec_id))?;
        e.io.resize(rows, cols).unwrap_or_else(|| {
            Err((
                ErrorKind::InvalidState,
                format!("exec {exec_id:?} has no terminal"),
            ))
        })
    }

    /// Sends `signal` (0: only check) to the exec process.
    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), Failure> {
        let sig = crate::container::parse_signal(signal)?;
        let pid = self
            .lock()
            .get(&(id.to_owned(), exec_id.to_owned()))
            .ok_or_else(|| not_found(id, exec_id))?
            .pid;
        match kill(pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(internal(ctx(e, "kill"))),
        }
    }
}

fn not_found(id: &str, exec_id: &str) -> Failure {
    (
        ErrorKind::NotFound,
        format!("no exec {exec_id:?} in container {id:?}"),
    )
}
