//! The container's file system view, built by container-init inside its mount namespace:
//! config.json's kernel file system mounts (before `pivot_root`, under the rootfs), the
//! default device nodes in a `/dev` tmpfs, sysctls, and read-only and masked paths (after
//! `pivot_root`, as runc: sysctls, then read-only paths, then masked paths).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use husk_protocol::{BindSource, Device, DeviceKind, Mount, MountFlag, MountKind};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};

use crate::init::ctx;

/// Character devices every container gets in a `/dev` it mounts: (name, major, minor).
const DEV_NODES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Mounts `mounts` in order under `root`; a tmpfs on `/dev` gets the default device nodes
/// and links right away, before anything is mounted below it. Bind sources are under
/// `shares` (the agent mounted each virtio-fs share there, named by its tag). A container
/// without a cgroup namespace of its own gets its `cgroup` directory bound where it mounts
/// the cgroup hierarchy (as runc does), never the whole guest's hierarchy.
pub fn mount_all(
    root: &Path,
    shares: &Path,
    mounts: &[Mount],
    cgroup: Option<&Path>,
) -> io::Result<()> {
    for m in mounts {
        mount_one(root, shares, m, cgroup)?;
        if !m.recursive.is_empty() {
            set_recursive(root, m)?;
        }
    }
    Ok(())
}

/// Applies `m.recursive` to the mount at its destination and every mount below it.
fn set_recursive(root: &Path, m: &Mount) -> io::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let target = root.join(m.destination.trim_start_matches('/'));
    // The mount just made there (the container has not run: nothing of its own moved it).
    let at = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(&target)
        .map_err(|e| io::Error::new(e.kind(), format!("mount {}: {e}", m.destination)))?;
    crate::sys::mount_setattr_recursive(at.as_fd(), m.recursive.set, m.recursive.clear).map_err(
        |e| {
            io::Error::new(
                e.kind(),
                format!("recursive mount options of {}: {e}", m.destination),
            )
        },
    )
}

/// Mounts `m` under `root`.
fn mount_one(root: &Path, shares: &Path, m: &Mount, cgroup: Option<&Path>) -> io::Result<()> {
    if let (MountKind::Bind, Some(source)) = (m.kind, &m.source) {
        return bind(root, shares, m, source);
    }
    if let (MountKind::Cgroup2, Some(cgroup)) = (m.kind, cgroup) {
        let target = prepare_target(root, &m.destination)?;
        return bind_at(cgroup, &target, m);
    }
    let target = prepare_target(root, &m.destination)?;
    let fstype = m.kind.fstype();
    let data = m.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    // What the mount point holds, still reachable through this descriptor once covered.
    let copy_up = (m.kind == MountKind::Tmpfs && m.flags.contains(&MountFlag::TmpCopyUp))
        .then(|| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options()
                .read(true)
                .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
                .open(&target)
        })
        .transpose()
        .map_err(|e| io::Error::new(e.kind(), format!("tmpcopyup of {}: {e}", m.destination)))?;
    // A read-only tmpfs to copy into is made read-only once filled.
    let flags = ms_flags(&m.flags);
    let first = match copy_up {
        Some(_) => flags - MsFlags::MS_RDONLY,
        None => flags,
    };
    mount(
        Some(m.device.as_deref().unwrap_or(fstype)),
        &target,
        Some(fstype),
        first,
        data,
    )
    .map_err(|e| ctx(e, &format!("mount {fstype} on {}", m.destination)))?;
    if let Some(below) = copy_up {
        let below = Path::new("/proc/self/fd").join(below.as_raw_fd().to_string());
        copy_tree(&below, &target, 0).map_err(|e| {
            io::Error::new(e.kind(), format!("tmpcopyup of {}: {e}", m.destination))
        })?;
        if flags != first {
            let remount = flags | MsFlags::MS_REMOUNT;
            mount(None::<&str>, &target, None::<&str>, remount, data)
                .map_err(|e| ctx(e, &format!("read-only remount of {}", m.destination)))?;
        }
    }
    if m.destination.trim_end_matches('/') == "/dev" {
        populate_dev(&target)?;
    }
    Ok(())
}

/// How deep [`copy_tree`] goes.
const COPY_UP_DEPTH: usize = 32;

/// Copies the directory tree `from` into the directory `to` (directories, regular files and
/// symlinks with their modes and owners; nothing else), as runc's `tmpcopyup`.
fn copy_tree(from: &Path, to: &Path, depth: usize) -> io::Result<()> {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    if depth > COPY_UP_DEPTH {
        return Err(io::Error::other("too deep"));
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let dest = to.join(entry.file_name());
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&dest)?;
            copy_tree(&entry.path(), &dest, depth + 1)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &dest)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dest)?;
        } else {
            continue;
        }
        lchown(&dest, Some(meta.uid()), Some(meta.gid()))?;
        if !kind.is_symlink() {
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(meta.mode()))?;
        }
    }
    Ok(())
}

/// Binds a file or directory of a share (or of a directory inside it, `source.path`) onto
/// `m.destination`, then applies its flags with a remount (a bind mount ignores them on
/// creation).
fn bind(root: &Path, shares: &Path, m: &Mount, source: &BindSource) -> io::Result<()> {
    let mut from = shares.join(&source.tag);
    if let Some(path) = &source.path {
        from.push(path);
    }
    let target = match &source.file {
        Some(file) => {
            from.push(file);
            let (parent, name) = m
                .destination
                .trim_end_matches('/')
                .rsplit_once('/')
                .unwrap_or(("", &m.destination));
            let target = prepare_target(root, parent)?.join(name);
            match std::fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "bind mount {}: the destination in the rootfs is not a regular file",
                        m.destination
                    )))
                }
                Err(_) => drop(std::fs::File::create(&target)?),
            }
            target
        }
        None => prepare_target(root, &m.destination)?,
    };
    bind_at(&from, &target, m)
}

/// Binds `from` on `target` (`m.destination` under the root), then applies `m`'s flags.
fn bind_at(from: &Path, target: &Path, m: &Mount) -> io::Result<()> {
    let what = format!("bind {} on {}", from.display(), m.destination);
    mount(
        Some(from),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ctx(e, &what))?;
    let flags = ms_flags(&m.flags);
    if flags.is_empty() {
        return Ok(());
    }
    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
    mount(None::<&str>, target, None::<&str>, remount, None::<&str>).map_err(|e| {
        ctx(
            e,
            &format!("remount bind mount {} with its options", m.destination),
        )
    })
}

/// `root` + `destination`, creating missing directories; a symlink or a non-directory on the
/// way is an error (the rootfs is the user's: a mount must not land outside it).
fn prepare_target(root: &Path, destination: &str) -> io::Result<PathBuf> {
    let mut path = root.to_path_buf();
    for component in destination.split('/').filter(|c| !c.is_empty()) {
        path.push(component);
        let shown = || {
            path.strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string()
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "mount destination {destination}: /{} in the rootfs is not a directory",
                    shown()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("mkdir /{}: {e}", shown())))?,
            Err(e) => return Err(e),
        }
    }
    Ok(path)
}

/// Makes `devices` (`linux.devices`) under `root`, after the mounts (so in the container's
/// /dev): the node with its type and numbers, then its mode (mknod's is cut by the umask) and
/// owner. An existing node there is replaced. In a user namespace, where mknod is refused, the
/// guest's own node at the same path is bound instead (as runc binds the host's).
pub fn make_devices(root: &Path, devices: &[Device]) -> io::Result<()> {
    for d in devices {
        let (parent, name) = d
            .path
            .rsplit_once('/')
            .ok_or_else(|| io::Error::other(format!("device path {}", d.path)))?;
        let node = prepare_target(root, parent)?.join(name);
        let kind = match d.kind {
            DeviceKind::Char => SFlag::S_IFCHR,
            DeviceKind::Block => SFlag::S_IFBLK,
            DeviceKind::Fifo => SFlag::S_IFIFO,
        };
        match std::fs::symlink_metadata(&node) {
            Ok(meta) if !meta.is_dir() => std::fs::remove_file(&node)?,
            _ => {}
        }
        let mode = Mode::from_bits_truncate(d.mode);
        match mknod(&node, kind, mode, makedev(d.major, d.minor)) {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) => {
                std::fs::File::create(&node)?;
                mount(
                    Some(Path::new(&d.path)),
                    &node,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| ctx(e, &format!("bind device {}", d.path)))?;
                continue;
            }
            Err(e) => return Err(ctx(e, &format!("mknod {}", d.path))),
        }
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &node,
            mode,
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(|e| ctx(e, &format!("chmod {}", d.path)))?;
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &node,
            Some(nix::unistd::Uid::from_raw(d.uid)),
            Some(nix::unistd::Gid::from_raw(d.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ctx(e, &format!("chown {}", d.path)))?;
    }
    Ok(())
}

fn ms_flags(flags: &[MountFlag]) -> MsFlags {
    flags.iter().fold(MsFlags::empty(), |acc, f| {
        acc | match f {
            MountFlag::Ro => MsFlags::MS_RDONLY,
            MountFlag::Nosuid => MsFlags::MS_NOSUID,
            MountFlag::Nodev => MsFlags::MS_NODEV,
            MountFlag::Noexec => MsFlags::MS_NOEXEC,
            MountFlag::Sync => MsFlags::MS_SYNCHRONOUS,
            MountFlag::Dirsync => MsFlags::MS_DIRSYNC,
            MountFlag::Noatime => MsFlags::MS_NOATIME,
            MountFlag::Nodiratime => MsFlags::MS_NODIRATIME,
            MountFlag::Relatime => MsFlags::MS_RELATIME,
            MountFlag::Strictatime => MsFlags::MS_STRICTATIME,
            MountFlag::TmpCopyUp => MsFlags::empty(),
        }
    })
}

/// Creates the default device nodes; in a user namespace, where mknod is not allowed, binds
/// the guest's own nodes (still visible under /dev before `pivot_root`) instead, as runc.
fn populate_dev(dev: &Path) -> io::Result<()> {
    let rw = Mode::from_bits_truncate(0o666);
    for (name, major, minor) in DEV_NODES {
        let node = dev.join(name);
        match mknod(&node, SFlag::S_IFCHR, rw, makedev(major, minor)) {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) => bind_device(name, &node)?,
            Err(e) => return Err(ctx(e, &format!("mknod /dev/{name}"))),
        }
    }
    for (name, target) in DEV_LINKS {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    Ok(())
}

fn bind_device(name: &str, node: &Path) -> io::Result<()> {
    std::fs::File::create(node)
        .map_err(|e| io::Error::new(e.kind(), format!("create /dev/{name}: {e}")))?;
    let source = Path::new("/dev").join(name);
    mount(
        Some(&source),
        node,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ctx(e, &format!("bind /dev/{name}")))
}

/// Writes `value` to the sysctl `key` through the caller's /proc/sys: the net, IPC and UTS
/// entries there are those of the caller's namespaces.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let rel = match key.contains('/') {
        true => key.to_owned(),
        false => key.replace('.', "/"),
    };
    std::fs::write(Path::new("/proc/sys").join(rel), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value}: {e}")))
}

/// Makes `path` read-only with a bind mount onto itself, keeping the flags the mount had (in
/// a user namespace they are locked); a missing path is skipped, as runc does.
pub fn make_readonly(path: &str) -> io::Result<()> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(ctx(e, &format!("bind read-only path {path}"))),
    }
    let kept = statvfs(path)
        .map(|st| {
            let f = st.flags();
            [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            ]
            .into_iter()
            .filter(|(st, _)| f.contains(*st))
            .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
        })
        .map_err(|e| ctx(e, &format!("statvfs {path}")))?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept;
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|e| ctx(e, &format!("remount {path} read-only")))
}

/// Hides `path`: `/dev/null` bound over a file, an empty read-only tmpfs over a directory; a
/// missing path is skipped, as runc does.
pub fn mask(path: &str) -> io::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("masked path {path}: {e}"))),
    };
    let result = match meta.is_dir() {
        true => mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ),
        false => mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    };
    result.map_err(|e| ctx(e, &format!("mask {path}")))
}
