//! virtio-vsock, host side, with the hybrid vsock (Unix socket) backend.
//!
//! # Shape
//! ```text
//!  transport (vhost-user adapter today, in-process virtio-mmio later)
//!     | vrings + guest memory           | backend fd readable
//!     v                                 v
//!  device.rs  Vsock<B: VsockBackend>: TX chain -> packet -> backend.send_pkt()
//!                                     RX chain <- packet <- backend.recv_pkt()
//!     |
//!  unix/muxer.rs  VsockUnixBackend: routes packets by (host port, guest port) to connections,
//!                 owns the `uds_path` listener, a nested epoll fd, the RX queue and kill queue
//!     |
//!  csm/connection.rs  one VsockConnection per Unix stream: state, credit, tx buffer
//! ```
//! The device never sees vhost-user: a transport hands it `virtio_queue::Queue`s and a
//! `vm_memory::GuestMemory`, polls [`VsockEpollListener::as_raw_fd`] of the backend and calls
//! `Vsock::process_queues` whenever a queue was kicked or the backend fd became readable.
//! Everything runs on that one transport thread; nothing here blocks.
//!
//! # Hybrid vsock (as Firecracker and cloud-hypervisor)
//! - Host to guest: a host process connects to `uds_path`, writes `CONNECT <port>\n`; the muxer
//!   picks a fresh host port, sends REQUEST to the guest, and on RESPONSE writes
//!   `OK <host port>\n` on the Unix stream; from then on bytes flow both ways. RST from the guest
//!   closes the stream; a malformed line closes it too.
//! - Guest to host: a REQUEST for host port `P` connects to the Unix socket `<uds_path>_<P>`;
//!   RST to the guest if nothing listens there.
//!
//! # Flow control (virtio 1.2 §5.10.6.3)
//! Every packet carries the sender's `buf_alloc` and `fwd_cnt`. Guest to host: we grant
//! `CONN_TX_BUF_SIZE` bytes and count as forwarded only what the Unix stream accepted, so a slow
//! host reader stops the guest (no credit) instead of growing a buffer; a guest exceeding its
//! credit is reset. Host to guest: we read from the Unix stream only as much as the guest's
//! credit allows and stop polling the stream while the credit is zero (sending one
//! CREDIT_REQUEST). Half-close maps SHUTDOWN flags onto `shutdown(2)` and EOF.
//!
//! # Hostile guest
//! Every chain is popped through `crate::queue::pop`: a corrupted ring (available index too far
//! ahead, descriptor index out of range, loop, indirect descriptor, buffer outside guest memory)
//! breaks the device (`queues_broken`, one rate-limited line, `DEVICE_NEEDS_RESET` through the
//! transport, every host stream closed, nothing processed until reset). A well-formed chain
//! that is not a valid packet is parsed by `virtio_vsock::packet::VsockPacket`, returned to the
//! guest unused, counted in `metrics.rs` and logged rate-limited. One `process_queues` call
//! handles a bounded number of chains. Header values are only used through checked or wrapping
//! arithmetic as the spec defines them.

pub(crate) mod csm;
pub(crate) mod device;
pub(crate) mod metrics;
pub(crate) mod packet;
#[cfg(test)]
pub(crate) mod test_utils;
pub(crate) mod unix;

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::EventSet;

use self::packet::VsockPacket;

/// Constants shared by the vsock modules.
pub(crate) mod defs {
    /// Guest-visible values from include/uapi/linux/virtio_vsock.h and
    /// include/uapi/linux/vm_sockets.h (virtio 1.2 §5.10).
    pub(crate) mod uapi {
        /// `VMADDR_CID_HOST`: the host's CID.
        pub(crate) const VSOCK_HOST_CID: u64 = 2;
        /// `VIRTIO_VSOCK_TYPE_STREAM`.
        pub(crate) const VSOCK_TYPE_STREAM: u16 = 1;
        /// `VIRTIO_VSOCK_OP_REQUEST`: connection request.
        pub(crate) const VSOCK_OP_REQUEST: u16 = 1;
        /// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
        pub(crate) const VSOCK_OP_RESPONSE: u16 = 2;
        /// `VIRTIO_VSOCK_OP_RST`: connection reset.
        pub(crate) const VSOCK_OP_RST: u16 = 3;
        /// `VIRTIO_VSOCK_OP_SHUTDOWN`: half or full close, see the flags below.
        pub(crate) const VSOCK_OP_SHUTDOWN: u16 = 4;
        /// `VIRTIO_VSOCK_OP_RW`: payload.
        pub(crate) const VSOCK_OP_RW: u16 = 5;
        /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: unsolicited `buf_alloc`/`fwd_cnt`.
        pub(crate) const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
        /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: ask the peer for a credit update.
        pub(crate) const VSOCK_OP_CREDIT_REQUEST: u16 = 7;
        /// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
        pub(crate) const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
        /// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
        pub(crate) const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;
        /// Both shutdown flags.
        pub(crate) const VSOCK_FLAGS_SHUTDOWN_ALL: u32 =
            VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
    }

    /// Index of the RX virtqueue (device to driver), virtio 1.2 §5.10.2.
    pub(crate) const RXQ_INDEX: usize = 0;
    /// Index of the TX virtqueue (driver to device).
    pub(crate) const TXQ_INDEX: usize = 1;
    /// Index of the event virtqueue (device to driver).
    pub(crate) const EVQ_INDEX: usize = 2;
    /// Number of virtqueues of a vsock device (rx, tx, event).
    pub(crate) const NUM_QUEUES: usize = 3;
    /// Largest queue size we accept from a driver.
    pub(crate) const MAX_QUEUE_SIZE: u16 = 1024;
    /// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
    pub(crate) const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;
}

/// Configuration of one vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 ..= `u32::MAX - 1`), exposed in the device config space.
    pub guest_cid: u64,
    /// Host-side Unix socket: host processes connect here and write `CONNECT <port>\n`;
    /// guest connections to host port `P` go to `<uds_path>_<P>`. The socket file stays when
    /// the device goes: it belongs to whoever chose its path (husk's run directory), and the
    /// confined built-in VMM may not unlink files.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the values a guest would be confused by.
    ///
    /// # Errors
    /// [`VsockError::InvalidCid`] for a reserved or out-of-range CID.
    pub fn validate(&self) -> Result<(), VsockError> {
        // 0, 1 and 2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if self.guest_cid <= defs::uapi::VSOCK_HOST_CID || self.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid {
                cid: self.guest_cid,
            });
        }
        Ok(())
    }
}

/// Errors of the vsock device and its vhost-user daemon.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configured guest CID is reserved or out of range.
    #[error("invalid guest cid {cid}")]
    InvalidCid {
        /// The rejected CID.
        cid: u64,
    },
    /// Binding the hybrid-vsock listener failed.
    #[error("failed to bind vsock listener {path}")]
    BindListener {
        /// Path of the listener socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating an epoll instance, timer or event fd failed.
    #[error("failed to create {what}")]
    CreateFd {
        /// Which fd.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Registering an fd with an epoll instance failed.
    #[error("failed to register {what} with epoll")]
    RegisterFd {
        /// Which fd.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The vhost-user daemon could not be created.
    #[error("failed to create vhost-user daemon: {reason}")]
    CreateDaemon {
        /// The vhost-user-backend error, which has no `std::error::Error` impl.
        reason: String,
    },
    /// A daemon thread could not be started.
    #[error("failed to spawn thread {name}")]
    SpawnThread {
        /// Thread name.
        name: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A daemon thread panicked.
    #[error("thread {name} panicked")]
    ThreadPanicked {
        /// Thread name.
        name: &'static str,
    },
    /// A daemon thread did not stop within its deadline; it is left behind.
    #[error("thread {name} did not stop within {timeout_ms} ms")]
    StopTimeout {
        /// Thread name.
        name: &'static str,
        /// The deadline.
        timeout_ms: u128,
    },
    /// The vhost-user session ended with an error.
    #[error("vhost-user session failed: {reason}")]
    Session {
        /// The vhost-user-backend error text.
        reason: String,
    },
    /// Removing a socket file failed.
    #[error("failed to remove socket {path}")]
    RemoveSocket {
        /// Path of the socket file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a backend did with an RX buffer offered by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxOutcome {
    /// The packet was filled in; the buffer goes to the used ring.
    Filled,
    /// Nothing to send; the buffer stays with the device for later.
    NoData,
}

/// What a backend did with a packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxOutcome {
    /// The packet was consumed (forwarded, answered or dropped).
    Consumed,
    /// The backend cannot take packets until the guest drained RX; retry later.
    Busy,
}

/// Packet exchange between the device and its backend.
pub(crate) trait VsockChannel {
    /// Fills a device-to-driver packet whose header and data buffers are guest RX memory.
    fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> RxOutcome;
    /// Takes one driver-to-device packet (already bounds-checked, source CID verified).
    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> TxOutcome;
    /// Whether [`VsockChannel::recv_pkt`] would fill a packet now.
    fn has_pending_rx(&self) -> bool;
}

/// A backend with a pollable fd (a nested epoll fd) for the transport's event loop.
pub(crate) trait VsockEpollListener: AsRawFd {
    /// Events the transport should poll on [`AsRawFd::as_raw_fd`].
    fn get_polled_evset(&self) -> EventSet;
    /// Called when [`AsRawFd::as_raw_fd`] reported `evset`.
    fn notify(&mut self, evset: EventSet);
}

/// A complete vsock backend.
pub(crate) trait VsockBackend: VsockChannel + VsockEpollListener + Send {
    /// Drops every connection (device reset); the host streams are closed.
    fn reset(&mut self);
}
