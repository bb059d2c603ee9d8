//! A container's recorded state: `<root>/<id>/state.json`, the OCI state (runtime spec,
//! runtime.md "State") plus what husk needs to find the container's owner again.
//!
//! Writers (the owner of the VM and the mutating commands) hold the directory's command lock
//! ([`CommandLock`]) for their read-modify-write; the file is replaced atomically (write to a
//! temporary file, rename), so readers (`state`, `list`) need no lock. A recorded status is
//! only believed while the owner lives (it holds the directory's owner lock, see
//! [`crate::state_dir`]): a container whose owner died is `stopped`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::SandboxError;

/// The OCI runtime spec version husk implements (the one runtime-tools' validation suite
/// targets; README's "Conformance" lists where husk does not follow it and why).
pub const OCI_VERSION: &str = "1.3.0";
/// File name of the record in a state directory.
pub const STATE_FILE: &str = "state.json";
/// File name of the command lock in a state directory.
const COMMAND_LOCK: &str = "cmd.lock";

/// Lifecycle status (runtime spec: creating, created, running, stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The VM boots and the container is being built.
    Creating,
    /// The container's process waits for `start`.
    Created,
    /// The container's process runs.
    Running,
    /// Its processes are frozen (`pause`; runc's status beyond the runtime spec's four).
    Paused,
    /// The container's process exited (or its VM ended).
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

/// The OCI state of a container, as `husk state` prints it (runc's field order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciState {
    /// [`OCI_VERSION`].
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// Host pid of the container's VM (its VMM process); 0 once stopped.
    pub pid: i32,
    /// Lifecycle status.
    pub status: Status,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute rootfs path.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339 with nanoseconds, UTC.
    pub created: String,
    /// Owner (user name; empty for root, as runc's `state`).
    pub owner: String,
    /// config.json's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The OCI state.
    #[serde(flatten)]
    pub oci: OciState,
    /// husk's own part.
    pub husk: Private,
}

/// husk's own part of a [`Record`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Private {
    /// Pid of the owner process (`husk run`, or the monitor `husk create` left behind).
    pub owner_pid: i32,
    /// The container's exit code once stopped (128+N for signal N).
    pub exit_code: Option<i32>,
    /// `husk run` without `--keep`: the directory goes with its owner, and one left by an
    /// owner that was killed is cleared by the next use of the id.
    pub ephemeral: bool,
    /// The bundle's host hooks still to run (poststart, poststop), as they were at create.
    #[serde(default)]
    pub hooks: crate::hooks::Hooks,
    /// While `creating`: when `create` gives up (milliseconds since the Unix epoch); a `start`
    /// that arrives before waits for it until then.
    #[serde(default)]
    pub create_deadline_ms: u64,
}

impl Record {
    /// Reads `<dir>/state.json`.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`] when there is no such container, [`SandboxError::StateDir`]
    /// when the file is unreadable or not a record.
    pub fn read(dir: &Path) -> Result<Self, SandboxError> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found(dir)),
            Err(source) => return Err(SandboxError::StateDir { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| SandboxError::StateDir {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Replaces `<dir>/state.json` atomically.
    ///
    /// # Errors
    /// [`SandboxError::StateDir`] on I/O errors.
    pub fn write(&self, dir: &Path) -> Result<(), SandboxError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(".state.json.tmp");
        let io_err = |source| SandboxError::StateDir {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|e| io_err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(io_err)
    }

    /// The state as a reader should believe it: a container whose owner is gone is stopped, and
    /// so is one whose process as the host sees it (`pid`) has exited (killed on the host; its
    /// owner is ending the VM), as runc's state follows its container's process.
    pub fn current(mut self, dir: &Path) -> Self {
        let handing_over =
            self.oci.status == Status::Creating && crate::state_dir::pid_alive(self.husk.owner_pid);
        let pid_exited = u32::try_from(self.oci.pid)
            .is_ok_and(|pid| pid > 0 && husk_hypervisor::process_exited(pid));
        if self.oci.status != Status::Stopped
            && !handing_over
            && (pid_exited || !crate::state_dir::owner_alive(dir))
        {
            self.oci.status = Status::Stopped;
        }
        if self.oci.status == Status::Stopped {
            self.oci.pid = 0;
        }
        self
    }
}

/// The exclusive command lock of a state directory, held by a command for its whole
/// read-modify-write of the record.
#[derive(Debug)]
pub struct CommandLock(#[allow(dead_code)] Flock<File>);

impl CommandLock {
    /// Waits for and takes `<dir>`'s command lock.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`] when the directory is gone, [`SandboxError::StateDir`]
    /// otherwise.
    pub fn take(dir: &Path) -> Result<Self, SandboxError> {
        let (file, path) = open_lock(dir)?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(Self)
            .map_err(|(_, errno)| SandboxError::StateDir {
                path,
                source: errno.into(),
            })
    }
}

impl CommandLock {
    /// [`CommandLock::take`], giving up after `patience`: `None` then.
    ///
    /// # Errors
    /// As [`CommandLock::take`].
    pub fn take_within(
        dir: &Path,
        patience: std::time::Duration,
    ) -> Result<Option<Self>, SandboxError> {
        let (mut file, _) = open_lock(dir)?;
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(Self(lock))),
                Err((f, _)) if std::time::Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return Ok(None),
            }
        }
    }
}

/// `<dir>`'s command lock file, made on first use.
fn open_lock(dir: &Path) -> Result<(File, PathBuf), SandboxError> {
    let path = dir.join(COMMAND_LOCK);
    match File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => Ok((file, path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found(dir)),
        Err(source) => Err(SandboxError::StateDir { path, source }),
    }
}

/// No container: `dir`'s name is its id.
fn not_found(dir: &Path) -> SandboxError {
    SandboxError::NotFound {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Now as RFC 3339 UTC with nanoseconds, as runc writes `created`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            oci: OciState {
                oci_version: OCI_VERSION.into(),
                id: "c1".into(),
                pid: 42,
                status: Status::Running,
                bundle: "/b".into(),
                rootfs: "/b/rootfs".into(),
                created: now_rfc3339(),
                owner: String::new(),
                annotations: BTreeMap::new(),
            },
            husk: Private::default(),
        }
    }

    #[test]
    fn test_record_write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let r = record();
        r.write(dir.path()).unwrap();
        assert_eq!(Record::read(dir.path()).unwrap(), r);
    }

    #[test]
    fn test_oci_state_json_fields_as_runc() {
        let json = serde_json::to_value(&record().oci).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        for key in [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner",
        ] {
            assert!(keys.contains(&key.to_owned()), "{key} missing: {keys:?}");
        }
        assert_eq!(json["status"], "running");
    }

    #[test]
    fn test_current_dead_owner_stopped_pid_0() {
        let dir = tempfile::tempdir().unwrap();
        let r = record().current(dir.path());
        assert_eq!((r.oci.status, r.oci.pid), (Status::Stopped, 0));
    }

    #[test]
    fn test_read_missing_not_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Record::read(&dir.path().join("nope")),
            Err(SandboxError::NotFound { .. })
        ));
    }
}
