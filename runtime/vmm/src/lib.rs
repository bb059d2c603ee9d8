//! husk's built-in VMM: one KVM virtual machine per sandbox, with nothing but what a husk guest
//! needs (see ../shared/DESIGN.md, "The two hypervisor doors").
//!
//! - [`Vm`]: guest memory (vm-memory), vCPUs (kvm-ioctls), the port-IO and MMIO [`bus`]es and
//!   the legacy devices ([`legacy`]: 8250 serial, i8042 for reset, a debug-exit port);
//! - [`x86`]: what a vCPU needs before its first instruction (CPUID, MSRs, FPU, registers,
//!   GDT and identity page tables for 64-bit entry, LAPIC);
//! - [`snapshot`]: a paused VM's state saved to a directory and loaded back;
//! - [`layout`]: where everything lives in guest-physical memory;
//! - [`confine`]: the seccomp allowlist and capability drop the VMM runs under;
//! - [`console`]: the serial console's host file, capped.

mod boot;
pub mod bus;
pub mod confine;
pub mod console;
pub mod document;
mod error;
pub mod jail;
pub mod layout;
pub mod legacy;
pub mod mptable;
pub mod probe;
pub mod relay;
mod report;
pub mod sentinel;
pub mod snapshot;
mod vm;
pub mod x86;

pub use error::VmmError;
pub use report::{monotonic_now, MemoryUsage, RunReport};
pub use vm::{CpuMode, Entry, ExitReason, Pauser, RestoreConfig, Vm, VmConfig};
