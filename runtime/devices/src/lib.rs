//! husk device models, served in-process over virtio-mmio by the built-in VMM.
//!
//! Today: the host side of virtio-vsock with the hybrid vsock convention (see [`vsock`]),
//! [`VsockMmio`] (the QEMU door's guest channel is a virtio-serial port instead, whose host side
//! is `husk_vmm::relay`: QEMU cannot save a VM with a vhost-user vsock device);
//! virtio-blk on a raw file, in process with [`BlockMmio`] (see [`block`]); virtio-net on a
//! tap, in process with [`NetMmio`] (see [`net`]).

#![warn(missing_docs)]

pub mod block;
pub mod fs;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod log_bridge;
pub mod net;
mod queue;
mod rate_limited;
pub mod transport;
pub mod vsock;

pub use block::BlockError;
pub use fs::VhostUserFs;
pub use log_bridge::install_log_bridge;
pub use net::NetError;
pub use transport::mmio::{
    Interrupt, MmioTransport, MmioTransportState, QueuePosition, QueueRegsState, VirtioMmioDevice,
};
pub use transport::mmio_block::BlockMmio;
pub use transport::mmio_net::NetMmio;
pub use transport::mmio_vsock::VsockMmio;
pub use vsock::{VsockConfig, VsockError};
