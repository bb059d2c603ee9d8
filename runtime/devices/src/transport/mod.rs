//! Transports: how a device model reaches a guest.
//!
//! A device model (`crate::vsock::device::Vsock`) works on `virtio_queue::Queue`s and guest
//! memory only. [`vhost_user`] serves it to QEMU over a vhost-user socket (QEMU owns the
//! virtio transport, we own the queues' processing); the in-process virtio-mmio transport of the
//! built-in VMM will drive the same device from its own event loop.

pub mod mmio;
pub mod mmio_block;
pub mod mmio_net;
pub mod mmio_vsock;
pub mod vhost_user;
mod worker;
