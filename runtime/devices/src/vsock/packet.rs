//! Guest wire format: descriptor chains to `virtio_vsock::packet::VsockPacket` and back.
//!
//! The `virtio-vsock` crate does the bounds checking (header fits the head descriptor, payload
//! fits its descriptor and guest memory, `len` below [`MAX_PKT_BUF_SIZE`], the right
//! read/write direction); this module fixes the policy around it: which maximum payload we
//! accept, how a device-to-driver header is filled, and how many bytes of a chain were used.
//! The header read from a TX chain is a private copy, so a guest rewriting it after the check
//! cannot change what we act on.

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::GuestMemory;

pub(crate) use virtio_vsock::packet::{Error as PacketError, VsockPacket, PKT_HEADER_SIZE};

use super::defs::uapi::{VSOCK_HOST_CID, VSOCK_TYPE_STREAM};
use super::defs::MAX_PKT_BUF_SIZE;

/// Size of `struct virtio_vsock_hdr` as a `u32` (used-ring lengths are `u32`).
const HDR_LEN: u32 = 44;
const _: () = assert!(PKT_HEADER_SIZE == HDR_LEN as usize);

/// Parses a driver-to-device chain (header, then optional payload).
///
/// # Errors
/// The chain is malformed: wrong direction, too short, payload larger than
/// [`MAX_PKT_BUF_SIZE`] or outside guest memory.
pub(crate) fn parse_tx<'a, M: GuestMemory>(
    mem: &'a M,
    chain: &mut DescriptorChain<&'a M>,
) -> Result<VsockPacket<'a, BS<'a, M::Bitmap>>, PacketError> {
    VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_BUF_SIZE)
}

/// Parses a device-to-driver chain (writable header, then writable payload buffer).
///
/// # Errors
/// The chain is malformed: read-only buffers, too short, payload buffer larger than
/// [`MAX_PKT_BUF_SIZE`] or outside guest memory.
pub(crate) fn parse_rx<'a, M: GuestMemory>(
    mem: &'a M,
    chain: &mut DescriptorChain<&'a M>,
) -> Result<VsockPacket<'a, BS<'a, M::Bitmap>>, PacketError> {
    VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_BUF_SIZE)
}

/// The variable fields of a device-to-driver header; the source CID is always the host's and
/// the type always stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RxHeader {
    /// Guest CID.
    pub(crate) dst_cid: u64,
    /// Host-side port.
    pub(crate) src_port: u32,
    /// Guest-side port.
    pub(crate) dst_port: u32,
    /// `VSOCK_OP_*`.
    pub(crate) op: u16,
    /// `VSOCK_FLAGS_*` (shutdown only).
    pub(crate) flags: u32,
    /// Payload length already written to the data buffer.
    pub(crate) len: u32,
    /// Our receive buffer size for this connection.
    pub(crate) buf_alloc: u32,
    /// Bytes we forwarded to the host stream so far (wrapping).
    pub(crate) fwd_cnt: u32,
}

/// Writes every header field of `pkt` into guest memory.
pub(crate) fn write_rx_header<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>, hdr: &RxHeader) {
    pkt.set_src_cid(VSOCK_HOST_CID)
        .set_dst_cid(hdr.dst_cid)
        .set_src_port(hdr.src_port)
        .set_dst_port(hdr.dst_port)
        .set_len(hdr.len)
        .set_type(VSOCK_TYPE_STREAM)
        .set_op(hdr.op)
        .set_flags(hdr.flags)
        .set_buf_alloc(hdr.buf_alloc)
        .set_fwd_cnt(hdr.fwd_cnt);
}

/// Bytes of an RX chain the device wrote: the header plus the payload.
pub(crate) fn rx_used_len<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> u32 {
    HDR_LEN.saturating_add(pkt.len())
}

/// Payload capacity of an RX packet (0 without a data buffer).
pub(crate) fn rx_capacity<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> usize {
    pkt.data_slice().map_or(0, |slice| slice.len())
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::vsock::test_utils::DESC_F_WRITE as WRITE;

    const HDR_ADDR: u64 = 0x10_0000;
    const DATA_ADDR: u64 = 0x20_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn set_hdr_len(mem: &GuestMemoryMmap, len: u32) {
        // `len` is at offset 24 of struct virtio_vsock_hdr.
        mem.write_obj(len, GuestAddress(HDR_ADDR + 24)).unwrap();
    }

    #[test]
    fn test_parse_tx_header_and_data_returns_packet() {
        let mem = mem();
        set_hdr_len(&mem, 8);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq
            .build_desc_chain(&[desc(HDR_ADDR, HDR_LEN, 0), desc(DATA_ADDR, 8, 0)])
            .unwrap();

        let pkt = parse_tx(&mem, &mut chain).unwrap();

        assert_eq!(pkt.len(), 8);
        assert_eq!(pkt.data_slice().unwrap().len(), 8);
    }

    #[test]
    fn test_parse_tx_write_only_header_rejected() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq
            .build_desc_chain(&[desc(HDR_ADDR, HDR_LEN, WRITE)])
            .unwrap();

        assert!(parse_tx(&mem, &mut chain).is_err());
    }

    #[test]
    fn test_parse_tx_short_header_rejected() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq.build_desc_chain(&[desc(HDR_ADDR, 10, 0)]).unwrap();

        assert!(parse_tx(&mem, &mut chain).is_err());
    }

    #[test]
    fn test_parse_tx_len_above_max_rejected() {
        let mem = mem();
        set_hdr_len(&mem, MAX_PKT_BUF_SIZE + 1);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq
            .build_desc_chain(&[desc(HDR_ADDR, HDR_LEN, 0), desc(DATA_ADDR, 0x2_0000, 0)])
            .unwrap();

        assert!(parse_tx(&mem, &mut chain).is_err());
    }

    #[test]
    fn test_parse_tx_data_outside_memory_rejected() {
        let mem = mem();
        set_hdr_len(&mem, 16);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq
            .build_desc_chain(&[desc(HDR_ADDR, HDR_LEN, 0), desc(0x3F_FFF8, 16, 0)])
            .unwrap();

        assert!(parse_tx(&mem, &mut chain).is_err());
    }

    #[test]
    fn test_parse_rx_read_only_buffer_rejected() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq.build_desc_chain(&[desc(HDR_ADDR, 4096, 0)]).unwrap();

        assert!(parse_rx(&mem, &mut chain).is_err());
    }

    #[test]
    fn test_write_rx_header_all_fields_round_trip() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chain = vq
            .build_desc_chain(&[desc(HDR_ADDR, HDR_LEN + 100, WRITE)])
            .unwrap();
        let mut pkt = parse_rx(&mem, &mut chain).unwrap();
        let hdr = RxHeader {
            dst_cid: 3,
            src_port: 1,
            dst_port: 2,
            op: 5,
            flags: 0,
            len: 7,
            buf_alloc: 9,
            fwd_cnt: 11,
        };

        write_rx_header(&mut pkt, &hdr);

        assert_eq!(pkt.src_cid(), VSOCK_HOST_CID);
        assert_eq!((pkt.dst_cid(), pkt.src_port(), pkt.dst_port()), (3, 1, 2));
        assert_eq!((pkt.len(), pkt.buf_alloc(), pkt.fwd_cnt()), (7, 9, 11));
        assert_eq!(rx_used_len(&pkt), HDR_LEN + 7);
        assert_eq!(rx_capacity(&pkt), 100);
    }
}
