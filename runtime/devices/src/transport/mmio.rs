//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout), in process: the
//! built-in VMM maps one [`MmioTransport`] per device on its MMIO bus and lists it on the guest
//! kernel command line (`virtio_mmio.device=4K@<base>:<irq>`).
//!
//! Every register value comes from a hostile guest: a bad one is ignored or marks the device
//! as needing a reset (`DEVICE_NEEDS_RESET`), never panics the VMM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limited::warn_rate_limited;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x6b73_7568; // "husk"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

/// Interrupt status bit: a queue has used buffers.
const INT_VRING: u32 = 1;

/// The device side a transport drives.
pub trait VirtioMmioDevice: Send {
    /// Virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Reads the device configuration space (`data` left as is past its end).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving: the driver set DRIVER_OK with these valid queues. `kicks[i]` becomes
    /// readable when the driver notifies queue `i`.
    ///
    /// # Errors
    /// A one-line reason; the transport then reports DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<(), String>;
    /// The driver reset the device: stop serving, drop the queues.
    fn reset(&mut self);
}

/// How a device tells the driver that queues have used buffers.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
}

impl Interrupt {
    /// Sets the used-buffer bit and raises the interrupt line.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            warn_rate_limited!(error = %e, "virtio-mmio: raising the interrupt failed");
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One virtio-mmio device window.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Arc<EventFd>,
    kicks: Vec<EventFd>,
    interrupt_status: Arc<AtomicU32>,
    status: u32,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    config_generation: u32,
    active: bool,
}

impl<D> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("active", &self.active)
            .finish()
    }
}

impl<D: VirtioMmioDevice> MmioTransport<D> {
    /// A transport for `device` over `mem`, raising `irq` (an irqfd) for interrupts.
    ///
    /// # Errors
    /// When the kick event fds cannot be created.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> std::io::Result<Self> {
        let n = device.queue_max_sizes().len();
        let kicks = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device,
            mem,
            irq: Arc::new(irq),
            kicks,
            interrupt_status: Arc::default(),
            status: 0,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); n],
            config_generation: 0,
            active: false,
        })
    }

    /// The queue-notify event fds, for the VMM to register as ioeventfds (so that a notify
    /// needs no exit to user space); notifies through [`MmioTransport::write`] reach them too.
    pub fn kick_events(&self) -> &[EventFd] {
        &self.kicks
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn selected_max(&self) -> u16 {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.device.queue_max_sizes().get(i).copied())
            .unwrap_or(0)
    }

    /// A 32-bit register read (config space: any width).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let value = match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let features = self.device.features();
                match self.features_sel {
                    0 => low(features),
                    1 => high(features),
                    _ => 0,
                }
            }
            0x034 => u32::from(self.selected_max()),
            0x044 => self.selected().map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt_status.load(Ordering::SeqCst),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        match data.len() {
            4 => data.copy_from_slice(&value.to_le_bytes()),
            _ => data.fill(0),
        }
    }

    /// A 32-bit register write (other widths are ignored, as the spec allows).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let set_half = |old: u64, high: bool| match high {
            true => (old & 0xffff_ffff) | (u64::from(value) << 32),
            false => (old & !0xffff_ffff) | u64::from(value),
        };
        match offset {
            0x014 => self.features_sel = value,
            0x020 => match self.driver_features_sel {
                0 | 1 => {
                    self.driver_features =
                        set_half(self.driver_features, self.driver_features_sel == 1)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 => {
                let max = self.selected_max();
                let size = u16::try_from(value)
                    .ok()
                    .filter(|s| s.is_power_of_two() && *s <= max);
                match (size, self.selected()) {
                    (Some(size), Some(q)) => q.size = size,
                    _ => self.needs_reset("invalid queue size"),
                }
            }
            0x044 => {
                if let Some(q) = self.selected() {
                    q.ready = value == 1;
                }
            }
            0x050 => match usize::try_from(value).ok().and_then(|i| self.kicks.get(i)) {
                Some(kick) => {
                    let _ = kick.write(1);
                }
                None => warn_rate_limited!(
                    queue = value,
                    "virtio-mmio: notify of a queue that does not exist"
                ),
            },
            0x064 => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            0x070 => self.set_status(value),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let high = offset & 4 == 4;
                if let Some(q) = self.selected() {
                    match offset & !4 {
                        0x080 => q.desc = set_half(q.desc, high),
                        0x090 => q.driver = set_half(q.driver, high),
                        _ => q.device = set_half(q.device, high),
                    }
                }
            }
            _ => warn_rate_limited!(
                offset,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn needs_reset(&mut self, why: &str) {
        warn_rate_limited!(why, "virtio-mmio: device needs reset");
        self.status |= STATUS_NEEDS_RESET;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        self.status = value;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
            // The driver accepted features we never offered: refuse FEATURES_OK.
            self.status &= !STATUS_FEATURES_OK;
        }
        let wanted = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if newly & STATUS_DRIVER_OK != 0
            && self.status & wanted == wanted
            && self.status & STATUS_FAILED == 0
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (regs, &max) in self.queues.iter().zip(self.device.queue_max_sizes()) {
            let Ok(mut q) = Queue::new(max) else {
                return self.needs_reset("queue creation");
            };
            q.set_size(regs.size);
            q.set_desc_table_address(Some(low(regs.desc)), Some(high(regs.desc)));
            q.set_avail_ring_address(Some(low(regs.driver)), Some(high(regs.driver)));
            q.set_used_ring_address(Some(low(regs.device)), Some(high(regs.device)));
            q.set_ready(regs.ready);
            queues.push(q);
        }
        if queues.iter().any(|q| q.ready() && !q.is_valid(&self.mem)) {
            return self.needs_reset("queue outside guest memory or misaligned");
        }
        let kicks = match self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(kicks) => kicks,
            Err(_) => return self.needs_reset("kick fds"),
        };
        let interrupt = Interrupt {
            status: self.interrupt_status.clone(),
            irq: self.irq.clone(),
        };
        match self
            .device
            .activate(self.mem.clone(), queues, kicks, interrupt)
        {
            Ok(()) => self.active = true,
            Err(e) => self.needs_reset(&e),
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueRegs::default());
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

fn low(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(0)
}

fn high(value: u64) -> u32 {
    u32::try_from(value >> 32).unwrap_or(0)
}

impl VirtioMmioDevice for Box<dyn VirtioMmioDevice> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        (**self).activate(mem, queues, kicks, interrupt)
    }
    fn reset(&mut self) {
        (**self).reset();
    }
}
