//! Hybrid vsock backend: guest vsock streams multiplexed onto host Unix sockets.
//!
//! [`muxer::VsockUnixBackend`] owns the listener at `uds_path`, one
//! [`crate::vsock::csm::VsockConnection`] per stream, a nested epoll fd the transport polls,
//! the bounded queue of connections with something to send ([`muxer_rxq`]) and the queue of
//! connections with a close deadline ([`muxer_killq`]). Host clients speak one line first:
//! `CONNECT <port>\n`, answered with `OK <host port>\n` once the guest accepted.

pub(crate) mod muxer;
pub(crate) mod muxer_killq;
pub(crate) mod muxer_rxq;
#[cfg(test)]
mod tests;

pub(crate) use self::muxer::VsockUnixBackend;

/// Identifies a connection: (host-side port, guest-side port). The guest CID is fixed per
/// device, the host CID is always 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    /// Host-side port.
    pub(crate) local_port: u32,
    /// Guest-side port.
    pub(crate) peer_port: u32,
}

/// Muxer limits.
pub(crate) mod defs {
    /// Most connections per device (a bound on fds and memory, not a protocol limit).
    pub(crate) const MAX_CONNECTIONS: usize = 1023;
    /// Most accepted host clients still writing their `CONNECT` line.
    pub(crate) const MAX_PENDING_HANDSHAKES: usize = 64;
    /// Longest accepted `CONNECT <port>\n` line (`CONNECT 4294967295\n` is 19 bytes).
    pub(crate) const MAX_CONNECT_LINE: usize = 32;
    /// Host ports for host-initiated connections are picked in `[LOCAL_PORT_MIN, LOCAL_PORT_END)`,
    /// away from the ports services usually listen on.
    pub(crate) const LOCAL_PORT_MIN: u32 = 1 << 30;
    /// End (exclusive) of the host-initiated port range.
    pub(crate) const LOCAL_PORT_END: u32 = 1 << 31;
    /// Capacity of the muxer RX queue.
    pub(crate) const MUXER_RXQ_SIZE: usize = 256;
    /// Capacity of the kill queue.
    pub(crate) const MUXER_KILLQ_SIZE: usize = 128;
    /// Events taken from the nested epoll per notification.
    pub(crate) const EPOLL_EVENTS: usize = 32;
}
