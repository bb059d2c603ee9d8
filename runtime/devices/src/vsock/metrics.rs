//! Vsock device metrics: one process-wide `static` of atomic counters.
//!
//! One counter per unit of work (packets, bytes, connections) and one per error branch, so that a
//! guest-triggered error that is only logged rate-limited is still counted exactly. The daemon
//! logs a summary when it stops ([`VsockMetrics::log_summary`]); e2e tests check it there.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing event counter.
#[derive(Debug)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub(crate) const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds one.
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// Adds `n` (wrapping, as any counter exporter expects).
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! vsock_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)+) => {
        /// All vsock counters.
        #[derive(Debug)]
        pub(crate) struct VsockMetrics {
            $($(#[doc = $doc])* pub(crate) $name: Counter,)+
        }

        impl VsockMetrics {
            const fn new() -> Self {
                Self { $($name: Counter::new(),)+ }
            }

            /// Name and value of every counter, in declaration order.
            pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.count()),)+]
            }
        }
    };
}

vsock_metrics! {
    /// Packets delivered to the guest (RX queue).
    rx_packets,
    /// Payload bytes delivered to the guest.
    rx_bytes,
    /// Packets consumed from the guest (TX queue).
    tx_packets,
    /// Payload bytes consumed from the guest.
    tx_bytes,
    /// RX descriptor chains rejected as malformed.
    rx_bad_desc,
    /// TX descriptor chains rejected as malformed.
    tx_bad_desc,
    /// TX packets dropped because their source CID is not the guest's.
    tx_bad_src_cid,
    /// TX packets dropped because they are addressed to a CID other than the host.
    tx_bad_dst_cid,
    /// TX processing paused because the muxer RX queue was full.
    tx_backpressure,
    /// Queues the guest corrupted (bad available index, descriptor index, loop, indirect
    /// descriptor, buffer outside guest memory): the device then needs a reset.
    queues_broken,
    /// RST packets queued for unknown connections or unsupported packets.
    rst_unknown,
    /// RST packets lost because the muxer RX queue was full.
    rst_dropped,
    /// Times the muxer RX queue was rebuilt from the connection map.
    rxq_resync,
    /// Times the kill queue was rebuilt from the connection map.
    killq_resync,
    /// Connections added (either side initiating).
    conns_added,
    /// Connections removed.
    conns_removed,
    /// Connections killed (RST sent by us).
    conns_killed,
    /// Connections killed because the peer did not finish closing in time.
    conns_expired,
    /// Guest connection requests refused (no host listener at `<uds>_<port>`).
    conns_refused,
    /// Guest sent more data than the credit we granted.
    credit_violations,
    /// Credit updates sent to the guest.
    credit_updates_sent,
    /// Credit requests sent to the guest.
    credit_requests_sent,
    /// Malformed or truncated `CONNECT <port>` lines from host clients.
    host_handshake_fails,
    /// Host clients refused because a connection or handshake limit was reached.
    host_conns_refused,
    /// Failed reads from host Unix streams.
    stream_read_fails,
    /// Failed writes to host Unix streams.
    stream_write_fails,
    /// Muxer epoll failures (wait, add, modify).
    muxer_event_fails,
}

/// The process-wide vsock counters.
pub(crate) static METRICS: VsockMetrics = VsockMetrics::new();

impl VsockMetrics {
    /// Logs every non-zero counter on one `info!` line.
    pub(crate) fn log_summary(&self) {
        log_nonzero("vsock", self.snapshot());
    }
}

/// Logs the non-zero `counters` of device `what` on one `info!` line (every device's
/// metrics summary).
pub(crate) fn log_nonzero(what: &str, counters: impl IntoIterator<Item = (&'static str, u64)>) {
    let summary: Vec<String> = counters
        .into_iter()
        .filter(|(_, value)| *value != 0)
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    tracing::info!(metrics = %summary.join(" "), "{what} device metrics");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_counter_add_then_count_returns_sum() {
        let counter = Counter::new();
        counter.inc();
        counter.add(41);
        assert_eq!(counter.count(), 42);
    }

    #[test]
    fn test_metrics_snapshot_lists_every_counter() {
        let names: Vec<_> = METRICS.snapshot().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"rx_packets"));
        assert!(names.contains(&"muxer_event_fails"));
    }
}
