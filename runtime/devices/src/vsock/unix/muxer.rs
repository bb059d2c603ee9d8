//! `VsockUnixBackend`: the vsock backend that maps guest streams onto host Unix sockets.
//!
//! Two jobs. Routing: guest packets go to their connection by [`ConnKey`]; a REQUEST without a
//! connection opens one to `<uds_path>_<port>`, any other orphan packet gets an RST. Event
//! dispatch: every fd it owns (the `uds_path` listener, the kill timer, host clients still
//! writing their `CONNECT` line, connection streams) sits in one nested epoll whose fd the
//! transport polls; [`VsockEpollListener::notify`] drains it without blocking.
//!
//! After anything that may change a connection, [`VsockUnixBackend::with_conn`] re-syncs the
//! three derived views: the RX queue (does it have something to send), the kill queue (did it get
//! a close deadline) and its epoll interest set.

use std::collections::{HashMap, HashSet};
use std::io::{self, ErrorKind, Read};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::defs::*;
use super::muxer_killq::MuxerKillQ;
use super::muxer_rxq::{MuxerRx, MuxerRxQ};
use super::ConnKey;
use crate::rate_limited::{debug_rate_limited, warn_rate_limited};
use crate::vsock::csm::{ConnState, VsockConnection};
use crate::vsock::defs::uapi::*;
use crate::vsock::metrics::METRICS;
use crate::vsock::packet::{write_rx_header, RxHeader, VsockPacket};
use crate::vsock::{
    RxOutcome, TxOutcome, VsockBackend, VsockChannel, VsockEpollListener, VsockError,
};

/// What an fd registered in the nested epoll stands for.
#[derive(Debug)]
enum Listener {
    /// The `uds_path` listener.
    HostSock,
    /// The kill-queue timer.
    KillTimer,
    /// An accepted host client that has not sent its whole `CONNECT <port>\n` line.
    Handshake { stream: UnixStream, line: Vec<u8> },
    /// A connection's stream, polled for `evset`.
    Connection { key: ConnKey, evset: EventSet },
}

/// Hybrid-vsock backend of one device.
#[derive(Debug)]
pub(crate) struct VsockUnixBackend {
    guest_cid: u64,
    uds_path: PathBuf,
    host_sock: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    conns: HashMap<ConnKey, VsockConnection>,
    listeners: HashMap<RawFd, Listener>,
    rxq: MuxerRxQ,
    killq: MuxerKillQ,
    /// Host ports in use by host-initiated connections.
    local_ports: HashSet<u32>,
    last_local_port: u32,
    handshakes: usize,
}

impl VsockUnixBackend {
    /// Binds `uds_path` (replacing a stale socket nobody listens on) and sets up the epoll.
    ///
    /// # Errors
    /// Binding the listener or creating the epoll/timer fds failed.
    pub(crate) fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let host_sock = bind_listener(uds_path)?;
        let create = |what| move |source| VsockError::CreateFd { what, source };
        let mut backend = Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            host_sock,
            epoll: Epoll::new().map_err(create("vsock muxer epoll"))?,
            timer: TimerFd::new()
                .map_err(io::Error::from)
                .map_err(create("vsock kill timer"))?,
            conns: HashMap::new(),
            listeners: HashMap::new(),
            rxq: MuxerRxQ::new(),
            killq: MuxerKillQ::new(),
            local_ports: HashSet::new(),
            last_local_port: LOCAL_PORT_END - 1,
            handshakes: 0,
        };
        let register = |what| move |source| VsockError::RegisterFd { what, source };
        let fd = backend.host_sock.as_raw_fd();
        backend
            .add_listener(fd, EventSet::IN, Listener::HostSock)
            .map_err(register("vsock listener"))?;
        let fd = backend.timer.as_raw_fd();
        backend
            .add_listener(fd, EventSet::IN, Listener::KillTimer)
            .map_err(register("vsock kill timer"))?;
        Ok(backend)
    }

    fn add_listener(&mut self, fd: RawFd, evset: EventSet, listener: Listener) -> io::Result<()> {
        let data = u64::try_from(fd).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(evset, data))?;
        self.listeners.insert(fd, listener);
        Ok(())
    }

    fn remove_listener(&mut self, fd: RawFd) -> Option<Listener> {
        let listener = self.listeners.remove(&fd)?;
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            METRICS.muxer_event_fails.inc();
            warn_rate_limited!(error = %e, "vsock: failed to remove fd from epoll");
        }
        Some(listener)
    }

    fn dispatch(&mut self, fd: RawFd, evset: EventSet) {
        match self.listeners.get(&fd) {
            Some(Listener::HostSock) => self.accept_host_clients(),
            Some(Listener::KillTimer) => self.on_kill_timer(),
            Some(Listener::Handshake { .. }) => self.on_handshake_readable(fd),
            Some(Listener::Connection { key, .. }) => {
                let key = *key;
                self.with_conn(key, |conn| conn.notify(evset));
            }
            // An event for an fd removed earlier in the same batch.
            None => debug_rate_limited!(fd, "vsock: event for unknown fd"),
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            let stream = match self.host_sock.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    METRICS.muxer_event_fails.inc();
                    warn_rate_limited!(error = %e, "vsock: failed to accept host client");
                    return;
                }
            };
            self.add_handshake(stream);
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) {
        let full = self.conns.len().saturating_add(self.handshakes) >= MAX_CONNECTIONS
            || self.handshakes >= MAX_PENDING_HANDSHAKES;
        if full {
            METRICS.host_conns_refused.inc();
            warn_rate_limited!("vsock: connection limit reached, closing host client");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            METRICS.muxer_event_fails.inc();
            warn_rate_limited!(error = %e, "vsock: failed to set host client non-blocking");
            return;
        }
        let fd = stream.as_raw_fd();
        let line = Vec::with_capacity(MAX_CONNECT_LINE);
        match self.add_listener(fd, EventSet::IN, Listener::Handshake { stream, line }) {
            Ok(()) => self.handshakes = self.handshakes.saturating_add(1),
            Err(e) => {
                METRICS.muxer_event_fails.inc();
                warn_rate_limited!(error = %e, "vsock: failed to register host client");
            }
        }
    }

    /// Reads the `CONNECT` line one byte at a time, so that bytes after it stay in the stream.
    fn on_handshake_readable(&mut self, fd: RawFd) {
        let Some(Listener::Handshake { stream, line }) = self.listeners.get_mut(&fd) else {
            return;
        };
        let done = loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte == *b"\n" => break Ok(()),
                Ok(_) if line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => line.extend_from_slice(&byte),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(Listener::Handshake { stream, line }) = self.remove_listener(fd) else {
            return;
        };
        self.handshakes = self.handshakes.saturating_sub(1);
        match done.ok().and_then(|()| parse_connect_line(&line)) {
            Some(port) => self.connect_to_guest(stream, port),
            None => {
                METRICS.host_handshake_fails.inc();
                debug_rate_limited!("vsock: malformed CONNECT line, closing host client");
            }
        }
    }

    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.allocate_local_port() else {
            METRICS.host_conns_refused.inc();
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = VsockConnection::new_local_init(stream, self.guest_cid, local_port, peer_port);
        self.add_connection(key, conn);
    }

    /// Round-robin in `[LOCAL_PORT_MIN, LOCAL_PORT_END)`, skipping ports in use.
    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let next = self.last_local_port.saturating_add(1);
            self.last_local_port = if next >= LOCAL_PORT_END {
                LOCAL_PORT_MIN
            } else {
                next
            };
            if self.local_ports.insert(self.last_local_port) {
                return Some(self.last_local_port);
            }
        }
        None
    }

    fn on_guest_request<B: BitmapSlice>(&mut self, key: ConnKey, pkt: &VsockPacket<'_, B>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            METRICS.conns_refused.inc();
            self.enq_rst(key);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = VsockConnection::new_peer_init(stream, self.guest_cid, pkt);
                self.add_connection(key, conn);
            }
            Err(e) => {
                METRICS.conns_refused.inc();
                debug_rate_limited!(port = key.local_port, error = %e, "vsock: no host listener");
                self.enq_rst(key);
            }
        }
    }

    fn add_connection(&mut self, key: ConnKey, conn: VsockConnection) {
        if self.conns.contains_key(&key) {
            // A host port allocated while a guest-initiated connection uses the same pair.
            self.free_local_port(key);
            return;
        }
        self.conns.insert(key, conn);
        METRICS.conns_added.inc();
        let fd = self.conns.get(&key).map(AsRawFd::as_raw_fd);
        if let Some(fd) = fd {
            self.sync_conn(key, fd, false, false);
        }
    }

    fn remove_connection(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.remove_listener(conn.as_raw_fd());
            METRICS.conns_removed.inc();
            self.free_local_port(key);
        }
    }

    fn free_local_port(&mut self, key: ConnKey) {
        // Only host-initiated connections hold an allocated port; a guest-initiated one with
        // the same host port can only exist with another guest port, hence the lookup.
        let still_used = self.conns.keys().any(|k| k.local_port == key.local_port);
        if !still_used {
            self.local_ports.remove(&key.local_port);
        }
    }

    /// Runs `f` on a connection, then re-syncs RX queue, kill queue and epoll interest.
    fn with_conn<R>(
        &mut self,
        key: ConnKey,
        f: impl FnOnce(&mut VsockConnection) -> R,
    ) -> Option<R> {
        let conn = self.conns.get_mut(&key)?;
        let had_rx = conn.has_pending_rx();
        let had_expiry = conn.expiry().is_some();
        let result = f(conn);
        let fd = conn.as_raw_fd();
        self.sync_conn(key, fd, had_rx, had_expiry);
        Some(result)
    }

    fn sync_conn(&mut self, key: ConnKey, fd: RawFd, had_rx: bool, had_expiry: bool) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let (has_rx, expiry, evset) = (
            conn.has_pending_rx(),
            conn.expiry(),
            conn.get_polled_evset(),
        );
        if has_rx && !had_rx {
            // A failed push only desyncs the queue; it is rebuilt from `conns` later.
            self.rxq.push(MuxerRx::Conn(key));
        }
        if let (false, Some(at)) = (had_expiry, expiry) {
            self.killq.push(key, at);
            self.arm_timer();
        }
        if let Err(e) = self.update_interest(key, fd, evset) {
            METRICS.muxer_event_fails.inc();
            warn_rate_limited!(error = %e, "vsock: failed to update epoll interest");
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.kill();
            }
            self.rxq.push(MuxerRx::Conn(key));
        }
    }

    fn update_interest(&mut self, key: ConnKey, fd: RawFd, evset: EventSet) -> io::Result<()> {
        let current = match self.listeners.get(&fd) {
            Some(Listener::Connection { evset, .. }) => Some(*evset),
            _ => None,
        };
        match current {
            None if evset.is_empty() => Ok(()),
            None => self.add_listener(fd, evset, Listener::Connection { key, evset }),
            Some(_) if evset.is_empty() => {
                self.remove_listener(fd);
                Ok(())
            }
            Some(old) if old != evset => {
                let data =
                    u64::try_from(fd).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(evset, data))?;
                self.listeners
                    .insert(fd, Listener::Connection { key, evset });
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    fn enq_rst(&mut self, key: ConnKey) {
        if self.rxq.push(MuxerRx::Rst(key)) {
            METRICS.rst_unknown.inc();
        } else {
            METRICS.rst_dropped.inc();
            warn_rate_limited!(port = key.local_port, "vsock: rx queue full, dropping rst");
        }
    }

    fn on_kill_timer(&mut self) {
        // The timer is only readable once expired, so this read does not block.
        if let Err(e) = self.timer.wait() {
            METRICS.muxer_event_fails.inc();
            warn_rate_limited!(error = %e, "vsock: failed to read kill timer");
        }
        self.sweep_killq();
    }

    fn sweep_killq(&mut self) {
        let now = Instant::now();
        while let Some(key) = self.killq.pop_expired(now) {
            let expired = self.conns.get(&key).is_some_and(|c| c.has_expired(now));
            if expired {
                METRICS.conns_expired.inc();
                self.with_conn(key, VsockConnection::kill);
            }
        }
        if self.killq.is_empty() && !self.killq.is_synced() {
            METRICS.killq_resync.inc();
            self.killq = MuxerKillQ::from_conns(&self.conns);
        }
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let result = match self.killq.next_deadline() {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer instead of firing it.
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            METRICS.muxer_event_fails.inc();
            warn_rate_limited!(error = %e, "vsock: failed to arm kill timer");
        }
    }

    /// Fills `pkt` from the connection at the head of the RX queue and requeues it at the tail
    /// if it has more, so that one busy connection cannot starve the others.
    fn recv_from_conn<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        pkt: &mut VsockPacket<'_, B>,
    ) -> RxOutcome {
        let Some(conn) = self.conns.get_mut(&key) else {
            return RxOutcome::NoData;
        };
        let had_expiry = conn.expiry().is_some();
        let outcome = conn.recv_pkt(pkt);
        let fd = conn.as_raw_fd();
        // `had_rx = true`: requeueing is decided below, not by the sync.
        self.sync_conn(key, fd, true, had_expiry);
        let killed = self
            .conns
            .get(&key)
            .is_some_and(|c| c.state() == ConnState::Killed && !c.has_pending_rx());
        if outcome == RxOutcome::Filled && pkt.op() == VSOCK_OP_RST && killed {
            self.remove_connection(key);
        } else if self
            .conns
            .get(&key)
            .is_some_and(VsockConnection::has_pending_rx)
        {
            self.rxq.push(MuxerRx::Conn(key));
        }
        outcome
    }

    fn fill_rst<B: BitmapSlice>(&self, key: ConnKey, pkt: &mut VsockPacket<'_, B>) {
        let hdr = RxHeader {
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            op: VSOCK_OP_RST,
            ..RxHeader::default()
        };
        write_rx_header(pkt, &hdr);
    }
}

impl VsockChannel for VsockUnixBackend {
    fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> RxOutcome {
        if self.rxq.is_empty() && !self.rxq.is_synced() {
            METRICS.rxq_resync.inc();
            self.rxq = MuxerRxQ::from_conns(&self.conns);
        }
        // Each queued item is visited at most once per call; requeued ones wait for the next.
        for _ in 0..self.rxq.len() {
            let outcome = match self.rxq.pop() {
                Some(MuxerRx::Rst(key)) => {
                    self.fill_rst(key, pkt);
                    RxOutcome::Filled
                }
                Some(MuxerRx::Conn(key)) => self.recv_from_conn(key, pkt),
                None => break,
            };
            if outcome == RxOutcome::Filled {
                return outcome;
            }
        }
        RxOutcome::NoData
    }

    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> TxOutcome {
        // Every guest packet may need an answer in the RX queue; never risk dropping one.
        if self.rxq.is_full() || !self.rxq.is_synced() {
            METRICS.tx_backpressure.inc();
            return TxOutcome::Busy;
        }
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.type_() != VSOCK_TYPE_STREAM {
            self.enq_rst(key);
        } else if pkt.dst_cid() != VSOCK_HOST_CID {
            METRICS.tx_bad_dst_cid.inc();
            debug_rate_limited!(dst_cid = pkt.dst_cid(), "vsock: packet for another cid");
        } else if !self.conns.contains_key(&key) {
            match pkt.op() {
                VSOCK_OP_REQUEST => self.on_guest_request(key, pkt),
                VSOCK_OP_RST => {}
                _ => self.enq_rst(key),
            }
        } else if pkt.op() == VSOCK_OP_RST {
            self.remove_connection(key);
        } else {
            self.with_conn(key, |conn| conn.send_pkt(pkt));
        }
        TxOutcome::Consumed
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty() || !self.rxq.is_synced()
    }
}

impl AsRawFd for VsockUnixBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockEpollListener for VsockUnixBackend {
    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, _evset: EventSet) {
        let mut events = [EpollEvent::default(); EPOLL_EVENTS];
        match self.epoll.wait(0, &mut events) {
            Ok(count) => {
                for event in events.iter().take(count) {
                    let evset = EventSet::from_bits_truncate(event.events());
                    self.dispatch(event.fd(), evset);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                METRICS.muxer_event_fails.inc();
                warn_rate_limited!(error = %e, "vsock: muxer epoll wait failed");
            }
        }
    }
}

impl VsockBackend for VsockUnixBackend {
    fn reset(&mut self) {
        let fds: Vec<RawFd> = self
            .listeners
            .iter()
            .filter(|(_, l)| matches!(l, Listener::Handshake { .. } | Listener::Connection { .. }))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.remove_listener(fd);
        }
        self.conns.clear();
        self.local_ports.clear();
        self.handshakes = 0;
        self.rxq = MuxerRxQ::new();
        self.killq = MuxerKillQ::new();
        self.arm_timer();
    }
}

/// `CONNECT <port>` (keyword case-insensitive, exactly two words) to the port.
pub(crate) fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let (keyword, port) = (words.next()?, words.next()?);
    if !keyword.eq_ignore_ascii_case("connect") || words.next().is_some() {
        return None;
    }
    port.parse().ok()
}

/// `<uds_path>_<port>`.
fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Binds `path`; a socket file left by a dead process (connecting is refused) is replaced.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let bind_error = |source| VsockError::BindListener {
        path: path.to_path_buf(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Err(e) if e.kind() == ErrorKind::AddrInUse && is_stale_socket(path) => {
            std::fs::remove_file(path).map_err(bind_error)?;
            UnixListener::bind(path)
        }
        other => other,
    }
    .map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

fn is_stale_socket(path: &Path) -> bool {
    matches!(
        UnixStream::connect(path),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// Connects without blocking: a host listener with a full backlog must not stall the device
/// thread (a blocking `connect(2)` on a Unix socket waits for backlog room).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd: OwnedFd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
