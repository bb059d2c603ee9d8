//! End-to-end tests of husk: real guest kernel, real agent, real vsock, real QEMU.
//!
//! [`harness`] finds the build outputs (`make build` puts them in `out/`), makes busybox
//! bundles, runs `husk` as a user would and checks that nothing is left behind.
// Only the nested test host's TSC reading (`nested::host_tsc_khz`) needs unsafe.
#![deny(unsafe_code)]

pub mod conformance;
pub mod harness;
