//! The muxer's kill queue: connections with a close deadline, soonest first.
//!
//! Every deadline is "now + `CONN_SHUTDOWN_TIMEOUT`", so pushing in time order keeps the queue
//! sorted. Entries are not removed when a connection goes away early; the sweep checks the
//! connection's own deadline before killing. Bounded at [`MUXER_KILLQ_SIZE`], rebuilt from the
//! connection map when it overflowed and drained.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::defs::MUXER_KILLQ_SIZE;
use super::ConnKey;
use crate::vsock::csm::VsockConnection;

/// Bounded deadline queue.
#[derive(Debug)]
pub(crate) struct MuxerKillQ {
    queue: VecDeque<(ConnKey, Instant)>,
    synced: bool,
}

impl MuxerKillQ {
    /// An empty, synced queue.
    pub(crate) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            synced: true,
        }
    }

    /// A queue of the connections that have a deadline, soonest first.
    pub(crate) fn from_conns(conns: &HashMap<ConnKey, VsockConnection>) -> Self {
        let mut entries: Vec<(ConnKey, Instant)> = conns
            .iter()
            .filter_map(|(key, conn)| conn.expiry().map(|at| (*key, at)))
            .collect();
        entries.sort_by_key(|(_, at)| *at);
        let synced = entries.len() <= MUXER_KILLQ_SIZE;
        entries.truncate(MUXER_KILLQ_SIZE);
        Self {
            queue: entries.into(),
            synced,
        }
    }

    /// Appends a deadline; when full, drops it and goes out of sync.
    pub(crate) fn push(&mut self, key: ConnKey, at: Instant) {
        if self.synced && self.queue.len() < MUXER_KILLQ_SIZE {
            self.queue.push_back((key, at));
        } else {
            self.synced = false;
        }
    }

    /// Removes and returns the oldest entry if its deadline passed.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<ConnKey> {
        let (_, at) = self.queue.front()?;
        if *at > now {
            return None;
        }
        self.queue.pop_front().map(|(key, _)| key)
    }

    /// The soonest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.front().map(|(_, at)| *at)
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether every push so far fit.
    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(port: u32) -> ConnKey {
        ConnKey {
            local_port: port,
            peer_port: 1,
        }
    }

    #[test]
    fn test_killq_pop_expired_only_past_deadlines() {
        let now = Instant::now();
        let mut killq = MuxerKillQ::new();
        killq.push(key(1), now);
        killq.push(key(2), now + Duration::from_secs(60));

        assert_eq!(killq.pop_expired(now), Some(key(1)));
        assert_eq!(killq.pop_expired(now), None);
        assert_eq!(killq.next_deadline(), Some(now + Duration::from_secs(60)));
    }

    #[test]
    fn test_killq_push_beyond_capacity_goes_out_of_sync() {
        let now = Instant::now();
        let mut killq = MuxerKillQ::new();
        for port in 0..=MUXER_KILLQ_SIZE {
            killq.push(key(u32::try_from(port).unwrap()), now);
        }

        assert!(!killq.is_synced());
    }
}
