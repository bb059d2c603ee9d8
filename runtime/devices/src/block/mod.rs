//! virtio-blk on a raw file (virtio 1.2 §5.2), host side.
//!
//! # Shape
//! ```text
//!  transport (in-process virtio-mmio today: transport/mmio_block.rs)
//!     | request queue + guest memory
//!     v
//!  device.rs   Block: pops chains, runs them against the file with pread/pwrite/fdatasync,
//!              writes the status byte, returns the chain
//!     |
//!  request.rs  descriptor chain -> Request (header, data reader/writer, status writer)
//! ```
//! The device never sees the transport: it gets a `virtio_queue::Queue` and a
//! `vm_memory::GuestMemory` and is called whenever the queue is kicked, so a vhost-user adapter
//! can serve the same code to QEMU later.
//!
//! # What the guest sees
//! - Capacity: the backing file's size in 512-byte sectors, rounded down; a trailing partial
//!   sector is invisible to the guest (logged once when the device is opened). The size is read
//!   once, at open: a file that grows later is not resized, one that shrinks fails reads past
//!   its new end with `VIRTIO_BLK_S_IOERR`.
//! - Features: `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_FLUSH` (so the guest runs a write-back cache
//!   and sends flushes, which become `fdatasync`), `VIRTIO_BLK_F_SEG_MAX` (queue size minus the
//!   header and status descriptors) and `VIRTIO_BLK_F_RO` for a read-only disk.
//! - Requests: `IN`, `OUT`, `FLUSH`, `GET_ID` (the serial given at open); any other type gets
//!   `VIRTIO_BLK_S_UNSUPP`.
//!
//! # Hostile guest
//! A corrupted ring (available index too far ahead, descriptor index out of range, loop,
//! indirect descriptor, buffer outside guest memory) breaks the device (`queues_broken`, one
//! rate-limited line, `DEVICE_NEEDS_RESET`, nothing served until reset; see `crate::queue`).
//! Chains are parsed with virtio-queue's `Reader`/`Writer` (any framing is accepted, as
//! `VIRTIO_F_VERSION_1` implies `ANY_LAYOUT`). A chain without a writable status byte is
//! returned with a used length of 0. Any other bad request (short header, length not
//! a multiple of 512, a sector range past the capacity or overflowing, a write to a read-only
//! disk, a host I/O error) gets `VIRTIO_BLK_S_IOERR`. Every such branch bumps a counter in
//! `metrics.rs` and logs rate-limited; the device keeps serving.

pub(crate) mod device;
pub(crate) mod metrics;
pub(crate) mod request;

use std::io;
use std::path::PathBuf;

/// Guest-visible values, from include/uapi/linux/virtio_blk.h (virtio 1.2 §5.2).
pub(crate) mod defs {
    use virtio_bindings::virtio_blk;

    /// Size of a sector: the unit of `sector` in requests and of the capacity.
    pub(crate) const SECTOR_SIZE: u64 = 512;
    /// Size of the request header (`le32 type; le32 reserved; le64 sector`).
    pub(crate) const HEADER_LEN: usize = 16;
    /// Size of the queue (the only one, the request queue).
    pub(crate) const QUEUE_SIZE: u16 = 256;
    /// Longest scatter-gather list of one request: the queue size, less one descriptor for the
    /// header and one for the status (no indirect descriptors are offered).
    pub(crate) const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
    /// Size of the `GET_ID` answer.
    pub(crate) const ID_BYTES: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

    /// `VIRTIO_BLK_T_IN`: read sectors.
    pub(crate) const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
    /// `VIRTIO_BLK_T_OUT`: write sectors.
    pub(crate) const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    pub(crate) const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
    /// `VIRTIO_BLK_T_GET_ID`: read the device serial.
    pub(crate) const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;

    /// `VIRTIO_BLK_S_OK`.
    pub(crate) const S_OK: u8 = 0;
    /// `VIRTIO_BLK_S_IOERR`.
    pub(crate) const S_IOERR: u8 = 1;
    /// `VIRTIO_BLK_S_UNSUPP`.
    pub(crate) const S_UNSUPP: u8 = 2;
    const _: () = assert!(virtio_blk::VIRTIO_BLK_S_OK == S_OK as u32);
    const _: () = assert!(virtio_blk::VIRTIO_BLK_S_IOERR == S_IOERR as u32);
    const _: () = assert!(virtio_blk::VIRTIO_BLK_S_UNSUPP == S_UNSUPP as u32);

    /// `VIRTIO_F_VERSION_1` as a feature mask.
    pub(crate) const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the config space is valid.
    pub(crate) const F_SEG_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX;
    /// `VIRTIO_BLK_F_RO`: the disk is read-only.
    pub(crate) const F_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
    /// `VIRTIO_BLK_F_FLUSH`: the device takes `FLUSH` requests.
    pub(crate) const F_FLUSH: u64 = 1 << virtio_blk::VIRTIO_BLK_F_FLUSH;
}

/// Errors of the block device, all about its backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the backing file failed.
    #[error("failed to open block backing file {path}")]
    Open {
        /// The backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the backing file's type or size failed.
    #[error("failed to read the size of block backing file {path}")]
    Size {
        /// The backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The serial does not fit the 20 bytes of a virtio-blk id.
    #[error("disk serial {serial:?} is longer than 20 bytes")]
    Serial {
        /// The serial.
        serial: String,
    },
    /// The backing file is neither a regular file nor a block device.
    #[error("block backing file {path} is neither a regular file nor a block device")]
    NotAFile {
        /// The backing file.
        path: PathBuf,
    },
}
