//! Mount points in a read-only rootfs. The host exports a read-only rootfs read-only, so the
//! agent cannot make a missing mount destination in it as it does in a writable one; the host
//! makes them before the VM starts, as runc makes them in the rootfs before its read-only
//! remount. Only destinations on the rootfs itself are made (not those inside another mount
//! of the container, such as `/dev/pts`), walking the rootfs by descriptor without following
//! a symlink (the agent refuses symlinks in a destination too).

use std::os::fd::OwnedFd;
use std::path::Path;

use husk_protocol::{Mount, MountKind};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{mkdirat, Mode};

/// Makes the destinations of `mounts` that lie on the rootfs at `rootfs`: a directory, or an
/// empty file for a file bind.
///
/// # Errors
/// A destination that cannot be made (a component is not a directory, or is a symlink).
pub(super) fn make(rootfs: &Path, mounts: &[Mount]) -> Result<(), String> {
    let root = open(AT_FDCWD, rootfs, OFlag::O_DIRECTORY)
        .map_err(|e| format!("rootfs {}: {e}", rootfs.display()))?;
    for (i, m) in mounts.iter().enumerate() {
        let earlier = mounts.get(..i).unwrap_or_default();
        if earlier
            .iter()
            .any(|e| is_below(&m.destination, &e.destination))
        {
            continue;
        }
        let file = m.kind == MountKind::Bind && m.source.as_ref().is_some_and(|s| s.file.is_some());
        make_one(&root, &m.destination, file).map_err(|e| {
            format!(
                "mount destination {} in the read-only rootfs: {e}",
                m.destination
            )
        })?;
    }
    Ok(())
}

/// Whether `path` is strictly below `dir` (both absolute container paths).
fn is_below(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/') && !rest.trim_matches('/').is_empty())
}

fn make_one(root: &OwnedFd, destination: &str, file: bool) -> Result<(), Errno> {
    let parts: Vec<&str> = destination.split('/').filter(|c| !c.is_empty()).collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(());
    };
    let mut dir = open(root, Path::new("."), OFlag::O_DIRECTORY)?;
    for name in dirs {
        dir = open_or_mkdir(&dir, name)?;
    }
    if !file {
        return open_or_mkdir(&dir, last).map(drop);
    }
    let how = OpenHow::new()
        .flags(OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(0o644))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(&dir, *last, how).map(drop)
}

fn open_or_mkdir(dir: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    match open(dir, Path::new(name), OFlag::O_DIRECTORY) {
        Err(Errno::ENOENT) => {
            mkdirat(dir, name, Mode::from_bits_truncate(0o755))?;
            open(dir, Path::new(name), OFlag::O_DIRECTORY)
        }
        other => other,
    }
}

/// `O_PATH` open of `path` beneath `dir`, following no symlink.
fn open<Fd: std::os::fd::AsFd>(dir: Fd, path: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, path, how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::BindSource;

    fn mount(destination: &str, file: bool) -> Mount {
        Mount {
            destination: destination.into(),
            kind: MountKind::Bind,
            flags: Vec::new(),
            data: Vec::new(),
            source: Some(BindSource {
                tag: "binds".into(),
                path: None,
                file: file.then(|| "f".into()),
            }),
            device: None,
            recursive: Default::default(),
        }
    }

    #[test]
    fn test_make_dirs_and_files_on_rootfs_only() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        let mounts = [
            mount("/dev", false),
            mount("/dev/pts", false),
            mount("/data/sub", false),
            mount("/etc/f", true),
        ];
        make(root.path(), &mounts).unwrap();
        assert!(root.path().join("data/sub").is_dir());
        assert!(root.path().join("etc/f").is_file());
        assert!(!root.path().join("dev/pts").exists());
    }

    #[test]
    fn test_make_symlink_in_destination_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        assert!(make(root.path(), &[mount("/link/x", false)]).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
