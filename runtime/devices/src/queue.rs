//! Checked access to a guest's split virtqueue (virtio 1.2 §2.7), shared by every device.
//!
//! virtio-queue trusts the ring more than a hostile guest deserves: an available index more
//! than the queue size ahead makes `Queue::iter` fail (logged, no chain) while
//! `enable_notification` keeps reporting more work, so a device that loops "until no more"
//! spins forever; a descriptor index out of range or a loop silently truncates the chain; an
//! indirect descriptor is followed whether or not `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
//! [`pop`] detects each of these explicitly, before the device sees the chain:
//!
//! - the available index is more than the queue size ahead of the last one seen;
//! - the head or a `next` index is not below the queue size;
//! - the chain has more descriptors than the queue size (a loop, or simply too long);
//! - a descriptor is indirect (no husk device offers `VIRTIO_RING_F_INDIRECT_DESC`, and the
//!   transports refuse a driver that acks a feature it was not offered);
//! - a buffer is not entirely inside guest memory, or the chain is longer than 4 GiB;
//! - the ring itself cannot be read or written.
//!
//! Any of these is a [`QueueFault`]: the device marks itself broken (it sets
//! `DEVICE_NEEDS_RESET`, virtio 1.2 §2.1.2, through its transport), counts it, logs one
//! rate-limited line and stops processing its queues until the driver resets it. Faults that
//! concern one request's contents (a header too short, a write to a read-only disk) stay
//! per-request errors of the device.
//!
//! The chain is validated when popped; a guest that rewrites descriptors it already made
//! available (which the spec forbids) races only itself: what virtio-queue then walks is
//! still checked against guest memory and bounded, by the queue size, or, for a descriptor
//! rewritten as indirect, by its table (which virtio-queue caps at 65535 entries) and by the
//! 4 GiB a `Reader`/`Writer` chain may total.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::rate_limited::warn_rate_limited;

/// Size of one descriptor in the table.
const DESC_SIZE: u64 = 16;

/// How the guest corrupted a queue.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueFault {
    /// The driver made more buffers available than the queue holds.
    #[error("available index {avail} is more than the queue size {size} ahead of {next_avail}")]
    AvailIndex {
        /// The driver's available index.
        avail: u16,
        /// The next entry the device would read.
        next_avail: u16,
        /// Queue size.
        size: u16,
    },
    /// A head or `next` index is outside the descriptor table.
    #[error("descriptor index {index} is out of range for queue size {size}")]
    DescIndex {
        /// The index.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The chain loops or has more descriptors than the queue.
    #[error("descriptor chain from head {head} is longer than the queue size {size}")]
    ChainTooLong {
        /// Head of the chain.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// An indirect descriptor, never offered.
    #[error("indirect descriptor {index} but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    Indirect {
        /// Its index.
        index: u16,
    },
    /// A buffer outside guest memory.
    #[error("descriptor {index} buffer {addr:#x}+{len} is outside guest memory")]
    BadAddress {
        /// Its index.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The buffers of one chain add up to more than 4 GiB (virtio 1.2 §2.7.5.2).
    #[error("descriptor chain from head {head} is longer than 4 GiB")]
    ChainTooBig {
        /// Head of the chain.
        head: u16,
    },
    /// Reading or writing the ring itself failed.
    #[error("virtqueue ring access failed")]
    Ring(#[source] virtio_queue::Error),
}

/// The next available chain, validated; `None` when the driver made nothing more available.
///
/// # Errors
/// A [`QueueFault`]: the queue must not be processed any more.
pub(crate) fn pop<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Result<Option<DescriptorChain<&'a M>>, QueueFault> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueFault::Ring)?;
    let next_avail = queue.next_avail();
    let pending = (avail - Wrapping(next_avail)).0;
    if pending == 0 {
        return Ok(None);
    }
    let size = queue.size();
    if pending > size {
        return Err(QueueFault::AvailIndex {
            avail: avail.0,
            next_avail,
            size,
        });
    }
    // A driver only moves the index forward: the iterator sees at least `pending` entries, so
    // no chain here means the ring entry could not be read.
    let chain = queue
        .iter(mem)
        .map_err(QueueFault::Ring)?
        .next()
        .ok_or(QueueFault::Ring(virtio_queue::Error::InvalidChain))?;
    check_chain(
        mem,
        GuestAddress(queue.desc_table()),
        size,
        chain.head_index(),
    )?;
    Ok(Some(chain))
}

/// Walks the chain from `head` in the table at `table` of `size` descriptors.
fn check_chain<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<(), QueueFault> {
    let mut index = head;
    let mut total: u32 = 0;
    for _ in 0..size {
        if index >= size {
            return Err(QueueFault::DescIndex { index, size });
        }
        let desc: Descriptor = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(QueueFault::Ring(virtio_queue::Error::AddressOverflow))
            .and_then(|at| {
                mem.read_obj(at)
                    .map_err(|e| QueueFault::Ring(virtio_queue::Error::GuestMemory(e)))
            })?;
        check_desc(mem, index, &desc)?;
        total = total
            .checked_add(desc.len())
            .ok_or(QueueFault::ChainTooBig { head })?;
        if !desc.has_next() {
            return Ok(());
        }
        index = desc.next();
    }
    Err(QueueFault::ChainTooLong { head, size })
}

fn check_desc<M: GuestMemory>(mem: &M, index: u16, desc: &Descriptor) -> Result<(), QueueFault> {
    if desc.refers_to_indirect_table() {
        return Err(QueueFault::Indirect { index });
    }
    let access = match desc.is_write_only() {
        true => Permissions::Write,
        false => Permissions::Read,
    };
    let in_memory = usize::try_from(desc.len())
        .is_ok_and(|len| len == 0 || mem.check_range(desc.addr(), len, access));
    match in_memory {
        true => Ok(()),
        false => Err(QueueFault::BadAddress {
            index,
            addr: desc.addr().raw_value(),
            len: desc.len(),
        }),
    }
}

/// The one log line of a queue that just broke.
pub(crate) fn log_broken(device: &'static str, queue: &'static str, fault: &QueueFault) {
    warn_rate_limited!(
        device,
        queue,
        fault = %fault,
        "virtqueue corrupted by the guest: device needs reset, queue no longer processed"
    );
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const SIZE: u16 = 16;
    const BUF: u64 = 0x10_0000;
    const NEXT: u16 = 1;
    const INDIRECT: u16 = 4;

    fn setup() -> (GuestMemoryMmap, u64) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        (mem, 0)
    }

    fn write_desc(mem: &GuestMemoryMmap, table: u64, index: u16, desc: (u64, u32, u16, u16)) {
        let raw = RawDescriptor::from(Descriptor::new(desc.0, desc.1, desc.2, desc.3));
        mem.write_obj(raw, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    /// Makes head `head` available (ring slot 0, index 1) on a fresh queue.
    fn queue_with_head(mem: &GuestMemoryMmap, head: u16) -> (Queue, u64) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), SIZE);
        let queue: Queue = vq.create_queue().unwrap();
        let avail = queue.avail_ring();
        mem.write_obj(head, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let table = queue.desc_table();
        (queue, table)
    }

    #[test]
    fn test_pop_valid_chain_returned() {
        let (mem, _) = setup();
        let (mut queue, table) = queue_with_head(&mem, 3);
        write_desc(&mem, table, 3, (BUF, 64, NEXT, 5));
        write_desc(&mem, table, 5, (BUF + 64, 64, 0, 0));

        let chain = pop(&mut queue, &mem).unwrap().unwrap();

        assert_eq!(chain.head_index(), 3);
        assert_eq!(chain.count(), 2);
        assert!(pop(&mut queue, &mem).unwrap().is_none());
    }

    #[test]
    fn test_pop_avail_idx_past_queue_size_fault() {
        let (mem, _) = setup();
        let (mut queue, _) = queue_with_head(&mem, 0);
        mem.write_obj(SIZE + 1, GuestAddress(queue.avail_ring() + 2))
            .unwrap();

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(
            matches!(err, QueueFault::AvailIndex { avail: 17, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_pop_head_out_of_range_fault() {
        let (mem, _) = setup();
        let (mut queue, _) = queue_with_head(&mem, SIZE);

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(
            matches!(err, QueueFault::DescIndex { index: 16, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_pop_next_out_of_range_fault() {
        let (mem, _) = setup();
        let (mut queue, table) = queue_with_head(&mem, 0);
        write_desc(&mem, table, 0, (BUF, 64, NEXT, 0xffff));

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(
            matches!(err, QueueFault::DescIndex { index: 0xffff, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_pop_looping_chain_fault() {
        let (mem, _) = setup();
        let (mut queue, table) = queue_with_head(&mem, 0);
        write_desc(&mem, table, 0, (BUF, 64, NEXT, 1));
        write_desc(&mem, table, 1, (BUF, 64, NEXT, 0));

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(
            matches!(
                err,
                QueueFault::ChainTooLong {
                    head: 0,
                    size: SIZE
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn test_pop_indirect_descriptor_not_offered_fault() {
        let (mem, _) = setup();
        let (mut queue, table) = queue_with_head(&mem, 0);
        // A well-formed indirect table of one descriptor: still refused.
        write_desc(&mem, table, 0, (0x20_0000, 16, INDIRECT, 0));
        write_desc(&mem, 0x20_0000, 0, (BUF, 64, 0, 0));

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(matches!(err, QueueFault::Indirect { index: 0 }), "{err}");
    }

    #[test]
    fn test_pop_buffer_outside_memory_fault() {
        let (mem, _) = setup();
        let (mut queue, table) = queue_with_head(&mem, 0);
        write_desc(&mem, table, 0, (0x3f_fff0, 64, 0, 0));

        let err = pop(&mut queue, &mem).unwrap_err();

        assert!(
            matches!(err, QueueFault::BadAddress { index: 0, .. }),
            "{err}"
        );
    }
}
