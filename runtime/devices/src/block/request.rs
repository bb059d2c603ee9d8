//! Guest wire format: a descriptor chain to a [`Request`] (virtio 1.2 §5.2.6).
//!
//! ```text
//! struct virtio_blk_req { le32 type; le32 reserved; le64 sector; u8 data[]; u8 status; };
//! ```
//! The device-readable part of the chain is the header followed by the data of an `OUT`; the
//! device-writable part is the data of an `IN`/`GET_ID` followed by the status byte (its last
//! byte). Descriptor boundaries carry no meaning (`ANY_LAYOUT`). The header is read once into a
//! private copy, so a guest rewriting it during the request cannot change what we act on.

use std::io;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{GuestMemory, Le32, Le64};

use super::defs::HEADER_LEN;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// A descriptor lies outside guest memory or the chain is longer than 4 GiB.
    #[error("invalid descriptor chain")]
    Chain(#[source] virtio_queue::Error),
    /// The chain has no device-writable byte for the status.
    #[error("no writable status byte")]
    NoStatus,
    /// The device-readable part is shorter than the header.
    #[error("request header is {len} bytes, need {HEADER_LEN}")]
    ShortHeader {
        /// Readable bytes in the chain.
        len: usize,
    },
    /// The data length of a read or write is not a multiple of the sector size.
    #[error("data length {len} is not a multiple of 512")]
    Unaligned {
        /// Data bytes in the chain.
        len: usize,
    },
    /// The sector range ends past the capacity or overflows.
    #[error("sectors {sector}+{len} bytes past the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data bytes.
        len: usize,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Reading, writing or syncing the backing file failed.
    #[error("backing file i/o failed")]
    File(#[source] io::Error),
    /// Copying from or to guest memory failed.
    #[error("guest memory copy failed")]
    GuestMemory(#[source] io::Error),
}

/// The fixed part of a request, copied out of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// `VIRTIO_BLK_T_*`.
    pub(crate) request_type: u32,
    /// First sector, in 512-byte units (reads and writes only).
    pub(crate) sector: u64,
}

/// A request whose status byte was found.
pub(crate) struct Request<'a, B> {
    /// `None` when the device-readable part is shorter than the header.
    pub(crate) header: Option<Header>,
    /// Readable bytes left after the header: the data of an `OUT`.
    pub(crate) data_in: Reader<'a, B>,
    /// Writable bytes before the status byte: the data of an `IN` or `GET_ID`.
    pub(crate) data_out: Writer<'a, B>,
    /// The status byte.
    pub(crate) status: Writer<'a, B>,
    /// Readable bytes of the chain, header included (for the error of a short header).
    pub(crate) readable_len: usize,
}

impl<B> std::fmt::Debug for Request<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("header", &self.header)
            .field("readable_len", &self.readable_len)
            .finish()
    }
}

impl<B: BitmapSlice> Request<'_, B> {
    /// Bytes written into the chain so far (the used length of the chain).
    pub(crate) fn written(&self) -> u32 {
        let total = self
            .data_out
            .bytes_written()
            .saturating_add(self.status.bytes_written());
        // A chain is at most 4 GiB (virtio 1.2 §2.7.5.2; virtio-queue stops iterating past it).
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Splits `chain` into header, data and status.
///
/// # Errors
/// [`RequestError::Chain`] when a descriptor lies outside guest memory,
/// [`RequestError::NoStatus`] when nothing is device-writable. A short header is not an error
/// here (the request still has a status byte to report it with): see [`Request::header`].
pub(crate) fn parse<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
) -> Result<Request<'a, BS<'a, M::Bitmap>>, RequestError> {
    let mut data_in = Reader::new(mem, chain.clone()).map_err(RequestError::Chain)?;
    let mut data_out = Writer::new(mem, chain).map_err(RequestError::Chain)?;
    let status_at = data_out
        .available_bytes()
        .checked_sub(1)
        .ok_or(RequestError::NoStatus)?;
    let status = data_out.split_at(status_at).map_err(RequestError::Chain)?;
    let readable_len = data_in.available_bytes();
    let header = read_header(&mut data_in);
    Ok(Request {
        header,
        data_in,
        data_out,
        status,
        readable_len,
    })
}

fn read_header<B: BitmapSlice>(reader: &mut Reader<'_, B>) -> Option<Header> {
    if reader.available_bytes() < HEADER_LEN {
        return None;
    }
    let request_type: Le32 = reader.read_obj().ok()?;
    let _reserved: Le32 = reader.read_obj().ok()?;
    let sector: Le64 = reader.read_obj().ok()?;
    Some(Header {
        request_type: request_type.into(),
        sector: sector.into(),
    })
}
