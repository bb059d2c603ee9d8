//! Errors of the doors.

use std::path::PathBuf;

/// Everything a door can fail at.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// `--hypervisor` named a door that does not exist.
    #[error("unknown hypervisor {0:?} (expected auto, kvm or qemu)")]
    UnknownKind(String),
    /// `--hypervisor kvm` on a host whose KVM fails the capability probe.
    #[error("the built-in VMM cannot run a guest on this host: KVM probe: {0}; use --hypervisor qemu (or auto)")]
    KvmUnusable(String),
    /// A program the door runs is not installed.
    #[error("{program} not found in PATH; {hint}")]
    ProgramNotFound {
        /// Program name.
        program: &'static str,
        /// How to install it.
        hint: &'static str,
    },
    /// A file the VM needs is missing.
    #[error("{what} not found at {}", path.display())]
    MissingFile {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A helper process could not be started.
    #[error("failed to start {program}")]
    Spawn {
        /// Program name.
        program: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The empty file behind an unplugged disk could not be made.
    #[error("failed to make the empty disk {}", path.display())]
    EmptyDisk {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A share's staging directory (for one file or directory) could not be made.
    #[error("failed to stage share at {}", path.display())]
    ShareStaging {
        /// The staging directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A helper process ended before it was ready.
    #[error("{program} exited during start-up: {detail}")]
    HelperDied {
        /// Program name.
        program: &'static str,
        /// Its last log lines.
        detail: String,
    },
    /// A helper process ended while its VM ran.
    #[error(transparent)]
    HelperExited(#[from] HelperExited),
    /// A helper's socket did not appear in time.
    #[error("{program} did not create {} in time", path.display())]
    HelperTimeout {
        /// Program name.
        program: &'static str,
        /// The socket waited for.
        path: PathBuf,
    },
    /// The vsock device backend failed.
    #[error("vsock device failed")]
    Vsock(#[from] husk_devices::vsock::VsockError),
    /// The VM's host cgroup could not be made.
    #[error("failed to set up the VM's host cgroup")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// `wait` before `start`.
    #[error("the VM was not started")]
    NotStarted,
    /// Waiting for or signalling a process failed.
    #[error("failed to manage the VMM process")]
    Process(#[source] std::io::Error),
    /// The copy of a boot snapshot's memory for the VM restored from it failed.
    #[error("copying the snapshot's memory: {0}")]
    SnapshotMemory(std::io::Error),
}

impl HypervisorError {
    /// The error and its causes on one line (`failed to start X: why`): for a reason that is
    /// logged, such as a failed restore's.
    #[must_use]
    pub fn with_causes(&self) -> String {
        let mut line = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            line.push_str(&format!(": {c}"));
            cause = c.source();
        }
        line
    }
}

/// A device helper (virtiofsd) exited while its VM started or ran.
#[derive(Debug, thiserror::Error)]
#[error("{program} exited with {status}: {detail}")]
pub struct HelperExited {
    /// Program name.
    pub program: &'static str,
    /// How it ended.
    pub status: std::process::ExitStatus,
    /// Its last log lines.
    pub detail: String,
}
