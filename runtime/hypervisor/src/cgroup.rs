//! The container's cgroup on the host, which holds its VM's host processes (VMM or QEMU, device
//! backends, virtiofsd), so that the kubelet and cgroup accounting see the VM as the container.
//!
//! [`HostCgroup::create`] makes the cgroup `linux.cgroupsPath` names (OCI runtime spec 1.2,
//! config-linux.md; the forms are in `path`) in every hierarchy the host mounts (`mounts`:
//! cgroup v1 hierarchies, with an empty cgroup2 beside them or not, or cgroup v2 only) and
//! writes its limits. The jail that launches the VMM writes its own pid to every file of
//! [`HostCgroup::procs_files`] before it does anything else, so that the VMM and all it forks
//! are in the cgroup; [`HostCgroup::remove`] removes what `create` made once they have exited.
//! The directories are made directly (no systemd D-Bus call, also for systemd-style paths).
//!
//! Limits:
//! - memory: [`CgroupSpec::memory_limit_bytes`], which the caller sets to the VM's memory plus
//!   its page tables plus [`VMM_OVERHEAD_MIB`] ([`vm_memory_limit_bytes`]): the guest cannot
//!   use more than its RAM, and the container's own limit holds inside the guest; v2
//!   `memory.max`, v1 `memory.limit_in_bytes`. A pod's runtime class overhead
//!   (`overhead.podFixed`) should cover this and the guest's own (the sandbox crate's
//!   `GUEST_OVERHEAD_MIB`) where the kubelet limits the pod's cgroup.
//! - CPU: the container's quota and period (`linux.resources.cpu`); v2 `cpu.max`, v1
//!   `cpu.cfs_period_us` and `cpu.cfs_quota_us`.
//! - v2: `+memory +cpu +pids` are enabled in each parent's `cgroup.subtree_control` where the
//!   parent has them (a parent that refuses, holding processes itself, is logged; a limit that
//!   then has no file is an error). v1 cpuset: `cpuset.cpus` and `cpuset.mems` of each level
//!   that has none are copied from its parent, else the kernel refuses tasks.
//!
//! Safety of what is touched: a cgroup whose `cgroup.procs` lists a process, or that has child
//! cgroups, is someone else's and is refused ([`CgroupError::InUse`]), never joined or
//! emptied; an existing empty one is reused and left in place. Every directory is opened component by component
//! with `O_NOFOLLOW`; removal is `rmdir` of the directories `create` made, leaf first.

mod mounts;
mod path;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use tracing::{debug, warn};

pub use mounts::unescape_mountinfo;
use mounts::{Hierarchy, Role};

/// Host memory a VM's processes use beyond the guest's RAM and its page tables: the VMM's or
/// QEMU's own heap (TCG's translated code above all), device queues and buffers, virtiofsd's
/// threads and buffers. Measured: a guest filling its RAM peaked 61 MiB above it (128 MiB,
/// 1 vCPU) and 72 MiB (512 MiB, 2 vCPUs) with QEMU on TCG, virtiofsd and husk's own process
/// in the cgroup, QEMU's anonymous memory being 58 and 65 MiB of that; twice that is room for
/// more vCPUs, a larger TCG code cache and file I/O. A VMM that outgrows its limit is
/// OOM-killed, and the container with it.
pub const VMM_OVERHEAD_MIB: u64 = 128;
/// Page tables of guest memory per MiB of it: the VMM's own (8 bytes per 4 KiB page) and
/// KVM's second-level ones (as many), which cgroup v2 charges: 1 MiB per 256 MiB.
const PAGE_TABLE_DIVISOR: u64 = 256;
/// Where the mount table is read.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Controllers enabled for the children of each parent on cgroup v2.
const V2_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "cpuset"];

/// Tasks (threads included) a VM's host processes may have: QEMU or husk-vmm with a thread per
/// vCPU and device, the vsock backend, virtiofsd's thread pools; far below a host's limit.
pub const PIDS_MAX: u32 = 1024;
/// How long [`HostCgroup::remove`] waits for the kernel to release exited processes.
const REMOVE_PATIENCE: Duration = Duration::from_secs(1);
/// Pause between two attempts to remove a leaf that the kernel still counts processes in.
const REMOVE_RETRY: Duration = Duration::from_millis(10);

/// The host cgroup limit for a VM of `memory_mib`, in bytes: its RAM, the page tables that
/// map it (1/256 of it) and [`VMM_OVERHEAD_MIB`].
pub fn vm_memory_limit_bytes(memory_mib: u32) -> u64 {
    let ram = u64::from(memory_mib);
    ram.saturating_add(ram.div_ceil(PAGE_TABLE_DIVISOR))
        .saturating_add(VMM_OVERHEAD_MIB)
        .saturating_mul(1 << 20)
}

/// The host cgroup of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSpec {
    /// `linux.cgroupsPath` as given: `/a/b`, `a/b` (both below each hierarchy's root) or
    /// systemd's `slice:prefix:name`.
    pub path: String,
    /// Memory limit: [`vm_memory_limit_bytes`] of the VM's memory.
    pub memory_limit_bytes: Option<u64>,
    /// CPU quota per period in microseconds (negative: none).
    pub cpu_quota_us: Option<i64>,
    /// CPU period in microseconds.
    pub cpu_period_us: Option<u64>,
    /// Host CPUs the VM's processes run on (`linux.resources.cpu.cpus`: the same list the
    /// guest applies to its vCPUs), as cgroup's `cpuset.cpus` takes it.
    pub cpuset_cpus: Option<String>,
    /// Host memory nodes (`linux.resources.cpu.mems`).
    pub cpuset_mems: Option<String>,
    /// The VM's relative share of host CPU time on v1: `cpu.shares`
    /// (`linux.resources.cpu.shares`).
    pub cpu_shares: Option<u64>,
    /// The same share on v2: `cpu.weight` (runc's conversion of the shares).
    pub cpu_weight: Option<u64>,
}

/// What making a host cgroup can fail at.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` is not a path husk makes a cgroup at.
    #[error("invalid linux.cgroupsPath {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why.
        reason: String,
    },
    /// The mount table could not be read.
    #[error("failed to read {MOUNTINFO}")]
    ReadMounts(#[source] std::io::Error),
    /// No cgroup file system is mounted.
    #[error("no cgroup file system is mounted for linux.cgroupsPath {path:?}")]
    NoCgroupFs {
        /// The path as given.
        path: String,
    },
    /// The cgroup holds processes or child cgroups: another container (or a pod, a service)
    /// lives there.
    #[error("cgroup {} is in use: it holds processes or cgroups (another container's?)", path.display())]
    InUse {
        /// The cgroup's directory.
        path: PathBuf,
    },
    /// A limit was asked for and no hierarchy has its controller for this cgroup.
    #[error("no {controller} controller for cgroup {}, which its limit needs", path.display())]
    NoController {
        /// The controller.
        controller: &'static str,
        /// The cgroup's directory.
        path: PathBuf,
    },
    /// A directory of the cgroup could not be made or opened.
    #[error("failed to create cgroup directory {}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup file could not be read.
    #[error("failed to read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup file could not be written.
    #[error("failed to write {value:?} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The leaf of one hierarchy.
#[derive(Debug)]
struct Leaf {
    hierarchy: Hierarchy,
    /// Index of the first component `create` made (it made all below it too).
    first_made: Option<usize>,
}

/// A cgroup made on the host for one VM; [`HostCgroup::remove`] removes it once its processes
/// have exited. Dropped without `remove`, it tries once and logs what it leaves behind.
#[derive(Debug)]
pub struct HostCgroup {
    /// The path as given, for logs.
    path: String,
    /// Its directory below each hierarchy's root.
    components: Vec<String>,
    leaves: Vec<Leaf>,
}

/// The `cgroup.procs` files of `cgroup` (none without one), which each host process of the VM
/// joins.
pub(crate) fn procs_files(cgroup: Option<&HostCgroup>) -> Vec<PathBuf> {
    cgroup.map(HostCgroup::procs_files).unwrap_or_default()
}

impl HostCgroup {
    /// Makes the cgroup `spec.path` in every mounted hierarchy and writes its limits.
    ///
    /// # Errors
    /// [`CgroupError::InvalidPath`], [`CgroupError::NoCgroupFs`], [`CgroupError::InUse`] when
    /// it exists with processes or child cgroups, [`CgroupError::NoController`] for a limit nothing can hold,
    /// or the failed read, mkdir or write. Nothing `create` made is left behind on error.
    pub fn create(spec: &CgroupSpec) -> Result<HostCgroup, CgroupError> {
        let components =
            path::components(&spec.path).map_err(|reason| CgroupError::InvalidPath {
                path: spec.path.clone(),
                reason,
            })?;
        let mountinfo = std::fs::read_to_string(MOUNTINFO).map_err(CgroupError::ReadMounts)?;
        Self::create_in(
            spec,
            components,
            mounts::hierarchies(&mounts::parse(&mountinfo)),
        )
    }

    /// [`HostCgroup::create`] at `components` in `hierarchies`.
    fn create_in(
        spec: &CgroupSpec,
        components: Vec<String>,
        hierarchies: Vec<Hierarchy>,
    ) -> Result<HostCgroup, CgroupError> {
        if hierarchies.is_empty() {
            return Err(CgroupError::NoCgroupFs {
                path: spec.path.clone(),
            });
        }
        let mut cgroup = HostCgroup {
            path: spec.path.clone(),
            components,
            leaves: Vec::with_capacity(hierarchies.len()),
        };
        for hierarchy in &hierarchies {
            cgroup.refuse_in_use(hierarchy)?;
        }
        for hierarchy in hierarchies {
            let mut first_made = None;
            let made = make_dirs(&hierarchy.mount_point, &cgroup.components, &mut first_made);
            cgroup.leaves.push(Leaf {
                hierarchy,
                first_made,
            });
            made?;
        }
        cgroup.prepare_controllers()?;
        cgroup.write_limits(spec)?;
        debug!(path = %spec.path, dirs = ?cgroup.procs_files(), "host cgroup made");
        Ok(cgroup)
    }

    /// The `cgroup.procs` file of the cgroup in every hierarchy: the jail writes the VMM's
    /// pid to each.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.leaves
            .iter()
            .map(|l| self.dir(&l.hierarchy).join("cgroup.procs"))
            .collect()
    }

    /// Removes the directories [`HostCgroup::create`] made, leaf first, once their processes
    /// have exited: `rmdir` only, never anything else; a leaf the kernel still counts exited
    /// processes in is retried for up to a second (this blocks). What cannot be removed (a
    /// process still in it, another container's cgroup below a parent it made) is logged and
    /// left.
    pub fn remove(mut self) {
        self.kill_remaining();
        self.remove_dirs(REMOVE_PATIENCE);
    }

    /// SIGKILLs whatever still runs in the cgroup (only the VM's processes can: it was empty
    /// when made): a process that escaped its launcher's death signal does not outlive the VM.
    fn kill_remaining(&self) {
        let pids: std::collections::BTreeSet<i32> = self
            .procs_files()
            .iter()
            .flat_map(|procs| {
                let text = std::fs::read_to_string(procs).unwrap_or_default();
                text.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        for pid in pids {
            // Usually a jail's pid 1 on its way out (its launcher's death signal is async).
            debug!(pid, "VM process still in the cgroup at teardown: killed");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The cgroup's directory in `hierarchy`.
    fn dir(&self, hierarchy: &Hierarchy) -> PathBuf {
        under(&hierarchy.mount_point, &self.components)
    }

    /// [`CgroupError::InUse`] when the cgroup exists in `hierarchy` with processes or child
    /// cgroups (a pod's or a service's cgroup, say: its limits are not ours to write).
    fn refuse_in_use(&self, hierarchy: &Hierarchy) -> Result<(), CgroupError> {
        let dir = self.dir(hierarchy);
        let fd = match open_dir(&hierarchy.mount_point, &self.components) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(CgroupError::Create {
                    path: dir,
                    source: e.into(),
                })
            }
        };
        let has_procs = !read_file(&fd, &dir, "cgroup.procs")?.trim().is_empty();
        match has_procs || has_child_cgroup(&dir)? {
            true => Err(CgroupError::InUse { path: dir }),
            false => Ok(()),
        }
    }

    /// v2: the controllers enabled down to the leaf; v1 cpuset: every level given CPUs and
    /// memory nodes.
    fn prepare_controllers(&self) -> Result<(), CgroupError> {
        for leaf in &self.leaves {
            let h = &leaf.hierarchy;
            for depth in 0..self.components.len() {
                let Some(levels) = self.components.get(..depth) else {
                    continue;
                };
                if h.role == Role::V2 {
                    enable_v2_controllers(&h.mount_point, levels);
                }
                if h.is_v1_with("cpuset") {
                    let child = self.components.get(..=depth).unwrap_or_default();
                    inherit_cpuset(&h.mount_point, levels, child)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the memory and CPU limits of `spec`, and [`PIDS_MAX`] where the pids controller
    /// is there.
    fn write_limits(&self, spec: &CgroupSpec) -> Result<(), CgroupError> {
        for (file, list) in [
            ("cpuset.cpus", &spec.cpuset_cpus),
            ("cpuset.mems", &spec.cpuset_mems),
        ] {
            if let Some(list) = list {
                let value = [(file, list.clone())];
                // Placement, not a limit: a host that cannot apply it still runs the VM.
                if let Err(e) = self.write_limit("cpuset", &value, &value) {
                    warn!(path = %self.path, "host cpuset not applied: {e}");
                }
            }
        }
        if let (Some(shares), Some(weight)) = (spec.cpu_shares, spec.cpu_weight) {
            let v2 = [("cpu.weight", weight.to_string())];
            let v1 = [("cpu.shares", shares.to_string())];
            self.write_limit("cpu", &v2, &v1)?;
        }
        let pids = [("pids.max", PIDS_MAX.to_string())];
        match self.write_limit("pids", &pids, &pids) {
            Err(CgroupError::NoController { .. }) => debug!("no pids controller: no pids.max"),
            other => other?,
        }
        if let Some(bytes) = spec.memory_limit_bytes {
            let v2 = [("memory.max", bytes.to_string())];
            let v1 = [("memory.limit_in_bytes", bytes.to_string())];
            self.write_limit("memory", &v2, &v1)?;
        }
        let quota = spec.cpu_quota_us.filter(|q| *q > 0);
        if quota.is_none() && spec.cpu_period_us.is_none() {
            return Ok(());
        }
        let v2_quota = quota.map_or("max".to_owned(), |q| q.to_string());
        let v2 = match spec.cpu_period_us {
            Some(period) => [("cpu.max", format!("{v2_quota} {period}"))],
            None => [("cpu.max", v2_quota)],
        };
        // The period first: a quota is checked against the period in place (runc's order).
        let v1: Vec<(&str, String)> = spec
            .cpu_period_us
            .map(|p| ("cpu.cfs_period_us", p.to_string()))
            .into_iter()
            .chain([("cpu.cfs_quota_us", quota.unwrap_or(-1).to_string())])
            .collect();
        self.write_limit("cpu", &v2, &v1)
    }

    /// Writes a limit of `controller` as `v2` files on a v2 host, else as `v1` files in the v1
    /// hierarchy that has the controller.
    fn write_limit(
        &self,
        controller: &'static str,
        v2: &[(&str, String)],
        v1: &[(&str, String)],
    ) -> Result<(), CgroupError> {
        let target = self.leaves.iter().find_map(|l| match &l.hierarchy {
            h if h.role == Role::V2 => Some((h, v2)),
            h if h.is_v1_with(controller) => Some((h, v1)),
            _ => None,
        });
        let Some((hierarchy, files)) = target else {
            return Err(CgroupError::NoController {
                controller,
                path: PathBuf::from(&self.path),
            });
        };
        let dir = self.dir(hierarchy);
        let fd = open_dir(&hierarchy.mount_point, &self.components).map_err(|e| {
            CgroupError::Create {
                path: dir.clone(),
                source: e.into(),
            }
        })?;
        for (name, value) in files {
            match write_file(&fd, &dir, name, value) {
                Err(CgroupError::Write { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(CgroupError::NoController {
                        controller,
                        path: dir,
                    })
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// `rmdir` of what `create` made, leaf first; a busy leaf is retried until `patience` ends.
    fn remove_dirs(&mut self, patience: Duration) {
        let deadline = Instant::now() + patience;
        for leaf in std::mem::take(&mut self.leaves) {
            let Some(first) = leaf.first_made else {
                continue;
            };
            let root = &leaf.hierarchy.mount_point;
            for depth in (first..self.components.len()).rev() {
                let is_leaf = depth + 1 == self.components.len();
                let (Some(parent), Some(name)) =
                    (self.components.get(..depth), self.components.get(depth))
                else {
                    break;
                };
                let wait_until = if is_leaf { deadline } else { Instant::now() };
                if let Err(e) = rmdir_at(root, parent, name, wait_until) {
                    // A parent that still has children is someone else's now: not a leak.
                    match is_leaf {
                        true => {
                            warn!(path = %self.path, dir = %root.join(parent.join("/")).join(name).display(), error = %e, "host cgroup left behind")
                        }
                        false => debug!(dir = %name, error = %e, "cgroup parent kept"),
                    }
                    break;
                }
            }
        }
    }
}

impl Drop for HostCgroup {
    /// One attempt, no waiting: [`HostCgroup::remove`] is the way to remove a cgroup whose
    /// processes just exited.
    fn drop(&mut self) {
        if !self.leaves.is_empty() {
            self.remove_dirs(Duration::ZERO);
        }
    }
}

/// Makes the directories of `components` below `root` that do not exist yet, each opened
/// without following symlinks; records in `first_made` the first one it made.
fn make_dirs(
    root: &Path,
    components: &[String],
    first_made: &mut Option<usize>,
) -> Result<(), CgroupError> {
    let failed = |depth: usize, e: Errno| CgroupError::Create {
        path: under(root, components.get(..=depth).unwrap_or(components)),
        source: e.into(),
    };
    let mut dir = open_dir(root, &[]).map_err(|e| failed(0, e))?;
    for (depth, name) in components.iter().enumerate() {
        match mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) => {
                first_made.get_or_insert(depth);
            }
            Err(Errno::EEXIST) if first_made.is_none() => {}
            Err(e) => return Err(failed(depth, e)),
        }
        dir = openat(&dir, name.as_str(), dir_flags(), Mode::empty())
            .map_err(|e| failed(depth, e))?;
    }
    Ok(())
}

/// The directory `components` below `root`.
fn under(root: &Path, components: &[String]) -> PathBuf {
    components.iter().fold(root.to_owned(), |p, c| p.join(c))
}

/// Flags of every directory opened: no symlink followed, nothing inherited.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens `root` and then each of `components` below it, following no symlink.
fn open_dir(root: &Path, components: &[String]) -> Result<OwnedFd, Errno> {
    let mut dir = open(root, dir_flags(), Mode::empty())?;
    for name in components {
        dir = openat(&dir, name.as_str(), dir_flags(), Mode::empty())?;
    }
    Ok(dir)
}

/// Reads the file `name` of the cgroup directory `dir_fd` (`dir` for errors).
fn read_file(dir_fd: &OwnedFd, dir: &Path, name: &str) -> Result<String, CgroupError> {
    let failed = |source: std::io::Error| CgroupError::Read {
        path: dir.join(name),
        source,
    };
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir_fd, name, flags, Mode::empty()).map_err(|e| failed(e.into()))?;
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text).map_err(failed)?;
    Ok(text)
}

/// Writes `value` to the file `name` of the cgroup directory `dir_fd` (`dir` for errors), in
/// one write(2), as cgroup files want.
fn write_file(dir_fd: &OwnedFd, dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let failed = |source: std::io::Error| CgroupError::Write {
        path: dir.join(name),
        value: value.to_owned(),
        source,
    };
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir_fd, name, flags, Mode::empty()).map_err(|e| failed(e.into()))?;
    File::from(fd).write_all(value.as_bytes()).map_err(failed)
}

/// Whether the cgroup directory `dir` (just opened without following symlinks) has a child
/// cgroup: a directory entry.
fn has_child_cgroup(dir: &Path) -> Result<bool, CgroupError> {
    let failed = |source| CgroupError::Read {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(failed)? {
        if entry.and_then(|e| e.file_type()).map_err(failed)?.is_dir() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// v2: enables [`V2_CONTROLLERS`] for the children of the cgroup `levels` below `root`, those
/// it has and has not enabled yet. A refusal (the cgroup holds processes itself) is logged:
/// a limit that needs the controller then fails with [`CgroupError::NoController`].
fn enable_v2_controllers(root: &Path, levels: &[String]) {
    let dir = under(root, levels);
    let Ok(fd) = open_dir(root, levels) else {
        return;
    };
    let words = |name: &str| {
        read_file(&fd, &dir, name)
            .map(|t| t.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let (available, enabled) = (words("cgroup.controllers"), words("cgroup.subtree_control"));
    for controller in V2_CONTROLLERS {
        let wanted = available.iter().any(|c| c == controller);
        if wanted && !enabled.iter().any(|c| c == controller) {
            let value = format!("+{controller}");
            if let Err(e) = write_file(&fd, &dir, "cgroup.subtree_control", &value) {
                warn!(error = %e, "cgroup controller not enabled");
            }
        }
    }
}

/// v1 cpuset: gives `child` its parent's (`levels`) CPUs and memory nodes where it has none.
fn inherit_cpuset(root: &Path, levels: &[String], child: &[String]) -> Result<(), CgroupError> {
    let (parent_dir, child_dir) = (under(root, levels), under(root, child));
    let open = |components: &[String], path: &Path| {
        open_dir(root, components).map_err(|e| CgroupError::Create {
            path: path.to_owned(),
            source: e.into(),
        })
    };
    let (parent_fd, child_fd) = (open(levels, &parent_dir)?, open(child, &child_dir)?);
    for name in ["cpuset.cpus", "cpuset.mems"] {
        if read_file(&child_fd, &child_dir, name)?.trim().is_empty() {
            let value = read_file(&parent_fd, &parent_dir, name)?;
            write_file(&child_fd, &child_dir, name, value.trim())?;
        }
    }
    Ok(())
}

/// `rmdir` of `name` in the directory `parent` below `root`; while the kernel still counts
/// processes in it (EBUSY), retried until `deadline`. Already gone is success.
fn rmdir_at(root: &Path, parent: &[String], name: &str, deadline: Instant) -> Result<(), Errno> {
    loop {
        let dir = match open_dir(root, parent) {
            Ok(dir) => dir,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        match unlinkat(&dir, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if Instant::now() < deadline => std::thread::sleep(REMOVE_RETRY),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why the host cannot run the tests that make real cgroups, if it cannot.
    fn skip_reason() -> Option<&'static str> {
        if !nix::unistd::geteuid().is_root() {
            return Some("making host cgroups needs root");
        }
        let mountinfo = std::fs::read_to_string(MOUNTINFO).unwrap_or_default();
        if mounts::hierarchies(&mounts::parse(&mountinfo)).is_empty() {
            return Some("no cgroup file system mounted");
        }
        None
    }

    /// A cgroup path no other test or run uses.
    fn unique(tag: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("/husk-test-{tag}-{}-{nanos}", std::process::id())
    }

    fn spec(path: &str) -> CgroupSpec {
        CgroupSpec {
            path: path.to_owned(),
            memory_limit_bytes: Some(vm_memory_limit_bytes(128)),
            cpu_quota_us: Some(50_000),
            cpu_period_us: Some(100_000),
            cpuset_cpus: None,
            cpuset_mems: None,
            cpu_shares: None,
            cpu_weight: None,
        }
    }

    /// The first of `names` that exists next to one of `procs` files, read.
    fn limit(procs: &[PathBuf], names: &[&str]) -> Option<String> {
        procs.iter().find_map(|p| {
            names.iter().find_map(|n| {
                let file = p.parent()?.join(n);
                std::fs::read_to_string(file).ok()
            })
        })
    }

    #[test]
    fn test_vm_memory_limit_bytes_ram_plus_overhead() {
        assert_eq!(vm_memory_limit_bytes(256), (256 + 1 + 128) << 20);
        assert_eq!(vm_memory_limit_bytes(100), (100 + 1 + 128) << 20);
        assert_eq!(vm_memory_limit_bytes(65536), (65536 + 256 + 128) << 20);
    }

    #[test]
    fn test_create_invalid_path_refused_naming_it() {
        let err = HostCgroup::create(&spec("/a/../b")).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidPath { .. }));
        assert!(err.to_string().contains("\"/a/../b\""), "{err}");
    }

    #[test]
    fn test_create_child_joins_limits_set_in_use_refused_removed() {
        if let Some(reason) = skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
        let top = unique("join");
        let spec = spec(&format!("{top}/vm"));
        let cgroup = HostCgroup::create(&spec).unwrap();
        let procs = cgroup.procs_files();
        let memory = limit(&procs, &["memory.max", "memory.limit_in_bytes"]);
        let expected = vm_memory_limit_bytes(128).to_string();
        assert_eq!(memory.as_deref().map(str::trim), Some(expected.as_str()));
        let cpu = limit(&procs, &["cpu.max", "cpu.cfs_quota_us"]);
        assert!(cpu.is_some_and(|c| c.starts_with("50000")));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        for file in &procs {
            std::fs::write(file, child.id().to_string()).unwrap();
        }
        let seen = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let again = HostCgroup::create(&spec);
        child.kill().unwrap();
        child.wait().unwrap();
        cgroup.remove();

        assert_eq!(
            seen.lines()
                .filter(|l| l.ends_with(&format!("{top}/vm")))
                .count(),
            procs.len(),
            "{seen}"
        );
        assert!(matches!(again, Err(CgroupError::InUse { .. })), "{again:?}");
        for file in &procs {
            let top_dir = file.ancestors().nth(2).unwrap();
            assert!(!top_dir.exists(), "{} left", top_dir.display());
        }
    }

    #[test]
    fn test_create_existing_empty_reused_and_kept() {
        if let Some(reason) = skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
        let spec = spec(&unique("reuse"));
        let first = HostCgroup::create(&spec).unwrap();
        let procs = first.procs_files();

        let second = HostCgroup::create(&spec).unwrap();
        second.remove();
        let kept = procs.iter().all(|p| p.exists());
        drop(first);

        assert!(kept);
        assert!(procs.iter().all(|p| !p.parent().unwrap().exists()));
    }

    #[test]
    fn test_create_parent_of_a_cgroup_in_use() {
        if let Some(reason) = skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
        let top = unique("parent");
        let child = HostCgroup::create(&spec(&format!("{top}/vm"))).unwrap();

        let parent = HostCgroup::create(&spec(&top));
        child.remove();

        assert!(
            matches!(parent, Err(CgroupError::InUse { .. })),
            "{parent:?}"
        );
    }

    #[test]
    fn test_create_in_v2_without_controller_limit_refused_none_left() {
        let unified = Path::new("/sys/fs/cgroup/unified");
        if let Some(reason) = skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
        if !unified.join("cgroup.controllers").exists() {
            println!(
                "SKIPPED: no cgroup2 beside cgroup v1 at {}",
                unified.display()
            );
            return;
        }
        // The hybrid layout's cgroup2 holds no controller: a v2 host whose memory controller
        // is elsewhere.
        let v2 = || {
            vec![Hierarchy {
                mount_point: unified.to_owned(),
                role: Role::V2,
            }]
        };
        let top = unique("v2");
        let components = vec![top.trim_start_matches('/').to_owned(), "vm".to_owned()];
        let bare = CgroupSpec {
            memory_limit_bytes: None,
            cpu_quota_us: None,
            cpu_period_us: None,
            ..spec(&top)
        };

        let limited = HostCgroup::create_in(&spec(&top), components.clone(), v2());
        let left = unified.join(&components[0]).exists();
        let cgroup = HostCgroup::create_in(&bare, components, v2()).unwrap();
        let procs = cgroup.procs_files();
        cgroup.remove();

        assert!(
            matches!(
                limited,
                Err(CgroupError::NoController {
                    controller: "memory",
                    ..
                })
            ),
            "{limited:?}"
        );
        assert!(!left);
        assert_eq!(procs, [unified.join(&top[1..]).join("vm/cgroup.procs")]);
        assert!(!unified.join(&top[1..]).exists());
    }
}
