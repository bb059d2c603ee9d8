//! Both doors start every process that serves a guest (QEMU, husk-vmm, the vsock backend)
//! through `husk-vmm jail` ([`husk_vmm::jail`]): own namespaces, a root holding only what it
//! needs, no capabilities, `no_new_privs`, seccomp with argument filters, rlimits, the VM's
//! host cgroup. This module writes the spec and spawns the launcher.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

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
    /// Whether it may call `connect(2)` itself.
    pub(crate) allow_connect: bool,
}

/// Device nodes every jailed process may open.
const DEVICES: &[&str] = &["/dev/null", "/dev/urandom"];

/// Makes `<run_dir>/vm` ([`crate::VM_DIR`]), 0700, for the VM's sockets, console and logs
/// (before virtiofsd's socket goes there).
pub(crate) fn make_vm_dir(run_dir: &Path) -> Result<(), HypervisorError> {
    private_dir(&run_dir.join(crate::VM_DIR)).map_err(|source| HypervisorError::Spawn {
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
/// `<run_dir>/<name>.root`, stdout and stderr to `log`. Only `<run_dir>/vm` ([`crate::VM_DIR`],
/// made by [`make_vm_dir`] first) is writable in the jail; the rest of `run_dir` is not in it.
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
    let vm_dir = run_dir.join(crate::VM_DIR);
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
    let spec = JailSpec {
        root,
        binds,
        cgroup_procs: jail.cgroup_procs,
        netns: jail.netns,
        connect: jail.connect,
        tap: jail.tap,
        allow_connect: jail.allow_connect,
        argv,
    };
    let spec_path = run_dir.join(format!("{name}.jail.json"));
    let text = serde_json::to_vec(&spec).map_err(|e| spawn_err(std::io::Error::other(e)))?;
    std::fs::write(&spec_path, text).map_err(spawn_err)?;
    let mut cmd = Command::new(vmm);
    cmd.arg("jail").arg("--spec").arg(&spec_path);
    helpers::spawn_logged(name, &mut cmd, log)
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
