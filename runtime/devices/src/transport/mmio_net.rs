//! The network device in process, behind the virtio-mmio transport: `Net` of [`crate::net`],
//! driven by a worker thread that waits on both queue kicks and the tap, so a busy network
//! never stalls a vCPU.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{read_config_bytes, Interrupt, VirtioMmioDevice};
use super::worker::WorkerSlot;
use crate::net::defs::{CONFIG_LEN, DEVICE_ID, MIN_MTU, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::net::device::Net;
use crate::net::metrics::METRICS;
use crate::net::{parse_mac, tap, NetError};
use crate::rate_limited::warn_rate_limited;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
// The worker splits `queues` as `[rx, tx]`.
const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1);
const EV_RX: u64 = 0;
const EV_TX: u64 = 1;
const EV_TAP: u64 = 2;
const EV_STOP: u64 = 3;

/// A virtio-net device on a tap, for the built-in VMM.
pub struct NetMmio {
    config: [u8; CONFIG_LEN],
    features: u64,
    worker: WorkerSlot<Net>,
}

impl std::fmt::Debug for NetMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetMmio")
            .field("config", &self.config)
            .field("active", &self.worker.is_running())
            .finish()
    }
}

impl NetMmio {
    /// A device on the tap at descriptor `tap_fd` (handed over by the jail; this device owns
    /// it from here, and closes it when refused) with hardware address `mac`, and `mtu`
    /// offered to the driver when known.
    ///
    /// # Errors
    /// [`NetError`]: a bad address or MTU, or a descriptor that is not a tap with a virtio
    /// header.
    pub fn new(tap_fd: RawFd, mac: &str, mtu: Option<u16>) -> Result<Self, NetError> {
        let tap = tap::adopt(tap_fd)?;
        Self::on(tap, mac, mtu)
    }

    /// A device on `tap`, already set up (non-blocking, 12-byte header).
    pub(crate) fn on(tap: File, mac: &str, mtu: Option<u16>) -> Result<Self, NetError> {
        let mac = parse_mac(mac)?;
        if let Some(mtu) = mtu.filter(|&mtu| mtu < MIN_MTU) {
            return Err(NetError::Mtu(mtu));
        }
        let net = Net::new(tap, mac, mtu);
        Ok(Self {
            config: net.config(),
            features: net.features(),
            worker: WorkerSlot::new("net", net),
        })
    }

    fn stop_worker(&mut self) {
        if let Some(net) = self.worker.stop() {
            net.reset();
        }
    }
}

impl Drop for NetMmio {
    fn drop(&mut self) {
        self.stop_worker();
        METRICS.log_summary();
    }
}

impl VirtioMmioDevice for NetMmio {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn ack_features(&mut self, acked: u64) {
        if let Some(net) = self.worker.idle_mut() {
            net.ack_features(acked);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        let (Ok([rx, tx]), Ok([rx_kick, tx_kick])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(kicks),
        ) else {
            return Err("net device activated without its two queues".into());
        };
        self.worker.start(move |net, stop| {
            Worker {
                net,
                mem,
                rx,
                tx,
                rx_kick,
                tx_kick,
                interrupt,
                stop,
            }
            .run()
        })
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

/// What the worker thread owns while the device is active.
struct Worker {
    net: Net,
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    interrupt: Interrupt,
    stop: EventFd,
}

impl Worker {
    /// Serves the queues and the tap until `stop`; gives the device back.
    fn run(mut self) -> Net {
        let Ok(epoll) = Epoll::new() else {
            warn_rate_limited!("net: epoll_create failed; device stays silent");
            return self.net;
        };
        for (fd, data, events) in [
            (self.rx_kick.as_raw_fd(), EV_RX, EventSet::IN),
            (self.tx_kick.as_raw_fd(), EV_TX, EventSet::IN),
            // Edge-triggered: the device reads the tap until it is empty or the guest has no
            // buffer, and then waits for the guest's receive kick rather than the tap.
            (
                self.net.tap().as_raw_fd(),
                EV_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.stop.as_raw_fd(), EV_STOP, EventSet::IN),
        ] {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, data)) {
                warn_rate_limited!(error = %e, "net: epoll_ctl failed; device stays silent");
                return self.net;
            }
        }
        // Buffers and frames that came before the first event we see.
        self.serve();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return self.net,
            };
            for event in events.iter().take(n) {
                match event.data() {
                    EV_STOP => return self.net,
                    EV_RX => {
                        let _ = self.rx_kick.read();
                    }
                    EV_TX => {
                        let _ = self.tx_kick.read();
                    }
                    _ => {}
                }
            }
            self.serve();
        }
    }

    fn serve(&mut self) {
        if !self.rx.ready() || !self.tx.ready() {
            return;
        }
        let activity = self.net.process(&self.mem, &mut self.rx, &mut self.tx);
        if activity.used {
            self.interrupt.signal_used();
        }
        if activity.broke {
            self.interrupt.signal_needs_reset();
        }
        // Come back after looking at the stop event.
        if activity.more_tx {
            let _ = self.tx_kick.write(1);
        }
        if activity.more_rx {
            let _ = self.rx_kick.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::net::tap::socket_tap;
    use crate::transport::mmio::MmioTransport;

    const MEM_SIZE: usize = 0x40_0000;
    const RXQ_AT: u64 = 0x1_0000;
    const TXQ_AT: u64 = 0x2_0000;
    const BUF: u64 = 0x10_0000;

    fn write_reg(t: &mut MmioTransport<NetMmio>, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn read_reg(t: &mut MmioTransport<NetMmio>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// The driver's initialization (virtio 1.2 §3.1.1) of both queues, up to DRIVER_OK.
    fn bring_up(t: &mut MmioTransport<NetMmio>, queues: [&MockSplitQueue<GuestMemoryMmap>; 2]) {
        write_reg(t, 0x070, 1 | 2);
        write_reg(t, 0x024, 1);
        write_reg(t, 0x020, 1); // VIRTIO_F_VERSION_1 (bit 32)
        write_reg(t, 0x024, 0);
        write_reg(t, 0x020, 1 << 5); // MAC
        write_reg(t, 0x070, 1 | 2 | 8);
        for (i, vq) in (0u32..).zip(queues) {
            write_reg(t, 0x030, i);
            write_reg(t, 0x038, 16);
            for (offset, addr) in [
                (0x080, vq.desc_table_addr().0),
                (0x090, vq.avail_addr().0),
                (0x0a0, vq.used_addr().0),
            ] {
                write_reg(t, offset, u32::try_from(addr).unwrap());
                write_reg(t, offset + 4, 0);
            }
            write_reg(t, 0x044, 1);
        }
        write_reg(t, 0x070, 1 | 2 | 8 | 4);
    }

    #[test]
    fn test_net_mmio_refuses_bad_mac_and_mtu() {
        let (tap, _wire) = socket_tap().unwrap();
        let err =
            NetMmio::on(tap.try_clone().unwrap(), "01:00:5e:00:00:01", Some(1500)).unwrap_err();
        assert!(err.to_string().contains("bad MAC"), "{err}");
        let err = NetMmio::on(tap, "02:00:00:00:00:01", Some(67)).unwrap_err();
        assert!(err.to_string().contains("MTU 67"), "{err}");
    }

    #[test]
    fn test_net_mmio_frame_each_way_through_worker_then_reset_joins() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ_AT), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ_AT), 16);
        let (tap, wire) = socket_tap().unwrap();
        let dev = NetMmio::on(tap, "02:00:00:00:00:07", None).unwrap();
        let mut config = [0u8; 6];
        dev.read_config(0, &mut config);
        assert_eq!(config, [2, 0, 0, 0, 0, 7]);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(dev, mem.clone(), irq.try_clone().unwrap()).unwrap();
        bring_up(&mut t, [&rx, &tx]);
        assert_eq!(read_reg(&mut t, 0x070), 15, "activated without NEEDS_RESET");

        // Guest to host: one chain of header and frame.
        let frame = [0xabu8; 60];
        mem.write_slice(&frame, GuestAddress(BUF + 12)).unwrap();
        let descs = [SplitDescriptor::new(BUF, 72, 0, 0)];
        tx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();
        write_reg(&mut t, 0x050, 1);
        let mut got = [0u8; 128];
        wire.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = wire.recv(&mut got).unwrap();
        assert_eq!(&got[12..n], &frame[..]);

        // Host to guest: a frame waits on the "tap" until the guest posts a buffer.
        let mut sent = vec![0u8; 12];
        sent.extend_from_slice(&[0xcd; 60]);
        wire.send(&sent).unwrap();
        let descs = [SplitDescriptor::new(BUF + 0x1000, 1526, 2, 0)];
        rx.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();
        write_reg(&mut t, 0x050, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.used().idx().load() == 0 {
            assert!(Instant::now() < deadline, "frame never delivered");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut delivered = [0u8; 72];
        mem.read_slice(&mut delivered, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(&delivered[12..], &[0xcd; 60]);

        write_reg(&mut t, 0x070, 0);
        assert!(!t.device().worker.is_running());
    }
}
