//! The jail each VM's host processes run in: `husk-vmm jail --spec FILE` (Firecracker's jailer
//! is the model). The door writes a [`JailSpec`]; the launcher, a small single-threaded process
//! that stays in the host's namespaces only to wait:
//!
//! 1. joins the VM's host cgroup (every `cgroup.procs` file of the spec), and the pod's network
//!    namespace when the spec names one;
//! 2. connects the vhost-user sockets and opens the tap the program is given as descriptors
//!    3, 4, ... (so the program needs neither `connect(2)` nor `CAP_NET_ADMIN`);
//! 3. unshares mount, pid, ipc, uts, cgroup and (without a pod's) net namespaces and forks the
//!    jail's pid 1, which mounts a tmpfs as its root holding only the spec's binds (at their
//!    host paths, read-only unless writable, always `nosuid`, `nodev` but for device nodes),
//!    a fresh `/proc`, and pivots into it;
//! 4. sets rlimits, enters a user namespace of its own in which only root is mapped (to the
//!    host's root, written by the launcher: files stay as accessible as before, while any
//!    capability pid 1 could ever hold is one of that namespace, none over the host), locks
//!    the root-has-no-privilege securebits, drops every capability, sets `no_new_privs`,
//!    installs [`filter`] and execs the program.
//!
//! The jail's pid 1 is the VM's process as the host sees it: every namespace it is in (user,
//! mount, pid, ipc, uts, cgroup, net) is a new one (the net namespace is the pod's when given).
//! The launcher waits for pid 1, relays SIGTERM/SIGINT/SIGHUP/SIGQUIT as SIGKILL (pid 1 of a
//! namespace ignores signals it has no handler for) and SIGUSR1 as itself (husk-vmm blocks
//! and waits for it), and exits with its status (128+N for signal N). Pid 1 dies with the launcher (PR_SET_PDEATHSIG), and the whole jail with pid 1.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pivot_root, ForkResult, Pid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompRule,
};
use serde::{Deserialize, Serialize};

use crate::confine::{compile, rule};
use crate::VmmError;

/// First descriptor number the program gets its connected sockets and tap at.
pub const FIRST_PASSED_FD: RawFd = 3;

/// Descriptors a jailed process may hold (QEMU needs a few per device and vCPU).
const NOFILE: u64 = 4096;

/// One jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailSpec {
    /// An empty directory the jail's root tmpfs is mounted on (in the jail's mount namespace
    /// only: on the host it stays empty).
    pub root: PathBuf,
    /// Host paths seen in the jail at the same paths.
    pub binds: Vec<JailBind>,
    /// `cgroup.procs` files to join before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// A network namespace (nsfs file) to run in; without one the jail has an empty one.
    pub netns: Option<PathBuf>,
    /// Unix sockets connected for the program, as descriptors 3, 4, ... in order.
    pub connect: Vec<PathBuf>,
    /// A tap (in `netns`) opened for the program, as the descriptor after the sockets.
    pub tap: Option<String>,
    /// How many files the launcher inherited, as descriptors 3, 4, ... (memfds: a restored
    /// VM's guest RAM), passed on after the sockets and the tap, in order. Each is opened
    /// again through `/proc/self/fd`, read-write and only if it was open read-write, so only
    /// a file can be passed this way, never a socket, and never one made writable.
    #[serde(default)]
    pub inherited: u8,
    /// Whether the program may still `connect(2)` itself (husk-vmm connects virtiofsd's
    /// sockets while it builds the VM, then forbids it in its own filter).
    pub allow_connect: bool,
    /// The program (a host path, bound into the jail) and its arguments, `argv[0]` first.
    pub argv: Vec<String>,
}

/// A host path bound into the jail at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailBind {
    /// Host path (a symlink is recreated as the same symlink).
    pub path: PathBuf,
    /// Writable; otherwise read-only.
    pub writable: bool,
}

impl JailBind {
    /// A read-only bind.
    #[must_use]
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
        }
    }

    /// A writable bind.
    #[must_use]
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
        }
    }
}

/// What a dynamically linked program needs to start: the system's program and library
/// directories and the dynamic linker's cache, read-only (those the host has).
#[must_use]
pub fn system_binds() -> Vec<JailBind> {
    [
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/bin",
        "/etc/ld.so.cache",
    ]
    .into_iter()
    .filter(|p| Path::new(p).symlink_metadata().is_ok())
    .map(JailBind::ro)
    .collect()
}

/// Runs the launcher for `spec`: returns only on an error before the jail's pid 1 exists;
/// otherwise exits the process with pid 1's status.
///
/// Call it while the process has one thread (it forks and the child goes on allocating).
///
/// # Errors
/// The step that failed (joining the cgroup, a namespace, a socket, the tap, fork).
pub fn launch(spec: &JailSpec) -> Result<std::convert::Infallible, VmmError> {
    let err = |what: String| VmmError::Confine(what);
    // Nothing the spawner left open lives on in the launcher (say, a server's listening socket
    // that would answer for it after its death) but the files it passes: all else it needs it
    // opens itself.
    let first_closed = u32::try_from(FIRST_PASSED_FD).unwrap_or(3) + u32::from(spec.inherited);
    // SAFETY: close_range on this process's own descriptors above stdio and the inherited
    // ones; no Rust object here holds one yet.
    unsafe {
        libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32);
    }
    if spec.argv.is_empty() {
        return Err(err("jail: empty argv".into()));
    }
    join_cgroups(&spec.cgroup_procs).map_err(|e| err(format!("jail: {e}")))?;
    let mut new = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    match &spec.netns {
        Some(netns) => {
            let ns = File::open(netns)
                .map_err(|e| err(format!("jail: netns {}: {e}", netns.display())))?;
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(format!("jail: joining netns {}: {e}", netns.display())))?;
        }
        None => new |= CloneFlags::CLONE_NEWNET,
    }
    let passed = passed_fds(spec)?;
    unshare(new).map_err(|e| err(format!("jail: unshare: {e}")))?;
    // Signals the launcher relays: blocked from here, so none is lost between fork and wait.
    let relayed = relayed_signals();
    relayed
        .thread_block()
        .map_err(|e| err(format!("jail: sigprocmask: {e}")))?;
    // Pid 1 watches this pipe: its end means the launcher is gone.
    let (alive_r, alive_w) = nix::unistd::pipe().map_err(|e| err(format!("jail: pipe: {e}")))?;
    let (userns, userns_mapped) = UsernsSync::new()?;
    // SAFETY: the process has one thread (documented precondition), so the child may allocate.
    match unsafe { fork() }.map_err(|e| err(format!("jail: fork: {e}")))? {
        ForkResult::Child => {
            drop(alive_w);
            drop(userns_mapped);
            let e = child(spec, passed, &alive_r, &relayed, userns);
            let _ = writeln!(std::io::stderr(), "husk-vmm jail: {e}");
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(126) }
        }
        ForkResult::Parent { child } => {
            drop(passed);
            drop(alive_r);
            drop(userns);
            // Pid 1 waits for its maps (or ends when this fails): it is never left unmapped.
            if let Err(e) = userns_mapped.map_root(child) {
                let _ = writeln!(std::io::stderr(), "husk-vmm jail: {e}");
                let _ = kill(child, Signal::SIGKILL);
            }
            let _ = crate::confine::drop_capabilities();
            let _ = nix::sys::prctl::set_no_new_privs();
            let code = supervise(child, &relayed);
            drop(alive_w);
            std::process::exit(code)
        }
    }
}

fn relayed_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Waits for pid 1; relays a termination signal as SIGKILL and SIGUSR1 (husk-vmm's "save the
/// VM now") as itself. Returns the exit code to mirror.
fn supervise(child: Pid, relayed: &SigSet) -> i32 {
    loop {
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as i32,
            Ok(_) => {}
            Err(_) => return 125,
        }
        match relayed.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(Signal::SIGUSR1) => {
                let _ = kill(child, Signal::SIGUSR1);
            }
            Ok(_) => {
                let _ = kill(child, Signal::SIGKILL);
            }
        }
    }
}

/// Connects `spec.connect`, opens the tap and the inherited files, in order; each lands on its
/// descriptor in the child (`FIRST_PASSED_FD` + index).
fn passed_fds(spec: &JailSpec) -> Result<Vec<OwnedFd>, VmmError> {
    let mut fds = Vec::new();
    for path in &spec.connect {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| VmmError::Confine(format!("jail: connecting {}: {e}", path.display())))?;
        fds.push(OwnedFd::from(stream));
    }
    if let Some(tap) = &spec.tap {
        fds.push(open_tap(tap)?);
    }
    for fd in (FIRST_PASSED_FD..).take(usize::from(spec.inherited)) {
        fds.push(reopen_file(fd)?);
    }
    Ok(fds)
}

/// The file open as this process's descriptor `fd`, opened again read-write: refused unless
/// it is a regular file or memfd that `fd` has open read-write already (a file passed
/// read-only never becomes writable in the jail).
fn reopen_file(fd: RawFd) -> Result<OwnedFd, VmmError> {
    let err = |e: String| VmmError::Confine(format!("jail: inherited descriptor {fd}: {e}"));
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .map_err(|e| err(e.to_string()))?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| err("no flags in its fdinfo".into()))?;
    if flags & 0o3 != 0o2 {
        return Err(err("not open read-write".into()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| err(e.to_string()))?;
    match file.metadata() {
        Ok(meta) if meta.is_file() => Ok(file.into()),
        _ => Err(err("not a file".into())),
    }
}

/// Moves this process into the VM's host cgroup: its pid into every `cgroup.procs` file of
/// `cgroup_procs` (the jail launcher, the sentinel and the memory copy of a restore).
///
/// # Errors
/// One line naming the file that could not be written.
pub fn join_cgroups(cgroup_procs: &[PathBuf]) -> Result<(), String> {
    for procs in cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", procs.display()))?;
    }
    Ok(())
}

/// Opens an existing tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as QEMU's own tap code does).
fn open_tap(name: &str) -> Result<OwnedFd, VmmError> {
    let err = |e: String| VmmError::Confine(format!("jail: tap {name}: {e}"));
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err(e.to_string()))?;
    let mut ifr = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(err("bad interface name".into()));
    }
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = u16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
        .map_err(|e| err(e.to_string()))?;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86_64), which `ifr` is.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    Ok(OwnedFd::from(tun))
}

/// Pid 1's byte to the launcher: in a user namespace of its own, to be mapped.
const ENTERED: u8 = b'u';
/// Pid 1's byte to the launcher: the kernel gave it no user namespace.
const NOT_ENTERED: u8 = b'n';

/// The handshake that gives pid 1 its user namespace: pid 1 unshares it and says so, the
/// launcher (outside it, still privileged) writes its uid and gid maps and says so.
struct UsernsSync {
    /// Pid 1 writes a byte once it is in its namespace.
    entered: OwnedFd,
    /// The launcher's byte: the maps are written.
    mapped: OwnedFd,
}

/// The launcher's ends of [`UsernsSync`], and the host's `/proc`, opened before pid 1's
/// `pivot_root` moves the launcher's root (they share the mount namespace) into the jail.
struct UsernsMapper {
    entered: OwnedFd,
    mapped: OwnedFd,
    proc: OwnedFd,
}

impl UsernsSync {
    fn new() -> Result<(Self, UsernsMapper), VmmError> {
        let err = |e: nix::Error| VmmError::Confine(format!("jail: pipe: {e}"));
        let (entered_r, entered_w) = nix::unistd::pipe().map_err(err)?;
        let (mapped_r, mapped_w) = nix::unistd::pipe().map_err(err)?;
        let proc = nix::fcntl::open(
            "/proc",
            nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| VmmError::Confine(format!("jail: /proc: {e}")))?;
        Ok((
            Self {
                entered: entered_w,
                mapped: mapped_r,
            },
            UsernsMapper {
                entered: entered_r,
                mapped: mapped_w,
                proc,
            },
        ))
    }

    /// In pid 1: unshares the user namespace and waits until the launcher mapped it. A host
    /// kernel built without user namespaces gets one warning line and the rest of the jail;
    /// any other failure (namespaces switched off or used up) fails the launch.
    fn enter(self) -> Result<(), VmmError> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            VmmError::Confine(format!("user namespace: {what}: {e}"))
        };
        let entered = match unshare(CloneFlags::CLONE_NEWUSER) {
            Ok(()) => ENTERED,
            Err(e @ nix::Error::EINVAL) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "husk-vmm jail: warning: no user namespace of its own ({e}): the host kernel has none"
                );
                NOT_ENTERED
            }
            Err(e) => return Err(err("unshare", &e)),
        };
        nix::unistd::write(&self.entered, &[entered])
            .map_err(|e| err("signal the launcher", &e))?;
        drop(self.entered);
        if entered == NOT_ENTERED {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        match nix::unistd::read(&self.mapped, &mut byte) {
            Ok(1) => Ok(()),
            _ => Err(VmmError::Confine(
                "user namespace: the launcher did not map it".into(),
            )),
        }
    }
}

impl UsernsMapper {
    /// In the launcher: once `child` is in its user namespace, maps root (only) to the host's
    /// root in it and lets it go on.
    fn map_root(self, child: Pid) -> Result<(), VmmError> {
        let mut byte = [0u8; 1];
        let entered = nix::unistd::read(&self.entered, &mut byte);
        if !matches!(entered, Ok(1)) || byte[0] != ENTERED {
            // Pid 1 failed before (its error is on stderr; the launcher reaps it), or has no
            // user namespace to map.
            return Ok(());
        }
        for (file, map) in [("uid_map", "0 0 1\n"), ("gid_map", "0 0 1\n")] {
            let path = format!("{child}/{file}");
            let err = |e: nix::Error| VmmError::Confine(format!("jail: writing /proc/{path}: {e}"));
            let fd = nix::fcntl::openat(
                &self.proc,
                path.as_str(),
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(err)?;
            nix::unistd::write(&fd, map.as_bytes()).map_err(err)?;
        }
        nix::unistd::write(&self.mapped, b"m")
            .map_err(|e| VmmError::Confine(format!("jail: user namespace mapped: {e}")))?;
        Ok(())
    }
}

/// The jail's pid 1: builds the root, confines itself and execs the program.
fn child(
    spec: &JailSpec,
    passed: Vec<OwnedFd>,
    alive: &OwnedFd,
    relayed: &SigSet,
    userns: UsernsSync,
) -> VmmError {
    match child_steps(spec, passed, alive, relayed, userns) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn child_steps(
    spec: &JailSpec,
    passed: Vec<OwnedFd>,
    alive: &OwnedFd,
    relayed: &SigSet,
    userns: UsernsSync,
) -> Result<std::convert::Infallible, VmmError> {
    let err = |what: &str, e: &dyn std::fmt::Display| VmmError::Confine(format!("{what}: {e}"));
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| err("pdeathsig", &e))?;
    // The launcher may have died before the line above: its pipe end is closed then.
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(alive),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).map_err(|e| err("poll", &e))? > 0 {
        return Err(VmmError::Confine("launcher gone".into()));
    }
    build_root(spec)?;
    nix::unistd::sethostname("husk-vm").map_err(|e| err("hostname", &e))?;
    for (resource, limit) in [
        (nix::sys::resource::Resource::RLIMIT_NOFILE, NOFILE),
        (nix::sys::resource::Resource::RLIMIT_CORE, 0),
    ] {
        nix::sys::resource::setrlimit(resource, limit, limit).map_err(|e| err("rlimit", &e))?;
    }
    // Last of what needs the host's privileges (mounts, hostname, limits) is done.
    userns.enter()?;
    place_fds(passed)?;
    confine_self(spec.allow_connect)?;
    relayed
        .thread_unblock()
        .map_err(|e| err("sigprocmask", &e))?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| err("argv", &e))?;
    let env: Vec<CString> = std::env::var_os("HUSK_LOG")
        .and_then(|v| {
            let mut kv = b"HUSK_LOG=".to_vec();
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .into_iter()
        .collect();
    let e = nix::unistd::execve(&argv[0], &argv, &env);
    Err(err(&format!("exec {}", spec.argv[0]), &e.unwrap_err()))
}

/// A jailed process's own confinement, last before it execs or goes on: root-has-no-privilege
/// securebits locked, no capability, `no_new_privs`, and the jail's seccomp filters.
pub(crate) fn confine_self(allow_connect: bool) -> Result<(), VmmError> {
    let err = |what: &str, e: &dyn std::fmt::Display| VmmError::Confine(format!("{what}: {e}"));
    lock_securebits()?;
    crate::confine::drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| err("no_new_privs", &e))?;
    let self_pid = i64::from(nix::unistd::getpid().as_raw());
    for program in [no_x32(), filter(self_pid, allow_connect)?, unsupported()?] {
        seccompiler::apply_filter(&program).map_err(|e| err("seccomp", &e))?;
    }
    Ok(())
}

/// The jail's root: a tmpfs with the binds and `/proc`, pivoted into, read-only.
fn build_root(spec: &JailSpec) -> Result<(), VmmError> {
    let err = |what: String, e: &dyn std::fmt::Display| VmmError::Confine(format!("{what}: {e}"));
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| err("making / private".into(), &e))?;
    let root = &spec.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )
    .map_err(|e| err(format!("tmpfs on {}", root.display()), &e))?;
    let mut binds = spec.binds.clone();
    binds.sort_by_key(|b| b.path.components().count());
    for bind in &binds {
        place_bind(root, bind)?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(|e| err("mkdir /proc".into(), &e))?;
    // Processes only (no /proc/sys, sysrq-trigger, ...: uid 0 may write those by file mode),
    // read-only.
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        Some("subset=pid"),
    )
    .map_err(|e| err("mounting /proc".into(), &e))?;
    nix::unistd::chdir(root).map_err(|e| err("chdir root".into(), &e))?;
    // The old root is stacked under the new one and detached at once.
    pivot_root(".", ".").map_err(|e| err("pivot_root".into(), &e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the old root".into(), &e))?;
    nix::unistd::chdir("/").map_err(|e| err("chdir /".into(), &e))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(|e| err("read-only root".into(), &e))
}

/// One bind at its host path under `root`: the mount point, the bind, its flags.
fn place_bind(root: &Path, bind: &JailBind) -> Result<(), VmmError> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        VmmError::Confine(format!("{what} {}: {e}", bind.path.display()))
    };
    let relative = bind
        .path
        .strip_prefix("/")
        .map_err(|e| err("bind (not absolute)", &e))?;
    let target = root.join(relative);
    let meta = bind.path.symlink_metadata().map_err(|e| err("bind", &e))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err("mount point for", &e))?;
    }
    if meta.file_type().is_symlink() {
        let link = std::fs::read_link(&bind.path).map_err(|e| err("readlink", &e))?;
        return std::os::unix::fs::symlink(link, &target).map_err(|e| err("symlink", &e));
    }
    if meta.is_dir() {
        if !target.is_dir() {
            std::fs::create_dir(&target).map_err(|e| err("mount point for", &e))?;
        }
    } else if target.symlink_metadata().is_err() {
        File::create(&target).map_err(|e| err("mount point for", &e))?;
    }
    let none: Option<&str> = None;
    mount(Some(&bind.path), &target, none, MsFlags::MS_BIND, none)
        .map_err(|e| err("binding", &e))?;
    let device = meta.file_type().is_char_device() || meta.file_type().is_block_device();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
    if !device {
        flags |= MsFlags::MS_NODEV;
    }
    if device || bind.writable {
        flags |= MsFlags::MS_NOEXEC;
    }
    if !bind.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(none, &target, none, flags, none).map_err(|e| err("remounting", &e))
}

/// Moves the passed descriptors to 3, 4, ... (inherited across exec); closes everything else.
fn place_fds(passed: Vec<OwnedFd>) -> Result<(), VmmError> {
    let err = |e: nix::Error| VmmError::Confine(format!("passing descriptors: {e}"));
    // First out of the way (above any target), then down to their numbers.
    let mut high = Vec::new();
    for fd in passed {
        let moved =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(1000)).map_err(err)?;
        high.push(moved);
    }
    // SAFETY: close_range on numbers this process owns; none is used by Rust objects alive
    // here but `high` (>= 1000) and stdio.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, 999u32, 0u32);
    }
    let count = high.len();
    for (i, fd) in high.iter().enumerate() {
        let target = FIRST_PASSED_FD + RawFd::try_from(i).unwrap_or(RawFd::MAX);
        // SAFETY: dup2 onto a number closed above; the new descriptor is not close-on-exec.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(err(nix::Error::last()));
        }
    }
    // Nothing else crosses into the program: every other descriptor from there up closes.
    let first_free = FIRST_PASSED_FD + RawFd::try_from(count).unwrap_or(RawFd::MAX - 3);
    // SAFETY: close_range on this process's own descriptors; the Rust objects still holding
    // some (`high`) are dropped right after without further use.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            u32::try_from(first_free).unwrap_or(3),
            u32::MAX,
            0u32,
        );
    }
    std::mem::forget(high);
    Ok(())
}

/// SECBIT_NOROOT and friends, locked: uid 0 gains no capability by exec or setuid.
fn lock_securebits() -> Result<(), VmmError> {
    const NOROOT: libc::c_ulong = 1 << 0;
    const NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    let bits = NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) } < 0 {
        return Err(VmmError::Confine(format!(
            "securebits: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Syscalls that kill a jailed process outright (SIGSYS): namespaces, mounts, other
/// processes, the kernel's own state. Everything else is the program's own filter's business
/// (QEMU's `-sandbox`, husk-vmm's allowlist).
const DENIED: &[i64] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_tkill,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_userfaultfd,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_personality,
    // uid 0 owns what is bound in: no mode or owner changes (a setuid disk image, a 0666
    // /dev/kvm).
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    FCHMODAT2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
];

/// `fchmodat2` (Linux 6.6), not in every libc crate yet.
const FCHMODAT2: i64 = 452;

/// Namespace flags no jailed `clone` may carry.
const NEW_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// The jail's filter: [`DENIED`] always; `socket` of any family but `AF_UNIX`; `clone` that
/// does not make a thread or makes a namespace; signals to any process but `self_pid`; and,
/// unless `allow_connect`, `connect`. Each kills the process (SIGSYS).
///
/// # Errors
/// [`VmmError::Confine`] if seccompiler rejects it.
pub fn filter(self_pid: i64, allow_connect: bool) -> Result<BpfProgram, VmmError> {
    let pid = u64::try_from(self_pid).unwrap_or(0);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let af_unix = u64::try_from(libc::AF_UNIX).unwrap_or(1);
    rules.insert(
        libc::SYS_socket,
        vec![rule(0, Len::Dword, Op::Ne, af_unix)?],
    );
    // Not a thread (no CLONE_THREAD), or any namespace bit set: one rule each.
    let thread = libc::CLONE_THREAD as u64;
    let mut clone = vec![rule(0, Len::Qword, Op::MaskedEq(thread), 0)?];
    for bit in (0..64)
        .map(|b| 1u64 << b)
        .filter(|b| NEW_NAMESPACES & b != 0)
    {
        clone.push(rule(0, Len::Qword, Op::MaskedEq(bit), bit)?);
    }
    rules.insert(libc::SYS_clone, clone);
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        rules.insert(nr, vec![rule(0, Len::Dword, Op::Ne, pid)?]);
    }
    if !allow_connect {
        rules.insert(libc::SYS_connect, Vec::new());
    }
    // No way out of the parent-death signal that ties the jail to its launcher.
    let pdeathsig = u64::try_from(libc::PR_SET_PDEATHSIG).unwrap_or(1);
    rules.insert(
        libc::SYS_prctl,
        vec![rule(0, Len::Dword, Op::Eq, pdeathsig)?],
    );
    compile(rules, SeccompAction::Allow, SeccompAction::KillProcess)
}

/// Kills any x32 syscall (number with bit 30 set): seccompiler's filters check the
/// architecture, which x32 shares with x86_64, so a deny-list alone could be walked around
/// on a kernel with x32 support.
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    vec![
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }, // seccomp_data.nr
        sock_filter {
            code: JSET_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: KILL_PROCESS,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: ALLOW,
        },
    ]
}

/// `clone3` fails with ENOSYS (its flags live in memory a filter cannot read; glibc then
/// creates threads with `clone`, which [`filter`] checks), and so does io_uring (its
/// operations, sockets and connects included, pass no filter; QEMU probes it and goes on
/// without).
fn unsupported() -> Result<BpfProgram, VmmError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_clone3,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(enosys))
}

/// Reads a spec written by the door.
///
/// # Errors
/// An unreadable or malformed file, named.
pub fn read_spec(path: &Path) -> Result<JailSpec, VmmError> {
    let text = std::fs::read(path)
        .map_err(|e| VmmError::Confine(format!("jail spec {}: {e}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|e| VmmError::Confine(format!("jail spec {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filters_compile() {
        assert!(filter(1, false).unwrap().len() > DENIED.len());
        assert!(!unsupported().unwrap().is_empty());
    }

    #[test]
    fn test_spec_round_trips_and_rejects_unknown_fields() {
        let spec = JailSpec {
            root: "/r/jail".into(),
            binds: system_binds(),
            cgroup_procs: vec!["/sys/fs/cgroup/x/cgroup.procs".into()],
            netns: None,
            connect: vec!["/r/a.sock".into()],
            tap: Some("tap0".into()),
            inherited: 1,
            allow_connect: false,
            argv: vec!["/usr/bin/qemu-system-x86_64".into(), "-m".into()],
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JailSpec>(&text).unwrap(), spec);
        let bad = text.replacen("{", "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<JailSpec>(&bad).is_err());
    }

    #[test]
    fn test_reopen_file_passes_the_same_file_never_a_socket() {
        use std::os::unix::fs::FileExt;
        let memory = crate::vm::memfd(1 << 20).unwrap();
        memory.write_all_at(b"guest", 4096).unwrap();
        let again = File::from(reopen_file(memory.as_raw_fd()).unwrap());
        let mut buf = [0u8; 5];
        again.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"guest");
        again.write_all_at(b"host", 0).unwrap();
        memory.read_exact_at(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], b"host", "the same file, not a copy");
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = reopen_file(socket.as_raw_fd()).unwrap_err().to_string();
        assert!(err.contains("inherited descriptor"), "{err}");
        let read_only = File::open(format!("/proc/self/fd/{}", memory.as_raw_fd())).unwrap();
        let err = reopen_file(read_only.as_raw_fd()).unwrap_err().to_string();
        assert!(err.contains("not open read-write"), "{err}");
    }
}
