//! A container's state directory: `<root>/<id>/`, held under an exclusive `flock` for as long
//! as its owner lives. The VM's sockets and logs live in it. A directory whose lock is free
//! belongs to a husk that died (SIGKILL): it is stale and is cleared before reuse.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::SandboxError;

/// Longest path we put a Unix socket at (sun_path is 108 bytes; the vsock device appends
/// `_<port>` to the hybrid vsock path).
const MAX_SOCKET_PATH: usize = 90;
/// Longest socket file name the doors use in the directory.
const LONGEST_SOCKET_NAME: &str = "vhost-vsock.sock";

/// An owned, locked state directory; removed on drop.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates and locks `<root>/<id>`, clearing a stale one left by a dead husk.
    ///
    /// # Errors
    /// [`SandboxError::InvalidId`], [`SandboxError::AlreadyExists`] when a live husk holds it,
    /// [`SandboxError::StateDir`] on I/O errors.
    pub fn create(root: &Path, id: &str) -> Result<Self, SandboxError> {
        husk_protocol::validate_id(id).map_err(SandboxError::InvalidId)?;
        let path = root.join(id);
        let io_err = |source| SandboxError::StateDir {
            path: path.clone(),
            source,
        };
        if path.join(LONGEST_SOCKET_NAME).as_os_str().len() > MAX_SOCKET_PATH {
            let msg = format!(
                "state path {} is too long for Unix sockets; use a shorter --root or id",
                path.display()
            );
            return Err(SandboxError::InvalidId(msg));
        }
        std::fs::create_dir_all(root).map_err(io_err)?;
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => clear_stale(&path, id)?,
            Err(e) => return Err(io_err(e)),
        }
        let lock_file = File::create(path.join("lock")).map_err(io_err)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| SandboxError::AlreadyExists { id: id.to_owned() })?;
        Ok(Self { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes `path` if no live process holds its lock; otherwise the id is taken.
fn clear_stale(path: &Path, id: &str) -> Result<(), SandboxError> {
    let taken = || SandboxError::AlreadyExists { id: id.to_owned() };
    let lock_file = File::open(path.join("lock")).map_err(|_| taken())?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| taken())?;
    tracing::warn!(path = %path.display(), "removing stale state directory of a dead husk");
    std::fs::remove_dir_all(path).map_err(|source| SandboxError::StateDir {
        path: path.to_owned(),
        source,
    })?;
    std::fs::create_dir(path).map_err(|source| SandboxError::StateDir {
        path: path.to_owned(),
        source,
    })
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove state directory");
        }
    }
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
