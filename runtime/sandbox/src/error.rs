//! The sandbox's error type: what `husk` prints as one line before exiting 1.

use std::path::PathBuf;

use husk_protocol::ErrorKind;

/// Everything a sandbox operation can fail at.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod's network namespace cannot be read or wired to the VM.
    #[error("pod network: {0}")]
    PodNetwork(String),

    /// The bundle directory or its config.json is missing or unreadable.
    #[error("cannot read bundle config {}", path.display())]
    ReadConfig {
        /// config.json path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// config.json is readable but says something husk cannot run.
    #[error("invalid bundle config {}: {reason}", path.display())]
    InvalidConfig {
        /// config.json path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The operator's runtime configuration (`/etc/husk/config.toml`) is unreadable or wrong.
    #[error("runtime config {}: {reason}", path.display())]
    RuntimeConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The rootfs named by config.json does not exist.
    #[error("rootfs {} does not exist or is neither a directory nor a disk image file", path.display())]
    MissingRootfs {
        /// Resolved rootfs path.
        path: PathBuf,
    },
    /// The container id is malformed.
    #[error("{0}")]
    InvalidId(String),
    /// A terminal could not be set up.
    #[error("terminal: {0}")]
    Terminal(String),
    /// A hook failed.
    #[error("{phase} hook {}: {reason}", path.display())]
    Hook {
        /// Which hooks (`createRuntime`, `poststart`, ...).
        phase: String,
        /// The hook's program.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `create` failed: the monitor's own error line.
    #[error("{0}")]
    CreateFailed(String),
    /// No container has this id.
    #[error("container {id:?} does not exist")]
    NotFound {
        /// The id.
        id: String,
    },
    /// The container's status does not allow the command (as runc's messages).
    #[error("{0}")]
    InvalidState(String),
    /// A container with this id exists.
    #[error("container {id:?} already exists")]
    AlreadyExists {
        /// Container id.
        id: String,
    },
    /// The state directory could not be made, locked or removed.
    #[error("state directory {}", path.display())]
    StateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The host's random source could not be read for a guest's seed.
    #[error("cannot read /dev/urandom for the guest's seed")]
    HostEntropy(#[source] std::io::Error),
    /// The door could not boot or manage the VM.
    #[error(transparent)]
    Hypervisor(#[from] husk_hypervisor::HypervisorError),
    /// The VM ended before its agent answered.
    #[error("guest failed to boot ({reason}); {diagnostics}")]
    BootFailed {
        /// VMM exit status or timeout.
        reason: String,
        /// Last console and VMM log lines.
        diagnostics: String,
    },
    /// The VM ended while the container was running.
    #[error("VM ended unexpectedly ({reason}); {diagnostics}")]
    VmDied {
        /// VMM exit status, or "guest kernel panic".
        reason: String,
        /// Last console and VMM log lines.
        diagnostics: String,
    },
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {agent}, husk speaks {host}: rebuild the initramfs")]
    VersionMismatch {
        /// Ours.
        host: u32,
        /// The agent's.
        agent: u32,
    },
    /// The agent refused a request.
    #[error("agent: {message}")]
    Agent {
        /// Error kind from the agent.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// The agent did not answer a request within its deadline (see
    /// [`crate::agent::deadline`]): a guest that stalls is never waited for without end.
    #[error("agent did not answer {op} within {}s", after.as_secs())]
    AgentTimeout {
        /// The request (`signal`, `create`, `connect`, ...).
        op: &'static str,
        /// Its deadline.
        after: std::time::Duration,
    },
    /// The agent broke the protocol (unexpected reply, bad frame, closed connection).
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// Talking to the agent failed at the transport level.
    #[error("agent connection failed")]
    AgentIo(#[from] std::io::Error),
}

impl From<husk_protocol::FrameError> for SandboxError {
    fn from(e: husk_protocol::FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}
