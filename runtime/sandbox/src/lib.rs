//! Sandbox lifecycle: one VM per container.
//!
//! [`run`] takes an OCI bundle to a finished container: it reads config.json ([`bundle`]), takes
//! the container's state directory ([`state_dir`]), boots a VM through a hypervisor door, speaks
//! the agent protocol over the VM's hybrid vsock ([`agent`]), relays stdio ([`stdio`]) and tears
//! everything down whatever happens. `oci-spec` stops here: below, only the door trait.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod artifacts;
pub mod bundle;
pub mod config;
mod error;
pub mod features;
pub mod hooks;
/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; never in a release build):
/// parsers that are private to their module.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// Decodes one field of /proc/self/mountinfo (octal escapes `\ooo`).
    pub fn unescape_mountinfo(field: &str) -> String {
        crate::pod::unescape_mountinfo(field)
    }
}
pub mod lifecycle;
pub mod pod;
mod pod_net;
mod prepare;
mod run;
pub mod state;
pub mod state_dir;
pub mod stdio;
pub mod terminal;

pub use error::SandboxError;
pub use husk_hypervisor::qemu::{qemu_major, MIN_QEMU_MAJOR};
pub use husk_hypervisor::{find_program, probe_kvm, snapshot, vm_dir, HypervisorKind, ProbeReport};
/// Limits and counters of a container's cgroup in its guest (`update`, `events`).
pub use husk_protocol::{cpu_shares_to_weight, Resources, Stats};
pub use prepare::prepare_snapshots;
pub use run::{
    monitor, run, RunOptions, RunOutcome, Timings, VmOptions, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS,
};
