//! A pod's virtio-fs share, assembled so that the host never resolves a path the guest can
//! write (the class of Kata CVE-2020-2026 and CVE-2020-2024).
//!
//! The guest writes the share (`<run_dir>/share`) at will and can plant a symlink wherever it
//! expects the host to look. So a container's part is built elsewhere, in `<run_dir>/stage/<id>`
//! (the run directory is 0700 and outside the share): a small tmpfs with the mount points
//! `rootfs` and `binds/<slot>/<name>` (an empty file or directory named like the bind's
//! source), the binds of the container's sources on them (`nosuid,nodev`, read-only where the
//! container's are; a directory with its submounts for `rbind`), the tmpfs then sealed
//! read-only. Only then is it bound, whole, onto `share/<id>`: a directory
//! made with `mkdirat` on the share's descriptor and opened with
//! `openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`, the mount made through `/proc/self/fd`.
//! Removal detaches that one mount through a descriptor opened the same way; a directory is
//! deleted only once nothing is mounted below it, and never through a symlink.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::unistd::{unlinkat, UnlinkatFlags};
use tracing::warn;

use husk_hypervisor::ShareEntry;

use crate::bundle::BINDS_TAG;
use crate::SandboxError;

/// A pod's share: its directory, a descriptor of it, and the staging directory beside it.
#[derive(Debug)]
pub(crate) struct PodShare {
    dir: PathBuf,
    fd: OwnedFd,
    stage: PathBuf,
}

impl PodShare {
    /// Makes `<run_dir>` (0700), its `share` and `stage` directories (0700), and opens the
    /// share.
    ///
    /// # Errors
    /// [`SandboxError::StateDir`].
    pub fn create(run_dir: &Path) -> Result<Self, SandboxError> {
        let (dir, stage) = (run_dir.join("share"), run_dir.join("stage"));
        for path in [run_dir, &dir, &stage] {
            private_dir(path).map_err(|e| io_err(path, e))?;
        }
        let fd = open_dir_nofollow(&dir).map_err(|e| io_err(&dir, e.into()))?;
        Ok(Self { dir, fd, stage })
    }

    /// The share's host directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Exposes container `id`'s rootfs (`read_only` or not) and bind sources as
    /// `share/<id>/rootfs` and `share/<id>/binds/<slot>`.
    ///
    /// # Errors
    /// [`SandboxError::InvalidId`], or a mount that fails ([`SandboxError::StateDir`]);
    /// nothing is left mounted.
    pub fn place(
        &self,
        id: &str,
        rootfs: &Path,
        read_only: bool,
        binds: &[ShareEntry],
    ) -> Result<(), SandboxError> {
        husk_protocol::validate_id(id).map_err(SandboxError::InvalidId)?;
        let stage = self.stage.join(id);
        discard_stage(&stage);
        let placed =
            build_stage(&stage, rootfs, read_only, binds).and_then(|()| self.attach(id, &stage));
        discard_stage(&stage);
        if placed.is_err() {
            self.remove(id);
        }
        placed
    }

    /// Binds the built `stage` onto `share/<id>`, a directory made and opened on the share's
    /// descriptor without following a symlink; whatever the guest planted there goes first.
    fn attach(&self, id: &str, stage: &Path) -> Result<(), SandboxError> {
        let err = |e: Errno| io_err(&self.dir.join(id), e.into());
        let mode = Mode::from_bits_truncate(0o700);
        if let Err(Errno::EEXIST) = mkdirat(&self.fd, id, mode) {
            self.remove(id);
            mkdirat(&self.fd, id, mode).map_err(err)?;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(beneath() | ResolveFlag::RESOLVE_NO_XDEV);
        let target = openat2(&self.fd, id, how).map_err(err)?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(
            Some(stage),
            &fd_path(&target),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(err)
    }

    /// Undoes what [`PodShare::place`] made for `id` (or removes what the guest planted at
    /// `share/<id>`): detaches the mount there, then deletes the entry if nothing is mounted
    /// below it.
    pub fn remove(&self, id: &str) {
        if husk_protocol::validate_id(id).is_err() {
            return;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(beneath());
        // A planted symlink does not open (ELOOP): nothing of ours is there to detach.
        if let Ok(fd) = openat2(&self.fd, id, how) {
            let _ = umount2(&fd_path(&fd), MntFlags::MNT_DETACH);
        }
        let entry = self.dir.join(id);
        if !mount_points_under(&entry).is_empty() {
            warn!(path = %entry.display(), "still mounted: not removed");
            return;
        }
        // A guest-made tree holds no mount (checked above); std's removal follows no symlink.
        let removed = match unlinkat(&self.fd, id, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::ENOTEMPTY) => std::fs::remove_dir_all(&entry),
            Err(Errno::ENOTDIR) => {
                unlinkat(&self.fd, id, UnlinkatFlags::NoRemoveDir).map_err(Into::into)
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = removed {
            warn!(path = %entry.display(), error = %e, "share entry not removed");
        }
    }
}

/// Removes container `id`'s part of the share of the pod in `run_dir` (for a process that
/// does not hold the pod: containerd's cleanup after a dead shim).
pub fn remove_from(run_dir: &Path, id: &str) {
    let dir = run_dir.join("share");
    match open_dir_nofollow(&dir) {
        Ok(fd) => PodShare {
            dir,
            fd,
            stage: run_dir.join("stage"),
        }
        .remove(id),
        Err(e) => warn!(path = %dir.display(), error = %e, "pod share not opened"),
    }
}

/// Builds container `id`'s tree in `stage` (host-only: the guest cannot reach it).
fn build_stage(
    stage: &Path,
    rootfs: &Path,
    read_only: bool,
    binds: &[ShareEntry],
) -> Result<(), SandboxError> {
    let fail = |path: &Path, e: std::io::Error| io_err(path, e);
    private_dir(stage).map_err(|e| fail(stage, e))?;
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let data = Some("mode=0755,size=64k,nr_inodes=1024");
    mount(Some("tmpfs"), stage, Some("tmpfs"), base, data).map_err(|e| fail(stage, e.into()))?;
    mount(
        None::<&str>,
        stage,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail(stage, e.into()))?;
    let root = stage.join("rootfs");
    std::fs::create_dir(&root).map_err(|e| fail(&root, e))?;
    bind_sealed(rootfs, &root, read_only, true)?;
    for entry in binds {
        let at = stage.join(BINDS_TAG).join(entry.path_in_share());
        let parent = at.parent().unwrap_or(stage);
        std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
        entry.kind.make_placeholder(&at).map_err(|e| fail(&at, e))?;
        bind_sealed(
            &entry.source,
            &at,
            entry.read_only,
            entry.kind.is_recursive(),
        )?;
    }
    // The skeleton itself: the guest plants nothing in `share/<id>` or `binds`.
    let sealed = base | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, stage, None::<&str>, sealed, None::<&str>)
        .map_err(|e| fail(stage, e.into()))
}

/// Binds `from` (recursively) on `to`, then seals every mount of the bind `nosuid,nodev`, and
/// read-only when `read_only`, keeping the flags it already had.
fn bind_sealed(
    from: &Path,
    to: &Path,
    read_only: bool,
    recursive: bool,
) -> Result<(), SandboxError> {
    let err = |e: Errno| io_err(to, e.into());
    let flags = match recursive {
        true => MsFlags::MS_BIND | MsFlags::MS_REC,
        false => MsFlags::MS_BIND,
    };
    mount(Some(from), to, None::<&str>, flags, None::<&str>).map_err(err)?;
    for point in mount_points_under(to) {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(AT_FDCWD, &point, how).map_err(err)?;
        let mut flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | kept_flags(&fd).map_err(err)?;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            None::<&str>,
            &fd_path(&fd),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// The per-mount flags of the mount `fd` is on that a bind remount must repeat.
fn kept_flags(fd: &OwnedFd) -> Result<MsFlags, Errno> {
    let have = fstatvfs(fd)?.flags();
    let pairs = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    Ok(pairs
        .into_iter()
        .filter(|(st, _)| have.contains(*st))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms))
}

/// Detaches a stage and removes its directory (it is ours: no guest path is involved).
fn discard_stage(stage: &Path) {
    if !detach_all(stage) {
        warn!(path = %stage.display(), "stage still mounted: not removed");
        return;
    }
    let _ = std::fs::remove_dir(stage);
}

/// Detaches every mount at or below `dir`, deepest first, each through a descriptor opened
/// without following a symlink (a path below a guest-writable tree may have been replaced by
/// one: it fails to open, and the mount above it takes it along). Whether none is left.
pub(crate) fn detach_all(dir: &Path) -> bool {
    let mut points = mount_points_under(dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let detached = openat2(AT_FDCWD, &point, how)
            .and_then(|fd| umount2(&fd_path(&fd), MntFlags::MNT_DETACH));
        if let Err(e) = detached {
            tracing::debug!(mount = %point.display(), error = %e, "not detached here");
        }
    }
    mount_points_under(dir).is_empty()
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

pub(crate) use husk_hypervisor::unescape_mountinfo;

/// `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS` (which implies no magic links).
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

/// `/proc/self/fd/<fd>`: a mount through it acts on the very file `fd` was opened on.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn open_dir_nofollow(dir: &Path) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(AT_FDCWD, dir, how)
}

/// Makes `path` and its missing parents 0700 (an existing `path` is made 0700 too).
pub(crate) fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

fn io_err(path: &Path, source: std::io::Error) -> SandboxError {
    SandboxError::StateDir {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use husk_hypervisor::ShareEntry;

    use super::*;
    use husk_hypervisor::EntryKind;

    /// A run directory, a rootfs with one file, a bind directory, a directory with a bound
    /// file and its sibling, and a sentinel directory outside everything.
    struct Fixture {
        tmp: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Option<Self> {
            if !nix::unistd::geteuid().is_root() {
                println!("SKIPPED: pod share tests need root (mounts)");
                return None;
            }
            let tmp = tempfile::tempdir().unwrap();
            for dir in ["rootfs", "data", "files", "sentinel"] {
                std::fs::create_dir(tmp.path().join(dir)).unwrap();
            }
            std::fs::write(tmp.path().join("rootfs/a"), "a").unwrap();
            std::fs::write(tmp.path().join("files/bound"), "b").unwrap();
            std::fs::write(tmp.path().join("files/secret"), "s").unwrap();
            Some(Self { tmp })
        }

        fn path(&self, sub: &str) -> PathBuf {
            self.tmp.path().join(sub)
        }

        fn binds(&self) -> Vec<ShareEntry> {
            vec![
                ShareEntry {
                    slot: "0".into(),
                    source: self.path("data"),
                    name: Some("data".into()),
                    kind: EntryKind::Dir { recursive: true },
                    read_only: false,
                },
                ShareEntry {
                    slot: "1".into(),
                    source: self.path("files/bound"),
                    name: Some("bound".into()),
                    kind: EntryKind::File,
                    read_only: true,
                },
            ]
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn test_place_over_planted_symlink_builds_inside_share_only() {
        let Some(fx) = Fixture::new() else { return };
        let run_dir = fx.path("run");
        let share = PodShare::create(&run_dir).unwrap();
        std::os::unix::fs::symlink(fx.path("sentinel"), share.path().join("c1")).unwrap();

        share
            .place("c1", &fx.path("rootfs"), true, &fx.binds())
            .unwrap();

        let c1 = share.path().join("c1");
        let placed = (
            names(&fx.path("sentinel")),
            names(&c1),
            names(&c1.join("binds/1")),
            std::fs::read_to_string(c1.join("rootfs/a")).unwrap(),
            names(&c1.join("binds/0")),
        );
        let rootfs_write = std::fs::write(c1.join("rootfs/x"), "x");
        let skeleton_write = std::fs::create_dir(c1.join("planted"));
        let file_write = std::fs::write(c1.join("binds/1/bound"), "w");
        std::fs::write(c1.join("binds/0/data/new"), "n").unwrap();
        let mounts: Vec<_> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*share.path().to_string_lossy()))
            .map(str::to_owned)
            .collect();
        share.remove("c1");
        let left = mount_points_under(&run_dir);
        crate::pod::cleanup(&run_dir);

        assert_eq!(placed.0, Vec::<String>::new(), "made through the symlink");
        assert_eq!(placed.1, ["binds", "rootfs"]);
        assert_eq!(placed.2, ["bound"], "the bound file's siblings are seen");
        assert_eq!(placed.3, "a");
        assert_eq!(
            placed.4,
            ["data"],
            "the bound directory's siblings are seen"
        );
        assert!(rootfs_write.is_err() && skeleton_write.is_err() && file_write.is_err());
        assert_eq!(mounts.len(), 4, "{mounts:?}");
        assert!(
            mounts.iter().all(|l| l.contains("nosuid,nodev")),
            "{mounts:?}"
        );
        assert_eq!(left, Vec::<PathBuf>::new());
        assert!(!run_dir.exists());
        assert_eq!(names(&fx.path("data")), ["new"]);
        assert_eq!(names(&fx.path("rootfs")), ["a"]);
        assert_eq!(names(&fx.path("files")), ["bound", "secret"]);
    }

    #[test]
    fn test_remove_planted_symlink_unmounts_and_deletes_nothing_outside() {
        let Some(fx) = Fixture::new() else { return };
        let run_dir = fx.path("run");
        let share = PodShare::create(&run_dir).unwrap();
        std::fs::write(fx.path("sentinel/keep"), "k").unwrap();
        let outside = fx.path("sentinel/mnt");
        std::fs::create_dir(&outside).unwrap();
        let flags = MsFlags::MS_BIND;
        mount(
            Some(&fx.path("data")),
            &outside,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .unwrap();
        std::os::unix::fs::symlink(fx.path("sentinel"), share.path().join("c2")).unwrap();

        share.remove("c2");
        let still_mounted = mount_points_under(&outside);
        let _ = umount2(&outside, MntFlags::MNT_DETACH);
        crate::pod::cleanup(&run_dir);

        assert_eq!(still_mounted, [outside]);
        assert_eq!(names(&fx.path("sentinel")), ["keep", "mnt"]);
        assert!(!run_dir.exists());
    }

    #[test]
    fn test_place_bad_id_refused_before_any_path() {
        let Some(fx) = Fixture::new() else { return };
        let run_dir = fx.path("run");
        let share = PodShare::create(&run_dir).unwrap();
        let placed = share.place("../x", &fx.path("rootfs"), false, &[]);
        assert!(
            matches!(placed, Err(SandboxError::InvalidId(_))),
            "{placed:?}"
        );
        assert!(!fx.path("run/x").exists() && !fx.path("x").exists());
        crate::pod::cleanup(&run_dir);
    }

    #[test]
    fn test_unescape_mountinfo_space_and_backslash() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/bad\04"), r"/bad\04");
    }

    #[test]
    fn test_unescape_mountinfo_signed_digits_kept_literally() {
        // Found by the mountinfo_unescape fuzz target: `\+01` decoded as "\x01".
        assert_eq!(
            unescape_mountinfo(r"/ru\+011t1\ba12nl"),
            r"/ru\+011t1\ba12nl"
        );
    }
}
