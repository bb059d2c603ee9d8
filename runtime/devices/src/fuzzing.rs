//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; never in a release build).
//!
//! The device models are crate-private and their transports run them on worker threads; a
//! fuzz target needs to drive the same code synchronously, one call per input step. These are
//! thin wrappers over the real types (no logic of their own), so that a change of the devices
//! only has to be mirrored here.

use std::path::Path;

use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::EventSet;

use crate::block::device::Block;
use crate::block::BlockError;
use crate::net::device::Net;
use crate::vsock::device::Vsock;
use crate::vsock::unix::VsockUnixBackend;
use crate::vsock::VsockError;

/// The vsock device over its hybrid-vsock (Unix socket) backend.
#[derive(Debug)]
pub struct VsockFuzz(Vsock<VsockUnixBackend>);

impl VsockFuzz {
    /// A device for guest `guest_cid` whose host listener is bound at `uds_path`.
    ///
    /// # Errors
    /// As [`crate::VsockMmio::new`].
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let backend = VsockUnixBackend::new(guest_cid, uds_path)?;
        Ok(Self(Vsock::new(guest_cid, backend)))
    }

    /// One pass over both queues, as a transport runs on a kick; returns whether the RX and
    /// the TX used rings changed and whether a queue was found corrupted in this call.
    pub fn process_queues<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
    ) -> (bool, bool, bool) {
        let activity = self.0.process_queues(mem, rxq, txq);
        (activity.rx_used, activity.tx_used, activity.broke)
    }

    /// Delivers the pending host-side events (new clients, readable streams, timers).
    pub fn notify_backend(&mut self) {
        self.0.notify_backend(EventSet::IN);
    }

    /// Device reset.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// The block device on a backing file.
#[derive(Debug)]
pub struct BlockFuzz(Block);

impl BlockFuzz {
    /// Opens `path` as [`crate::BlockMmio::new`] does.
    ///
    /// # Errors
    /// As [`crate::BlockMmio::new`].
    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        Block::open(path, read_only, serial).map(Self)
    }

    /// Serves the available requests (up to the device's budget); returns whether buffers
    /// were used and whether the queue was found corrupted in this call.
    pub fn process_queue<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> (bool, bool) {
        let served = self.0.process_queue(mem, queue);
        (served.used, served.broke)
    }
}

/// The network device on a datagram socket pair standing in for the tap: what the device
/// sends is readable on the other end, what is written there arrives as from the tap.
#[derive(Debug)]
pub struct NetFuzz {
    net: Net,
    wire: std::os::unix::net::UnixDatagram,
}

impl NetFuzz {
    /// A device with MTU 1500 (offered) and its wire; `mergeable`: the driver accepted
    /// mergeable receive buffers.
    ///
    /// # Errors
    /// The socket pair cannot be made.
    pub fn new(mergeable: bool) -> std::io::Result<Self> {
        let (tap, wire) = crate::net::tap::socket_tap()?;
        wire.set_nonblocking(true)?;
        let mut net = Net::new(tap, [2, 0, 0, 0, 0, 1], Some(1500));
        if mergeable {
            net.ack_features(net.features());
        }
        Ok(Self { net, wire })
    }

    /// A frame (its 12-byte header first) arriving from the host network; dropped when the
    /// socket is full.
    pub fn host_sends(&self, bytes: &[u8]) {
        let _ = self.wire.send(bytes);
    }

    /// Takes what the device sent to the host network; returns the number of frames.
    pub fn host_drains(&self) -> usize {
        let mut buf = vec![0u8; 70_000];
        std::iter::from_fn(|| self.wire.recv(&mut buf).ok()).count()
    }

    /// One pass over both queues, as the transport runs on a wakeup; returns whether a used
    /// ring changed and whether a queue was found corrupted in this call.
    pub fn process<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
    ) -> (bool, bool) {
        let activity = self.net.process(mem, rxq, txq);
        (activity.used, activity.broke)
    }

    /// Device reset.
    pub fn reset(&mut self) {
        self.net.reset();
    }
}

/// A [`crate::NetMmio`] on a datagram socket pair standing in for the tap, and the pair's
/// other end (for the register target: a device behind the transport without a real tap).
///
/// # Errors
/// The socket pair cannot be made.
pub fn net_mmio() -> std::io::Result<(crate::NetMmio, std::os::unix::net::UnixDatagram)> {
    let (tap, wire) = crate::net::tap::socket_tap()?;
    let device =
        crate::NetMmio::on(tap, "02:00:00:00:00:01", Some(1500)).map_err(std::io::Error::other)?;
    Ok((device, wire))
}

/// The muxer's parser of a host client's `CONNECT <port>` line (without its `\n`).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    crate::vsock::unix::muxer::parse_connect_line(line)
}
