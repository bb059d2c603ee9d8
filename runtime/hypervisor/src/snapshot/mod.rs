//! Boot snapshots: a guest booted to its agent, saved once, and restored for every VM of the
//! same shape instead of booting a kernel.
//!
//! A snapshot is keyed by everything that shapes the saved guest ([`snapshot_key`]): the door,
//! the contents of the kernel, the initramfs and the VMM binary (SHA-256, cached by their
//! inode, size and times, so a run hashes nothing unchanged), the memory size, the vCPU count,
//! the kernel command line and the device layout (the virtio-fs tags in order; the disks'
//! serials and a network device: the doors save them unplugged, and a restored VM's disk is
//! the container's, probed again by the agent; on the QEMU door, its network device gets the
//! pod's tap and, from the agent, its address). A change to
//! any of them is another key: an old snapshot is never used for a new kernel.
//!
//! The store ([`Store`], `/run/husk-snapshots`) is root's alone (0700, files 0600) and no
//! jail sees it: the VMM that saves writes into its own VM directory, which is then renamed
//! into the store once the VMM has exited; a restoring VMM gets the snapshot read-only and
//! copies its memory, so no guest ever writes a snapshot. The store is in `/run`: snapshots
//! take memory, not disk, and a reboot (a new host kernel, maybe) starts afresh; at most
//! [`MAX_SNAPSHOTS`] are kept, the least recently made removed first.

mod making;

pub(crate) use making::{
    for_boot, maker_config, ready_to_save, remove_maker, settle_restore, wait_ready,
    PREPARE_TIMEOUT, RESTORE_TIMEOUT, SAVE_TIMEOUT,
};

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{hex, VmConfig};

/// Where snapshots are kept.
pub const STORE: &str = "/run/husk-snapshots";
/// Most snapshots kept at once (each holds the memory its guest touched, tens of MiB).
pub const MAX_SNAPSHOTS: usize = 8;
/// Bumped when what goes into a key changes meaning.
const KEY_VERSION: &str = "husk-snapshot-key v1";
/// Files of a snapshot directory ([`husk_vmm::snapshot`]).
const SNAPSHOT_FILES: [&str; 2] = [
    husk_vmm::snapshot::STATE_FILE,
    husk_vmm::snapshot::MEMORY_FILE,
];

/// The key of the boot snapshot for `config` on door `door` running `vmm`, or why the VM
/// boots cold.
///
/// # Errors
/// One line: snapshots are off for this VM, its layout cannot be saved yet (a network
/// device on the built-in VMM), or an input cannot be read.
pub fn snapshot_key(
    store: &Store,
    config: &VmConfig,
    door: &str,
    vmm: &Path,
    cmdline: &str,
) -> Result<String, String> {
    if !config.snapshot {
        return Err("snapshots are off for this VM (--no-snapshot or io.husk.snapshot)".into());
    }
    if config.net.is_some() && !door.starts_with("qemu") {
        return Err("this door cannot save a VM with a network device yet".into());
    }
    let mut key = Sha256::new();
    let mut part = |s: &str| {
        key.update(s.as_bytes());
        key.update(b"\n");
    };
    part(KEY_VERSION);
    part(door);
    for input in [&config.kernel, &config.initramfs, &vmm.to_path_buf()] {
        part(&store.content_hash(input)?);
    }
    part(&config.memory_mib.to_string());
    part(&config.vcpus.to_string());
    part(cmdline);
    for share in &config.shares {
        part(&share.tag);
    }
    // Not virtio-fs tags (they are names of the runtime's own). A disk's serial is what its
    // guest finds it by; its size and contents are the restored VM's own.
    for disk in &config.disks {
        part(&format!("disk: virtio-blk {}", disk.serial));
    }
    if config.net.is_some() {
        part("net: virtio-net");
    }
    Ok(hex(&key.finalize()[..16]))
}

/// The snapshot store: one directory per key.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store at [`STORE`] (or at `HUSK_SNAPSHOT_STORE`, for tests that need their own),
    /// made (0700) if missing.
    ///
    /// # Errors
    /// It cannot be made, or it is not a directory only root can use.
    pub fn open() -> Result<Self, String> {
        Self::open_at(&Self::path())
    }

    /// Where [`Store::open`] opens.
    pub fn path() -> PathBuf {
        std::env::var_os("HUSK_SNAPSHOT_STORE").map_or_else(|| PathBuf::from(STORE), PathBuf::from)
    }

    /// The store at `root` (tests).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_at(root: &Path) -> Result<Self, String> {
        let err = |e: std::io::Error| format!("snapshot store {}: {e}", root.display());
        match std::fs::DirBuilder::new().mode(0o700).create(root) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(err(e)),
            _ => {}
        }
        let meta = std::fs::symlink_metadata(root).map_err(err)?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "snapshot store {} must be a directory of root's with mode 0700",
                root.display()
            ));
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The complete snapshot of `key`, if there is one.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let dir = self.root.join(key);
        SNAPSHOT_FILES
            .iter()
            .all(|f| dir.join(f).is_file())
            .then_some(dir)
    }

    /// An exclusive lock on making (or removing) the snapshot of `key`, if no one else holds
    /// it. The lock file goes with the snapshot ([`Store::remove`]): a lock taken on a file
    /// removed meanwhile is no lock, and counts as held by another.
    pub fn try_lock(&self, key: &str) -> Option<nix::fcntl::Flock<File>> {
        let path = self.lock_path(key);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ok()?;
        let lock =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()?;
        let held = lock.metadata().ok()?;
        let current = std::fs::symlink_metadata(&path).ok()?;
        (held.dev() == current.dev() && held.ino() == current.ino()).then_some(lock)
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.lock"))
    }

    /// Moves the snapshot directory `made` (complete, its VMM gone) into the store as `key`'s,
    /// then removes the oldest snapshots beyond [`MAX_SNAPSHOTS`].
    ///
    /// # Errors
    /// `made` is incomplete or cannot be moved (another file system).
    pub fn install(&self, key: &str, made: &Path) -> Result<PathBuf, String> {
        // `made` was in a directory a jailed VMM could write: nothing in it is followed, and
        // only a real directory of regular files, none open to others, is taken.
        // Not empty either: husk-vmm makes both files before it boots, and fills them only
        // when it saves.
        let private_file = |path: &Path| {
            std::fs::symlink_metadata(path)
                .is_ok_and(|m| m.file_type().is_file() && m.mode() & 0o077 == 0 && m.len() > 0)
        };
        let dir_ok = std::fs::symlink_metadata(made).is_ok_and(|m| m.file_type().is_dir());
        if let Some(bad) = SNAPSHOT_FILES
            .iter()
            .find(|f| !dir_ok || !private_file(&made.join(f)))
        {
            return Err(format!("the saved VM left no private regular file {bad}"));
        }
        let dir = self.root.join(key);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(made, &dir).map_err(|e| format!("moving the snapshot: {e}"))?;
        self.prune(key);
        Ok(dir)
    }

    /// Removes `key`'s snapshot (one that failed to restore), unless another runtime is
    /// making it anew right now.
    pub fn remove(&self, key: &str) {
        if let Some(_lock) = self.try_lock(key) {
            let _ = std::fs::remove_dir_all(self.root.join(key));
            let _ = std::fs::remove_file(self.lock_path(key));
        }
    }

    /// The snapshots kept: key, bytes of memory held, newest first.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut found: Vec<(std::time::SystemTime, String, u64)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let dir = self.lookup(&name)?;
                let memory = std::fs::metadata(dir.join(husk_vmm::snapshot::MEMORY_FILE)).ok()?;
                let made = entry.metadata().ok()?.modified().ok()?;
                Some((made, name, memory.blocks() * 512))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.into_iter().map(|(_, k, b)| (k, b)).collect()
    }

    /// Removes the oldest snapshots beyond [`MAX_SNAPSHOTS`], never `keep`.
    fn prune(&self, keep: &str) {
        for (key, _) in self.list().into_iter().skip(MAX_SNAPSHOTS) {
            if key != keep {
                self.remove(&key);
            }
        }
        // The locks of snapshots never made (a failed boot) or already removed.
        let names = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten();
        for name in names.filter_map(|e| e.file_name().into_string().ok()) {
            if let Some(key) = name.strip_suffix(".lock") {
                if key != keep && self.lookup(key).is_none() {
                    self.remove(key);
                }
            }
        }
    }

    /// SHA-256 of the file at `path`, cached under `hashes/` by its device, inode, size,
    /// modification and change times (a rewritten file has a new change time).
    fn content_hash(&self, path: &Path) -> Result<String, String> {
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let meta = std::fs::metadata(path).map_err(err)?;
        let identity = format!(
            "{}\n{}:{}:{}:{}.{}:{}.{}",
            path.display(),
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        let cache = self
            .root
            .join("hashes")
            .join(hex(&Sha256::digest(identity.as_bytes())[..16]));
        if let Ok(hash) = std::fs::read_to_string(&cache) {
            if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(hash);
            }
        }
        let mut file = File::open(path).map_err(err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf).map_err(err)? {
                0 => break,
                n => hasher.update(buf.get(..n).unwrap_or_default()),
            }
        }
        let hash = hex(&hasher.finalize());
        let _ = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(self.root.join("hashes"));
        if let Ok(mut out) = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&cache)
        {
            let _ = out.write_all(hash.as_bytes());
        }
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::FsShare;

    fn setup() -> (tempfile::TempDir, Store, VmConfig) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o700)).unwrap();
        let store = Store::open_at(&dir.path().join("store")).unwrap();
        for f in ["vmlinux", "initramfs", "vmm"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        let config = VmConfig {
            kernel: dir.path().join("vmlinux"),
            initramfs: dir.path().join("initramfs"),
            memory_mib: 256,
            vcpus: 1,
            shares: vec![FsShare {
                tag: "rootfs".into(),
                export: crate::Export::Dir {
                    path: "/b".into(),
                    read_only: false,
                },
                keep_cache: true,
            }],
            disks: Vec::new(),
            net: None,
            run_dir: "/run/husk/x".into(),
            cgroup: None,
            snapshot: true,
            ready_port: 1024,
            save_port: None,
        };
        (dir, store, config)
    }

    fn key(store: &Store, config: &VmConfig, dir: &Path) -> Result<String, String> {
        snapshot_key(store, config, "kvm", &dir.join("vmm"), "console=ttyS0")
    }

    #[test]
    fn test_key_changes_with_kernel_content_size_and_tags() {
        let (dir, store, mut config) = setup();
        let first = key(&store, &config, dir.path()).unwrap();
        assert_eq!(key(&store, &config, dir.path()).unwrap(), first, "stable");

        std::fs::write(dir.path().join("vmlinux"), "another kernel").unwrap();
        let new_kernel = key(&store, &config, dir.path()).unwrap();
        assert_ne!(new_kernel, first);
        config.memory_mib = 512;
        assert_ne!(key(&store, &config, dir.path()).unwrap(), new_kernel);
        config.shares[0].tag = "pod".into();
        assert_ne!(key(&store, &config, dir.path()).unwrap(), new_kernel);
    }

    #[test]
    fn test_key_refused_when_off() {
        let (dir, store, mut config) = setup();
        config.snapshot = false;
        assert!(key(&store, &config, dir.path())
            .unwrap_err()
            .contains("off"));
    }

    #[test]
    fn test_key_with_disk_by_serial_not_file() {
        let (dir, store, mut config) = setup();
        let without = key(&store, &config, dir.path()).unwrap();
        config.disks.push(crate::Disk::unplugged("husk-rootfs"));
        let with = key(&store, &config, dir.path()).unwrap();
        assert_ne!(with, without);
        config.disks[0] = crate::Disk {
            serial: "husk-rootfs".into(),
            path: "/b/rootfs.img".into(),
            read_only: true,
        };
        let same = key(&store, &config, dir.path()).unwrap();
        assert_eq!(same, with, "the disk's file is not the key");
        config.disks[0].serial = "other".into();
        assert_ne!(key(&store, &config, dir.path()).unwrap(), with);
    }

    #[test]
    fn test_key_with_network_only_on_qemu_and_not_the_same_key() {
        let (dir, store, mut config) = setup();
        let qemu = |config: &VmConfig| {
            snapshot_key(&store, config, "qemu-tcg", &dir.path().join("vmm"), "c")
        };
        let without = qemu(&config).unwrap();
        config.net = Some(crate::NetDevice::unplugged());
        let with = qemu(&config).unwrap();
        assert_ne!(with, without);
        config.net = Some(crate::NetDevice {
            netns: "/run/netns/a".into(),
            tap: "husk0".into(),
            mac: "0a:58:0a:00:00:02".into(),
            mtu: Some(1450),
        });
        assert_eq!(
            qemu(&config).unwrap(),
            with,
            "the pod's tap and address are not the key"
        );
        assert!(key(&store, &config, dir.path())
            .unwrap_err()
            .contains("network"));
    }

    #[test]
    fn test_install_lookup_prune_and_incomplete_refused() {
        let (dir, store, _) = setup();
        let private = |path: &Path, text: &str| {
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, PermissionsExt::from_mode(0o600)).unwrap();
        };
        let made = |name: &str, complete: bool| {
            let m = dir.path().join(name);
            std::fs::create_dir(&m).unwrap();
            private(&m.join(husk_vmm::snapshot::STATE_FILE), "{}");
            if complete {
                private(&m.join(husk_vmm::snapshot::MEMORY_FILE), "m");
            }
            m
        };
        assert!(store.install("k0", &made("m0", false)).is_err());
        let empty = made("e0", false);
        private(&empty.join(husk_vmm::snapshot::MEMORY_FILE), "");
        assert!(
            store.install("k0", &empty).is_err(),
            "an unsaved VM's empty files"
        );
        let linked = made("m1", false);
        std::os::unix::fs::symlink("/etc/hostname", linked.join("memory")).unwrap();
        assert!(
            store.install("k0", &linked).is_err(),
            "a link is never taken"
        );
        assert!(store.lookup("k0").is_none());
        for i in 0..MAX_SNAPSHOTS + 2 {
            let installed = store.install(&format!("k{i}"), &made(&format!("n{i}"), true));
            let mode = std::fs::metadata(installed.unwrap().join("memory"))
                .unwrap()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(store.list().len(), MAX_SNAPSHOTS);
        assert!(store.lookup(&format!("k{}", MAX_SNAPSHOTS + 1)).is_some());
        assert!(store.lookup("k0").is_none(), "the oldest went");
    }

    #[test]
    fn test_lock_is_exclusive_and_goes_with_its_snapshot() {
        let (dir, store, _) = setup();
        let lock_file = dir.path().join("store/k.lock");
        let held = store.try_lock("k").unwrap();
        assert!(store.try_lock("k").is_none());
        drop(held);
        assert!(store.try_lock("k").is_some());
        // remove() takes the lock file too; prune() that of a key without a snapshot.
        store.remove("k");
        assert!(!lock_file.exists());
        drop(store.try_lock("k").unwrap());
        store.prune("other");
        assert!(!lock_file.exists());
    }

    #[test]
    fn test_store_open_refuses_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o755)).unwrap();
        assert!(Store::open_at(&open).unwrap_err().contains("0700"));
    }
}
