//! Both doors start every process that serves a guest (QEMU, husk-vmm, the vsock backend)
//! through `husk-vmm jail` ([`husk_vmm::jail`]): own namespaces, a root holding only what it
//! needs, no capabilities, `no_new_privs`, seccomp with argument filters, rlimits, the VM's
//! host cgroup. This module writes the spec and spawns the launcher.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use husk_vmm::jail::{JailBind, JailSpec};
use tokio::process::{Child, Command};

use crate::helpers;
use crate::HypervisorError;

/// What one jailed process gets besides the system's libraries.
#[derive(Debug, Default)]
pub(crate) struct Jail {
    /// Host paths it sees (at the same paths).
    pub(crate) binds: Vec<JailBind>,
    /// `cgroup.procs` files of the VM's host cgroup.
    pub(crate) cgroup_procs: Vec<PathBuf>,
    /// The pod's network namespace, if it has one.
    pub(crate) netns: Option<PathBuf>,
    /// Sockets connected for it (descriptors 3, 4, ...).
    pub(crate) connect: Vec<PathBuf>,
    /// A tap opened for it (the descriptor after the sockets).
    pub(crate) tap: Option<String>,
    /// Files of this process passed on to it (the descriptors after the tap): a restored
    /// VM's guest RAM, a memfd.
    pub(crate) pass: Vec<OwnedFd>,
    /// Whether it may call `connect(2)` itself.
    pub(crate) allow_connect: bool,
}

/// Device nodes every jailed process may open.
const DEVICES: &[&str] = &["/dev/null", "/dev/urandom"];

/// Makes the VM's directory ([`crate::vm_dir`]), 0700 and empty (what a VM of the same run
/// directory left, if its owner died, is removed first, and so is every VM directory whose
/// run directory is gone), for its sockets, console and logs (before virtiofsd's socket goes
/// there).
pub(crate) fn make_vm_dir(run_dir: &Path) -> Result<(), HypervisorError> {
    let dir = crate::vm_dir(run_dir);
    crate::remove_vm_dir(run_dir);
    crate::sweep_orphaned_vm_dirs();
    let made = dir
        .parent()
        .map_or(Ok(()), private_dir)
        .and_then(|()| crate::claim_vm_dir(run_dir))
        .and_then(|()| private_dir(&dir));
    made.map_err(|source| HypervisorError::Spawn {
        program: "jail",
        source,
    })
}

/// Makes `dir` with mode 0700 unless it exists.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Starts `argv` (a program by its host path, and its arguments) jailed as `name` in
/// `run_dir`: the spec goes to `<run_dir>/<name>.jail.json`, the root is the empty directory
/// `<run_dir>/<name>.root`, stdout and stderr to `log`. Only the VM's directory
/// ([`crate::vm_dir`], made by [`make_vm_dir`] first) is writable in the jail; `run_dir` is not
/// in it.
pub(crate) fn spawn(
    vmm: &Path,
    name: &'static str,
    jail: Jail,
    argv: Vec<String>,
    run_dir: &Path,
    log: &Path,
) -> Result<Child, HypervisorError> {
    let spawn_err = |source| HypervisorError::Spawn {
        program: name,
        source,
    };
    let root = run_dir.join(format!("{name}.root"));
    private_dir(&root).map_err(spawn_err)?;
    let vm_dir = crate::vm_dir(run_dir);
    let mut binds = husk_vmm::jail::system_binds();
    // Device nodes read-only: writing a device still works, changing its node does not.
    binds.extend(DEVICES.iter().map(|d| JailBind::ro(*d)));
    binds.push(JailBind::rw(vm_dir));
    if let Some(program) = argv.first() {
        if !Path::new(program).starts_with("/usr") {
            binds.push(JailBind::ro(program));
        }
    }
    binds.extend(jail.binds);
    // The launcher inherits them as 3, 4, ... (its stdio are 0 to 2).
    let mappings: Vec<FdMapping> = (husk_vmm::jail::FIRST_PASSED_FD..)
        .zip(jail.pass)
        .map(|(child_fd, parent_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    let inherited =
        u8::try_from(mappings.len()).map_err(|e| spawn_err(std::io::Error::other(e)))?;
    let spec = JailSpec {
        root,
        binds,
        cgroup_procs: jail.cgroup_procs,
        netns: jail.netns,
        connect: jail.connect,
        tap: jail.tap,
        inherited,
        allow_connect: jail.allow_connect,
        argv,
    };
    let spec_path = run_dir.join(format!("{name}.jail.json"));
    let text = serde_json::to_vec(&spec).map_err(|e| spawn_err(std::io::Error::other(e)))?;
    std::fs::write(&spec_path, text).map_err(spawn_err)?;
    let mut cmd = Command::new(vmm);
    cmd.arg("jail").arg("--spec").arg(&spec_path);
    cmd.fd_mappings(mappings)
        .map_err(|e| spawn_err(std::io::Error::other(e.to_string())))?;
    helpers::spawn_logged(name, &mut cmd, log, u32::from(inherited))
}

/// The host pid of the jail's pid 1 (the jailed program itself, in namespaces all its own)
/// under the launcher `launcher`; the launcher's own pid before pid 1 exists. The kernel's
/// list of the launcher's children is read: nothing the jailed program writes is believed.
pub(crate) fn jailed_pid(launcher: Option<u32>) -> Option<u32> {
    let launcher = launcher?;
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"));
    let first = children
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok());
    Some(first.unwrap_or(launcher))
}

/// A host path as a jailed program's argument (the jail sees it at the same path).
pub(crate) fn arg(path: &Path) -> Result<String, HypervisorError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| HypervisorError::Spawn {
            program: "jail",
            source: std::io::Error::other(format!("{} is not UTF-8", path.display())),
        })
}

/// The VM's host cgroup, made before any of its processes starts.
pub(crate) fn host_cgroup(
    config: &crate::VmConfig,
) -> Result<Option<crate::cgroup::HostCgroup>, HypervisorError> {
    Ok(config
        .cgroup
        .as_ref()
        .map(crate::cgroup::HostCgroup::create)
        .transpose()?)
}

/// Moves `pid` (a helper the jail did not start, such as virtiofsd) into `cgroup`.
pub(crate) fn adopt(cgroup: Option<&crate::cgroup::HostCgroup>, pid: Option<u32>) {
    let (Some(cgroup), Some(pid)) = (cgroup, pid) else {
        return;
    };
    for procs in cgroup.procs_files() {
        if let Err(e) = std::fs::write(&procs, pid.to_string()) {
            tracing::warn!(pid, procs = %procs.display(), "cannot move a helper into the VM's cgroup: {e}");
        }
    }
}

/// Removes the VM's host cgroup once its processes are gone (off the async runtime: removal
/// waits briefly for the kernel to let go of exited processes).
pub(crate) async fn remove_cgroup(cgroup: Option<crate::cgroup::HostCgroup>) {
    if let Some(cgroup) = cgroup {
        let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
    }
}

/// The container's process as engines see it (`husk-vmm sentinel`, [`husk_vmm::sentinel`]): a
/// process in every namespace and the host cgroup of the VM's jail, adopted by the engine's
/// subreaper (not the door's child), which exits with the container's exit status. Its pid is
/// the container's `state.pid`. Dropped without [`Sentinel::exit`], it exits 137 (killed).
#[derive(Debug)]
pub struct Sentinel {
    pid: u32,
    status: OwnedFd,
    /// Readable once it has exited (`None` if the kernel gave no pidfd).
    pidfd: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
}

/// How long `husk-vmm sentinel` may take to start the sentinel.
const SENTINEL_START: Duration = Duration::from_secs(10);
/// How long [`Sentinel::exit`] waits for the sentinel to have exited.
const SENTINEL_EXIT: Duration = Duration::from_secs(1);

impl Sentinel {
    /// Its host pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Returns once the sentinel has ended: told to, or killed on the host (never, if the
    /// kernel gave no pidfd for it).
    pub async fn ended(&self) {
        match &self.pidfd {
            Some(fd) => drop(fd.readable().await),
            None => std::future::pending().await,
        }
    }

    /// Ends the sentinel with `code` (0..=255; anything else is 255) and waits, briefly, until
    /// it has exited: before the VM (whose pid namespace it is in) goes, which would kill it.
    pub async fn exit(self, code: i32) {
        let byte = u8::try_from(code).unwrap_or(u8::MAX);
        if exited(self.pid) {
            return;
        }
        if let Err(e) = nix::unistd::write(&self.status, &[byte]) {
            tracing::warn!(
                pid = self.pid,
                "cannot give the sentinel its exit status: {e}"
            );
            return;
        }
        let deadline = Instant::now() + SENTINEL_EXIT;
        while !exited(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Whether `pid` has exited (a zombie its reaper has yet to reap, or gone).
#[must_use]
pub fn exited(pid: u32) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        // Only its absence says it is gone (not a /proc we cannot read just now).
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// Starts the VM's [`Sentinel`] in the namespaces of its jail's pid 1 (`jail_pid`, which must
/// not be the launcher `launcher_pid` itself: pid 1 exists once the VMM runs).
pub(crate) async fn sentinel(
    vmm: &Path,
    jail_pid: Option<u32>,
    launcher_pid: Option<u32>,
    cgroup_procs: &[PathBuf],
) -> Result<Sentinel, HypervisorError> {
    let err = |source| HypervisorError::Spawn {
        program: "sentinel",
        source,
    };
    let jail_pid = jail_pid
        .filter(|pid| Some(*pid) != launcher_pid)
        .ok_or(HypervisorError::NotStarted)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| err(std::io::Error::from(e)))?;
    let mut cmd = Command::new(vmm);
    cmd.arg("sentinel").arg("--pid").arg(jail_pid.to_string());
    for procs in cgroup_procs {
        cmd.arg("--cgroup-procs").arg(procs);
    }
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: read,
        child_fd: husk_vmm::sentinel::STATUS_FD,
    }])
    .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    // Its own process group: a terminal's Ctrl-C for husk's group does not end it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let out = tokio::time::timeout(SENTINEL_START, cmd.output())
        .await
        .map_err(|_| err(std::io::Error::other("did not start in time")))?
        .map_err(err)?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>();
    match (out.status.success(), pid) {
        (true, Ok(pid)) if pid > 0 => Ok(Sentinel {
            pid,
            status: write,
            pidfd: i32::try_from(pid)
                .ok()
                .and_then(|pid| husk_vmm::sentinel::pidfd_open(pid, libc::O_NONBLOCK).ok())
                .and_then(|fd| {
                    // SAFETY: the OwnedFd is moved in, valid and open for the AsyncFd's lifetime.
                    unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok()
                }),
        }),
        _ => Err(err(std::io::Error::other(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))),
    }
}

/// A restore's copy of the saved memory file `source` into `memory`, a memfd of its size
/// ([`husk_vmm::snapshot::memory_copy_files`]): by `husk-vmm copy-memory` (the program `vmm`)
/// in the VM's host cgroup (`cgroup_procs`), which so holds the restored guest's RAM as it
/// holds the rest of the VM's memory, within `deadline`.
///
/// # Errors
/// [`HypervisorError::SnapshotMemory`]: the copy failed or took too long.
pub(crate) async fn copy_memory(
    vmm: PathBuf,
    source: std::fs::File,
    memory: std::fs::File,
    cgroup_procs: Vec<PathBuf>,
    deadline: Instant,
) -> Result<(), HypervisorError> {
    let err = HypervisorError::SnapshotMemory;
    let mut cmd = Command::new(&vmm);
    cmd.arg("copy-memory");
    for procs in &cgroup_procs {
        cmd.arg("--cgroup-procs").arg(procs);
    }
    let [source_fd, memory_fd] = husk_vmm::snapshot::COPY_FDS;
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: source.into(),
            child_fd: source_fd,
        },
        FdMapping {
            parent_fd: memory.into(),
            child_fd: memory_fd,
        },
    ])
    .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    crate::sys::kill_with_parent(&mut cmd, 2);
    let out = tokio::time::timeout_at(deadline.into(), cmd.output())
        .await
        .map_err(|_| err(std::io::Error::other("husk-vmm copy-memory took too long")))?
        .map_err(err)?;
    if !out.status.success() {
        return Err(err(std::io::Error::other(format!(
            "husk-vmm copy-memory: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(())
}
