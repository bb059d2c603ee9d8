//! End-to-end tests of husk: real guest kernel, real agent, real vsock, real QEMU.
//!
//! [`harness`] finds the build outputs (`make build` puts them in `out/`), makes busybox
//! bundles, runs `husk` as a user would and checks that nothing is left behind.
#![forbid(unsafe_code)]

pub mod harness;
