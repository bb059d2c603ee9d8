//! What the VMM keeps once its VM is built: a seccomp allowlist on every thread (seccompiler)
//! and no capabilities. A VMM taken over by its guest can then run its vCPU, serve its devices
//! and exit, and little else: no new files, no exec, no ptrace, no mounts.
//!
//! The list is what husk-vmm was seen to call after setup (strace in the emulated test host,
//! booting the guest and running a container over vsock and virtio-fs), plus its error and
//! teardown paths. A syscall outside it kills the process (SIGSYS), which the door reports.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::VmmError;

/// Syscalls the running VMM may make.
const ALLOWED: &[i64] = &[
    // vCPU, devices' event loops, irqfd/ioeventfd and their event fds.
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_lseek,
    // virtio-blk: positioned I/O on the disk image, FLUSH.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    // The serial console's capped file (`console::CappedFile`) cuts its old part off.
    libc::SYS_ftruncate,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Hybrid vsock: the host's connections on the Unix socket; vhost-user messages (with file
    // descriptors) to virtiofsd, connected before the filter. `socket` of AF_UNIX only (see
    // `rules`); no `connect`: a guest connecting out to `<uds>_<port>` ends its own VM.
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // Memory, threads (the vCPU thread starts after the filter), locks, time, signals.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_futex,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The allowlist as a BPF program; anything else kills the process.
///
/// # Errors
/// [`VmmError::Confine`] if seccompiler rejects it.
pub fn filter() -> Result<BpfProgram, VmmError> {
    filter_with(&[])
}

/// [`filter`] plus the syscalls `extra`.
///
/// # Errors
/// [`VmmError::Confine`] if seccompiler rejects it.
pub fn filter_with(extra: &[i64]) -> Result<BpfProgram, VmmError> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED
        .iter()
        .chain(extra)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    rules.extend(argument_rules(i64::from(std::process::id()))?);
    compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// `rules` as an x86_64 BPF program: `on_match` where a rule matches, `otherwise` elsewhere.
/// (The VMM's allowlist and the jail's filters.)
pub(crate) fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, VmmError> {
    let filter = SeccompFilter::new(rules, otherwise, on_match, TargetArch::x86_64)
        .map_err(|e| VmmError::Confine(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| VmmError::Confine(e.to_string()))
}

/// A rule of one condition: argument `arg` (of `len`) compared by `op` with `value`.
pub(crate) fn rule(
    arg: u8,
    len: seccompiler::SeccompCmpArgLen,
    op: seccompiler::SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, VmmError> {
    let e = |e: seccompiler::BackendError| VmmError::Confine(format!("seccomp rule: {e}"));
    let condition = seccompiler::SeccompCondition::new(arg, len, op, value).map_err(e)?;
    SeccompRule::new(vec![condition]).map_err(e)
}

/// Syscalls of [`ALLOWED`] allowed only with some arguments:
/// - `ioctl`: KVM's requests (type 0xAE) and the descriptor and terminal queries the standard
///   library makes (FIONBIO, FIOCLEX, FIONCLEX, TCGETS, TIOCGWINSZ);
/// - `socket`: `AF_UNIX` only;
/// - `clone`: threads only (`CLONE_THREAD`);
/// - `tgkill`: the process's own threads (`self_pid`);
/// - `prctl`: anything but `PR_SET_PDEATHSIG` (the VMM dies with its launcher).
fn argument_rules(self_pid: i64) -> Result<Vec<(i64, Vec<SeccompRule>)>, VmmError> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op};
    let mut ioctl = vec![rule(1, Len::Dword, Op::MaskedEq(0xff00), 0xAE00)?];
    for request in [0x5421, 0x5451, 0x5450, 0x5401, 0x5413] {
        ioctl.push(rule(1, Len::Dword, Op::Eq, request)?);
    }
    let thread = libc::CLONE_THREAD as u64;
    let af_unix = libc::AF_UNIX as u64;
    let pid = u64::try_from(self_pid).unwrap_or(0);
    let pdeathsig = u64::try_from(libc::PR_SET_PDEATHSIG).unwrap_or(1);
    Ok(vec![
        (libc::SYS_ioctl, ioctl),
        (
            libc::SYS_socket,
            vec![rule(0, Len::Dword, Op::Eq, af_unix)?],
        ),
        (
            libc::SYS_clone,
            vec![rule(0, Len::Qword, Op::MaskedEq(thread), thread)?],
        ),
        (libc::SYS_tgkill, vec![rule(0, Len::Dword, Op::Eq, pid)?]),
        (
            libc::SYS_prctl,
            vec![rule(0, Len::Dword, Op::Ne, pdeathsig)?],
        ),
    ])
}

/// Makes the syscall `name` names as a guest that took a VMM over would, and returns its
/// result (when a filter lets it through): `connect` (to containerd's socket), `socket-inet`,
/// `tgkill-other`, `clone-newuser`, `chmod` (of /dev/null), `prctl-pdeathsig` (clearing
/// it), `proc-sys` (opening `/proc/sys/kernel/hostname` for writing), or `getpid` (allowed
/// everywhere, the control); `exists:PATH` asks whether PATH can be seen.
#[must_use]
pub fn attempt(name: &str) -> i64 {
    // SAFETY: raw syscalls with scalar arguments or pointers to locals that outlive them; the
    // child of a successful clone leaves at once with _exit.
    unsafe {
        match name {
            "connect" => {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
                for (d, s) in addr
                    .sun_path
                    .iter_mut()
                    .zip(b"/run/containerd/containerd.sock")
                {
                    *d = *s as libc::c_char;
                }
                let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
                    .unwrap_or(0);
                i64::from(libc::connect(fd, std::ptr::addr_of!(addr).cast(), len))
            }
            "chmod" => i64::from(libc::chmod(c"/dev/null".as_ptr(), 0o600)),
            "prctl-pdeathsig" => i64::from(libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0)),
            "proc-sys" => i64::from(libc::open(
                c"/proc/sys/kernel/hostname".as_ptr(),
                libc::O_WRONLY,
            )),
            path if path.starts_with("exists:") => {
                let path = std::ffi::CString::new(&path["exists:".len()..]).unwrap_or_default();
                i64::from(libc::access(path.as_ptr(), libc::F_OK))
            }
            "socket-inet" => i64::from(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)),
            "tgkill-other" => {
                let other = if libc::getpid() == 1 { 2 } else { 1 };
                libc::syscall(libc::SYS_tgkill, other, other, 0)
            }
            "clone-newuser" => {
                let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
                let rc = libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0);
                if rc == 0 {
                    libc::_exit(0);
                }
                rc
            }
            _ => i64::from(libc::getpid()),
        }
    }
}

/// Drops every capability (all sets, bounding and ambient included). Capabilities are per
/// thread: call this while the process has one thread, before the VM's device threads start.
/// Building the VM needs none (root owns /dev/kvm's node and the run directory).
///
/// # Errors
/// [`VmmError::Confine`] naming the set that could not be cleared.
pub fn drop_capabilities() -> Result<(), VmmError> {
    let err = |what: &str, e: caps::errors::CapsError| VmmError::Confine(format!("{what}: {e}"));
    // The bounding set needs CAP_SETPCAP, so it goes first.
    if caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false)
    {
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| err("bounding set", e))?;
    }
    for (name, set) in [
        ("ambient", caps::CapSet::Ambient),
        ("inheritable", caps::CapSet::Inheritable),
        ("effective", caps::CapSet::Effective),
        ("permitted", caps::CapSet::Permitted),
    ] {
        caps::clear(None, set).map_err(|e| err(name, e))?;
    }
    Ok(())
}

/// Installs [`filter`] on every thread of the process (and so on the threads they start).
///
/// # Errors
/// [`VmmError::Confine`] if the kernel refuses the filter.
pub fn install_filter() -> Result<(), VmmError> {
    install_filter_with(&[])
}

/// [`install_filter`] with the syscalls `extra` allowed too (the vsock backend removes its
/// socket files when its session ends).
///
/// # Errors
/// [`VmmError::Confine`] if the kernel refuses the filter.
pub fn install_filter_with(extra: &[i64]) -> Result<(), VmmError> {
    let program = filter_with(extra)?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| VmmError::Confine(format!("seccomp: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filter_compiles_allowlist_no_duplicates() {
        let mut sorted = ALLOWED.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED.len(), "a syscall is listed twice");
        let program = filter().unwrap();
        assert!(
            program.len() > ALLOWED.len(),
            "one check per syscall at least"
        );
    }
}
