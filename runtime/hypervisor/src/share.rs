//! What virtiofsd exports of a share, enforced by the host kernel.
//!
//! The guest kernel is assumed hostile: it can mount any virtio-fs tag itself, with any flags,
//! so the agent's read-only remount in the guest protects nothing. virtiofsd therefore runs in
//! a mount namespace of its own (made between fork and exec, gone with virtiofsd) in which
//! - a read-only share is a recursive bind of itself sealed `ro,nosuid,nodev`
//!   (`mount_setattr(2)` with `AT_RECURSIVE`, a top-only remount on kernels before 5.12);
//! - a share of entries (bind mounts' sources, files or directories) is a staging directory
//!   in the VM's run directory holding, for each entry, a slot directory with one empty
//!   placeholder of the entry's kind and name, on which the entry is bound (a directory with
//!   its submounts for `rbind`, without for `bind`): the staging directory and its slots are
//!   sealed read-only, each entry `nosuid,nodev` (recursively for a directory) and read-only
//!   when its binds are; nothing else of an entry's host directory is reachable. The guest
//!   binds `<share>/<slot>/<name>`, so its mountinfo shows the source's name as the bind's
//!   root, as under runc.
//!
//! A read-write share of a whole directory needs no mount and runs virtiofsd as before (a
//! pod's share then sees the binds its owner adds later).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::{Export, FsShare, HypervisorError, ShareEntry};

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
    /// Plans `share`'s export; an entries share's staging directory is made at `staging`.
    ///
    /// # Errors
    /// [`HypervisorError::ShareStaging`] when the staging directory cannot be made.
    pub(crate) fn prepare(share: &FsShare, staging: &Path) -> Result<Self, HypervisorError> {
        let entries = match &share.export {
            Export::Dir { path, read_only } => {
                let steps = match read_only {
                    false => Vec::new(),
                    true => vec![
                        bind(path, path, true)?,
                        seal(path, MOUNT_ATTR_RDONLY, true)?,
                    ],
                };
                return Ok(Self {
                    exported: path.clone(),
                    steps,
                });
            }
            Export::Entries(entries) => entries,
        };
        let err = |source| HypervisorError::ShareStaging {
            path: staging.to_owned(),
            source,
        };
        make_private_dir(staging).map_err(err)?;
        let mut steps = vec![bind(staging, staging, false)?];
        let mut seals = vec![seal(staging, MOUNT_ATTR_RDONLY, false)?];
        for entry in entries {
            let placeholder = staging.join(entry.path_in_share());
            make_placeholder(staging, entry).map_err(err)?;
            let recursive = entry.kind.is_recursive();
            let attrs = if entry.read_only {
                MOUNT_ATTR_RDONLY
            } else {
                0
            };
            steps.push(bind(&entry.source, &placeholder, recursive)?);
            seals.push(seal(&placeholder, attrs, recursive)?);
        }
        steps.extend(seals);
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

    /// Removes an entries share's staging directory (after virtiofsd ended: its mounts went
    /// with its namespace). Never recursive: a placeholder directory still holding something
    /// (a mount left by mistake) stays, and the host's files with it.
    pub(crate) fn remove_staging(staging: &Path) {
        for slot in std::fs::read_dir(staging).into_iter().flatten().flatten() {
            let slot = slot.path();
            for placeholder in std::fs::read_dir(&slot).into_iter().flatten().flatten() {
                let _ = match placeholder.file_type().is_ok_and(|t| t.is_dir()) {
                    true => std::fs::remove_dir(placeholder.path()),
                    false => std::fs::remove_file(placeholder.path()),
                };
            }
            let _ = std::fs::remove_dir(&slot);
        }
        let _ = std::fs::remove_dir(staging);
    }
}

/// A directory only root reaches (0700).
fn make_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// Makes `entry`'s slot in `staging` and in it an empty placeholder of the entry's kind and
/// name (the slot itself for a nameless entry).
fn make_placeholder(staging: &Path, entry: &ShareEntry) -> std::io::Result<()> {
    let slot = staging.join(&entry.slot);
    make_private_dir(&slot)?;
    match &entry.name {
        Some(name) => entry.kind.make_placeholder(&slot.join(name)),
        None => Ok(()),
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
    use crate::EntryKind;

    /// `dir/name` as the entry in slot `slot`.
    fn entry(dir: &Path, slot: &str, name: &str, kind: EntryKind, read_only: bool) -> ShareEntry {
        ShareEntry {
            slot: slot.into(),
            source: dir.join(name),
            name: Some(name.into()),
            kind,
            read_only,
        }
    }

    /// A share of `entries`, the guest's cache not kept.
    fn entries(entries: Vec<ShareEntry>) -> FsShare {
        FsShare {
            tag: "binds".into(),
            export: Export::Entries(entries),
            keep_cache: false,
        }
    }

    /// A share of the whole `path`.
    fn whole(path: &Path, read_only: bool) -> FsShare {
        FsShare {
            tag: "rootfs".into(),
            export: Export::Dir {
                path: path.to_owned(),
                read_only,
            },
            keep_cache: false,
        }
    }

    /// The names in a directory.
    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
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
        let share = whole(dir.path(), false);
        let plan = ShareMounts::prepare(&share, &dir.path().join("stage")).unwrap();
        assert!(plan.steps.is_empty());
        assert_eq!(plan.exported(), dir.path());
    }

    #[test]
    fn test_prepare_each_entry_a_placeholder_in_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "secret sibling?").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/keep"), "x").unwrap();
        let share = entries(vec![
            entry(dir.path(), "0", "f", EntryKind::File, true),
            entry(
                dir.path(),
                "1",
                "d",
                EntryKind::Dir { recursive: false },
                false,
            ),
            entry(
                dir.path(),
                "2",
                "d",
                EntryKind::Dir { recursive: true },
                false,
            ),
        ]);
        let staging = dir.path().join("stage");
        let plan = ShareMounts::prepare(&share, &staging).unwrap();
        assert_eq!(plan.exported(), staging);
        assert_eq!(names(&staging), vec!["0", "1", "2"]);
        assert_eq!(names(&staging.join("0")), vec!["f"]);
        assert_eq!(std::fs::metadata(staging.join("0/f")).unwrap().len(), 0);
        assert_eq!(std::fs::read_dir(staging.join("1/d")).unwrap().count(), 0);
        let at = |p: &str| staging.join(p).to_string_lossy().into_owned();
        assert_eq!(
            binds(&plan),
            vec![
                (at(""), false),
                (at("0/f"), false),
                (at("1/d"), false),
                (at("2/d"), true)
            ]
            .into_iter()
            .map(|(p, r)| (p.trim_end_matches('/').to_owned(), r))
            .collect::<Vec<_>>()
        );
        ShareMounts::remove_staging(&staging);
        assert!(!staging.exists());
        assert!(dir.path().join("d/keep").exists());
        assert!(dir.path().join("f").exists());
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

    fn is_root() -> bool {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: share export tests need root (mounts)");
            return false;
        }
        true
    }

    #[tokio::test]
    async fn test_apply_read_only_dir_kernel_refuses_writes() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "host").unwrap();
        let share = whole(dir.path(), true);
        // What a guest can ask of virtiofsd: create, write, list (not a remount: it speaks
        // FUSE).
        let script = "echo x > $D/new && echo WROTE-NEW; echo x >> $D/f && echo WROTE-F; \
                      echo LS $(ls -A $D); true";
        let seen = run_in_export(&share, &dir.path().join("stage"), script).await;
        assert_eq!(seen.trim(), "LS f", "{seen}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "host"
        );
        assert!(!dir.path().join("new").exists());
    }

    /// Entries of one share keep their own flags; nothing else of their host directories is
    /// reachable, and the staging directory takes no new file.
    #[tokio::test]
    async fn test_apply_entries_expose_only_themselves_each_with_its_flags() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ro"), "host").unwrap();
        std::fs::write(dir.path().join("rw"), "host").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/keep"), "host").unwrap();
        std::fs::write(dir.path().join("secret"), "sibling").unwrap();
        let staging = dir.path().join("stage");
        let script = "echo x > $D/new && echo WROTE-NEW; echo x > $D/0/new && echo WROTE-SLOT; \
                      echo x >> $D/0/ro && echo WROTE-RO; echo x >> $D/1/rw && echo WROTE-RW; \
                      echo x > $D/2/d/new && echo WROTE-D; \
                      echo LS $(ls -A $D) / $(ls -A $D/0) / $(ls -A $D/2/d); \
                      cat $D/2/d/../secret 2>/dev/null && echo READ-SECRET; true";
        for dir_ro in [true, false] {
            let share = entries(vec![
                entry(dir.path(), "0", "ro", EntryKind::File, true),
                entry(dir.path(), "1", "rw", EntryKind::File, false),
                entry(
                    dir.path(),
                    "2",
                    "d",
                    EntryKind::Dir { recursive: true },
                    dir_ro,
                ),
            ]);
            let seen = run_in_export(&share, &staging, script).await;
            let expected = match dir_ro {
                true => "WROTE-RW\nLS 0 1 2 / ro / keep",
                false => "WROTE-RW\nWROTE-D\nLS 0 1 2 / ro / keep new",
            };
            assert_eq!(seen.trim(), expected, "dir_ro={dir_ro}: {seen}");
            ShareMounts::remove_staging(&staging);
            assert!(!staging.exists());
            let _ = std::fs::remove_file(dir.path().join("d/new"));
        }
        assert!(!dir.path().join("new").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ro")).unwrap(),
            "host"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("rw")).unwrap(),
            "hostx\nx\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("d/keep")).unwrap(),
            "host"
        );
    }
}
