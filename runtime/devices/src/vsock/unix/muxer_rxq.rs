//! The muxer's RX queue: which connection (or which lone RST) fills the next RX buffer.
//!
//! Bounded at [`MUXER_RXQ_SIZE`]. When a push does not fit, the queue stops accepting pushes
//! ("out of sync") and is rebuilt from the connection map once drained: connections are never
//! lost that way, only RSTs for unknown connections could be, and the device avoids even that by
//! pausing TX while the queue is full or out of sync.

use std::collections::{HashMap, VecDeque};

use super::defs::MUXER_RXQ_SIZE;
use super::ConnKey;
use crate::vsock::csm::VsockConnection;

/// One unit of pending RX work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MuxerRx {
    /// Ask this connection for its next packet.
    Conn(ConnKey),
    /// Send an RST for a connection we do not have.
    Rst(ConnKey),
}

/// Bounded FIFO of [`MuxerRx`].
#[derive(Debug)]
pub(crate) struct MuxerRxQ {
    queue: VecDeque<MuxerRx>,
    synced: bool,
}

impl MuxerRxQ {
    /// An empty, synced queue.
    pub(crate) fn new() -> Self {
        Self {
            queue: VecDeque::with_capacity(MUXER_RXQ_SIZE),
            synced: true,
        }
    }

    /// A queue holding every connection with pending RX (out of sync if they do not fit).
    pub(crate) fn from_conns(conns: &HashMap<ConnKey, VsockConnection>) -> Self {
        let mut rxq = Self::new();
        for (key, conn) in conns {
            if conn.has_pending_rx() && !rxq.push(MuxerRx::Conn(*key)) {
                break;
            }
        }
        rxq
    }

    /// Appends `rx`; returns `false` (and goes out of sync) if it does not fit.
    pub(crate) fn push(&mut self, rx: MuxerRx) -> bool {
        if self.synced && self.queue.len() < MUXER_RXQ_SIZE {
            self.queue.push_back(rx);
            return true;
        }
        self.synced = false;
        false
    }

    /// Removes and returns the oldest item.
    pub(crate) fn pop(&mut self) -> Option<MuxerRx> {
        self.queue.pop_front()
    }

    /// Items queued.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the next push would fail.
    pub(crate) fn is_full(&self) -> bool {
        self.queue.len() >= MUXER_RXQ_SIZE
    }

    /// Whether every push so far fit.
    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u32) -> ConnKey {
        ConnKey {
            local_port: port,
            peer_port: port,
        }
    }

    #[test]
    fn test_rxq_push_beyond_capacity_goes_out_of_sync() {
        let mut rxq = MuxerRxQ::new();
        for port in 0..MUXER_RXQ_SIZE {
            assert!(rxq.push(MuxerRx::Rst(key(u32::try_from(port).unwrap()))));
        }

        let pushed = rxq.push(MuxerRx::Rst(key(9999)));

        assert!(!pushed);
        assert!(!rxq.is_synced());
        assert!(rxq.is_full());
    }

    #[test]
    fn test_rxq_pop_returns_fifo_order() {
        let mut rxq = MuxerRxQ::new();
        rxq.push(MuxerRx::Conn(key(1)));
        rxq.push(MuxerRx::Rst(key(2)));

        assert_eq!(rxq.pop(), Some(MuxerRx::Conn(key(1))));
        assert_eq!(rxq.pop(), Some(MuxerRx::Rst(key(2))));
        assert_eq!(rxq.pop(), None);
    }

    #[test]
    fn test_rxq_from_empty_conns_is_synced_and_empty() {
        let rxq = MuxerRxQ::from_conns(&HashMap::new());

        assert!(rxq.is_synced());
        assert_eq!(rxq.len(), 0);
    }
}
