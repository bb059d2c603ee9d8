//! Exec processes: more processes in a running container's namespaces, each started by an
//! `exec-init` helper ([`crate::exec_init`]) that joins the namespaces and spawns it.
//!
//! The helper stays the process's parent and exits with its exit code (128+N for signal N):
//! the reaper reports the helper's exit, and signals go straight to the process.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
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
    copy_output, internal, receive_terminal, set_winsize, spawn_helper, Attached, Containers,
    Failure, StdioFds,
};
use crate::init::ctx;

#[derive(Debug)]
struct Exec {
    /// The process itself (signals go here).
    pid: Pid,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// The terminal's master, when the process has one.
    pty: Option<OwnedFd>,
    /// The helper's exit code, which is the process's.
    exit: watch::Receiver<Option<i32>>,
    open_outputs: Arc<watch::Sender<usize>>,
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
        process: ProcessSpec,
        detach: bool,
    ) -> Result<u32, Failure> {
        validate_id(exec_id).map_err(|e| (ErrorKind::InvalidRequest, format!("exec id: {e}")))?;
        process
            .validate()
            .map_err(|e| (ErrorKind::InvalidRequest, e))?;
        let init_pid = containers.running_pid(id)?;
        let key = (id.to_owned(), exec_id.to_owned());
        if self.lock().contains_key(&key) {
            return Err((
                ErrorKind::AlreadyExists,
                format!("exec {exec_id:?} exists in container {id:?}"),
            ));
        }
        let terminal = process.terminal;
        let (helper, sync_parent, gate_w, stdio) =
            spawn_helper(crate::exec_init::ARG_C, CloneFlags::empty())?;
        // Registered before the next await: the reaper cannot miss the helper's exit.
        let exit = containers.exits().watch(helper);
        // No namespace of its own to prepare: let it run at once.
        nix::unistd::write(&gate_w, &[1]).map_err(|e| internal(ctx(e, "open the exec gate")))?;
        drop(gate_w);
        let StdioFds {
            child,
            mut stdin,
            mut stdout,
            mut stderr,
            mut pty,
        } = stdio;
        drop(child);
        let std_sync = std::os::unix::net::UnixStream::from(sync_parent);
        std_sync.set_nonblocking(true).map_err(internal)?;
        let mut sync = UnixStream::from_std(std_sync).map_err(internal)?;
        let init = ExecInit {
            init_pid: init_pid.as_raw(),
            process,
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
            let master = receive_terminal(&sync).await?;
            stdin = master.try_clone().map_err(internal)?;
            stdout = master.try_clone().map_err(internal)?;
            stderr = None;
            pty = Some(master);
        }
        let outputs = if terminal { 1 } else { 2 };
        let (open_outputs, _) = watch::channel(outputs);
        let open_outputs = Arc::new(open_outputs);
        let mut entry = Exec {
            pid: Pid::from_raw(i32::try_from(pid).map_err(internal)?),
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr,
            pty,
            exit,
            open_outputs: open_outputs.clone(),
        };
        if detach {
            entry.stdin = None;
            for fd in [entry.stdout.take(), entry.stderr.take()]
                .into_iter()
                .flatten()
            {
                tokio::spawn(copy_output(
                    fd,
                    None::<tokio::io::Sink>,
                    open_outputs.clone(),
                ));
            }
        }
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
        let taken = match stream {
            StdioStream::Stdin => e.stdin.take().map(Attached::Stdin),
            StdioStream::Stdout => e
                .stdout
                .take()
                .map(|fd| Attached::Output(fd, e.open_outputs.clone())),
            StdioStream::Stderr => e
                .stderr
                .take()
                .map(|fd| Attached::Output(fd, e.open_outputs.clone())),
        };
        taken.ok_or_else(|| {
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
            (e.exit.clone(), e.open_outputs.subscribe())
        };
        let code = match exit.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or_default(),
            Err(_) => return Err(internal("exit status lost")),
        };
        let _ = outputs.wait_for(|open| *open == 0).await;
        self.lock().remove(&key);
        Ok(code)
    }

    /// Sets the window size of the exec process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), Failure> {
        let map = self.lock();
        let e = map
            .get(&(id.to_owned(), exec_id.to_owned()))
            .ok_or_else(|| not_found(id, exec_id))?;
        let pty = e.pty.as_ref().ok_or_else(|| {
            (
                ErrorKind::InvalidState,
                format!("exec {exec_id:?} has no terminal"),
            )
        })?;
        set_winsize(pty, rows, cols)
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
