//! Hypervisor doors: how a sandbox gets a VM.
//!
//! The sandbox sees only the [`Hypervisor`] trait: boot a VM described by [`VmConfig`], reach its
//! hybrid-vsock socket, wait for it to end, stop it. Each door is a module behind the trait:
//! [`qemu`] runs `qemu-system-x86_64 -M microvm` and serves our own device models to it over
//! vhost-user; the built-in KVM VMM will be the second door. Nothing above this crate knows
//! which door runs a VM, and nothing in it knows about OCI.
#![warn(missing_docs)]

pub mod cgroup;
pub mod console;
mod error;
mod helpers;
mod jail;
pub mod kvm;
pub mod qemu;
mod share;
pub mod snapshot;
mod sys;

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

pub use cgroup::unescape_mountinfo;
pub use error::HypervisorError;
pub use helpers::find_program;
pub use husk_vmm::probe::{probe as probe_kvm, ProbeReport};
pub use jail::{exited as process_exited, Sentinel};

/// Where the VMs' directories live: a short path, so that no socket path depends on the length
/// of a state root or a container id (engines use 64-hex ids under long roots; `sun_path` holds
/// 107 bytes).
const VM_DIRS: &str = "/run/husk-vm";

/// The directory the jailed processes of the VM whose run directory is `run_dir` may write
/// (sockets, console, VMM logs): `/run/husk-vm/<32 hex of the run directory's SHA-256>`, the
/// same for every command that names `run_dir`. Everything of the run directory itself (the
/// container's state, jail specs, share staging) stays out of the jails' reach. Made by the
/// door at boot; removed with the run directory ([`remove_vm_dir`]).
#[must_use]
pub fn vm_dir(run_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let absolute = std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_owned());
    let digest = Sha256::digest(absolute.as_os_str().as_encoded_bytes());
    Path::new(VM_DIRS).join(hex(&digest[..16]))
}

/// `bytes` as lowercase hex (the names of VM directories and snapshots).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the VM directory of `run_dir` ([`vm_dir`]) with what is in it; call it wherever the
/// run directory is removed.
pub fn remove_vm_dir(run_dir: &Path) {
    remove_vm_dir_at(&vm_dir(run_dir));
}

/// Removes the VM directory `dir` and its owner file ([`owner_file`]).
fn remove_vm_dir_at(dir: &Path) {
    for removed in [
        std::fs::remove_dir_all(dir),
        std::fs::remove_file(owner_file(dir)),
    ] {
        if let Err(e) = removed {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "VM directory not removed");
            }
        }
    }
}

/// Beside each VM directory (out of its jails' reach: they see only the directory itself),
/// `<dir>.owner` names the run directory it belongs to, so that a VM directory whose run
/// directory was removed without the runtime (a state root deleted after its monitor was
/// killed) is found and removed by [`sweep_orphaned_vm_dirs`].
fn owner_file(dir: &Path) -> PathBuf {
    dir.with_extension("owner")
}

/// Records `run_dir` as the owner of its VM directory ([`owner_file`]), before the directory
/// is made.
pub(crate) fn claim_vm_dir(run_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let absolute = std::path::absolute(run_dir)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(owner_file(&vm_dir(run_dir)))?;
    std::io::Write::write_all(&mut file, absolute.as_os_str().as_encoded_bytes())
}

/// Removes every VM directory whose owner's run directory no longer exists and whose VM is
/// gone (nothing listens on its vsock socket: a run directory in a mount namespace of its own
/// is invisible here while its VM runs); best effort, and a directory without an owner file
/// is left alone.
pub(crate) fn sweep_orphaned_vm_dirs() {
    let Ok(entries) = std::fs::read_dir(VM_DIRS) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "owner") {
            continue;
        }
        let Ok(owner) = std::fs::read(&path) else {
            continue;
        };
        let owner = PathBuf::from(std::ffi::OsString::from_vec(owner));
        let dir = path.with_extension("");
        if owner.is_absolute() && owner.symlink_metadata().is_err() && !listening(&dir) {
            tracing::debug!(dir = %dir.display(), owner = %owner.display(), "removing an orphaned VM directory");
            remove_vm_dir_at(&dir);
        }
    }
}

/// Opens the Unix socket file at `path` itself, never through a symlink (`O_PATH|O_NOFOLLOW`,
/// checked to be a socket), for a connection to `/proc/self/fd/<fd>` of the result: a VM's
/// directory is writable by its jailed VMM, which could put a link to another VM's socket (or
/// any host socket) where its own was.
///
/// # Errors
/// `path` cannot be opened, or is not a socket.
pub fn open_socket_no_follow(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::SFlag;
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&fd)?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFSOCK.bits() {
        return Err(std::io::Error::other(format!(
            "{} is not a socket",
            path.display()
        )));
    }
    Ok(fd)
}

/// Longest `OK <port>\n` line accepted from the vsock device.
const MAX_OK_LINE: usize = 32;

/// Connects to the Unix socket at `path` itself, never through a symlink
/// ([`open_socket_no_follow`]).
pub(crate) async fn connect_socket_no_follow(
    path: &Path,
) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    let fd = open_socket_no_follow(path)?;
    tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await
}

/// Opens a hybrid-vsock connection to `port` in the guest.
///
/// # Errors
/// I/O errors; [`std::io::ErrorKind::ConnectionRefused`] when the guest refused the port.
pub async fn connect_vsock(uds: &Path, port: u32) -> std::io::Result<tokio::net::UnixStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect_socket_no_follow(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(MAX_OK_LINE);
    while line.len() < MAX_OK_LINE {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(std::io::ErrorKind::ConnectionRefused.into())
            }
            Err(e) => return Err(e),
        };
        if byte == b'\n' {
            return match line.starts_with(b"OK ") {
                true => Ok(stream),
                false => Err(std::io::Error::other("vsock device answered without OK")),
            };
        }
        line.push(byte);
    }
    Err(std::io::Error::other("vsock device answer too long"))
}

/// Whether something listens on the vsock socket in the VM directory `dir` (connected to
/// without following a link, [`open_socket_no_follow`]; anything there but a socket is not
/// listening). The connection is never waited for (a full backlog counts as listening) and
/// closed at once.
fn listening(dir: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(file) = open_socket_no_follow(&dir.join("vsock.sock")) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(format!("/proc/self/fd/{}", file.as_raw_fd()).as_str()) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return true;
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => true,
        Err(e) => !matches!(
            e,
            nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT
        ),
    }
}

/// Host side of the hybrid vsock of the VM whose run directory is `run_dir`.
#[must_use]
pub fn vsock_path(run_dir: &Path) -> PathBuf {
    vm_dir(run_dir).join("vsock.sock")
}

/// Which door to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypervisorKind {
    /// The fastest door this host can run a full guest with.
    Auto,
    /// The built-in VMM on KVM.
    Kvm,
    /// QEMU `-M microvm` (KVM or TCG).
    Qemu,
}

impl std::str::FromStr for HypervisorKind {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "qemu" => Ok(Self::Qemu),
            "kvm" => Ok(Self::Kvm),
            other => Err(HypervisorError::UnknownKind(other.to_owned())),
        }
    }
}

/// Host files and directories shared into the guest with virtio-fs. What the guest may not
/// write, the host does not let it write, whatever the guest mounts (`share`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    /// virtio-fs tag the guest mounts.
    pub tag: String,
    /// What the share holds.
    pub export: Export,
    /// The guest keeps what it read (virtiofsd `--cache always`: data across opens, names and
    /// attributes without expiry): for a container's own rootfs, which only the container
    /// changes while it runs. Otherwise (`--cache auto`) every open drops the file's cached
    /// data and attributes expire after a second, so host changes show.
    pub keep_cache: bool,
}

/// What an [`FsShare`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// A host directory, whole.
    Dir {
        /// The host directory.
        path: PathBuf,
        /// Exported read-only (and `nosuid,nodev`) by the host kernel.
        read_only: bool,
    },
    /// Chosen host files and directories (bind mounts' sources), each alone in a directory of
    /// its own, `<slot>/<name>`: nothing else of the host is reachable. One share serves any
    /// number of them (a VM has few device slots).
    Entries(Vec<ShareEntry>),
}

impl Export {
    /// The host refuses every write to the share.
    pub fn read_only(&self) -> bool {
        match self {
            Self::Dir { read_only, .. } => *read_only,
            Self::Entries(entries) => entries.iter().all(|e| e.read_only),
        }
    }
}

/// A file or directory shared alone at `<slot>/<name>` of its share: a bind of it then shows
/// that name as its root in the guest's `/proc/self/mountinfo`, as under runc.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareEntry {
    /// Its directory in the share: one path component, unique in the share.
    pub slot: String,
    /// The host file or directory (absolute, canonical).
    pub source: PathBuf,
    /// Its name in the slot: one path component; `None` for `/`, which has no name: the slot
    /// is then the directory itself.
    pub name: Option<String>,
    /// What it is.
    pub kind: EntryKind,
    /// Exported read-only (and `nosuid,nodev`) by the host kernel.
    pub read_only: bool,
}

impl ShareEntry {
    /// Its path in the share: `<slot>/<name>`, or `<slot>`.
    pub fn path_in_share(&self) -> PathBuf {
        let slot = PathBuf::from(&self.slot);
        match &self.name {
            Some(name) => slot.join(name),
            None => slot,
        }
    }
}

/// The kind of a [`ShareEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory, with the mounts below it on the host (`rbind`) or without them (`bind`).
    Dir {
        /// With the mounts below it.
        recursive: bool,
    },
}

impl EntryKind {
    /// A directory bound with the mounts below it.
    pub fn is_recursive(self) -> bool {
        self == Self::Dir { recursive: true }
    }

    /// Makes an empty stand-in of this kind at `path` for the entry to be bound on: a
    /// directory (0700) or a new regular file (0600).
    ///
    /// # Errors
    /// `path` exists, or cannot be made.
    pub fn make_placeholder(self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        match self {
            Self::Dir { .. } => std::fs::DirBuilder::new().mode(0o700).create(path),
            Self::File => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map(drop),
        }
    }
}

/// A raw disk image given to the guest as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The disk's serial (virtio-blk GET_ID), by which the guest finds it: 1 to 20 characters
    /// of `[A-Za-z0-9_-]`.
    pub serial: String,
    /// Host file.
    pub path: PathBuf,
    /// The guest cannot write it.
    pub read_only: bool,
}

impl Disk {
    /// The disk of a VM that is saved for a snapshot: the serial of the disk the restored VM
    /// gets, no contents (each door backs it with something empty and writable: QEMU a
    /// `null-co` device, husk-vmm an empty file; writable, so that a restored read-only disk
    /// still matches the features the guest negotiated). The guest sees a disk of 0 sectors;
    /// its agent probes the disk again when a container mounts it (the restored VM's real
    /// disk then).
    #[must_use]
    pub fn unplugged(serial: &str) -> Self {
        Self {
            serial: serial.to_owned(),
            path: PathBuf::new(),
            read_only: false,
        }
    }

    /// Whether it is [`unplugged`](Self::unplugged).
    #[must_use]
    pub fn is_unplugged(&self) -> bool {
        self.path.as_os_str().is_empty()
    }
}

/// A pod's network device: a tap in the pod's network namespace (mirrored to the pod's
/// interface on the host), which the VMM opens from inside that namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// The pod's network namespace (a bind-mounted nsfs file, as CRI keeps it).
    pub netns: PathBuf,
    /// The tap's name in it.
    pub tap: String,
    /// The guest device's hardware address (the pod interface's).
    pub mac: String,
    /// The pod interface's MTU, where known when the VM starts (not for a network an
    /// engine's hook wires later).
    pub mtu: Option<u16>,
}

impl NetDevice {
    /// The hardware address of an [`unplugged`](Self::unplugged) device, in the locally
    /// administered range.
    pub const UNPLUGGED_MAC: &'static str = "02:68:75:73:6b:00";

    /// A device with no host side (no namespace, no tap; its frames go nowhere): what the VM
    /// saved for a boot snapshot has, so that a VM restored from it has the device the
    /// engine's network is given to. The agent gives the device the pod interface's address.
    #[must_use]
    pub fn unplugged() -> Self {
        Self {
            netns: PathBuf::new(),
            tap: String::new(),
            mac: Self::UNPLUGGED_MAC.to_owned(),
            mtu: None,
        }
    }

    /// Whether it is [`unplugged`](Self::unplugged).
    #[must_use]
    pub fn is_unplugged(&self) -> bool {
        self.tap.is_empty()
    }
}

/// Everything a door needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` of the guest.
    pub kernel: PathBuf,
    /// Initramfs (cpio) holding the agent as `/init`.
    pub initramfs: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// virtio-fs shares.
    pub shares: Vec<FsShare>,
    /// virtio-blk disks.
    pub disks: Vec<Disk>,
    /// A virtio-net device on the pod's network.
    pub net: Option<NetDevice>,
    /// Private directory of this VM: sockets and logs go here; the door removes only its own files.
    pub run_dir: PathBuf,
    /// The container's host cgroup, which the VM's host processes run in ([`cgroup`]); `None`
    /// without `linux.cgroupsPath`: they stay in the runtime's cgroup.
    pub cgroup: Option<cgroup::CgroupSpec>,
    /// Start from a boot snapshot where the door can ([`snapshot`]); `false` always boots a
    /// kernel.
    pub snapshot: bool,
    /// The vsock port the guest listens on once it is up (its agent's): a VM restored from a
    /// snapshot that does not answer there in time is stopped and booted cold instead.
    pub ready_port: u32,
    /// The vsock port a VM about to be saved as a boot snapshot is asked on to ready its guest
    /// (the agent gives free memory back as zeros, which the snapshot leaves out); the door
    /// waits until the guest closes that connection. The QEMU door asks; the built-in VMM
    /// does not yet (in the emulated test host every page the guest takes is a nested fault).
    pub save_port: Option<u32>,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmExit {
    /// Exit status of the VMM process.
    pub status: ExitStatus,
}

/// A door to a VM: boot, reach, wait, stop.
#[async_trait::async_trait]
pub trait Hypervisor: Send + std::fmt::Debug {
    /// Boots the VM. Returns once the VMM runs; the guest may still be booting.
    ///
    /// # Errors
    /// A missing program or file, or a VMM or device backend that failed to start.
    async fn start(&mut self) -> Result<(), HypervisorError>;

    /// The connection to [`VmConfig::ready_port`] that showed a VM restored by
    /// [`Hypervisor::start`] answering, once: the caller's first connection to the guest's
    /// agent, one fewer for the guest to accept. `None` after a cold boot.
    fn take_ready_connection(&mut self) -> Option<tokio::net::UnixStream>;

    /// Host side of the VM's hybrid vsock (see DESIGN.md, "Guest channel").
    fn vsock_path(&self) -> PathBuf;

    /// File that receives the guest's serial console.
    fn console_path(&self) -> PathBuf;

    /// What the VMM and the guest said last: console and VMM log tails, for error messages.
    fn diagnostics(&self) -> String;

    /// Host pid of the VMM process, once started: the jail's pid 1, whose every namespace is
    /// its own (the launcher's before it exists).
    fn pid(&self) -> Option<u32>;

    /// Host pid of the VMM's jail launcher: the door's own child, which the host reaps, and
    /// the process to signal to end the VM (its jail dies with it). [`Hypervisor::pid`] is
    /// guest-controlled once the guest owns the VMM: for reporting only.
    fn launcher_pid(&self) -> Option<u32>;

    /// Starts the VM's [`Sentinel`], the container's process as engines see it, once the VM
    /// runs.
    ///
    /// # Errors
    /// [`HypervisorError::NotStarted`], or `husk-vmm sentinel` failed.
    async fn sentinel(&self) -> Result<Sentinel, HypervisorError>;

    /// Waits until the VM ends (guest power-off, reboot, panic or a killed VMM).
    ///
    /// # Errors
    /// [`HypervisorError::NotStarted`] or a failed wait.
    async fn wait(&mut self) -> Result<VmExit, HypervisorError>;

    /// Ends the VM now and removes everything the door made. Idempotent.
    ///
    /// # Errors
    /// Only when a helper process cannot be killed or reaped.
    async fn stop(&mut self) -> Result<(), HypervisorError>;
}

/// Picks the door for `kind` on this host and prepares it for `config`.
///
/// # Errors
/// [`HypervisorError`] when the requested door cannot run here.
pub fn new_door(
    kind: HypervisorKind,
    config: VmConfig,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    match kind {
        HypervisorKind::Qemu => Ok(Box::new(qemu::QemuDoor::new(config)?)),
        HypervisorKind::Kvm => {
            let probe = probe_logged();
            if !probe.passed {
                return Err(HypervisorError::KvmUnusable(probe.detail));
            }
            Ok(Box::new(kvm::KvmDoor::new(config)?))
        }
        // The built-in VMM where the host's KVM can run a full guest, QEMU (TCG) elsewhere.
        HypervisorKind::Auto => match probe_logged().passed {
            true => Ok(Box::new(kvm::KvmDoor::new(config)?)),
            false => Ok(Box::new(qemu::QemuDoor::new(config)?)),
        },
    }
}

/// Runs the KVM probe and logs what it found.
fn probe_logged() -> ProbeReport {
    let probe = husk_vmm::probe::probe();
    tracing::debug!(
        passed = probe.passed,
        elapsed_ms = probe.elapsed.as_secs_f64() * 1e3,
        detail = %probe.detail,
        "KVM probe"
    );
    probe
}

/// Last `lines` lines of a text file, for error messages (empty when unreadable).
pub fn tail_lines(path: &Path, lines: usize) -> Vec<String> {
    let text = read_tail(path);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = all.len().saturating_sub(lines);
    all.into_iter()
        .skip(skip)
        .map(|l| l.trim_end().to_owned())
        .collect()
}

/// The reason of a guest kernel panic on the console at `path` ("Kernel panic - not syncing:
/// <reason>"), if the guest panicked.
pub fn kernel_panic(path: &Path) -> Option<String> {
    const MARK: &str = "Kernel panic - not syncing:";
    let text = read_tail(path);
    let line = text.lines().find(|l| l.contains(MARK))?;
    let reason = line.split_once(MARK).map_or("", |(_, r)| r).trim();
    Some(reason.to_owned())
}

/// The last [`TAIL_BYTES`] of a log the guest writes (it may write without bound), lossily
/// decoded. Opened without following a symlink or blocking on a FIFO, and only if it is a
/// regular file: an error report never reads what is not a log.
fn read_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = console::open_regular(path, false) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = file.take(TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// How much of a guest-written log is read back.
const TAIL_BYTES: u64 = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kind_from_str_unknown_rejected() {
        assert_eq!(
            "qemu".parse::<HypervisorKind>().unwrap(),
            HypervisorKind::Qemu
        );
        assert_eq!(
            "auto".parse::<HypervisorKind>().unwrap(),
            HypervisorKind::Auto
        );
        assert!("xen".parse::<HypervisorKind>().is_err());
    }

    #[test]
    fn test_vm_dir_of_removed_run_dir_swept_at_next_boot() {
        let runs = tempfile::tempdir().unwrap();
        let (gone, live) = (runs.path().join("gone"), runs.path().join("live"));
        for run_dir in [&gone, &live] {
            std::fs::create_dir(run_dir).unwrap();
            jail::make_vm_dir(run_dir).unwrap();
            std::fs::write(vm_dir(run_dir).join("vsock.sock"), "").unwrap();
        }
        let hidden = runs.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        jail::make_vm_dir(&hidden).unwrap();
        let _vsock =
            std::os::unix::net::UnixListener::bind(vm_dir(&hidden).join("vsock.sock")).unwrap();
        // A dead VM whose VMM left a link to a live socket where its own was: not followed.
        let linked = runs.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        jail::make_vm_dir(&linked).unwrap();
        std::os::unix::fs::symlink(
            vm_dir(&hidden).join("vsock.sock"),
            vm_dir(&linked).join("vsock.sock"),
        )
        .unwrap();
        std::fs::remove_dir_all(&linked).unwrap();
        // The state root removed without the runtime: the VM directory stays behind.
        std::fs::remove_dir_all(&gone).unwrap();
        std::fs::remove_dir_all(&hidden).unwrap();
        assert!(vm_dir(&gone).is_dir());

        let next = runs.path().join("next");
        std::fs::create_dir(&next).unwrap();
        jail::make_vm_dir(&next).unwrap();

        assert!(!vm_dir(&gone).exists(), "orphaned VM directory left");
        // A VM still listening, whose run directory this process cannot see: kept.
        assert!(
            vm_dir(&hidden).join("vsock.sock").exists(),
            "a running VM's directory swept"
        );
        assert!(!owner_file(&vm_dir(&gone)).exists());
        assert!(
            vm_dir(&live).join("vsock.sock").exists(),
            "a live VM's directory swept"
        );
        assert!(
            !vm_dir(&linked).exists(),
            "a link kept a dead VM's directory"
        );
        for run_dir in [&live, &next, &hidden, &linked] {
            remove_vm_dir(run_dir);
            assert!(!vm_dir(run_dir).exists() && !owner_file(&vm_dir(run_dir)).exists());
        }
    }

    #[test]
    fn test_tail_lines_long_file_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\n\nb\nc\r\nd\n").unwrap();
        assert_eq!(tail_lines(&p, 2), vec!["c", "d"]);
        assert!(tail_lines(&dir.path().join("missing"), 3).is_empty());
    }

    #[test]
    fn test_tail_lines_symlink_and_fifo_empty() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret");
        std::fs::write(&target, "secret\n").unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(tail_lines(&link, 3).is_empty());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(tail_lines(&fifo, 3).is_empty(), "returns at once, empty");
    }

    #[test]
    fn test_tail_lines_reads_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut text = "x".repeat(usize::try_from(TAIL_BYTES).unwrap() * 2);
        text.push_str("\nlast\n");
        std::fs::write(&p, text).unwrap();
        let lines = tail_lines(&p, 2);
        assert_eq!(lines.last().map(String::as_str), Some("last"));
        assert!(
            lines.iter().map(String::len).sum::<usize>() < usize::try_from(TAIL_BYTES).unwrap()
        );
    }

    #[test]
    fn test_kernel_panic_panic_line_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console");
        std::fs::write(
            &p,
            "boot\n[ 1.0] Kernel panic - not syncing: No working init found.\nstack\n",
        )
        .unwrap();
        assert_eq!(kernel_panic(&p).as_deref(), Some("No working init found."));
        std::fs::write(&p, "all fine\n").unwrap();
        assert_eq!(kernel_panic(&p), None);
    }
}
