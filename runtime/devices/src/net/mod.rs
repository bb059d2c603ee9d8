//! virtio-net on a tap (virtio 1.2 §5.1), host side: the built-in VMM's network device.
//!
//! # Shape
//! ```text
//!  transport (in-process virtio-mmio: transport/mmio_net.rs), a worker thread on epoll:
//!     rx kick, tx kick, the tap (edge-triggered), stop
//!     |
//!  device.rs   Net: TX chains -> one write(2) each to the tap; tap frames -> RX chains
//!     |
//!  tap.rs      the tap descriptor the jail opened in the engine's network namespace
//! ```
//! Like the block device, `Net` never sees the transport: it is given a `virtio_queue::Queue`
//! and guest memory, so a vhost-user adapter could serve the same code.
//!
//! # What the guest sees
//! - One queue pair (receive 0, transmit 1), no control queue.
//! - Features: `VIRTIO_F_VERSION_1` (12-byte header), `VIRTIO_NET_F_MAC` (the engine's
//!   interface's address), `VIRTIO_NET_F_MRG_RXBUF` (a frame may span several receive
//!   buffers, so the driver's buffers fit any MTU) and, where the door knows the engine's MTU
//!   when the VM starts (not for Docker, whose hook wires the network later),
//!   `VIRTIO_NET_F_MTU`. No checksum or segmentation offload: every frame travels whole and
//!   checksummed, at most MTU plus the Ethernet header.
//! - No `VIRTIO_NET_F_STATUS`: the link is always up.
//!
//! # Hostile guest
//! - The host kernel never parses a header the guest wrote: the tap gets a zeroed
//!   `virtio_net_hdr_v1` (no offload was negotiated, so a correct driver's header is zero
//!   anyway) and the frame bytes, in one `write(2)`.
//! - A transmit chain shorter than the header plus an Ethernet header, or longer than
//!   [`defs::MAX_CHAIN_LEN`], is returned unsent (counted); receive buffers too short for the
//!   frame at hand (all of the queue's, when merging) are left for later and the frame dropped
//!   (counted).
//! - A corrupted ring (see `crate::queue`) breaks the device: `DEVICE_NEEDS_RESET`, one
//!   rate-limited line, nothing served on either queue until the driver resets it.
//! - Work per wakeup is bounded ([`defs::BUDGET`] chains per queue); the rest is served after
//!   the worker looked at its other events.
//! - Frames the guest does not take (no receive buffers) wait in the tap's queue, which the
//!   host kernel bounds (and drops from); the device holds at most one frame.

pub(crate) mod device;
pub(crate) mod metrics;
pub(crate) mod tap;

use std::io;

/// Guest-visible values, from include/uapi/linux/virtio_net.h (virtio 1.2 §5.1).
pub(crate) mod defs {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU};

    /// Virtio device id of a network card.
    pub(crate) const DEVICE_ID: u32 = 1;
    /// Features offered always.
    pub(crate) const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | F_MRG_RXBUF;
    /// Mergeable receive buffers: a frame may span several receive chains.
    pub(crate) const F_MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
    /// Offered with an MTU.
    pub(crate) const F_MTU: u64 = 1 << VIRTIO_NET_F_MTU;
    /// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
    /// csum_offset, num_buffers.
    pub(crate) const HEADER_LEN: usize = 12;
    /// Offset of `num_buffers` in the header.
    pub(crate) const NUM_BUFFERS_AT: usize = 10;
    /// Ethernet header: the shortest frame worth sending.
    pub(crate) const ETH_HEADER_LEN: usize = 14;
    /// Longest chain a transmit may be and longest frame read from the tap, header included:
    /// a 64 KiB IP packet in an Ethernet frame with a VLAN tag, as Firecracker bounds it.
    pub(crate) const MAX_CHAIN_LEN: usize = HEADER_LEN + 65_550;
    /// Queue indexes and sizes.
    pub(crate) const RX_QUEUE: usize = 0;
    /// Transmit queue index.
    pub(crate) const TX_QUEUE: usize = 1;
    /// Size of each queue.
    pub(crate) const QUEUE_SIZE: u16 = 256;
    /// Chains served per queue and wakeup before the worker looks at its other events.
    pub(crate) const BUDGET: usize = 256;
    /// Size of `mac` + `status` + `max_virtqueue_pairs` + `mtu` in `struct virtio_net_config`.
    pub(crate) const CONFIG_LEN: usize = 12;
    /// The smallest MTU the driver accepts (IPv4's minimum).
    pub(crate) const MIN_MTU: u16 = 68;
}

/// Why a network device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The hardware address is not six `:`-separated hex bytes, or not a unicast address.
    #[error("network device: bad MAC address {0:?} (want six hex bytes like 02:00:00:00:00:01, unicast)")]
    Mac(String),
    /// The MTU is below what the driver accepts.
    #[error("network device: MTU {0} is below {min}", min = defs::MIN_MTU)]
    Mtu(u16),
    /// The descriptor is not a tap with a virtio header, or could not be set up.
    #[error("network device: tap descriptor {fd}: {what}: {source}")]
    Tap {
        /// The descriptor.
        fd: i32,
        /// The step that failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses a multicast (or broadcast) address, which a device
/// cannot have.
///
/// # Errors
/// [`NetError::Mac`].
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::Mac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mac_accepts_unicast_refuses_malformed_and_multicast() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "02:42:ac:11:00:2",
            "02:42:ac:11:00:zz",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "+2:42:ac:11:00:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
