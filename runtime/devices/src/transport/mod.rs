//! Transports: how a device model reaches a guest.
//!
//! A device model (`crate::vsock::device::Vsock`) works on `virtio_queue::Queue`s and guest
//! memory only; the in-process virtio-mmio transport of the built-in VMM ([`mmio`]) drives it
//! from its own event loop.

pub mod mmio;
pub mod mmio_block;
pub mod mmio_net;
pub mod mmio_vsock;
mod worker;
