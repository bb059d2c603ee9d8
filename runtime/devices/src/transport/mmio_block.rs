//! The block device in process, behind the virtio-mmio transport: the transport-independent
//! `Block` of [`crate::block`], driven by a worker thread that waits on the queue kick. The
//! file I/O runs on that thread, so a slow disk never stalls a vCPU or the VMM loop.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{read_config_bytes, Interrupt, QueuePosition, VirtioMmioDevice};
use super::worker::WorkerSlot;
use crate::block::defs::{F_RO, QUEUE_SIZE};
use crate::block::device::{Block, CONFIG_LEN};
use crate::block::metrics::METRICS;
use crate::block::BlockError;
use crate::rate_limited::warn_rate_limited;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const EV_KICK: u64 = 0;
const EV_STOP: u64 = 1;

/// A virtio-blk device on a raw file (or block device), for the built-in VMM.
pub struct BlockMmio {
    path: PathBuf,
    config: [u8; CONFIG_LEN],
    features: u64,
    worker: WorkerSlot<Block>,
    /// Where the queue was when the worker last stopped (for [`VirtioMmioDevice::pause`]).
    position: Arc<Mutex<Option<QueuePosition>>>,
}

impl std::fmt::Debug for BlockMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMmio")
            .field("path", &self.path)
            .field("features", &self.features)
            .field("active", &self.worker.is_running())
            .finish()
    }
}

impl BlockMmio {
    /// A disk backed by `path`, opened read-write, or read-only (offering `VIRTIO_BLK_F_RO` and
    /// refusing writes) when `read_only`. Its capacity is the file's size at this call in whole
    /// 512-byte sectors; a trailing partial sector is not visible to the guest. `serial` (at
    /// most 20 bytes) is its id (`GET_ID`), by which the guest finds it.
    ///
    /// # Errors
    /// The serial is too long, the file cannot be opened or sized, or is neither a regular
    /// file nor a block device.
    pub fn new(path: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let block = Block::open(path, read_only, serial)?;
        Ok(Self {
            path: path.to_owned(),
            config: block.config(),
            features: block.features(),
            worker: WorkerSlot::new("block", block),
            position: Arc::default(),
        })
    }

    /// Capacity in 512-byte sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        let mut capacity = [0u8; 8];
        self.read_config(0, &mut capacity);
        u64::from_le_bytes(capacity)
    }

    /// Whether the disk is read-only (`VIRTIO_BLK_F_RO` offered, writes refused).
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    fn stop_worker(&mut self) {
        if let Some(block) = self.worker.stop() {
            block.reset();
        }
    }
}

impl Drop for BlockMmio {
    fn drop(&mut self) {
        self.stop_worker();
        METRICS.log_summary();
    }
}

impl VirtioMmioDevice for BlockMmio {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        let (Some(queue), Some(kick)) = (queues.into_iter().next(), kicks.into_iter().next())
        else {
            return Err("block device activated without its queue".into());
        };
        let position = self.position.clone();
        self.worker.start(move |block, stop| {
            let mut worker = Worker {
                block,
                mem,
                queue,
                kick,
                interrupt,
                stop,
            };
            worker.run();
            let at = QueuePosition::of(&worker.queue);
            *position.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
            worker.block
        })
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    /// Every request taken was answered before the worker looks at its stop event, so the
    /// queue's position is all there is to save (the disk's file is the restored VM's own).
    fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
        if self.worker.stop().is_none() {
            return Err("block device is not active".into());
        }
        let at = self
            .position
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        at.map(|at| vec![at])
            .ok_or_else(|| "block worker left no queue position".into())
    }
}

/// What the worker thread owns while the device is active.
struct Worker {
    block: Block,
    mem: GuestMemoryMmap,
    queue: Queue,
    kick: EventFd,
    interrupt: Interrupt,
    stop: EventFd,
}

impl Worker {
    /// Serves the queue until `stop`.
    fn run(&mut self) {
        let Ok(epoll) = Epoll::new() else {
            warn_rate_limited!("block: epoll_create failed; device stays silent");
            return;
        };
        for (fd, data) in [
            (self.kick.as_raw_fd(), EV_KICK),
            (self.stop.as_raw_fd(), EV_STOP),
        ] {
            let event = EpollEvent::new(EventSet::IN, data);
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, event) {
                warn_rate_limited!(error = %e, "block: epoll_ctl failed; device stays silent");
                return;
            }
        }
        // Requests queued before the first kick we see.
        self.serve();
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in events.iter().take(n) {
                match event.data() {
                    EV_STOP => return,
                    _ => {
                        let _ = self.kick.read();
                    }
                }
            }
            self.serve();
        }
    }

    fn serve(&mut self) {
        if !self.queue.ready() {
            return;
        }
        let served = self.block.process_queue(&self.mem, &mut self.queue);
        if served.used {
            self.interrupt.signal_used();
        }
        if served.broke {
            self.interrupt.signal_needs_reset();
        }
        if served.more {
            // Come back after looking at the stop event.
            let _ = self.kick.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use tempfile::NamedTempFile;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::defs::{S_OK, T_IN};
    use crate::transport::mmio::MmioTransport;

    const MEM_SIZE: usize = 0x40_0000;
    const QUEUE_ADDR: u64 = 0x1_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn disk() -> NamedTempFile {
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(&[0x5a; 4 * 512]).unwrap();
        file.flush().unwrap();
        file
    }

    fn write_reg(transport: &mut MmioTransport<BlockMmio>, offset: u64, value: u32) {
        transport.write(offset, &value.to_le_bytes());
    }

    fn read_reg(transport: &mut MmioTransport<BlockMmio>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Plays the driver's initialization (virtio 1.2 §3.1.1) up to DRIVER_OK.
    /// A writable device on `file`, its transport brought up with the queue `vq` in `mem`,
    /// and its interrupt's event fd.
    fn active<'a>(
        mem: &'a GuestMemoryMmap,
        file: &NamedTempFile,
    ) -> (
        MockSplitQueue<'a, GuestMemoryMmap>,
        EventFd,
        MmioTransport<BlockMmio>,
    ) {
        let vq = MockSplitQueue::create(mem, GuestAddress(QUEUE_ADDR), QUEUE_SIZE);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = BlockMmio::new(file.path(), false, "husk-blk").unwrap();
        let mut transport = MmioTransport::new(dev, mem.clone(), irq.try_clone().unwrap()).unwrap();
        bring_up(&mut transport, &vq);
        (vq, irq, transport)
    }

    /// Puts one request on `vq`: read sector 1 into `DATA`, its status (0xff until served) at
    /// `STATUS`.
    fn queue_read_of_sector_1(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) {
        mem.write_obj(T_IN.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(1u64.to_le(), GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let descs = [
            SplitDescriptor::new(HDR, 16, 1, 1),
            SplitDescriptor::new(DATA, 512, 1 | 2, 2),
            SplitDescriptor::new(STATUS, 1, 2, 0),
        ];
        vq.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();
    }

    fn bring_up(transport: &mut MmioTransport<BlockMmio>, vq: &MockSplitQueue<GuestMemoryMmap>) {
        write_reg(transport, 0x070, 1 | 2);
        write_reg(transport, 0x024, 1);
        write_reg(transport, 0x020, 1); // VIRTIO_F_VERSION_1 (bit 32)
        write_reg(transport, 0x070, 1 | 2 | 8);
        write_reg(transport, 0x030, 0);
        write_reg(transport, 0x038, u32::from(QUEUE_SIZE));
        for (offset, addr) in [
            (0x080, vq.desc_table_addr().0),
            (0x090, vq.avail_addr().0),
            (0x0a0, vq.used_addr().0),
        ] {
            write_reg(transport, offset, u32::try_from(addr).unwrap());
            write_reg(transport, offset + 4, 0);
        }
        write_reg(transport, 0x044, 1);
        write_reg(transport, 0x070, 1 | 2 | 8 | 4);
    }

    #[test]
    fn test_block_mmio_read_config_past_fields_reads_zero() {
        let file = disk();
        let dev = BlockMmio::new(file.path(), true, "husk-blk").unwrap();
        let mut data = [0xffu8; 8];

        dev.read_config(12, &mut data);

        assert_eq!(data, [254, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(dev.capacity_sectors(), 4);
        assert!(dev.read_only());
    }

    #[test]
    fn test_block_mmio_kick_served_by_worker_raises_irq_then_reset_joins() {
        let file = disk();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (vq, irq, mut transport) = active(&mem, &file);
        assert_eq!(
            read_reg(&mut transport, 0x070),
            15,
            "activated without NEEDS_RESET"
        );
        queue_read_of_sector_1(&mem, &vq);

        write_reg(&mut transport, 0x050, 0);

        let deadline = Instant::now() + Duration::from_secs(5);
        while irq.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(read_reg(&mut transport, 0x060) & 1, 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0x5a; 512]);
        write_reg(&mut transport, 0x070, 0);
        assert!(!transport.device().worker.is_running());
    }

    #[test]
    fn test_block_mmio_saved_after_a_request_at_its_queue_position_then_restored() {
        let file = disk();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (vq, irq, mut transport) = active(&mem, &file);
        queue_read_of_sector_1(&mem, &vq);
        write_reg(&mut transport, 0x050, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while vq.used().idx().load() != 1 {
            assert!(Instant::now() < deadline, "request not served");
            std::thread::sleep(Duration::from_millis(1));
        }

        let state = transport.save().unwrap();

        let at = QueuePosition {
            next_avail: 1,
            next_used: 1,
        };
        assert_eq!(state.positions, Some(vec![at]));
        assert!(!transport.device().worker.is_running(), "paused");
        // Restored onto another disk (a read-only one: its features are a superset).
        let other = disk();
        let dev = BlockMmio::new(other.path(), true, "husk-blk").unwrap();
        let restored = MmioTransport::restore(dev, mem, irq, &state).unwrap();
        assert!(restored.device().worker.is_running());
    }

    #[test]
    fn test_block_mmio_corrupted_avail_idx_needs_reset_then_reset_joins() {
        let file = disk();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (vq, irq, mut transport) = active(&mem, &file);
        vq.avail().idx().store(QUEUE_SIZE + 1);

        write_reg(&mut transport, 0x050, 0);

        let deadline = Instant::now() + Duration::from_secs(5);
        while read_reg(&mut transport, 0x070) & 64 == 0 {
            assert!(Instant::now() < deadline, "no DEVICE_NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(read_reg(&mut transport, 0x060) & 2, 2, "config interrupt");
        assert!(irq.read().is_ok());
        let reset = Instant::now();
        write_reg(&mut transport, 0x070, 0);
        assert!(
            reset.elapsed() < Duration::from_secs(1),
            "{:?}",
            reset.elapsed()
        );
        assert_eq!(read_reg(&mut transport, 0x070), 0);
        assert!(!transport.device().worker.is_running());
    }
}
