//! `husk-agent container-init`: the first process of a container, already in its namespaces.
//!
//! Started by [`crate::container`] with stdin/stdout/stderr on the container's pipes and a sync
//! socket on fd 3. The exchange on the sync socket:
//! 1. agent -> init: the [`ContainerSpec`] (one frame);
//! 2. init -> agent: `Ok` once mounts, root, hostname and network are set up, or `Error`;
//! 3. agent -> init: one byte, "start";
//! 4. init -> agent: nothing if `execve` succeeds (the socket is close-on-exec, the agent sees
//!    EOF), or an error: `ExecFailed`, or a failed `startContainer` hook.
//!
//! `createContainer` hooks run during 2, after the mounts and before the root is entered;
//! `startContainer` hooks after 3, before the process ([`crate::hooks`]).

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use husk_protocol::{
    decode_body, decode_len, encode, ContainerSpec, ErrorKind, Namespace, Personality, Response,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chdir, execve, pivot_root, sethostname};
use seccompiler::BpfProgram;

use crate::cgroup::Cgroup;
use crate::container::{rootfs_path, shares_path};
use crate::init::ctx;
use crate::{hooks, mounts, namespaces, privileges, seccomp, sys};

/// The argument that selects this mode.
pub const ARG: &str = "container-init";
/// [`ARG`] as a C string, for the exec in [`sys::spawn_container_init`].
pub const ARG_C: &CStr = c"container-init";
/// The argument of a spare container-init (`crate::container`'s `Spare`), in a network
/// namespace of its own before any spec.
pub const SPARE_ARG: &str = "spare-container-init";
/// [`SPARE_ARG`] as a C string.
pub const SPARE_ARG_C: &CStr = c"spare-container-init";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub(crate) const DEFAULT_UMASK: u32 = 0o022;
/// Exit code when the process could not be executed (as a shell).
const EXIT_EXEC_FAILED: u8 = 127;

/// How a container-init was started.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// For its spec, in the namespaces the spec asks for.
    Fresh,
    /// As the spare (`crate::container`'s `Spare`), before any spec, in a network namespace of
    /// its own whose loopback it brought up (`loopback_up`) while it waited: in a boot
    /// snapshot that is done already, as the kernel's network set-up costs about 20 ms each
    /// time it runs afresh under TCG. A spec without a network namespace of its own (the VM's
    /// network, as engines and pods have it) leaves it for the VM's.
    Spare { loopback_up: bool },
}

/// A spare container-init: see [`Start::Spare`].
pub fn main_spare() -> ExitCode {
    // A failure is not reported here (stderr is the container's): `setup` tries again.
    let loopback_up = sys::loopback_up().is_ok();
    run(Start::Spare { loopback_up })
}

pub fn main() -> ExitCode {
    run(Start::Fresh)
}

fn run(start: Start) -> ExitCode {
    let mut sync = UnixStream::from(sys::inherited_sync_fd());
    let spec = match read_spec(&mut sync) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("husk-agent container-init: reading the spec: {e}");
            return ExitCode::FAILURE;
        }
    };
    let setup = fcntl(&sync, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| ctx(e, "close-on-exec sync socket"))
        .and_then(|_| setup(&spec, start));
    // Compiled now so that a profile the agent cannot build fails `create`, not `start`.
    let filters = match &spec.seccomp {
        Some(profile) => seccomp::compile(profile),
        None => Ok(Vec::new()),
    };
    let (reply, filters) = match (setup, filters) {
        (Ok(()), Ok(filters)) => match check_program(&spec) {
            Ok(()) => (Response::Ok, filters),
            Err(e) => (error(ErrorKind::ExecFailed, e), Vec::new()),
        },
        (Err(e), _) => (
            error(ErrorKind::Internal, format!("container setup: {e}")),
            Vec::new(),
        ),
        (Ok(()), Err(e)) => (error(ErrorKind::InvalidRequest, e), Vec::new()),
    };
    let failed = reply != Response::Ok;
    if write_frame(&mut sync, &reply).is_err() || failed {
        return ExitCode::FAILURE;
    }
    if spec.terminal {
        if let Err(e) = use_terminal(&sync) {
            eprintln!("husk-agent container-init: {e}");
            return ExitCode::FAILURE;
        }
    }
    warm_program(&spec);
    let mut start = [0u8; 1];
    if !matches!(sync.read(&mut start), Ok(1)) {
        return ExitCode::FAILURE;
    }
    let start_container = &spec.hooks.start_container;
    if let Err(e) = hooks::run("startContainer", start_container, None, &spec.hooks.state) {
        let _ = write_frame(&mut sync, &error(ErrorKind::Internal, e));
        return ExitCode::FAILURE;
    }
    let e = exec(&spec, &filters);
    let _ = write_frame(&mut sync, &error(ErrorKind::ExecFailed, e));
    ExitCode::from(EXIT_EXEC_FAILED)
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

/// Namespaces not made by clone, mounts, root, sysctls, paths, hostname, loopback:
/// everything before the user's process.
fn setup(spec: &ContainerSpec, start: Start) -> io::Result<()> {
    umask(Mode::empty());
    let own_net = spec.namespaces.contains(&Namespace::Net);
    if let (Start::Spare { .. }, false) = (start, own_net) {
        // The agent's (PID 1's, as this mount namespace's /proc still shows it), before any
        // sysctl or sysfs of the container refers to a network namespace.
        namespaces::join(nix::unistd::Pid::from_raw(1), &[Namespace::Net])
            .map_err(io::Error::other)?;
    }
    // The agent moved this process into the container's cgroup before it sent the spec.
    let own_cgroup = if spec.namespaces.contains(&Namespace::Cgroup) {
        // That cgroup becomes the root of the container's view.
        unshare(CloneFlags::CLONE_NEWCGROUP).map_err(|e| ctx(e, "unshare cgroup namespace"))?;
        None
    } else {
        let own = Cgroup::of_self()
            .map_err(|e| io::Error::new(e.kind(), format!("find the container's cgroup: {e}")))?;
        Some(own)
    };
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| ctx(e, "make / private"))?;
    for (key, value) in &spec.sysctl {
        mounts::write_sysctl(key, value)?;
    }
    let root = rootfs_path(&spec.id);
    // A mount made in this namespace, unlike the copied ones, which a user namespace locks
    // (pivot_root refuses a locked new root), as runc does.
    mount(
        Some(&root),
        &root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ctx(e, "bind the rootfs onto itself"))?;
    mounts::mount_all(
        &root,
        &shares_path(&spec.id),
        &spec.mounts,
        own_cgroup.as_deref(),
    )?;
    mounts::make_devices(&root, &spec.devices)?;
    // In the container's namespaces, before its root is entered: paths resolve in the rootfs.
    let create_container = &spec.hooks.create_container;
    hooks::run(
        "createContainer",
        create_container,
        Some(&root),
        &spec.hooks.state,
    )
    .map_err(io::Error::other)?;
    enter_root(&root)?;
    if let Some(propagation) = spec.rootfs_propagation {
        // After pivot_root, as runc: on the container's own root, never on a mount it came from.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            propagation_flags(propagation),
            None::<&str>,
        )
        .map_err(|e| ctx(e, "set the root's propagation"))?;
    }
    if spec.rootfs_readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            .map_err(|e| ctx(e, "remount / read-only"))?;
    }
    for path in &spec.readonly_paths {
        mounts::make_readonly(path)?;
    }
    for path in &spec.masked_paths {
        mounts::mask(path)?;
    }
    // Only in its own uts namespace: a joined one keeps the hostname its owner set (CRI gives
    // a pod's containers the pod's hostname anyway).
    if let (Some(hostname), true) = (&spec.hostname, spec.namespaces.contains(&Namespace::Uts)) {
        sethostname(hostname).map_err(|e| ctx(e, "sethostname"))?;
    }
    if own_net && !matches!(start, Start::Spare { loopback_up: true }) {
        sys::loopback_up().map_err(|e| io::Error::new(e.kind(), format!("loopback up: {e}")))?;
    }
    Ok(())
}

/// mount(2) flags of a root propagation.
fn propagation_flags(p: husk_protocol::RootPropagation) -> MsFlags {
    use husk_protocol::Propagation;
    let kind = match p.kind {
        Propagation::Shared => MsFlags::MS_SHARED,
        Propagation::Slave => MsFlags::MS_SLAVE,
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::Unbindable => MsFlags::MS_UNBINDABLE,
    };
    match p.recursive {
        true => kind | MsFlags::MS_REC,
        false => kind,
    }
}

/// `pivot_root` into `root` and detach the old root.
fn enter_root(root: &Path) -> io::Result<()> {
    chdir(root).map_err(|e| ctx(e, "chdir to the rootfs"))?;
    pivot_root(".", ".").map_err(|e| ctx(e, "pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| ctx(e, "detach the old root"))?;
    chdir("/").map_err(|e| ctx(e, "chdir /"))?;
    Ok(())
}

/// Allocates the process's terminal in the container's own devpts (so that `tty` names it
/// there), makes it stdin, stdout and stderr, and hands the master to the agent.
pub(crate) fn use_terminal(sync: &UnixStream) -> io::Result<()> {
    use std::os::fd::AsFd;
    let (master, slave) = sys::open_terminal()
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/ptmx: {e}")))?;
    nix::unistd::dup2_stdin(&slave).map_err(|e| ctx(e, "terminal as stdin"))?;
    nix::unistd::dup2_stdout(&slave).map_err(|e| ctx(e, "terminal as stdout"))?;
    nix::unistd::dup2_stderr(&slave).map_err(|e| ctx(e, "terminal as stderr"))?;
    sys::send_fd(sync.as_fd(), master.as_fd())
        .map_err(|e| io::Error::new(e.kind(), format!("send the terminal: {e}")))
}

/// Becomes the user and execs the process; returns only the reason it failed.
/// Without `no_new_privs` the seccomp filters go in first, while CAP_SYS_ADMIN is still held
/// (so they also cover the privilege changes); with it, last, right before execve (as runc).
fn exec(spec: &ContainerSpec, filters: &[BpfProgram]) -> String {
    if spec.terminal {
        // A session of its own, with the terminal (stdin) as its controlling terminal.
        if let Err(e) = nix::unistd::setsid()
            .map_err(io::Error::from)
            .and_then(|_| {
                rustix::process::ioctl_tiocsctty(std::io::stdin()).map_err(io::Error::from)
            })
        {
            return format!("controlling terminal: {e}");
        }
    }
    if let Some(personality) = spec.personality {
        let persona = match personality {
            Personality::Linux => 0x0000,
            Personality::Linux32 => 0x0008,
        };
        if let Err(e) = sys::set_personality(persona) {
            return format!("personality {personality:?}: {e}");
        }
    }
    if !spec.no_new_privileges {
        if let Err(e) = install(filters) {
            return e;
        }
    }
    if let Err(e) = privileges::apply(&spec.into()) {
        return e;
    }
    umask(Mode::from_bits_truncate(
        spec.user.umask.unwrap_or(DEFAULT_UMASK),
    ));
    if let Err(e) = chdir(spec.cwd.as_str()) {
        return format!("chdir to cwd {:?}: {}", spec.cwd, e.desc());
    }
    let program = &spec.args[0];
    let path = match find_program(program, &spec.env) {
        Ok(path) => path,
        Err(e) => return e,
    };
    let (Ok(path), Ok(args), Ok(env)) =
        (c_string(path), c_strings(&spec.args), c_strings(&spec.env))
    else {
        return "args or env contain a NUL byte".to_owned();
    };
    if spec.no_new_privileges {
        if let Err(e) = install(filters) {
            return e;
        }
    }
    match execve(&path, &args, &env) {
        Err(e) => format!("exec {program:?}: {}", e.desc()),
        Ok(never) => match never {},
    }
}

pub(crate) fn install(filters: &[BpfProgram]) -> Result<(), String> {
    for program in filters {
        sys::install_seccomp(program).map_err(|e| format!("install seccomp filter: {e}"))?;
    }
    Ok(())
}

/// The file `program` names: itself if it has a `/`, else the first executable in `$PATH` (the
/// container's env, as runc).
pub(crate) fn find_program(program: &str, env: &[String]) -> Result<PathBuf, String> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("exec {program:?}: executable file not found in $PATH"))
}

/// Fails `create` (not `start`) for a program that is not there to be executed, as runc
/// does: found in `$PATH` or, with a `/`, existing (relative to the cwd), executable, not a
/// directory.
fn check_program(spec: &ContainerSpec) -> Result<(), String> {
    let Some(program) = spec.args.first() else {
        return Err("the process has no args".to_owned());
    };
    let path = Path::new(&spec.cwd).join(find_program(program, &spec.env)?);
    match nix::sys::stat::stat(&path) {
        Err(e) => Err(format!(
            "exec {program:?}: stat {}: {}",
            path.display(),
            e.desc()
        )),
        Ok(_) if !is_executable(&path) => Err(format!("exec {program:?}: permission denied")),
        Ok(_) => Ok(()),
    }
}

/// The most of the program's file [`warm_program`] reads.
const WARM_LIMIT: u64 = 64 << 20;

/// Reads the program's file once while the container waits for `start`, so that its exec
/// after `start` pages it in from the guest's cache instead of through virtio-fs (about 40 ms
/// for busybox under TCG). A hint: anything not a regular file, or any error, is left alone.
fn warm_program(spec: &ContainerSpec) {
    let Some(program) = spec.args.first() else {
        return;
    };
    let Ok(path) = find_program(program, &spec.env) else {
        return;
    };
    let path = Path::new(&spec.cwd).join(path);
    if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
        return;
    }
    // Non-blocking open (a FIFO swapped in since does not hold `start` up), and only what is
    // still a regular file is read.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path);
    if let Ok(file) = opened {
        if file.metadata().is_ok_and(|m| m.is_file()) {
            let _ = io::copy(&mut io::Read::take(file, WARM_LIMIT), &mut io::sink());
        }
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| {
        let t = m.file_type();
        !t.is_dir() && !t.is_char_device() && m.permissions().mode() & 0o111 != 0
    })
}

fn c_string(path: PathBuf) -> Result<CString, std::ffi::NulError> {
    CString::new(path.into_os_string().into_encoded_bytes())
}

fn c_strings(items: &[String]) -> Result<Vec<CString>, std::ffi::NulError> {
    items.iter().map(|s| CString::new(s.as_bytes())).collect()
}

fn read_spec(stream: &mut UnixStream) -> io::Result<ContainerSpec> {
    let mut header = [0u8; husk_protocol::HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = decode_len(header).map_err(io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    decode_body(&body).map_err(io::Error::other)
}

fn write_frame(stream: &mut UnixStream, msg: &Response) -> io::Result<()> {
    stream.write_all(&encode(msg).map_err(io::Error::other)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(args: &[&str], cwd: &str) -> ContainerSpec {
        serde_json::from_value(serde_json::json!({
            "id": "c", "rootfs": {"kind": "virtio_fs", "tag": "c", "path": null},
            "rootfs_readonly": false, "hostname": null, "args": args,
            "env": ["PATH=/usr/bin:/bin"], "cwd": cwd, "user": {"uid": 0, "gid": 0},
            "namespaces": ["mount"],
        }))
        .unwrap()
    }

    #[test]
    fn test_check_program_missing_fails_with_stat_error() {
        let err = check_program(&running(&["/no/such/cmd"], "/")).unwrap_err();

        assert_eq!(
            err,
            "exec \"/no/such/cmd\": stat /no/such/cmd: No such file or directory"
        );
    }

    #[test]
    fn test_check_program_not_in_path_fails() {
        let err = check_program(&running(&["no-such-cmd"], "/")).unwrap_err();

        assert!(err.contains("executable file not found in $PATH"), "{err}");
    }

    #[test]
    fn test_check_program_not_executable_fails() {
        let err = check_program(&running(&["/etc/passwd"], "/")).unwrap_err();

        assert!(err.contains("permission denied"), "{err}");
    }

    #[test]
    fn test_check_program_in_path_or_relative_to_cwd_passes() {
        check_program(&running(&["sh", "-c", "true"], "/")).unwrap();
        check_program(&running(&["./sh"], "/bin")).unwrap();
    }
}
