//! A container's state directory: `<root>/<id>/`, with its record ([`crate::state`]), the VM's
//! sockets and logs, and two locks:
//! - the owner lock (`lock`), held by the process that owns the VM (`husk run`, or the monitor
//!   `husk create` leaves behind) for as long as it lives: a free owner lock means the VM is
//!   gone, whatever the record says;
//! - the command lock (`cmd.lock`, [`crate::state::CommandLock`]), held by each command for its
//!   read-modify-write of the record.
//!
//! A directory whose owner died is stale when it belonged to a `husk run` (its record says
//! ephemeral) or never got a record: it is cleared before the id is reused. A created or
//! detached container's directory stays, `stopped`, until `delete`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::state::{Record, Status};
use crate::SandboxError;

/// File name of the owner lock.
const OWNER_LOCK: &str = "lock";

/// An owned state directory: its owner lock is held; removed on drop unless [`StateDir::keep`].
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// `None` once [`StateDir::hold_until_exit`] handed it to the process's end.
    lock: Option<Flock<File>>,
    remove_on_drop: bool,
}

impl StateDir {
    /// Creates `<root>/<id>` and takes its owner lock, clearing a stale one.
    ///
    /// # Errors
    /// [`SandboxError::InvalidId`], [`SandboxError::AlreadyExists`] when the id is in use,
    /// [`SandboxError::StateDir`] on I/O errors.
    pub fn create(root: &Path, id: &str) -> Result<Self, SandboxError> {
        let path = container_dir(root, id)?;
        let io_err = |source| SandboxError::StateDir {
            path: path.clone(),
            source,
        };
        private_dirs()
            .recursive(true)
            .create(root)
            .map_err(io_err)?;
        match private_dirs().create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => clear_stale(&path, id)?,
            Err(e) => return Err(io_err(e)),
        }
        let lock_file = File::create(path.join(OWNER_LOCK)).map_err(io_err)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| SandboxError::AlreadyExists { id: id.to_owned() })?;
        Ok(Self {
            path,
            lock: Some(lock),
            remove_on_drop: true,
        })
    }

    /// Takes over the existing `<root>/<id>` as its owner, waiting up to `timeout` for the
    /// owner lock (its creator lets go of it right after starting us). Kept on drop.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`], or the lock is not free in time.
    pub fn adopt(root: &Path, id: &str, timeout: Duration) -> Result<Self, SandboxError> {
        let path = container_dir(root, id)?;
        let file = File::open(path.join(OWNER_LOCK))
            .map_err(|_| SandboxError::NotFound { id: id.to_owned() })?;
        let deadline = Instant::now() + timeout;
        let mut file = file;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(Self {
                        path,
                        lock: Some(lock),
                        remove_on_drop: false,
                    })
                }
                Err((f, _)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => return Err(SandboxError::AlreadyExists { id: id.to_owned() }),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory when this owner goes (a container that lives on until `delete`).
    pub fn keep(&mut self) {
        self.remove_on_drop = false;
    }

    /// Keeps the directory and the owner lock until this process exits: whoever waits for the
    /// lock (`delete`) goes on only once the owner's process is gone, not while it is still
    /// on its way out.
    pub fn hold_until_exit(mut self) {
        self.remove_on_drop = false;
        // The kernel drops the lock with the process's last descriptor of it.
        std::mem::forget(self.lock.take());
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        if let Err(e) = remove_run_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove state directory");
        }
    }
}

/// Removes a VM's run directory (a container's state directory, a pod's directory) and its
/// VM directory ([`husk_hypervisor::vm_dir`]).
///
/// # Errors
/// The run directory cannot be removed.
pub fn remove_run_dir(path: &Path) -> std::io::Result<()> {
    husk_hypervisor::remove_vm_dir(path);
    // The network namespace husk may keep there is a mount: detached first.
    crate::pod_net::remove_netns(&netns_path(path));
    std::fs::remove_dir_all(path)
}

/// Where husk keeps the network namespace it makes for the VM whose run directory is
/// `run_dir`, for an engine's hooks to connect (a bind mount, detached by [`remove_run_dir`]).
#[must_use]
pub(crate) fn netns_path(run_dir: &Path) -> PathBuf {
    run_dir.join("netns")
}

/// `<root>/<id>` for a valid id.
///
/// # Errors
/// [`SandboxError::InvalidId`].
pub fn container_dir(root: &Path, id: &str) -> Result<PathBuf, SandboxError> {
    husk_protocol::validate_id(id).map_err(SandboxError::InvalidId)?;
    Ok(root.join(id))
}

/// Whether a live process owns the VM of the container in `dir`.
pub fn owner_alive(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(OWNER_LOCK)) else {
        return false;
    };
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// Clears `path` when no live process owns it and it is not a container awaiting `delete`;
/// otherwise the id is taken.
fn clear_stale(path: &Path, id: &str) -> Result<(), SandboxError> {
    let taken = || SandboxError::AlreadyExists { id: id.to_owned() };
    let lock_file = File::open(path.join(OWNER_LOCK)).map_err(|_| taken())?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| taken())?;
    let stale = match Record::read(path) {
        Err(SandboxError::NotFound { .. }) => true,
        Ok(record) => {
            record.husk.ephemeral
                || (record.oci.status == Status::Creating && !pid_alive(record.husk.owner_pid))
        }
        Err(_) => false,
    };
    if !stale {
        return Err(taken());
    }
    tracing::warn!(path = %path.display(), "removing stale state directory of a dead husk");
    remove_run_dir(path).map_err(|source| SandboxError::StateDir {
        path: path.to_owned(),
        source,
    })?;
    private_dirs()
        .create(path)
        .map_err(|source| SandboxError::StateDir {
            path: path.to_owned(),
            source,
        })
}

/// Directories only root enters (0700): a state directory holds the VM's sockets and logs and
/// may hold what the guest wrote; no other host user reaches them.
fn private_dirs() -> std::fs::DirBuilder {
    use std::os::unix::fs::DirBuilderExt;
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    builder
}

/// Whether `pid` names a live process.
pub(crate) fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_create_twice_already_exists() {
        let root = tempfile::tempdir().unwrap();
        let first = StateDir::create(root.path(), "c1").unwrap();
        assert!(matches!(
            StateDir::create(root.path(), "c1"),
            Err(SandboxError::AlreadyExists { .. })
        ));
        drop(first);
        assert!(!root.path().join("c1").exists());
    }

    #[test]
    fn test_create_dirs_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let dir = StateDir::create(&root, "c1").unwrap();
        for path in [root.as_path(), dir.path()] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", path.display());
        }
    }

    #[test]
    fn test_create_stale_dir_reused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("c1")).unwrap();
        std::fs::write(root.path().join("c1/lock"), "").unwrap();
        std::fs::write(root.path().join("c1/vsock.sock"), "").unwrap();
        let dir = StateDir::create(root.path(), "c1").unwrap();
        assert!(!dir.path().join("vsock.sock").exists());
    }

    #[test]
    fn test_create_bad_id_rejected() {
        let root = tempfile::tempdir().unwrap();
        for id in ["", "..", "a/b"] {
            assert!(matches!(
                StateDir::create(root.path(), id),
                Err(SandboxError::InvalidId(_))
            ));
        }
    }
}
