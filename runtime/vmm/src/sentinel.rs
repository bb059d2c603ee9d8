//! The container's process as engines see it: `husk-vmm sentinel --pid PID [--cgroup-procs
//! FILE]...`, with the read end of a pipe as descriptor 3.
//!
//! An engine (conmon under Podman, containerd's runc shim under Docker) takes the pid `create`
//! writes to `--pid-file`, waits for that process as its subreaper and reports its exit status
//! as the container's. With husk the container's process runs in the guest; the sentinel stands
//! for it on the host:
//!
//! 1. it joins the VM's host cgroup and every namespace of the jail's pid 1 `PID` (user, mount,
//!    pid, ipc, uts, net, cgroup: what the runtime spec's tests read of `state.pid`);
//! 2. forks the sentinel proper, prints its host pid on stdout and exits: the sentinel, whose
//!    parent is gone, is adopted by the caller's nearest subreaper (the engine), not by the VM's
//!    owner;
//! 3. the sentinel sets its stdio to `/dev/null`, confines itself as a jailed program is
//!    ([`crate::jail`]: no capabilities, `no_new_privs`, seccomp) and not dumpable, and waits
//!    for one byte on descriptor 3: the container's exit status, which the VM's owner writes
//!    once the container has stopped. It exits with it; 137 (SIGKILL's) when the pipe closes
//!    without one (the owner ended the VM, or died). As it lives in the jail's pid namespace,
//!    it also dies with the VM's process.
//!
//! Nothing the guest controls reaches it but the end of its VM.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::unistd::{fork, ForkResult};

use crate::VmmError;

/// Descriptor the exit status arrives on.
pub const STATUS_FD: i32 = 3;
/// Exit status when the pipe closes without a status: the container was killed with its VM.
pub const KILLED: i32 = 128 + libc::SIGKILL;

/// Runs `husk-vmm sentinel`: returns only on an error before the sentinel exists; otherwise
/// exits the process (0) once the sentinel's pid is printed.
///
/// Call it while the process has one thread (`setns` of a user or mount namespace needs it).
///
/// # Errors
/// The step that failed (the cgroup, the namespaces, fork).
pub fn launch(
    jail_pid: i32,
    cgroup_procs: &[PathBuf],
) -> Result<std::convert::Infallible, VmmError> {
    let err = |what: String| VmmError::Confine(format!("sentinel: {what}"));
    // SAFETY: close_range on this process's own descriptors above the status pipe; no Rust
    // object holds one.
    unsafe {
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
    }
    // SAFETY: descriptor 3 is the status pipe the caller passed (checked by fstat below); the
    // process owns it from here.
    let status = unsafe { OwnedFd::from_raw_fd(STATUS_FD) };
    let is_pipe = nix::sys::stat::fstat(status.as_fd())
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    if !is_pipe {
        return Err(err(format!("descriptor {STATUS_FD} is not a pipe")));
    }
    crate::jail::join_cgroups(cgroup_procs).map_err(err)?;
    let pidfd = pidfd_open(jail_pid, 0).map_err(|e| err(format!("pidfd of {jail_pid}: {e}")))?;
    let mut all = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWCGROUP;
    // A host kernel without user namespaces left pid 1 in ours: nothing to join there.
    if !same_namespace(jail_pid, "user") {
        all |= CloneFlags::CLONE_NEWUSER;
    }
    nix::sched::setns(&pidfd, all)
        .map_err(|e| err(format!("joining the namespaces of {jail_pid}: {e}")))?;
    drop(pidfd);
    // SAFETY: the process has one thread (documented precondition), so the child may allocate.
    match unsafe { fork() }.map_err(|e| err(format!("fork: {e}")))? {
        ForkResult::Child => {
            let e = sentinel(&status);
            let _ = writeln!(std::io::stderr(), "husk-vmm sentinel: {e}");
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(KILLED) }
        }
        ForkResult::Parent { child } => {
            drop(status);
            println!("{child}");
            std::process::exit(0)
        }
    }
}

/// The sentinel: waits for its exit status.
fn sentinel(status: &OwnedFd) -> VmmError {
    let err =
        |what: &str, e: &dyn std::fmt::Display| VmmError::Confine(format!("sentinel: {what}: {e}"));
    // Its parent's stdout is the caller's pipe: this copy closes at once.
    let null = match File::options().read(true).write(true).open("/dev/null") {
        Ok(null) => null,
        Err(e) => return err("/dev/null", &e),
    };
    for fd in 0..3 {
        // SAFETY: dup2 of a descriptor this process owns onto its own stdio numbers.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return err("stdio", &std::io::Error::last_os_error());
        }
    }
    drop(null);
    // Not dumpable: the VM's process (same uid, same user namespace) cannot open its
    // descriptors through /proc.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        return err("dumpable", &e);
    }
    if let Err(e) = crate::jail::confine_self(false) {
        return e;
    }
    let code = read_status(status.as_fd());
    // SAFETY: _exit with the status; nothing to flush.
    unsafe { libc::_exit(code) }
}

/// The status byte, or [`KILLED`] when the pipe closes without one.
fn read_status(fd: BorrowedFd<'_>) -> i32 {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut byte) {
            Ok(1) => return i32::from(byte[0]),
            Err(nix::Error::EINTR) => {}
            _ => return KILLED,
        }
    }
}

/// Whether `pid` is in this process's namespace of `kind` (`/proc/<pid>/ns/<kind>`).
fn same_namespace(pid: i32, kind: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    // Without the namespace files (a kernel without user namespaces) there is none to join.
    match (
        id(format!("/proc/{pid}/ns/{kind}")),
        id(format!("/proc/self/ns/{kind}")),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => true,
    }
}

/// `pidfd_open(2)` of `pid` with `flags` (0, or `O_NONBLOCK`).
///
/// # Errors
/// The kernel's (no such process; ENOSYS before Linux 5.3).
pub fn pidfd_open(pid: i32, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::last_os_error())?;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
