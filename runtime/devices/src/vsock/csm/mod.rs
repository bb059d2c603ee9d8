//! Connection state machine: one [`VsockConnection`] per host Unix stream.
//!
//! ```text
//!  host CONNECT ──> LocalInit ──guest RESPONSE──> Established <──RESPONSE sent── PeerInit <── guest REQUEST
//!                       │                           │      │
//!                       │          we sent SHUTDOWN(RCV|SEND) (host EOF + host gone)
//!                       │                           │      v
//!                       │                           │   Closing ──guest RST or timeout──> removed
//!                       v                           v
//!                    Killed (RST queued) ──RST delivered──> removed by the muxer
//! ```
//! A connection never blocks: the stream is non-blocking, guest data the stream does not take
//! waits in a [`txbuf::TxBuf`] bounded by the credit we granted, and host data is read straight
//! into guest RX buffers only as far as the guest's credit goes.

pub(crate) mod connection;
pub(crate) mod txbuf;

pub(crate) use self::connection::VsockConnection;

/// Connection tuning.
pub(crate) mod defs {
    use std::time::Duration;

    /// Receive buffer we advertise to the guest (`buf_alloc`), and the bound of the tx buffer.
    pub(crate) const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
    /// Forwarded-but-unreported bytes after which we send a CREDIT_UPDATE on our own.
    pub(crate) const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;
    /// How long a closing connection may wait for the guest's RST or for its tx buffer to
    /// drain before we reset it.
    pub(crate) const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
}

/// Lifecycle state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host stream is connected, our RESPONSE is queued.
    PeerInit,
    /// Data flows (possibly half-closed).
    Established,
    /// We sent SHUTDOWN with both flags and wait for the guest's RST.
    Closing,
    /// An RST is queued; the muxer removes the connection once it is delivered.
    Killed,
}

/// Errors inside a connection; each ends in a reset, never in a panic.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CsmError {
    /// The guest sent more than the credit we granted.
    #[error("tx buffer full: {len} buffered + {incoming} incoming > {capacity}")]
    TxBufFull {
        /// Bytes already buffered.
        len: usize,
        /// Bytes of the new packet.
        incoming: usize,
        /// Capacity of the buffer.
        capacity: usize,
    },
    /// Copying guest memory failed.
    #[error("failed to copy guest data")]
    GuestMemory(#[source] vm_memory::VolatileMemoryError),
}
