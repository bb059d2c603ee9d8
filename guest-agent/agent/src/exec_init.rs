//! `husk-agent exec-init`: starts an exec process inside a running container.
//!
//! Started by [`crate::exec`] with the process's stdin/stdout/stderr and a sync socket on fd 3.
//! It reads an [`ExecInit`], joins the namespaces of the container's first process (ipc, uts,
//! net, pid, mount: the mount namespace's root is the container's root), takes the process's
//! limits, credentials and privileges ([`crate::privileges`], as the container's first
//! process), umask and cwd, and spawns it (a child, so that it is inside the pid
//! namespace). It answers `Started {pid}` (the pid in the agent's namespace) or an error, then
//! waits for the process and exits with its exit code, 128+N when signal N ended it.

use std::ffi::CStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};

use husk_protocol::{decode_body, decode_len, encode, ErrorKind, ExecInit, Response};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chdir, Pid};

use crate::container_init::{find_program, install, DEFAULT_UMASK};
use crate::init::ctx;
use crate::privileges::{self, Privileges};
use crate::{namespaces, sys};

/// The argument that selects this mode.
pub const ARG: &str = "exec-init";
/// [`ARG`] as a C string, for [`sys::spawn_self`].
pub const ARG_C: &CStr = c"exec-init";

pub fn main() -> ExitCode {
    let mut sync = UnixStream::from(sys::inherited_sync_fd());
    let init = match read_init(&mut sync) {
        Ok(init) => init,
        Err(e) => {
            eprintln!("husk-agent exec-init: reading the spec: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = fcntl(&sync, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| ctx(e, "close-on-exec sync socket").to_string())
        .and_then(|_| spawn(&init));
    let (reply, child, master) = match child {
        Ok((child, master)) => (Response::Started { pid: child.id() }, Some(child), master),
        Err(message) => (
            Response::Error {
                kind: ErrorKind::ExecFailed,
                message,
            },
            None,
            None,
        ),
    };
    let sent = encode(&reply)
        .map_err(io::Error::other)
        .and_then(|frame| sync.write_all(&frame))
        .and_then(|()| match &master {
            Some(master) => sys::send_fd(sync.as_fd(), master.as_fd()),
            None => Ok(()),
        });
    drop(master);
    drop(sync);
    let Some(mut child) = child else {
        return ExitCode::from(127);
    };
    if sent.is_err() {
        let _ = child.kill();
    }
    let code = match child.wait() {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|n| 128 + n))
            .unwrap_or(1),
        Err(_) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Joins the container and spawns the process (with a terminal from the container's devpts
/// if it asks for one: its master is returned); the reason when it could not.
fn spawn(init: &ExecInit) -> Result<(std::process::Child, Option<OwnedFd>), String> {
    // Before the mount namespace: its /proc is the container's pid namespace's, where this
    // helper has no /proc/self.
    privileges::set_oom_score_adj(init.oom_score_adj)?;
    // Every namespace (one the container shares with the agent is skipped); the process is
    // spawned below, a child, so that it is inside the pid namespace too.
    namespaces::join(Pid::from_raw(init.init_pid), &namespaces::ALL)
        .map_err(|e| format!("enter the container: {e}"))?;
    let p = &init.process;
    let filters = match &init.seccomp {
        Some(profile) => crate::seccomp::compile(profile)?,
        None => Vec::new(),
    };
    // The container's seccomp profile, as container-init installs it: without `no_new_privs`
    // first, while CAP_SYS_ADMIN is still held; with it, in the child right before exec.
    if !p.no_new_privileges {
        install(&filters)?;
    }
    // Here, not in the child: the child inherits them across fork, and what follows (the
    // terminal, the program's lookup) happens with the process's credentials, as in runc.
    let privileges = Privileges {
        oom_score_adj: None,
        ..Privileges::from(init)
    };
    privileges::apply(&privileges)?;
    umask(Mode::from_bits_truncate(
        p.user.umask.unwrap_or(DEFAULT_UMASK),
    ));
    chdir(p.cwd.as_str()).map_err(|e| format!("chdir to cwd {:?}: {}", p.cwd, e.desc()))?;
    let program = find_program(&p.args[0], &p.env)?;
    let mut cmd = Command::new(program);
    cmd.arg0(&p.args[0]).args(&p.args[1..]).env_clear();
    if p.no_new_privileges && !filters.is_empty() {
        // SAFETY: exec-init is single-threaded, so the child may allocate; install only makes
        // the seccomp syscall on the programs moved in.
        unsafe {
            cmd.pre_exec(move || install(&filters).map_err(io::Error::other));
        }
    }
    let mut master = None;
    if p.terminal {
        let (m, slave) = sys::open_terminal().map_err(|e| format!("open /dev/ptmx: {e}"))?;
        if let Some((rows, cols)) = p.console_size {
            crate::container::set_winsize(&m, rows, cols).map_err(|e| e.1)?;
        }
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("terminal: {e}"));
        cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(slave);
        sys::with_controlling_terminal(&mut cmd);
        master = Some(m);
    }
    for pair in &p.env {
        if let Some((key, value)) = pair.split_once('=') {
            cmd.env(key, value);
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("exec {:?}: {e}", p.args[0]))?;
    Ok((child, master))
}

fn read_init(stream: &mut UnixStream) -> io::Result<ExecInit> {
    let mut header = [0u8; husk_protocol::HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = decode_len(header).map_err(io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    let init: ExecInit = decode_body(&body).map_err(io::Error::other)?;
    init.validate().map_err(io::Error::other)?;
    Ok(init)
}
