//! The network device: moves frames between the guest's queues and a tap (see the module
//! documentation of `crate::net` for what the guest sees and what a hostile one can do).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::GuestMemory;

use super::defs::{
    BUDGET, CONFIG_LEN, ETH_HEADER_LEN, FEATURES, F_MRG_RXBUF, F_MTU, HEADER_LEN, MAX_CHAIN_LEN,
    NUM_BUFFERS_AT,
};
use super::metrics::METRICS;
use crate::queue::{log_broken, pop, QueueFault};
use crate::rate_limited::warn_rate_limited;

/// What one [`Net::process`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activity {
    /// A used ring changed: interrupt the driver.
    pub(crate) used: bool,
    /// A queue was found corrupted in this call: the transport reports `DEVICE_NEEDS_RESET`.
    pub(crate) broke: bool,
    /// The transmit queue stopped at its budget with chains left.
    pub(crate) more_tx: bool,
    /// The receive side stopped at its budget with frames left on the tap.
    pub(crate) more_rx: bool,
}

/// A virtio-net device on an open tap (or, in tests, any datagram descriptor).
#[derive(Debug)]
pub(crate) struct Net {
    tap: File,
    features: u64,
    config: [u8; CONFIG_LEN],
    /// A frame read from the tap (its virtio header first) and its length, when no receive
    /// buffer took it yet.
    frame: Vec<u8>,
    pending: Option<usize>,
    /// Transmit bounce buffer: header and frame, written to the tap in one call.
    tx: Vec<u8>,
    /// The driver accepted `VIRTIO_NET_F_MRG_RXBUF`: a frame may span receive chains.
    mergeable: bool,
    /// The guest corrupted a queue: nothing is served until the driver resets the device.
    broken: bool,
}

impl Net {
    /// A device on `tap` (non-blocking, one frame per read and write, each behind a 12-byte
    /// virtio header) with hardware address `mac`, and `mtu` offered when known.
    pub(crate) fn new(tap: File, mac: [u8; 6], mtu: Option<u16>) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        // status (not offered) and max_virtqueue_pairs (no MQ) stay 0.
        config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
        Self {
            tap,
            features: mtu.map_or(FEATURES, |_| FEATURES | F_MTU),
            config,
            frame: vec![0; MAX_CHAIN_LEN],
            pending: None,
            tx: vec![0; MAX_CHAIN_LEN],
            mergeable: false,
            broken: false,
        }
    }

    /// Offered feature bits.
    pub(crate) fn features(&self) -> u64 {
        self.features
    }

    /// `struct virtio_net_config` up to `mtu`, little-endian.
    pub(crate) fn config(&self) -> [u8; CONFIG_LEN] {
        self.config
    }

    /// The features the driver accepted, before the queues are served.
    pub(crate) fn ack_features(&mut self, acked: u64) {
        self.mergeable = acked & F_MRG_RXBUF != 0;
    }

    /// The tap, for the transport's epoll.
    pub(crate) fn tap(&self) -> &File {
        &self.tap
    }

    /// Sends what the guest queued on `txq`, then gives the guest what waits on the tap, as
    /// far as `rxq` has buffers; at most [`BUDGET`] chains each. Nothing once a queue was
    /// found corrupted (until [`Net::reset`]).
    pub(crate) fn process<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        txq: &mut Queue,
    ) -> Activity {
        let mut activity = Activity::default();
        if self.broken {
            return activity;
        }
        let served = self
            .transmit(mem, txq, &mut activity)
            .map_err(|fault| ("transmit", fault))
            .and_then(|()| {
                self.receive(mem, rxq, &mut activity)
                    .map_err(|fault| ("receive", fault))
            });
        if let Err((queue, fault)) = served {
            self.broken = true;
            METRICS.queues_broken.inc();
            log_broken("net", queue, &fault);
            activity.broke = true;
            activity.more_rx = false;
            activity.more_tx = false;
        }
        activity
    }

    /// Device reset: a broken device is served again; a frame held for the guest is dropped.
    pub(crate) fn reset(&mut self) {
        self.broken = false;
        self.mergeable = false;
        if self.pending.take().is_some() {
            METRICS.rx_dropped.inc();
        }
    }

    fn transmit<M: GuestMemory>(
        &mut self,
        mem: &M,
        txq: &mut Queue,
        activity: &mut Activity,
    ) -> Result<(), QueueFault> {
        for _ in 0..BUDGET {
            let Some(chain) = pop(txq, mem)? else {
                return Ok(());
            };
            let head = chain.head_index();
            self.send(mem, chain);
            txq.add_used(mem, head, 0).map_err(QueueFault::Ring)?;
            activity.used = true;
        }
        activity.more_tx = pending(txq, mem)?;
        Ok(())
    }

    /// One transmit chain to the tap, behind a zeroed header.
    fn send<'a, M: GuestMemory>(&mut self, mem: &'a M, chain: DescriptorChain<&'a M>) {
        let mut reader = match Reader::new(mem, chain) {
            Ok(reader) => reader,
            Err(e) => {
                METRICS.tx_bad_chain.inc();
                warn_rate_limited!(error = %e, "net: transmit chain refused");
                return;
            }
        };
        let len = reader.available_bytes();
        if !(HEADER_LEN + ETH_HEADER_LEN..=MAX_CHAIN_LEN).contains(&len) {
            METRICS.tx_bad_chain.inc();
            warn_rate_limited!(len, "net: transmit chain shorter than a frame or too long");
            return;
        }
        let Some(buf) = self.tx.get_mut(..len) else {
            return;
        };
        if let Err(e) = reader.read_exact(buf) {
            METRICS.tx_bad_chain.inc();
            warn_rate_limited!(error = %e, "net: reading a transmit chain failed");
            return;
        }
        // The host kernel parses no header the guest wrote.
        buf[..HEADER_LEN].fill(0);
        // A tap takes a frame whole or not at all.
        match self.tap.write(buf) {
            Ok(written) if written == len => {
                METRICS.tx_frames.inc();
                METRICS.tx_bytes.add((len - HEADER_LEN) as u64);
            }
            Ok(_) => METRICS.tx_dropped.inc(),
            Err(e) => {
                // A full or down tap drops the frame, as a wire would.
                METRICS.tx_dropped.inc();
                if e.kind() != ErrorKind::WouldBlock {
                    warn_rate_limited!(error = %e, "net: writing to the tap failed");
                }
            }
        }
    }

    fn receive<M: GuestMemory>(
        &mut self,
        mem: &M,
        rxq: &mut Queue,
        activity: &mut Activity,
    ) -> Result<(), QueueFault> {
        // Chains one frame may take: any number with mergeable buffers, else one.
        let most = match self.mergeable {
            true => usize::from(rxq.size()),
            false => 1,
        };
        for _ in 0..BUDGET {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => return Ok(()),
                },
            };
            let mut buffers = Vec::new();
            let mut room = 0usize;
            while room < len && buffers.len() < most {
                let Some(chain) = pop(rxq, mem)? else {
                    break;
                };
                let head = chain.head_index();
                // `pop` checked the chain: a failure here is the guest rewriting it since.
                let writer = Writer::new(mem, chain).map_err(QueueFault::Ring)?;
                room = room.saturating_add(writer.available_bytes());
                buffers.push((head, writer));
            }
            if room < len {
                // Leave the buffers for later.
                for _ in 0..buffers.len() {
                    rxq.go_to_previous_position();
                }
                if buffers.len() < most {
                    // The guest has no more buffers: keep the frame, wait for its kick.
                    self.pending = Some(len);
                    return Ok(());
                }
                METRICS.rx_dropped.inc();
                warn_rate_limited!(
                    len,
                    room,
                    "net: frame larger than the guest's receive buffers dropped"
                );
                continue;
            }
            for (head, written) in self.deliver(buffers, len) {
                rxq.add_used(mem, head, written).map_err(QueueFault::Ring)?;
            }
            activity.used = true;
        }
        activity.more_rx = true;
        Ok(())
    }

    /// The next frame from the tap into `self.frame`; `None` when the tap has none now.
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            match self.tap.read(&mut self.frame) {
                Ok(len) if len >= HEADER_LEN + ETH_HEADER_LEN => return Some(len),
                Ok(0) => return None,
                Ok(_) => METRICS.rx_dropped.inc(),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        METRICS.rx_dropped.inc();
                        warn_rate_limited!(error = %e, "net: reading the tap failed");
                    }
                    return None;
                }
            }
        }
    }

    /// The frame of `len` bytes (header included, which `buffers` have room for) into
    /// `buffers`, behind a header of our own; the used length of each buffer.
    fn deliver<B: BitmapSlice>(
        &mut self,
        buffers: Vec<(u16, Writer<'_, B>)>,
        len: usize,
    ) -> Vec<(u16, u32)> {
        let count = u16::try_from(buffers.len()).unwrap_or(u16::MAX);
        let Some(frame) = self.frame.get_mut(..len) else {
            return buffers.into_iter().map(|(head, _)| (head, 0)).collect();
        };
        // Nothing offloaded: no flags, no GSO; the number of buffers the frame took.
        frame[..HEADER_LEN].fill(0);
        frame[NUM_BUFFERS_AT..HEADER_LEN].copy_from_slice(&count.to_le_bytes());
        let mut rest: &[u8] = frame;
        let mut used = Vec::with_capacity(buffers.len());
        let mut failed = false;
        for (head, mut writer) in buffers {
            let (part, tail) = rest.split_at(rest.len().min(writer.available_bytes()));
            rest = tail;
            if let Err(e) = writer.write_all(part) {
                failed = true;
                warn_rate_limited!(error = %e, "net: writing a frame into guest memory failed");
            }
            used.push((head, u32::try_from(writer.bytes_written()).unwrap_or(0)));
        }
        match failed {
            true => METRICS.rx_dropped.inc(),
            false => {
                METRICS.rx_frames.inc();
                METRICS.rx_bytes.add((len - HEADER_LEN) as u64);
            }
        }
        used
    }
}

/// Whether `queue` has chains the device has not taken yet.
fn pending<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, QueueFault> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(QueueFault::Ring)?;
    Ok(avail.0 != queue.next_avail())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::net::tap::socket_tap;

    const MEM_SIZE: usize = 0x40_0000;
    const RXQ_AT: u64 = 0x1_0000;
    const TXQ_AT: u64 = 0x2_0000;
    const BUF: u64 = 0x10_0000;
    const WRITE: u16 = 2;
    const NEXT: u16 = 1;
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    struct Rig {
        mem: GuestMemoryMmap,
        net: Net,
        /// The other end of the "tap": what the host network sees.
        wire: UnixDatagram,
    }

    fn rig() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (tap, wire) = socket_tap().unwrap();
        Rig {
            mem,
            net: Net::new(tap, MAC, Some(1500)),
            wire,
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn test_config_has_mac_and_mtu() {
        let r = rig();
        assert_eq!(r.net.config(), [2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xdc, 0x05]);
        assert_eq!(r.net.features(), 1 << 32 | 1 << 15 | 1 << 5 | 1 << 3);
    }

    #[test]
    fn test_transmit_writes_frame_behind_zeroed_header() {
        let mut r = rig();
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        let f = frame(b"hello");
        // The guest's header claims checksum offload and GSO: never reaches the tap.
        r.mem
            .write_slice(&[1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], GuestAddress(BUF))
            .unwrap();
        r.mem.write_slice(&f, GuestAddress(BUF + 0x100)).unwrap();
        let descs = [
            SplitDescriptor::new(BUF, 12, NEXT, 1),
            SplitDescriptor::new(BUF + 0x100, u32::try_from(f.len()).unwrap(), 0, 0),
        ];
        tx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();

        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);

        assert!(activity.used && !activity.broke);
        let mut got = [0u8; 100];
        let n = r.wire.recv(&mut got).unwrap();
        assert_eq!(&got[..12], &[0; 12]);
        assert_eq!(&got[12..n], &f[..]);
        assert_eq!(tx.used().idx().load(), 1);
    }

    #[test]
    fn test_transmit_runt_chain_returned_unsent() {
        let mut r = rig();
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        let descs = [SplitDescriptor::new(BUF, 20, 0, 0)];
        tx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();

        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);

        assert!(activity.used && !activity.broke);
        assert_eq!(tx.used().idx().load(), 1);
        r.wire.set_nonblocking(true).unwrap();
        assert!(r.wire.recv(&mut [0u8; 64]).is_err(), "nothing sent");
    }

    #[test]
    fn test_receive_waits_for_buffer_then_delivers_with_own_header() {
        let mut r = rig();
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        let f = frame(b"from the host");
        let mut sent = vec![0x5a; 12]; // whatever the tap's header says
        sent.extend_from_slice(&f);
        r.wire.send(&sent).unwrap();

        let idle = r.net.process(&r.mem, &mut rxq, &mut txq);
        assert!(!idle.used, "no receive buffer yet: the frame is held");

        let descs = [SplitDescriptor::new(BUF, 1526, WRITE, 0)];
        rx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();
        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);

        assert!(activity.used);
        assert_eq!(rx.used().idx().load(), 1);
        let mut got = vec![0u8; 12 + f.len()];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[12..], &f[..]);
    }

    #[test]
    fn test_receive_buffer_too_small_frame_dropped_buffer_kept() {
        let mut r = rig();
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        let mut big = vec![0u8; 12];
        big.extend_from_slice(&frame(&[7; 200]));
        r.wire.send(&big).unwrap();
        let mut small = vec![0u8; 12];
        small.extend_from_slice(&frame(b"fits"));
        r.wire.send(&small).unwrap();
        let descs = [SplitDescriptor::new(BUF, 64, WRITE, 0)];
        rx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();

        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);

        assert!(activity.used && !activity.broke);
        assert_eq!(
            rx.used().idx().load(),
            1,
            "the one buffer took the small frame"
        );
        let mut got = [0u8; 22];
        r.mem.read_slice(&mut got, GuestAddress(BUF + 12)).unwrap();
        assert_eq!(&got[14..18], b"fits");
    }

    #[test]
    fn test_receive_mergeable_frame_spans_buffers_with_their_count() {
        let mut r = rig();
        r.net.ack_features(r.net.features());
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut sent = vec![0u8; 12];
        sent.extend_from_slice(&frame(&payload));
        r.wire.send(&sent).unwrap();
        // Two 1024-byte buffers are not enough: the frame waits for a third.
        let descs: Vec<RawDescriptor> = (0..2)
            .map(|i| SplitDescriptor::new(BUF + i * 0x1000, 1024, WRITE, 0).into())
            .collect();
        rx.add_desc_chains(&descs, 0).unwrap();
        assert!(!r.net.process(&r.mem, &mut rxq, &mut txq).used);

        let descs: Vec<RawDescriptor> = (2..4)
            .map(|i| SplitDescriptor::new(BUF + i * 0x1000, 1024, WRITE, 0).into())
            .collect();
        rx.add_desc_chains(&descs, 2).unwrap();
        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);

        assert!(activity.used && !activity.broke);
        let total = sent.len(); // 3026: three buffers, the last partly
        assert_eq!(rx.used().idx().load(), 3);
        let lens: Vec<u32> = (0..3)
            .map(|i| rx.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [1024, 1024, u32::try_from(total - 2048).unwrap()]);
        let mut got = vec![0u8; total];
        for i in 0..3u64 {
            let at = usize::try_from(i).unwrap() * 1024;
            let end = (at + 1024).min(total);
            r.mem
                .read_slice(&mut got[at..end], GuestAddress(BUF + i * 0x1000))
                .unwrap();
        }
        assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &sent[12..]);
    }

    #[test]
    fn test_corrupted_ring_breaks_until_reset() {
        let mut r = rig();
        let rx = MockSplitQueue::create(&r.mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&r.mem, GuestAddress(TXQ_AT), 16);
        let (mut rxq, mut txq): (Queue, Queue) =
            (rx.create_queue().unwrap(), tx.create_queue().unwrap());
        tx.avail().idx().store(17);

        let activity = r.net.process(&r.mem, &mut rxq, &mut txq);
        assert!(activity.broke);
        tx.avail().idx().store(0);
        assert_eq!(
            r.net.process(&r.mem, &mut rxq, &mut txq),
            Activity::default()
        );

        r.net.reset();
        assert!(!r.net.process(&r.mem, &mut rxq, &mut txq).broke);
    }
}
