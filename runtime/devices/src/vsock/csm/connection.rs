//! One vsock stream connection between a guest port and a host Unix stream.
//!
//! The muxer routes guest packets here ([`VsockConnection::send_pkt`]), asks for packets to
//! deliver ([`VsockConnection::recv_pkt`]) while [`VsockConnection::has_pending_rx`] holds,
//! forwards epoll events on the stream ([`VsockConnection::notify`]) and polls the stream for
//! [`VsockConnection::get_polled_evset`]. Credit accounting follows virtio 1.2 §5.10.6.3; all
//! counters wrap as the spec defines, and a lying guest can at worst stall its own connection.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::defs::{CONN_CREDIT_UPDATE_THRESHOLD, CONN_SHUTDOWN_TIMEOUT, CONN_TX_BUF_SIZE};
use super::txbuf::TxBuf;
use super::ConnState;
use crate::rate_limited::debug_rate_limited;
use crate::vsock::defs::uapi::*;
use crate::vsock::metrics::METRICS;
use crate::vsock::packet::{rx_capacity, write_rx_header, RxHeader, VsockPacket};
use crate::vsock::RxOutcome;

/// Control packets a connection owes the guest; emitted in the order of the constants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PendingRx(u8);

impl PendingRx {
    const RST: u8 = 1 << 0;
    const REQUEST: u8 = 1 << 1;
    const RESPONSE: u8 = 1 << 2;
    const SHUTDOWN: u8 = 1 << 3;
    const CREDIT_REQUEST: u8 = 1 << 4;
    const CREDIT_UPDATE: u8 = 1 << 5;

    fn insert(&mut self, flag: u8) {
        self.0 |= flag;
    }

    fn remove(&mut self, flag: u8) {
        self.0 &= !flag;
    }

    fn any(self, mask: u8) -> bool {
        self.0 & mask != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Clears `flag`; returns whether it was set.
    fn take(&mut self, flag: u8) -> bool {
        let was_set = self.any(flag);
        self.remove(flag);
        was_set
    }
}

/// Credit state of both directions (virtio 1.2 §5.10.6.3).
#[derive(Debug, Default)]
struct Credit {
    /// Guest bytes written to the host stream (or discarded after the host went away).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last reported to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer size, as last reported.
    peer_buf_alloc: u32,
    /// Bytes the guest consumed, as last reported.
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes we sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST was sent and not yet answered with fresh credit.
    requested: bool,
}

impl Credit {
    /// Bytes the guest can still take; 0 if its counters make no sense.
    fn peer_avail(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn on_peer_header(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_avail() > 0 {
            self.requested = false;
        }
    }

    fn forwarded(&mut self, bytes: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(bytes).unwrap_or(u32::MAX));
    }

    /// Forwarded bytes the guest has not been told about.
    fn unreported(&self) -> u32 {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0
    }
}

/// What we know about the host end of the stream.
#[derive(Debug, Default)]
struct HostSide {
    /// A read may return data or EOF (the last read did not say `WouldBlock`).
    readable: bool,
    /// A read returned EOF: the host sends no more.
    eof: bool,
    /// The host end is gone (hang-up, error, failed write): guest data is discarded.
    gone: bool,
    /// We shut down the stream's write side after the guest's SHUTDOWN(SEND).
    write_shut: bool,
}

/// A vsock connection backed by a non-blocking Unix stream.
#[derive(Debug)]
pub(crate) struct VsockConnection {
    stream: UnixStream,
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    pending: PendingRx,
    tx_buf: TxBuf,
    credit: Credit,
    host: HostSide,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent or have queued.
    local_shutdown: u32,
    expiry: Option<Instant>,
}

impl VsockConnection {
    fn new(stream: UnixStream, state: ConnState, guest_cid: u64, ports: (u32, u32)) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port: ports.0,
            peer_port: ports.1,
            pending: PendingRx::default(),
            tx_buf: TxBuf::new(usize::try_from(CONN_TX_BUF_SIZE).unwrap_or(usize::MAX)),
            credit: Credit::default(),
            host: HostSide::default(),
            peer_shutdown: 0,
            local_shutdown: 0,
            expiry: None,
        }
    }

    /// A host-initiated connection; a REQUEST to `peer_port` is queued.
    pub(crate) fn new_local_init(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            ConnState::LocalInit,
            guest_cid,
            (local_port, peer_port),
        );
        conn.pending.insert(PendingRx::REQUEST);
        conn
    }

    /// A guest-initiated connection whose REQUEST carried `pkt`'s credit; a RESPONSE is queued.
    pub(crate) fn new_peer_init<B: BitmapSlice>(
        stream: UnixStream,
        guest_cid: u64,
        pkt: &VsockPacket<'_, B>,
    ) -> Self {
        let ports = (pkt.dst_port(), pkt.src_port());
        let mut conn = Self::new(stream, ConnState::PeerInit, guest_cid, ports);
        conn.credit.on_peer_header(pkt.buf_alloc(), pkt.fwd_cnt());
        conn.pending.insert(PendingRx::RESPONSE);
        conn
    }

    /// Current lifecycle state.
    pub(crate) fn state(&self) -> ConnState {
        self.state
    }

    /// When the connection must be reset if it has not finished closing.
    pub(crate) fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether the close deadline passed.
    pub(crate) fn has_expired(&self, now: Instant) -> bool {
        self.expiry.is_some_and(|deadline| deadline <= now)
    }

    /// Queues an RST and forgets everything else; the muxer drops us once it is delivered.
    pub(crate) fn kill(&mut self) {
        if self.state != ConnState::Killed {
            METRICS.conns_killed.inc();
        }
        self.state = ConnState::Killed;
        self.pending = PendingRx(PendingRx::RST);
        self.expiry = None;
    }

    /// Whether [`Self::recv_pkt`] would produce a packet.
    pub(crate) fn has_pending_rx(&self) -> bool {
        !self.pending.is_empty()
            || (self.wants_host_read() && (self.credit.peer_avail() > 0 || !self.credit.requested))
    }

    /// Handles a guest packet for this connection (the muxer handles RST and REQUEST).
    pub(crate) fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        self.credit.on_peer_header(pkt.buf_alloc(), pkt.fwd_cnt());
        let open = matches!(self.state, ConnState::Established | ConnState::Closing);
        match (self.state, pkt.op()) {
            (ConnState::Killed, _) => {}
            (ConnState::LocalInit, VSOCK_OP_RESPONSE) => self.on_response(),
            (_, VSOCK_OP_RW) if open => self.on_guest_data(pkt.data_slice()),
            (_, VSOCK_OP_SHUTDOWN) if open => self.on_guest_shutdown(pkt.flags()),
            (_, VSOCK_OP_CREDIT_REQUEST) if open => self.pending.insert(PendingRx::CREDIT_UPDATE),
            (_, VSOCK_OP_CREDIT_UPDATE) if open => {}
            (state, op) => {
                debug_rate_limited!(
                    ?state,
                    op,
                    port = self.local_port,
                    "vsock: unexpected packet"
                );
                self.kill();
            }
        }
    }

    /// Fills `pkt` with the next packet for the guest: RST, REQUEST, RESPONSE, data, SHUTDOWN,
    /// CREDIT_REQUEST, CREDIT_UPDATE, in that priority.
    pub(crate) fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> RxOutcome {
        let handshake = PendingRx::RST | PendingRx::REQUEST | PendingRx::RESPONSE;
        if !self.pending.any(handshake) && self.wants_host_read() {
            if let Some(len) = self.read_host_data(pkt) {
                self.emit(pkt, VSOCK_OP_RW, 0, len);
                return RxOutcome::Filled;
            }
        }
        self.emit_control(pkt)
    }

    /// Handles epoll events on the stream.
    pub(crate) fn notify(&mut self, evset: EventSet) {
        if evset.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.on_host_gone();
        }
        if evset.contains(EventSet::IN) {
            self.host.readable = true;
        }
        if evset.contains(EventSet::OUT) {
            self.flush_tx_buf();
        }
    }

    /// Events to poll on the stream; empty means "take the stream out of epoll".
    pub(crate) fn get_polled_evset(&self) -> EventSet {
        let mut evset = EventSet::empty();
        // A hung-up stream reports HANG_UP forever; never poll it again.
        if self.host.gone || self.state == ConnState::Killed {
            return evset;
        }
        if self.state == ConnState::Established
            && !self.host.readable
            && self.host_read_allowed()
            && self.credit.peer_avail() > 0
        {
            evset |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            evset |= EventSet::OUT;
        }
        evset
    }

    fn host_read_allowed(&self) -> bool {
        !self.host.eof && self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV == 0
    }

    fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established && self.host.readable && self.host_read_allowed()
    }

    /// The guest accepted our REQUEST: tell the host client which port it got.
    fn on_response(&mut self) {
        let ack = format!("OK {}\n", self.local_port);
        match self.stream.write(ack.as_bytes()) {
            Ok(n) if n == ack.len() => self.state = ConnState::Established,
            _ => {
                METRICS.stream_write_fails.inc();
                self.kill();
            }
        }
    }

    fn on_guest_data<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) {
        let Some(data) = data else { return };
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            debug_rate_limited!(port = self.local_port, "vsock: data after guest shutdown");
            self.kill();
            return;
        }
        if self.host.gone {
            self.credit.forwarded(data.len());
        } else if let Err(e) = self.forward_guest_data(data) {
            METRICS.credit_violations.inc();
            debug_rate_limited!(port = self.local_port, error = %e, "vsock: guest exceeded credit");
            self.kill();
            return;
        }
        self.maybe_credit_update();
    }

    /// Writes what the stream takes now, buffers the rest (behind older buffered bytes).
    fn forward_guest_data<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), super::CsmError> {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => {
                    METRICS.stream_write_fails.inc();
                    self.credit.forwarded(data.len());
                    self.on_host_gone();
                    return Ok(());
                }
            }
            self.credit.forwarded(written);
        }
        let rest = data.offset(written).map_err(super::CsmError::GuestMemory)?;
        if rest.is_empty() {
            return Ok(());
        }
        self.tx_buf.push(&rest)
    }

    fn on_guest_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & VSOCK_FLAGS_SHUTDOWN_ALL;
        if self.peer_shutdown == VSOCK_FLAGS_SHUTDOWN_ALL && !self.tx_buf.is_empty() {
            // Let the host drain what the guest sent before we reset, but not forever.
            self.arm_expiry();
        }
        self.try_finish_guest_send();
    }

    /// After the guest's SHUTDOWN(SEND) and a drained tx buffer, pass EOF on to the host; once
    /// the guest closed both directions, answer with the RST its close waits for.
    fn try_finish_guest_send(&mut self) {
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND == 0 || !self.tx_buf.is_empty() {
            return;
        }
        if !self.host.write_shut && !self.host.gone {
            // ENOTCONN here only means the host already left; nothing to do about it.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host.write_shut = true;
        }
        if self.peer_shutdown == VSOCK_FLAGS_SHUTDOWN_ALL {
            self.kill();
        }
    }

    fn flush_tx_buf(&mut self) {
        match self.tx_buf.flush_to(&mut self.stream) {
            Ok(written) => {
                self.credit.forwarded(written);
                self.maybe_credit_update();
                self.try_finish_guest_send();
            }
            Err(_) => {
                METRICS.stream_write_fails.inc();
                self.on_host_gone();
            }
        }
    }

    /// The host end hung up or failed: discard guest data from now on and tell the guest to
    /// stop sending; what the host wrote before leaving is still delivered, then EOF.
    fn on_host_gone(&mut self) {
        if self.host.gone {
            return;
        }
        self.host.gone = true;
        self.host.readable = true;
        let dropped = self.tx_buf.clear();
        self.credit.forwarded(dropped);
        if self.state != ConnState::Established {
            self.kill();
            return;
        }
        self.queue_shutdown(VSOCK_FLAGS_SHUTDOWN_RCV);
        self.try_finish_guest_send();
    }

    fn on_host_eof(&mut self) {
        self.host.eof = true;
        self.host.readable = false;
        let mut flags = VSOCK_FLAGS_SHUTDOWN_SEND;
        if self.host.gone {
            flags |= VSOCK_FLAGS_SHUTDOWN_RCV;
        }
        self.queue_shutdown(flags);
    }

    fn queue_shutdown(&mut self, flags: u32) {
        if self.local_shutdown | flags != self.local_shutdown {
            self.local_shutdown |= flags;
            self.pending.insert(PendingRx::SHUTDOWN);
        }
    }

    fn maybe_credit_update(&mut self) {
        if self.credit.unreported() >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending.insert(PendingRx::CREDIT_UPDATE);
        }
    }

    fn arm_expiry(&mut self) {
        if self.expiry.is_none() {
            self.expiry = Instant::now().checked_add(CONN_SHUTDOWN_TIMEOUT);
        }
    }

    /// Reads host data straight into the guest buffer, within the guest's credit. Returns the
    /// payload length, or `None` (nothing read; EOF, errors and credit stalls update the state).
    fn read_host_data<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        let credit = self.credit.peer_avail();
        if credit == 0 {
            if !self.credit.requested {
                self.credit.requested = true;
                self.pending.insert(PendingRx::CREDIT_REQUEST);
            }
            return None;
        }
        let max = rx_capacity(pkt).min(usize::try_from(credit).unwrap_or(usize::MAX));
        let mut dst = pkt.data_slice()?.subslice(0, max).ok()?;
        if dst.is_empty() {
            return None;
        }
        match self.stream.read_volatile(&mut dst) {
            Ok(0) => {
                self.on_host_eof();
                None
            }
            Ok(n) => {
                let len = u32::try_from(n).ok()?;
                self.credit.rx_cnt += Wrapping(len);
                METRICS.rx_bytes.add(u64::from(len));
                Some(len)
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.host.readable = false;
                None
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => None,
            Err(_) => {
                METRICS.stream_read_fails.inc();
                self.kill();
                None
            }
        }
    }

    fn emit_control<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> RxOutcome {
        if self.pending.take(PendingRx::RST) {
            self.pending = PendingRx::default();
            self.emit(pkt, VSOCK_OP_RST, 0, 0);
        } else if self.pending.take(PendingRx::REQUEST) {
            self.emit(pkt, VSOCK_OP_REQUEST, 0, 0);
        } else if self.pending.take(PendingRx::RESPONSE) {
            self.state = ConnState::Established;
            self.emit(pkt, VSOCK_OP_RESPONSE, 0, 0);
        } else if self.pending.take(PendingRx::SHUTDOWN) {
            if self.local_shutdown == VSOCK_FLAGS_SHUTDOWN_ALL {
                self.state = ConnState::Closing;
                self.arm_expiry();
            }
            self.emit(pkt, VSOCK_OP_SHUTDOWN, self.local_shutdown, 0);
        } else if self.pending.take(PendingRx::CREDIT_REQUEST) {
            METRICS.credit_requests_sent.inc();
            self.emit(pkt, VSOCK_OP_CREDIT_REQUEST, 0, 0);
        } else if self.pending.take(PendingRx::CREDIT_UPDATE) {
            METRICS.credit_updates_sent.inc();
            self.emit(pkt, VSOCK_OP_CREDIT_UPDATE, 0, 0);
        } else {
            return RxOutcome::NoData;
        }
        RxOutcome::Filled
    }

    /// Writes the header; every packet reports our credit, so a pending update is moot.
    fn emit<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        let hdr = RxHeader {
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            flags,
            len,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.credit.fwd_cnt.0,
        };
        write_rx_header(pkt, &hdr);
        self.credit.last_fwd_cnt_sent = self.credit.fwd_cnt;
        self.pending.remove(PendingRx::CREDIT_UPDATE);
    }
}

impl AsRawFd for VsockConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}
