//! Test harness: a real [`Vsock`] over a real [`VsockUnixBackend`], driven through
//! virtio-queue `MockSplitQueue` rings in a `GuestMemoryMmap`, playing the guest driver.
//!
//! Layout of guest memory: the RX and TX rings at fixed addresses, then one fixed buffer per
//! descriptor index (so a used element's id tells where its data is).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::defs::uapi::*;
use super::device::{QueueActivity, Vsock};
use super::unix::VsockUnixBackend;

/// CID of the test guest.
pub(crate) const GUEST_CID: u64 = 3;
/// Size of both test queues.
pub(crate) const QUEUE_SIZE: u16 = 512;
/// Payload room of each RX buffer (as Linux: one 4 KiB buffer after the header).
pub(crate) const RX_BUF_DATA: u32 = 4096;
/// Largest payload of one TX packet in these tests.
pub(crate) const TX_BUF_DATA: u32 = 64 * 1024;
/// Buffer size the test guest advertises.
pub(crate) const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// `VRING_DESC_F_WRITE` as the `u16` descriptor flags are.
#[allow(clippy::cast_possible_truncation)] // the flag is 2
pub(crate) const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Size of `struct virtio_vsock_hdr`.
pub(crate) const HDR_LEN: u32 = 44;
/// Guest address of the first TX buffer (raw chains may use memory from here on).
pub(crate) const TX_BUF_BASE: u64 = 0x80_0000;
/// Guest memory for hand-made TX chains, past every TX slot.
pub(crate) const SCRATCH_BASE: u64 = 0x300_0000;
/// How long the pump helpers wait for the device before failing the test.
const PUMP_DEADLINE: Duration = Duration::from_secs(5);

const MEM_SIZE: usize = 0x400_0000;
const RXQ_ADDR: u64 = 0x0;
const TXQ_ADDR: u64 = 0x2_0000;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_SLOT: u64 = 0x1_1000;
const _: () = assert!(TX_BUF_BASE + QUEUE_SIZE as u64 * TX_SLOT <= SCRATCH_BASE);

/// A virtio_vsock_hdr as plain fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hdr {
    pub(crate) src_cid: u64,
    pub(crate) dst_cid: u64,
    pub(crate) src_port: u32,
    pub(crate) dst_port: u32,
    pub(crate) len: u32,
    pub(crate) type_: u16,
    pub(crate) op: u16,
    pub(crate) flags: u32,
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

impl Hdr {
    /// A guest-to-host stream header from guest port `src_port` to host port `dst_port`.
    pub(crate) fn guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            type_: VSOCK_TYPE_STREAM,
            op,
            buf_alloc: GUEST_BUF_ALLOC,
            ..Self::default()
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, addr: u64) {
        let at = |off: u64| GuestAddress(addr + off);
        mem.write_obj(self.src_cid, at(0)).unwrap();
        mem.write_obj(self.dst_cid, at(8)).unwrap();
        mem.write_obj(self.src_port, at(16)).unwrap();
        mem.write_obj(self.dst_port, at(20)).unwrap();
        mem.write_obj(self.len, at(24)).unwrap();
        mem.write_obj(self.type_, at(28)).unwrap();
        mem.write_obj(self.op, at(30)).unwrap();
        mem.write_obj(self.flags, at(32)).unwrap();
        mem.write_obj(self.buf_alloc, at(36)).unwrap();
        mem.write_obj(self.fwd_cnt, at(40)).unwrap();
    }

    fn read(mem: &GuestMemoryMmap, addr: u64) -> Self {
        let at = |off: u64| GuestAddress(addr + off);
        Self {
            src_cid: mem.read_obj(at(0)).unwrap(),
            dst_cid: mem.read_obj(at(8)).unwrap(),
            src_port: mem.read_obj(at(16)).unwrap(),
            dst_port: mem.read_obj(at(20)).unwrap(),
            len: mem.read_obj(at(24)).unwrap(),
            type_: mem.read_obj(at(28)).unwrap(),
            op: mem.read_obj(at(30)).unwrap(),
            flags: mem.read_obj(at(32)).unwrap(),
            buf_alloc: mem.read_obj(at(36)).unwrap(),
            fwd_cnt: mem.read_obj(at(40)).unwrap(),
        }
    }
}

/// A packet the device put in the RX used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RxPkt {
    pub(crate) hdr: Hdr,
    pub(crate) data: Vec<u8>,
    pub(crate) used_len: u32,
}

/// One ring as the guest driver sees it. Accessed through raw guest memory: a
/// `MockSplitQueue` zeroes the ring indices whenever it is created, so it is used only once, to
/// lay the rings out.
#[derive(Debug)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// Lays out a ring at `addr`; returns it and the device's view of it.
    fn create(mem: &GuestMemoryMmap, addr: u64) -> (Self, Queue) {
        let queue: Queue = MockSplitQueue::create(mem, GuestAddress(addr), QUEUE_SIZE)
            .create_queue()
            .unwrap();
        let ring = Self {
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    /// Writes `descs` as one chain at the next free table slots and makes it available.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + u16::try_from(i).unwrap()) % QUEUE_SIZE;
            let has_next = i + 1 < descs.len();
            let flags = flags | if has_next { 1 } else { 0 };
            let next = (idx + 1) % QUEUE_SIZE;
            let desc = RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next));
            mem.write_obj(desc, GuestAddress(self.desc + 16 * u64::from(idx)))
                .unwrap();
        }
        self.next_desc = (head + u16::try_from(descs.len()).unwrap()) % QUEUE_SIZE;
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Makes available a chain of two writable descriptors whose second points back at the
    /// first.
    fn add_loop(&mut self, mem: &GuestMemoryMmap, addr: u64) {
        let head = self.add_chain(mem, &[(addr, 64, DESC_F_WRITE), (addr, 64, DESC_F_WRITE)]);
        let second = (head + 1) % QUEUE_SIZE;
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, 64, DESC_F_WRITE | 1, head));
        mem.write_obj(desc, GuestAddress(self.desc + 16 * u64::from(second)))
            .unwrap();
    }

    fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, ahead: u16) {
        let idx = self.avail_idx.wrapping_add(ahead);
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<VirtqUsedElem> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != used_idx {
            let slot = u64::from(self.used_seen % QUEUE_SIZE);
            out.push(
                mem.read_obj(GuestAddress(self.used + 4 + 8 * slot))
                    .unwrap(),
            );
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Guest memory, queues and a temp dir for the host sockets.
#[derive(Debug)]
pub(crate) struct TestContext {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rxq: Queue,
    pub(crate) txq: Queue,
    rx: Ring,
    tx: Ring,
    pub(crate) dir: TempDir,
}

impl TestContext {
    pub(crate) fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = Ring::create(&mem, RXQ_ADDR);
        let (tx, txq) = Ring::create(&mem, TXQ_ADDR);
        Self {
            mem,
            rxq,
            txq,
            rx,
            tx,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Path of the hybrid-vsock listener.
    pub(crate) fn uds_path(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    /// Path a host service for guest port `port` listens on.
    pub(crate) fn port_path(&self, port: u32) -> PathBuf {
        self.dir.path().join(format!("vsock.sock_{port}"))
    }

    /// A device with a fresh backend bound at [`Self::uds_path`].
    pub(crate) fn device(&self) -> Vsock<VsockUnixBackend> {
        Vsock::new(
            GUEST_CID,
            VsockUnixBackend::new(GUEST_CID, &self.uds_path()).unwrap(),
        )
    }

    /// Queues a TX packet: header descriptor, then a data descriptor if `data` is not empty.
    pub(crate) fn push_tx(&mut self, mut hdr: Hdr, data: &[u8]) {
        assert!(data.len() <= TX_BUF_DATA as usize);
        hdr.len = u32::try_from(data.len()).unwrap();
        let addr = TX_BUF_BASE + u64::from(self.tx.next_desc) * TX_SLOT;
        hdr.write(&self.mem, addr);
        let data_addr = addr + 0x100;
        self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
        let mut descs = vec![(addr, HDR_LEN, 0)];
        if !data.is_empty() {
            descs.push((data_addr, hdr.len, 0));
        }
        self.tx.add_chain(&self.mem, &descs);
    }

    /// Queues a raw TX chain of `(addr, len, flags)` descriptors.
    pub(crate) fn push_tx_raw(&mut self, descs: &[(u64, u32, u16)]) {
        self.tx.add_chain(&self.mem, descs);
    }

    /// Writes `hdr` as is (a lying `len` included) at the first descriptor's address and queues
    /// the raw TX chain `descs`.
    pub(crate) fn push_tx_hdr_raw(&mut self, hdr: Hdr, descs: &[(u64, u32, u16)]) {
        let (addr, _, _) = descs.first().copied().unwrap();
        hdr.write(&self.mem, addr);
        self.tx.add_chain(&self.mem, descs);
    }

    /// Queues a raw RX chain of `(addr, len, flags)` descriptors.
    pub(crate) fn push_rx_raw(&mut self, descs: &[(u64, u32, u16)]) {
        self.rx.add_chain(&self.mem, descs);
    }

    /// Queues `n` RX buffers, each one writable descriptor (header + [`RX_BUF_DATA`]).
    pub(crate) fn push_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_BUF_BASE + u64::from(self.rx.next_desc) * RX_SLOT;
            self.rx
                .add_chain(&self.mem, &[(addr, HDR_LEN + RX_BUF_DATA, DESC_F_WRITE)]);
        }
    }

    /// Moves the TX ring's available index `ahead` entries past what was posted, as a
    /// hostile driver would.
    pub(crate) fn corrupt_tx_avail_idx(&mut self, ahead: u16) {
        self.tx.set_avail_idx(&self.mem, ahead);
    }

    /// Queues an RX chain that loops (its second descriptor's `next` is its head).
    pub(crate) fn push_rx_loop(&mut self) {
        self.rx.add_loop(&self.mem, RX_BUF_BASE);
    }

    /// Moves the RX ring's available index `ahead` entries past what was posted.
    pub(crate) fn corrupt_rx_avail_idx(&mut self, ahead: u16) {
        self.rx.set_avail_idx(&self.mem, ahead);
    }

    /// TX chains the device returned since the last call.
    pub(crate) fn take_used_tx(&mut self) -> Vec<VirtqUsedElem> {
        self.tx.take_used(&self.mem)
    }

    /// RX packets the device delivered since the last call.
    pub(crate) fn take_rx(&mut self) -> Vec<RxPkt> {
        let used = self.rx.take_used(&self.mem);
        used.into_iter()
            .map(|elem| {
                let addr = RX_BUF_BASE + u64::from(elem.id()) * RX_SLOT;
                let hdr = Hdr::read(&self.mem, addr);
                let mut data = vec![0u8; hdr.len.min(RX_BUF_DATA) as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + u64::from(HDR_LEN)))
                    .unwrap();
                RxPkt {
                    hdr,
                    data,
                    used_len: elem.len(),
                }
            })
            .collect()
    }

    /// Runs the device once over both queues.
    pub(crate) fn process(&mut self, dev: &mut Vsock<VsockUnixBackend>) -> QueueActivity {
        dev.process_queues(&self.mem, &mut self.rxq, &mut self.txq)
    }

    /// Delivers pending backend events, then processes the queues.
    pub(crate) fn pump(&mut self, dev: &mut Vsock<VsockUnixBackend>) -> QueueActivity {
        dev.notify_backend(EventSet::IN);
        self.process(dev)
    }

    /// Pumps until `done(&all packets so far)` holds (or panics after a few seconds); returns
    /// the packets. Like a driver, reposts one RX buffer for each one the device used.
    pub(crate) fn pump_until(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        mut done: impl FnMut(&[RxPkt]) -> bool,
    ) -> Vec<RxPkt> {
        let deadline = Instant::now() + PUMP_DEADLINE;
        let mut pkts = Vec::new();
        loop {
            self.pump(dev);
            let new = self.take_rx();
            self.push_rx_buffers(new.len());
            pkts.extend(new);
            if done(&pkts) {
                return pkts;
            }
            assert!(Instant::now() < deadline, "device stalled; got {pkts:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps until an RX packet arrives (or panics after a few seconds); returns them all.
    pub(crate) fn pump_until_rx(&mut self, dev: &mut Vsock<VsockUnixBackend>) -> Vec<RxPkt> {
        self.pump_until(dev, |pkts| !pkts.is_empty())
    }

    /// Pumps `rounds` times and returns whatever arrived (reposting used RX buffers); for
    /// checking that the device stays quiet once every host event was delivered.
    pub(crate) fn pump_rounds(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        rounds: usize,
    ) -> Vec<RxPkt> {
        let mut pkts = Vec::new();
        for _ in 0..rounds {
            self.pump(dev);
            let new = self.take_rx();
            self.push_rx_buffers(new.len());
            pkts.extend(new);
        }
        pkts
    }

    /// Pumps until `len` payload bytes arrived in RW packets; returns them in order and the
    /// packets (all of them, not only RW).
    pub(crate) fn pump_until_payload(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        len: usize,
    ) -> (Vec<u8>, Vec<RxPkt>) {
        let pkts = self.pump_until(dev, |pkts| rw_payload(pkts).len() >= len);
        (rw_payload(&pkts), pkts)
    }

    /// Guest connects from `guest_port` to host port `host_port`; returns the RX reply.
    pub(crate) fn guest_connect(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        guest_port: u32,
        host_port: u32,
    ) -> RxPkt {
        self.guest_connect_hdr(dev, Hdr::guest(VSOCK_OP_REQUEST, guest_port, host_port))
    }

    /// Guest sends the REQUEST `req`; returns the RX reply.
    pub(crate) fn guest_connect_hdr(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        req: Hdr,
    ) -> RxPkt {
        self.push_tx(req, &[]);
        let mut pkts = self.pump_until_rx(dev);
        assert_eq!(pkts.len(), 1);
        pkts.remove(0)
    }

    /// Host client connects to the hybrid listener and asks for guest port `guest_port`;
    /// returns the stream and the REQUEST the guest received.
    pub(crate) fn host_connect(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        guest_port: u32,
    ) -> (UnixStream, RxPkt) {
        let mut stream = UnixStream::connect(self.uds_path()).unwrap();
        stream
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let mut pkts = self.pump_until_rx(dev);
        assert_eq!(pkts.len(), 1);
        (stream, pkts.remove(0))
    }

    /// A guest-initiated connection whose REQUEST advertised `buf_alloc`, accepted by a host
    /// service listening at [`Self::port_path`]`(host_port)`.
    pub(crate) fn connect_from_guest(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        guest_port: u32,
        host_port: u32,
        buf_alloc: u32,
    ) -> Conn {
        let listener = UnixListener::bind(self.port_path(host_port)).unwrap();
        let mut req = Hdr::guest(VSOCK_OP_REQUEST, guest_port, host_port);
        req.buf_alloc = buf_alloc;
        let reply = self.guest_connect_hdr(dev, req);
        assert_eq!(reply.hdr.op, VSOCK_OP_RESPONSE, "{reply:?}");
        let stream = accept_now(&listener).expect("the device connected to the host service");
        Conn {
            stream,
            host_port,
            guest_port,
        }
    }

    /// A host-initiated connection to `guest_port` that the guest accepted; the host client
    /// already read its `OK <port>\n` line.
    pub(crate) fn connect_from_host(
        &mut self,
        dev: &mut Vsock<VsockUnixBackend>,
        guest_port: u32,
    ) -> Conn {
        let (mut stream, req) = self.host_connect(dev, guest_port);
        assert_eq!(req.hdr.op, VSOCK_OP_REQUEST, "{req:?}");
        let host_port = req.hdr.src_port;
        self.push_tx(Hdr::guest(VSOCK_OP_RESPONSE, guest_port, host_port), &[]);
        self.process(dev);
        let ok = format!("OK {host_port}\n");
        assert_eq!(read_n(&mut stream, ok.len()), ok.as_bytes());
        Conn {
            stream,
            host_port,
            guest_port,
        }
    }
}

/// An established connection: the host end of the stream and the vsock ports.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    pub(crate) host_port: u32,
    pub(crate) guest_port: u32,
}

impl Conn {
    /// A guest-to-host header for this connection.
    pub(crate) fn hdr(&self, op: u16) -> Hdr {
        Hdr::guest(op, self.guest_port, self.host_port)
    }

    /// Whether `pkt` is addressed to this connection's guest end.
    pub(crate) fn owns(&self, pkt: &RxPkt) -> bool {
        pkt.hdr.src_port == self.host_port
            && pkt.hdr.dst_port == self.guest_port
            && pkt.hdr.src_cid == VSOCK_HOST_CID
            && pkt.hdr.dst_cid == GUEST_CID
            && pkt.hdr.type_ == VSOCK_TYPE_STREAM
    }
}

/// The payloads of the RW packets among `pkts`, concatenated in order.
pub(crate) fn rw_payload(pkts: &[RxPkt]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.hdr.op == VSOCK_OP_RW)
        .flat_map(|p| p.data.iter().copied())
        .collect()
}

/// `len` bytes that never repeat with a period dividing a buffer size, so a lost, repeated or
/// reordered chunk shows.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

/// Accepts a connection that must already be pending; `None` if there is none.
pub(crate) fn accept_now(listener: &UnixListener) -> Option<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Ok((stream, _)) => {
            stream.set_nonblocking(false).unwrap();
            Some(stream)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept failed: {e}"),
    }
}

/// Reads exactly `n` bytes from a blocking stream (with a timeout).
pub(crate) fn read_n(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the stream reached EOF (waits up to a second).
pub(crate) fn is_eof(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        _ => false,
    }
}

/// Whether the stream is open with nothing to read right now (does not wait).
pub(crate) fn is_open_and_empty(stream: &mut UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let result = stream.read(&mut byte);
    stream.set_nonblocking(false).unwrap();
    matches!(result, Err(e) if e.kind() == ErrorKind::WouldBlock)
}
