//! Shared pieces of husk's fuzz targets: a byte cursor over the fuzzer's input and a guest
//! (memory plus split virtqueues) that plays the driver of a device.
//!
//! Inputs are a sequence of small operations decoded with [`Input`]; every value is read as
//! raw bytes (little-endian), and an exhausted input reads as zeros, so that any byte string
//! is a valid input and a hand-made seed is a few `struct.pack`ed fields.

#![allow(clippy::cast_possible_truncation)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads fields off the fuzzer's input.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.bytes(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length byte, then that many bytes.
    pub fn blob(&mut self) -> &'a [u8] {
        let len = usize::from(self.u8());
        self.bytes(len)
    }
}

/// Runs a future that never waits (its I/O reads from a byte slice) to completion.
///
/// # Panics
/// If the future is still pending after many polls: it waited on something, which a slice
/// reader never does.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("a future over an in-memory reader did not complete");
}

/// Ignores `SIGPIPE`, as the runtime of a Rust `main` does for husk's binaries (libFuzzer's
/// `main` does not): a write to a Unix stream whose peer is gone must return `EPIPE`, which the
/// vsock muxer relies on (see husk-devices' transport/vhost_user.rs).
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs the SIG_IGN disposition, no handler code runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
}

/// Size of the guest memory of the queue targets.
pub const MEM_SIZE: u64 = 0x4_0000;
/// Guest memory below this address holds the rings; descriptors from the fuzzer never point
/// there, so that the device writing a buffer cannot rewrite an avail index behind the
/// harness's back.
pub const RINGS_END: u64 = 0x1_0000;
/// Size of every queue of the harness (small, so that the rings wrap often).
pub const QUEUE_SIZE: u16 = 16;
/// Bytes of guest memory per descriptor slot of the well-formed buffers.
pub const SLOT: u64 = 0x1000;
/// `VRING_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_F_WRITE: u16 = 2;

/// The driver's view of one split queue: where its rings are and what it posted.
#[derive(Debug)]
pub struct Ring {
    desc: u64,
    avail: u64,
    /// First byte of this queue's buffer slots (one [`SLOT`] per descriptor index).
    slots: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// Guest address of the buffer slot of descriptor `idx`.
    pub fn slot(&self, idx: u16) -> u64 {
        self.slots + u64::from(idx % QUEUE_SIZE) * SLOT
    }

    /// The descriptor index [`Ring::take_desc`] returns next.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// The next free descriptor index (round robin).
    pub fn take_desc(&mut self) -> u16 {
        let idx = self.next_desc;
        self.next_desc = (idx + 1) % QUEUE_SIZE;
        idx
    }
}

/// Guest memory and split queues, written as a (possibly hostile) driver would.
#[derive(Debug)]
pub struct Guest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's queues.
    pub queues: Vec<Queue>,
    /// The driver's side of each queue.
    pub rings: Vec<Ring>,
}

impl Guest {
    /// `n` (at most 4) ready queues of [`QUEUE_SIZE`], their rings at the start of memory and
    /// their buffer slots after [`RINGS_END`].
    ///
    /// # Panics
    /// If the memory cannot be mapped (a harness bug, not an input).
    pub fn new(n: u16) -> Self {
        let len = usize::try_from(MEM_SIZE).expect("memory size fits usize");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).expect("guest memory");
        let mut queues = Vec::new();
        let mut rings = Vec::new();
        for i in 0..u64::from(n.min(4)) {
            let vq = MockSplitQueue::create(&mem, GuestAddress(i * 0x1000), QUEUE_SIZE);
            let queue: Queue = vq.create_queue().expect("queue");
            rings.push(Ring {
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                slots: RINGS_END + i * u64::from(QUEUE_SIZE) * SLOT,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            });
            queues.push(queue);
        }
        Self { mem, queues, rings }
    }

    /// Writes descriptor `idx` of queue `q` as is.
    pub fn write_desc(&self, q: usize, idx: u16, desc: (u64, u32, u16, u16)) {
        let Some(ring) = self.rings.get(q) else {
            return;
        };
        let (addr, len, flags, next) = desc;
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = ring.desc + 16 * u64::from(idx % QUEUE_SIZE);
        let _ = self.mem.write_obj(raw, GuestAddress(at));
    }

    /// Makes the chain starting at `head` available on queue `q`.
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let Some(ring) = self.rings.get_mut(q) else {
            return;
        };
        let slot = u64::from(ring.avail_idx % QUEUE_SIZE);
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        let (avail, idx) = (ring.avail, ring.avail_idx);
        let _ = self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
        let _ = self.mem.write_obj(idx, GuestAddress(avail + 2));
    }

    /// Sets the avail index of queue `q` to any value (a corrupt one included).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        if let Some(ring) = self.rings.get_mut(q) {
            ring.avail_idx = idx;
            let _ = self.mem.write_obj(idx, GuestAddress(ring.avail + 2));
        }
    }

    /// Writes `descs` as one chain at the next free descriptor indexes of queue `q` and makes
    /// it available; returns the descriptor indexes used.
    pub fn push_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> Vec<u16> {
        let Some(ring) = self.rings.get_mut(q) else {
            return Vec::new();
        };
        let idxs: Vec<u16> = descs.iter().map(|_| ring.take_desc()).collect();
        for (i, (&(addr, len, flags), &idx)) in descs.iter().zip(&idxs).enumerate() {
            let next = idxs.get(i + 1).copied();
            let flags = flags | next.map_or(0, |_| DESC_F_NEXT);
            self.write_desc(q, idx, (addr, len, flags, next.unwrap_or(0)));
        }
        if let Some(&head) = idxs.first() {
            self.push_avail(q, head);
        }
        idxs
    }

    /// Makes one buffer of `len` bytes with `flags`, at its descriptor's own slot, available
    /// on queue `q`.
    pub fn push_buffer(&mut self, q: usize, len: u32, flags: u16) {
        let Some(ring) = self.rings.get_mut(q) else {
            return;
        };
        let idx = ring.take_desc();
        let addr = ring.slot(idx);
        self.write_desc(q, idx, (addr, len, flags, 0));
        self.push_avail(q, idx);
    }

    /// The driver's ring of queue `q`.
    pub fn ring(&self, q: usize) -> Option<&Ring> {
        self.rings.get(q)
    }

    /// How many buffers the device returned on queue `q` since the last call.
    pub fn take_used(&mut self, q: usize) -> u16 {
        let (Some(queue), Some(ring)) = (self.queues.get(q), self.rings.get_mut(q)) else {
            return 0;
        };
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(queue.used_ring() + 2))
            .unwrap_or(ring.used_seen);
        let new = idx.wrapping_sub(ring.used_seen);
        ring.used_seen = idx;
        new
    }
}

/// A guest address for a fuzzed descriptor: within the buffer area of guest memory (never on
/// the rings, see [`RINGS_END`]), or, when `sel` has its top bit, anywhere (mostly outside
/// guest memory).
pub fn desc_addr(sel: u8, raw: u32) -> u64 {
    if sel & 0x80 != 0 {
        return (u64::from(raw) << 8).max(RINGS_END);
    }
    RINGS_END + u64::from(raw) % (MEM_SIZE - RINGS_END)
}

/// A fuzzed descriptor length: short, or (`sel` bit 6) any `u32`.
pub fn desc_len(sel: u8, raw: u32) -> u32 {
    match sel & 0x40 {
        0 => raw % 0x2000,
        _ => raw,
    }
}

/// Reads a raw descriptor `(addr, len, flags, next)` off the input.
pub fn raw_desc(input: &mut Input<'_>) -> (u64, u32, u16, u16) {
    let sel = input.u8();
    let addr = desc_addr(sel, input.u32());
    let len = desc_len(sel, input.u32());
    (addr, len, input.u16(), input.u16())
}
