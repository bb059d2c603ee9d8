//! Network device metrics: one process-wide `static` of atomic counters, one per unit of work
//! and one per drop or error branch (a guest-triggered one is only logged rate-limited, but
//! counted exactly). Logged as one line when the device goes away.

use crate::vsock::metrics::{log_nonzero, Counter};

/// All network counters.
#[derive(Debug)]
pub(crate) struct NetMetrics {
    /// Frames the guest sent, written to the tap.
    pub(crate) tx_frames: Counter,
    /// Their bytes (Ethernet frames, without the virtio header).
    pub(crate) tx_bytes: Counter,
    /// Frames the tap did not take (full or down).
    pub(crate) tx_dropped: Counter,
    /// Transmit chains returned unsent: shorter than a header and an Ethernet header, longer
    /// than the largest frame, or unreadable.
    pub(crate) tx_bad_chain: Counter,
    /// Frames from the tap delivered to the guest.
    pub(crate) rx_frames: Counter,
    /// Their bytes.
    pub(crate) rx_bytes: Counter,
    /// Frames from the tap dropped: runts, larger than the guest's buffer, unwritable, or held
    /// at a reset.
    pub(crate) rx_dropped: Counter,
    /// Times the guest corrupted a queue: the device then needs a reset.
    pub(crate) queues_broken: Counter,
}

/// The process-wide network counters.
pub(crate) static METRICS: NetMetrics = NetMetrics {
    tx_frames: Counter::new(),
    tx_bytes: Counter::new(),
    tx_dropped: Counter::new(),
    tx_bad_chain: Counter::new(),
    rx_frames: Counter::new(),
    rx_bytes: Counter::new(),
    rx_dropped: Counter::new(),
    queues_broken: Counter::new(),
};

impl NetMetrics {
    /// Name and value of every counter, in declaration order.
    pub(crate) fn snapshot(&self) -> [(&'static str, u64); 8] {
        [
            ("tx_frames", self.tx_frames.count()),
            ("tx_bytes", self.tx_bytes.count()),
            ("tx_dropped", self.tx_dropped.count()),
            ("tx_bad_chain", self.tx_bad_chain.count()),
            ("rx_frames", self.rx_frames.count()),
            ("rx_bytes", self.rx_bytes.count()),
            ("rx_dropped", self.rx_dropped.count()),
            ("queues_broken", self.queues_broken.count()),
        ]
    }

    /// Logs every non-zero counter on one `info!` line.
    pub(crate) fn log_summary(&self) {
        log_nonzero("net", self.snapshot());
    }
}
