//! Errors of the built-in VMM.

/// What went wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// Which operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image does not fit or cannot be loaded.
    #[error("guest image: {0}")]
    Image(String),
    /// A snapshot cannot be saved or loaded; the reason.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VMM's configuration document is unreadable or malformed.
    #[error("{0}")]
    Config(String),
    /// The VMM could not confine itself (seccomp filter, capabilities).
    #[error("confining the VMM: {0}")]
    Confine(String),
    /// An I/O error (event fds, threads, files).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl VmmError {
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Ioctl { op, source }
    }
}
