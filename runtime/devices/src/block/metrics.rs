//! Block device metrics: one process-wide `static` of atomic counters (all block devices of the
//! process together), one per unit of work and one per error branch, so that a guest-triggered
//! error that is only logged rate-limited is still counted exactly.

use crate::vsock::metrics::{log_nonzero, Counter};

/// All block counters.
#[derive(Debug)]
pub(crate) struct BlockMetrics {
    /// `IN` requests completed with `VIRTIO_BLK_S_OK`.
    pub(crate) reads: Counter,
    /// Bytes read from backing files into guest memory.
    pub(crate) read_bytes: Counter,
    /// `OUT` requests completed with `VIRTIO_BLK_S_OK`.
    pub(crate) writes: Counter,
    /// Bytes written from guest memory to backing files.
    pub(crate) write_bytes: Counter,
    /// `FLUSH` requests completed with `VIRTIO_BLK_S_OK`.
    pub(crate) flushes: Counter,
    /// `GET_ID` requests completed with `VIRTIO_BLK_S_OK`.
    pub(crate) get_ids: Counter,
    /// Requests of a type we do not serve (answered `VIRTIO_BLK_S_UNSUPP`).
    pub(crate) unsupported: Counter,
    /// Chains returned unanswered: no writable status byte or a descriptor outside guest memory.
    pub(crate) bad_desc: Counter,
    /// Requests whose header is shorter than 16 bytes.
    pub(crate) bad_header: Counter,
    /// Requests whose data length is not a multiple of 512.
    pub(crate) unaligned: Counter,
    /// Requests whose sector range is past the capacity or overflows.
    pub(crate) out_of_range: Counter,
    /// Writes to a read-only disk.
    pub(crate) read_only_writes: Counter,
    /// Host I/O errors (pread, pwrite, fdatasync) and guest-memory copy failures.
    pub(crate) io_errors: Counter,
    /// Times the guest corrupted the request queue (bad available index, descriptor index,
    /// loop, indirect descriptor, buffer outside guest memory): the device then needs a reset.
    pub(crate) queues_broken: Counter,
}

/// The process-wide block counters.
pub(crate) static METRICS: BlockMetrics = BlockMetrics {
    reads: Counter::new(),
    read_bytes: Counter::new(),
    writes: Counter::new(),
    write_bytes: Counter::new(),
    flushes: Counter::new(),
    get_ids: Counter::new(),
    unsupported: Counter::new(),
    bad_desc: Counter::new(),
    bad_header: Counter::new(),
    unaligned: Counter::new(),
    out_of_range: Counter::new(),
    read_only_writes: Counter::new(),
    io_errors: Counter::new(),
    queues_broken: Counter::new(),
};

impl BlockMetrics {
    /// Name and value of every counter, in declaration order.
    pub(crate) fn snapshot(&self) -> [(&'static str, u64); 14] {
        [
            ("reads", self.reads.count()),
            ("read_bytes", self.read_bytes.count()),
            ("writes", self.writes.count()),
            ("write_bytes", self.write_bytes.count()),
            ("flushes", self.flushes.count()),
            ("get_ids", self.get_ids.count()),
            ("unsupported", self.unsupported.count()),
            ("bad_desc", self.bad_desc.count()),
            ("bad_header", self.bad_header.count()),
            ("unaligned", self.unaligned.count()),
            ("out_of_range", self.out_of_range.count()),
            ("read_only_writes", self.read_only_writes.count()),
            ("io_errors", self.io_errors.count()),
            ("queues_broken", self.queues_broken.count()),
        ]
    }

    /// Logs every non-zero counter on one `info!` line.
    pub(crate) fn log_summary(&self) {
        log_nonzero("block", self.snapshot());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_metrics_snapshot_lists_every_counter() {
        let names: Vec<_> = METRICS.snapshot().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.first(), Some(&"reads"));
        assert_eq!(names.last(), Some(&"queues_broken"));
    }
}
