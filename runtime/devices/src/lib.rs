//! husk device models, written once and served either in-process (virtio-mmio, built-in VMM) or
//! to QEMU over vhost-user.
//!
//! Today: the host side of virtio-vsock with the hybrid vsock convention (see [`vsock`]),
//! served over vhost-user with [`spawn_vhost_user_vsock`] or in process with [`VsockMmio`];
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
pub use transport::vhost_user::{spawn_vhost_user_vsock, VsockDaemon};
pub use vsock::{VsockConfig, VsockError};
