//! What virtiofsd exports of a share, enforced by the host kernel.
//!
//! The guest kernel is assumed hostile: it can mount any virtio-fs tag itself, with any flags,
//! so the agent's read-only remount in the guest protects nothing. virtiofsd therefore runs in
//! a mount namespace of its own (made between fork and exec, gone with virtiofsd) in which
//! - a read-only share is a recursive bind of itself sealed `ro,nosuid,nodev`
//!   (`mount_setattr(2)` with `AT_RECURSIVE`, a top-only remount on kernels before 5.12);
//! - a share of one entry (a bind mount's source file or directory) is a staging directory in
//!   the VM's run directory holding one empty placeholder of the entry's kind and name, on
//!   which the entry is bound (a directory with its submounts for `rbind`, without for
//!   `bind`): the staging directory is sealed read-only, the entry `nosuid,nodev` (recursively
//!   for a directory) and read-only when the bind is; nothing else of the entry's host
//!   directory is reachable. The guest binds `<share>/<name>`, so its mountinfo shows the
//!   source's name as the bind's root, as under runc.
//!
//! A read-write share of a whole directory needs no mount and runs virtiofsd as before (a
//! pod's share then sees the binds its owner adds later).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::{EntryKind, FsShare, HypervisorError};

/// `MOUNT_ATTR_*` and `AT_RECURSIVE` (include/uapi/linux/mount.h, fcntl.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `struct mount_attr` (include/uapi/linux/mount.h, MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One mount made in virtiofsd's namespace, its paths ready for the child (no allocation
/// between fork and exec).
#[derive(Debug)]
enum Step {
    /// Bind `from` on `to`, recursively or not.
    Bind {
        from: CString,
        to: CString,
        recursive: bool,
    },
    /// Add `attrs` (`MOUNT_ATTR_*`) to the mount at `target` (and, `recursive`, below it).
    Seal {
        target: CString,
        attrs: u64,
        recursive: bool,
    },
}

/// How virtiofsd exports one share: the directory it serves and the mounts that make it.
#[derive(Debug)]
pub(crate) struct ShareMounts {
    exported: PathBuf,
    steps: Vec<Step>,
}

impl ShareMounts {
    /// Plans `share`'s export; an entry's staging directory is made at `staging`.
    ///
    /// # Errors
    /// [`HypervisorError::ShareStaging`] when the staging directory cannot be made.
    pub(crate) fn prepare(share: &FsShare, staging: &Path) -> Result<Self, HypervisorError> {
        let ro = share.read_only;
        let Some(entry) = &share.entry else {
            let steps = match ro {
                false => Vec::new(),
                true => vec![
                    bind(&share.host_dir, &share.host_dir, true)?,
                    seal(&share.host_dir, MOUNT_ATTR_RDONLY, true)?,
                ],
            };
            return Ok(Self {
                exported: share.host_dir.clone(),
                steps,
            });
        };
        let err = |source| HypervisorError::ShareStaging {
            path: staging.to_owned(),
            source,
        };
        let placeholder = staging.join(&entry.name);
        make_staging(staging, &placeholder, entry.kind).map_err(err)?;
        let recursive = entry.kind == EntryKind::Dir { recursive: true };
        let entry_attrs = if ro { MOUNT_ATTR_RDONLY } else { 0 };
        let steps = vec![
            bind(staging, staging, false)?,
            bind(&share.host_dir.join(&entry.name), &placeholder, recursive)?,
            seal(staging, MOUNT_ATTR_RDONLY, false)?,
            seal(&placeholder, entry_attrs, recursive)?,
        ];
        Ok(Self {
            exported: staging.to_owned(),
            steps,
        })
    }

    /// The directory virtiofsd serves.
    pub(crate) fn exported(&self) -> &Path {
        &self.exported
    }

    /// Makes `cmd`'s child build the export in a mount namespace of its own before it execs
    /// (nothing to do for a read-write directory).
    pub(crate) fn apply(self, cmd: &mut Command) {
        if self.steps.is_empty() {
            return;
        }
        let steps = self.steps;
        // SAFETY: the closure runs between fork and exec in the single-threaded child; it
        // makes only raw syscalls (unshare, mount, mount_setattr) on buffers built before
        // the fork, allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || build_in_child(&steps));
        }
    }

    /// Removes an entry's staging directory (after virtiofsd ended: its mounts went with its
    /// namespace). Never recursive: a placeholder directory still holding something (a mount
    /// left by mistake) stays, and the host's files with it.
    pub(crate) fn remove_staging(staging: &Path) {
        if let Some((path, is_dir)) = staging_placeholder(staging) {
            let _ = match is_dir {
                true => std::fs::remove_dir(path),
                false => std::fs::remove_file(path),
            };
        }
        let _ = std::fs::remove_dir(staging);
    }
}

/// The one placeholder in `staging`, if any, and whether it is a directory (not following a
/// symlink).
fn staging_placeholder(staging: &Path) -> Option<(PathBuf, bool)> {
    let entry = std::fs::read_dir(staging).ok()?.next()?.ok()?;
    let is_dir = entry.file_type().ok()?.is_dir();
    Some((entry.path(), is_dir))
}

/// Makes the staging directory (0700: host users never reach it) and its empty placeholder of
/// `kind`.
fn make_staging(staging: &Path, placeholder: &Path, kind: EntryKind) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(staging)?;
    match kind {
        EntryKind::Dir { .. } => std::fs::DirBuilder::new().mode(0o700).create(placeholder),
        EntryKind::File => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(placeholder)
            .map(drop),
    }
}

fn c_path(path: &Path) -> Result<CString, HypervisorError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| HypervisorError::ShareStaging {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn bind(from: &Path, to: &Path, recursive: bool) -> Result<Step, HypervisorError> {
    Ok(Step::Bind {
        from: c_path(from)?,
        to: c_path(to)?,
        recursive,
    })
}

/// Seals `target` with `attrs` plus `nosuid,nodev`.
fn seal(target: &Path, attrs: u64, recursive: bool) -> Result<Step, HypervisorError> {
    Ok(Step::Seal {
        target: c_path(target)?,
        attrs: attrs | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        recursive,
    })
}

/// In the child: a private mount namespace (host mounts still propagate in, none out), then
/// `steps`.
fn build_in_child(steps: &[Step]) -> std::io::Result<()> {
    // SAFETY: unshare(2) takes no pointer.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    // SAFETY: the target is a NUL-terminated literal; the other pointers may be null.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    })?;
    for step in steps {
        match step {
            Step::Bind {
                from,
                to,
                recursive,
            } => bind_in_child(from, to, *recursive)?,
            Step::Seal {
                target,
                attrs,
                recursive,
            } => seal_in_child(target, *attrs, *recursive)?,
        }
    }
    Ok(())
}

fn bind_in_child(from: &CString, to: &CString, recursive: bool) -> std::io::Result<()> {
    let flags = match recursive {
        true => libc::MS_BIND | libc::MS_REC,
        false => libc::MS_BIND,
    };
    // SAFETY: both paths are NUL-terminated CStrings owned by the caller for the call.
    check(unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// `mount_setattr(2)`; where the kernel lacks it (before 5.12), a bind remount of the top mount.
fn seal_in_child(target: &CString, attrs: u64, recursive: bool) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: the path is a NUL-terminated CString and `attr` a live `struct mount_attr`
    // whose size is passed with it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if attrs & MOUNT_ATTR_RDONLY != 0 {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: as in `bind_in_child`.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShareEntry;

    fn file_entry(name: &str) -> ShareEntry {
        ShareEntry {
            name: name.into(),
            kind: EntryKind::File,
        }
    }

    fn dir_entry(name: &str, recursive: bool) -> ShareEntry {
        ShareEntry {
            name: name.into(),
            kind: EntryKind::Dir { recursive },
        }
    }

    /// A share of `host_dir` (or its `entry`), the guest's cache not kept.
    fn share(host_dir: PathBuf, entry: Option<ShareEntry>, read_only: bool) -> FsShare {
        FsShare {
            tag: "bind0".into(),
            host_dir,
            entry,
            read_only,
            keep_cache: false,
        }
    }

    /// The names in a staging directory.
    fn staged_names(staging: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(staging)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    /// The binds of `plan`: (to, recursive).
    fn binds(plan: &ShareMounts) -> Vec<(String, bool)> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind { to, recursive, .. } => {
                    Some((to.to_string_lossy().into_owned(), *recursive))
                }
                Step::Seal { .. } => None,
            })
            .collect()
    }

    #[test]
    fn test_prepare_rw_dir_no_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let share = share(dir.path().to_owned(), None, false);
        let plan = ShareMounts::prepare(&share, &dir.path().join("stage")).unwrap();
        assert!(plan.steps.is_empty());
        assert_eq!(plan.exported(), dir.path());
    }

    #[test]
    fn test_prepare_file_stages_only_a_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "secret sibling?").unwrap();
        let share = share(dir.path().to_owned(), Some(file_entry("f")), true);
        let staging = dir.path().join("stage");
        let plan = ShareMounts::prepare(&share, &staging).unwrap();
        assert_eq!(plan.exported(), staging);
        let names = staged_names(&staging);
        assert_eq!(names, vec!["f"]);
        assert_eq!(std::fs::metadata(staging.join("f")).unwrap().len(), 0);
        ShareMounts::remove_staging(&staging);
        assert!(!staging.exists());
    }

    #[test]
    fn test_prepare_dir_stages_an_empty_directory_bound_without_submounts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/keep"), "x").unwrap();
        let share = share(dir.path().to_owned(), Some(dir_entry("d", false)), false);
        let staging = dir.path().join("stage");
        let plan = ShareMounts::prepare(&share, &staging).unwrap();
        assert_eq!(plan.exported(), staging);
        let names = staged_names(&staging);
        assert_eq!(names, vec!["d"]);
        assert_eq!(std::fs::read_dir(staging.join("d")).unwrap().count(), 0);
        let placeholder = staging.join("d").to_string_lossy().into_owned();
        assert!(binds(&plan).contains(&(placeholder, false)));
        ShareMounts::remove_staging(&staging);
        assert!(!staging.exists());
        assert!(dir.path().join("d/keep").exists());
    }

    #[test]
    fn test_prepare_rbind_dir_binds_with_submounts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let share = share(dir.path().to_owned(), Some(dir_entry("d", true)), true);
        let staging = dir.path().join("stage");
        let plan = ShareMounts::prepare(&share, &staging).unwrap();
        let placeholder = staging.join("d").to_string_lossy().into_owned();
        let staged = staging.to_string_lossy().into_owned();
        assert_eq!(binds(&plan), vec![(staged, false), (placeholder, true)]);
        ShareMounts::remove_staging(&staging);
        assert!(!staging.exists());
    }

    /// Runs `script` under `sh` with `share`'s export built (as virtiofsd would be); its
    /// stdout.
    async fn run_in_export(share: &FsShare, staging: &Path, script: &str) -> String {
        let plan = ShareMounts::prepare(share, staging).unwrap();
        let exported = plan.exported().to_owned();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).env("D", exported);
        plan.apply(&mut cmd);
        let out = cmd.output().await.unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What a guest can ask of virtiofsd: create, write, list (not a remount: it speaks FUSE).
    const ATTACK: &str = "echo x > $D/new && echo WROTE-NEW; echo x >> $D/f && echo WROTE-F; \
                          echo LS $(ls -A $D); true";

    #[tokio::test]
    async fn test_apply_read_only_dir_kernel_refuses_writes() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: share export tests need root (mounts)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "host").unwrap();
        let share = share(dir.path().to_owned(), None, true);
        let seen = run_in_export(&share, &dir.path().join("stage"), ATTACK).await;
        assert_eq!(seen.trim(), "LS f", "{seen}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "host"
        );
        assert!(!dir.path().join("new").exists());
    }

    #[tokio::test]
    async fn test_apply_file_share_exposes_only_the_file() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: share export tests need root (mounts)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "host").unwrap();
        std::fs::write(dir.path().join("secret"), "sibling").unwrap();
        let share = share(dir.path().to_owned(), Some(file_entry("f")), false);
        let staging = dir.path().join("stage");
        let seen = run_in_export(&share, &staging, ATTACK).await;
        // A read-write file bind: the file is written, nothing else is reachable.
        assert_eq!(seen.trim(), "WROTE-F\nLS f", "{seen}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "hostx\n"
        );
        ShareMounts::remove_staging(&staging);
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn test_apply_dir_share_exposes_only_the_dir() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: share export tests need root (mounts)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/keep"), "host").unwrap();
        std::fs::write(dir.path().join("secret"), "sibling").unwrap();
        let staging = dir.path().join("stage");
        let script = "echo x > $D/new && echo WROTE-NEW; echo x > $D/d/new && echo WROTE-D; \
                      echo LS $(ls -A $D) / $(ls -A $D/d); \
                      cat $D/d/../secret 2>/dev/null && echo READ-SECRET; true";
        for ro in [true, false] {
            let share = share(dir.path().to_owned(), Some(dir_entry("d", true)), ro);
            let seen = run_in_export(&share, &staging, script).await;
            // The staging directory is read-only either way; the directory as the bind is.
            let expected = match ro {
                true => "LS d / keep",
                false => "WROTE-D\nLS d / keep new",
            };
            assert_eq!(seen.trim(), expected, "ro={ro}: {seen}");
            ShareMounts::remove_staging(&staging);
            assert!(!staging.exists());
        }
        assert!(!dir.path().join("new").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("d/keep")).unwrap(),
            "host"
        );
    }
}
