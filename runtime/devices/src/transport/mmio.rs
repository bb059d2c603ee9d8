//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout), in process: the
//! built-in VMM maps one [`MmioTransport`] per device on its MMIO bus and lists it on the guest
//! kernel command line (`virtio_mmio.device=4K@<base>:<irq>`).
//!
//! Every register value comes from a hostile guest: a bad one is ignored or marks the device
//! as needing a reset (`DEVICE_NEEDS_RESET`), never panics the VMM.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
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

/// The only interface version the devices speak (virtio 1.2 §6.1).
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a queue has used buffers.
const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration (here: the device status) changed.
const INT_CONFIG: u32 = 2;

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
    /// The features the driver accepted (offered ones only, `VIRTIO_F_VERSION_1` among them),
    /// told right before [`VirtioMmioDevice::activate`].
    fn ack_features(&mut self, _acked: u64) {}
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
    /// Stops serving because the VM is paused to be saved, and returns where each queue is.
    /// The device serves no more (the paused VM is not resumed).
    ///
    /// # Errors
    /// The device cannot be saved (the default), or its worker is gone.
    fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
        Err(format!("device {} cannot be saved", self.device_type()))
    }
    /// Called once before a restored device is activated: a device whose peers did not
    /// survive the restore tells the driver here (vsock: a transport reset event).
    fn restoring(&mut self) {}
}

/// Where a queue was when its device paused: the next available entry the device would
/// take and the next used entry it would fill (virtio 1.2 §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// Next index of the available ring to read.
    pub next_avail: u16,
    /// Next index of the used ring to write.
    pub next_used: u16,
}

impl QueuePosition {
    /// The position of `queue`.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// A transport's registers and, when its device was active, its queues' positions: what a
/// snapshot keeps of a virtio-mmio device ([`MmioTransport::save`], [`MmioTransport::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device status the driver set (`DEVICE_NEEDS_RESET` is `needs_reset`).
    pub status: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// Which half of the offered features reads.
    pub features_sel: u32,
    /// Which half of the accepted features writes.
    pub driver_features_sel: u32,
    /// The selected queue.
    pub queue_sel: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegsState>,
    /// Each queue's position, when the device was active.
    pub positions: Option<Vec<QueuePosition>>,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
    /// The configuration generation.
    pub config_generation: u32,
}

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegsState {
    /// Queue size.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub driver: u64,
    /// Used (device) ring address.
    pub device: u64,
}

/// How a device tells the driver that queues have used buffers, or that it needs a reset.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
    needs_reset: Arc<AtomicBool>,
}

impl Interrupt {
    /// Sets the used-buffer bit and raises the interrupt line.
    pub fn signal_used(&self) {
        self.raise(INT_VRING);
    }

    /// The device hit an error only a reset clears (a queue the guest corrupted): sets
    /// `DEVICE_NEEDS_RESET` in the device status and sends a configuration change
    /// notification, as virtio 1.2 §2.1.2 requires.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
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
    kicks: Vec<EventFd>,
    /// Shared with the active device: interrupt status, line and `DEVICE_NEEDS_RESET`.
    interrupt: Interrupt,
    /// What the driver set; `DEVICE_NEEDS_RESET` lives in `interrupt`.
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
            kicks,
            interrupt: Interrupt {
                status: Arc::default(),
                irq: Arc::new(irq),
                needs_reset: Arc::default(),
            },
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
            0x060 => self.interrupt.status.load(Ordering::SeqCst),
            0x070 => self.status | self.needs_reset_bit(),
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
            // Features are fixed once FEATURES_OK is set.
            0x020 if self.status & STATUS_FEATURES_OK != 0 => {}
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
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
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

    /// The transport's state for a snapshot; an active device is paused first
    /// ([`VirtioMmioDevice::pause`]) and serves no more.
    ///
    /// # Errors
    /// The device cannot be saved.
    pub fn save(&mut self) -> Result<MmioTransportState, String> {
        let positions = match self.active {
            true => Some(self.device.pause()?),
            false => None,
        };
        Ok(MmioTransportState {
            status: self.status,
            driver_features: self.driver_features,
            features_sel: self.features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegsState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            positions,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            needs_reset: self.interrupt.needs_reset.load(Ordering::SeqCst),
            config_generation: self.config_generation,
        })
    }

    /// A transport for `device` as `state` left one: its registers, and, if its device was
    /// active, the device activated with its queues where they were (after
    /// [`VirtioMmioDevice::restoring`]). The state is checked as the registers are when the
    /// guest writes them: a state this device could not have reached is refused.
    ///
    /// # Errors
    /// The kick fds cannot be made, or the state does not fit the device (number or sizes of
    /// queues, unoffered features) or its activation fails.
    pub fn restore(
        device: D,
        mem: GuestMemoryMmap,
        irq: EventFd,
        state: &MmioTransportState,
    ) -> Result<Self, String> {
        let mut t = Self::new(device, mem, irq).map_err(|e| e.to_string())?;
        let maxes = t.device.queue_max_sizes();
        let sizes_fit = state.queues.len() == maxes.len()
            && state
                .queues
                .iter()
                .zip(maxes)
                .all(|(q, &max)| q.size <= max && (q.size == 0 || q.size.is_power_of_two()));
        if !sizes_fit || state.driver_features & !t.device.features() != 0 {
            return Err(format!(
                "saved queues or features do not fit device {}",
                t.device.device_type()
            ));
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.features_sel = state.features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        for (regs, saved) in t.queues.iter_mut().zip(&state.queues) {
            (regs.size, regs.ready) = (saved.size, saved.ready);
            (regs.desc, regs.driver, regs.device) = (saved.desc, saved.driver, saved.device);
        }
        t.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        t.interrupt
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        t.config_generation = state.config_generation;
        if let Some(positions) = &state.positions {
            if positions.len() != t.queues.len() {
                return Err(format!(
                    "{} saved queue positions for {} queues",
                    positions.len(),
                    t.queues.len()
                ));
            }
            t.device.restoring();
            t.activate_at(Some(positions));
            if !t.active {
                return Err(format!(
                    "device {} did not activate from its saved queues",
                    t.device.device_type()
                ));
            }
        }
        Ok(t)
    }

    /// Raises the interrupt line again if the interrupt status has a bit set: a restored VM's
    /// interrupt controllers lost any edge raised before its vCPUs existed (the saved status,
    /// a restored device's first signal).
    pub fn resignal(&self) {
        if self.interrupt.status.load(Ordering::SeqCst) != 0 {
            if let Err(e) = self.interrupt.irq.write(1) {
                warn_rate_limited!(error = %e, "virtio-mmio: raising the interrupt failed");
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        warn_rate_limited!(why, "virtio-mmio: device needs reset");
        self.interrupt.signal_needs_reset();
    }

    fn needs_reset_bit(&self) -> u32 {
        match self.interrupt.needs_reset.load(Ordering::SeqCst) {
            true => STATUS_NEEDS_RESET,
            false => 0,
        }
    }

    /// The driver's side of the status state machine (virtio 1.2 §2.1, §3.1.1): 0 resets;
    /// otherwise bits are only added, each after its predecessor (ACKNOWLEDGE, DRIVER,
    /// FEATURES_OK, DRIVER_OK; FAILED at any time). Any other write is ignored, so DRIVER_OK
    /// activates the device once per reset and never again while it is active.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let value = value & !STATUS_NEEDS_RESET;
        if value & self.status != self.status || !in_order(value) {
            warn_rate_limited!(
                status = self.status,
                value,
                "virtio-mmio: status write out of order ignored"
            );
            return;
        }
        let newly = value & !self.status;
        self.status = value;
        let legacy = self.driver_features & VIRTIO_F_VERSION_1 == 0;
        if newly & STATUS_FEATURES_OK != 0
            && (self.driver_features & !self.device.features() != 0 || legacy)
        {
            // The driver accepted features we never offered, or wants the legacy interface
            // (the devices speak virtio 1 only): refuse FEATURES_OK.
            self.status &= !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        }
        let wanted = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if newly & STATUS_DRIVER_OK != 0
            && !self.active
            && self.status & wanted == wanted
            && self.status & STATUS_FAILED == 0
            && self.needs_reset_bit() == 0
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.activate_at(None);
    }

    /// Activates the device with its queues at `positions` (a restore) or at their start.
    fn activate_at(&mut self, positions: Option<&[QueuePosition]>) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (regs, &max)) in self
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            let Ok(mut q) = Queue::new(max) else {
                return self.needs_reset("queue creation");
            };
            if let Some(at) = positions.and_then(|p| p.get(i)) {
                q.set_next_avail(at.next_avail);
                q.set_next_used(at.next_used);
            }
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
        self.device.ack_features(self.driver_features);
        match self
            .device
            .activate(self.mem.clone(), queues, kicks, self.interrupt.clone())
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
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueRegs::default());
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// A read of `data.len()` bytes at `offset` of a device configuration space whose filled
/// fields are `config`; bytes past them read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Whether every status bit set in `value` has its predecessor set too.
fn in_order(value: u32) -> bool {
    [
        (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
        (STATUS_FEATURES_OK, STATUS_DRIVER),
        (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
    ]
    .iter()
    .all(|&(bit, needs)| value & bit == 0 || value & needs != 0)
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
    fn ack_features(&mut self, acked: u64) {
        (**self).ack_features(acked);
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
    fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
        (**self).pause()
    }
    fn restoring(&mut self) {
        (**self).restoring();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;

    const ALL: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    /// Counts activations and resets; keeps the interrupt it was given and where its queues
    /// started; pauses at `paused_at`.
    #[derive(Default)]
    struct Probe {
        activations: usize,
        resets: usize,
        restorings: usize,
        interrupt: Arc<Mutex<Option<Interrupt>>>,
        started_at: Vec<(u16, u16)>,
        paused_at: Vec<QueuePosition>,
    }

    impl VirtioMmioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _kicks: Vec<EventFd>,
            interrupt: Interrupt,
        ) -> Result<(), String> {
            self.activations += 1;
            self.started_at = queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect();
            *self.interrupt.lock().unwrap() = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn pause(&mut self) -> Result<Vec<QueuePosition>, String> {
            Ok(self.paused_at.clone())
        }
        fn restoring(&mut self) {
            self.restorings += 1;
        }
    }

    fn transport() -> (MmioTransport<Probe>, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(Probe::default(), mem, irq.try_clone().unwrap());
        (transport.unwrap(), irq)
    }

    fn write(t: &mut MmioTransport<Probe>, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn read(t: &mut MmioTransport<Probe>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, DRIVER_OK.
    fn bring_up(t: &mut MmioTransport<Probe>) {
        write(t, 0x070, STATUS_ACKNOWLEDGE);
        write(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, 0x024, 1);
        write(t, 0x020, 1);
        write(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        write(t, 0x070, ALL);
    }

    #[test]
    fn test_mmio_driver_ok_twice_activates_once() {
        let (mut t, _irq) = transport();
        bring_up(&mut t);

        write(&mut t, 0x070, ALL);
        write(&mut t, 0x070, ALL & !STATUS_DRIVER_OK); // clearing a bit: ignored
        write(&mut t, 0x070, ALL);

        assert_eq!(t.device().activations, 1);
        assert_eq!(read(&mut t, 0x070), ALL);
    }

    #[test]
    fn test_mmio_status_zero_resets_then_driver_ok_activates_again() {
        let (mut t, _irq) = transport();
        bring_up(&mut t);

        write(&mut t, 0x070, 0);
        assert_eq!(read(&mut t, 0x070), 0);
        bring_up(&mut t);

        assert_eq!((t.device().activations, t.device().resets), (2, 1));
    }

    #[test]
    fn test_mmio_driver_ok_without_features_ok_ignored() {
        let (mut t, _irq) = transport();
        write(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        write(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );

        assert_eq!(t.device().activations, 0);
        assert_eq!(read(&mut t, 0x070), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    }

    #[test]
    fn test_mmio_unoffered_feature_acked_features_ok_refused_no_activation() {
        let (mut t, _irq) = transport();
        write(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, 0x024, 0);
        write(&mut t, 0x020, 1 << 28); // VIRTIO_RING_F_INDIRECT_DESC, never offered

        write(&mut t, 0x070, ALL);

        assert_eq!(t.device().activations, 0);
        assert_eq!(read(&mut t, 0x070) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn test_mmio_legacy_driver_without_version_1_features_ok_refused() {
        let (mut t, _irq) = transport();
        write(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        write(&mut t, 0x070, ALL);

        assert_eq!(t.device().activations, 0);
        assert_eq!(read(&mut t, 0x070) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn test_mmio_device_needs_reset_sets_status_and_config_interrupt() {
        let (mut t, irq) = transport();
        bring_up(&mut t);
        let interrupt = t.device().interrupt.lock().unwrap().clone().unwrap();

        interrupt.signal_needs_reset();

        assert_eq!(read(&mut t, 0x070), ALL | STATUS_NEEDS_RESET);
        assert_eq!(read(&mut t, 0x060), INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
        write(&mut t, 0x070, ALL | STATUS_NEEDS_RESET); // the driver cannot clear it
        assert_eq!(read(&mut t, 0x070), ALL | STATUS_NEEDS_RESET);
        write(&mut t, 0x070, 0);
        assert_eq!((read(&mut t, 0x070), read(&mut t, 0x060)), (0, 0));
    }

    /// Queue 0 at 0x1000 (descriptors), 0x2000 (available), 0x3000 (used), 8 entries, ready.
    fn set_up_queue(t: &mut MmioTransport<Probe>) {
        write(t, 0x030, 0);
        write(t, 0x038, 8);
        for (offset, addr) in [(0x080, 0x1000), (0x090, 0x2000), (0x0a0, 0x3000)] {
            write(t, offset, addr);
        }
        write(t, 0x044, 1);
    }

    #[test]
    fn test_mmio_save_restore_registers_and_queue_positions_device_restarted_there() {
        let (mut t, _irq) = transport();
        set_up_queue(&mut t);
        bring_up(&mut t);
        t.device.paused_at = vec![QueuePosition {
            next_avail: 5,
            next_used: 3,
        }];
        let state = t.save().unwrap();

        let (_, irq) = transport();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut restored = MmioTransport::restore(Probe::default(), mem, irq, &state).unwrap();

        assert_eq!(read(&mut restored, 0x070), ALL);
        assert_eq!(read(&mut restored, 0x044), 1);
        assert_eq!(restored.device().restorings, 1);
        assert_eq!(restored.device().activations, 1);
        assert_eq!(restored.device().started_at, vec![(5, 3)]);
        assert_eq!(restored.save().unwrap().queues, state.queues);
    }

    #[test]
    fn test_mmio_restore_of_state_that_does_not_fit_device_refused() {
        let (mut t, _irq) = transport();
        bring_up(&mut t);
        let mut state = t.save().unwrap();
        state.queues[0].size = 32; // Probe's queue holds 16
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(MmioTransport::restore(Probe::default(), mem.clone(), irq, &state).is_err());
        state.queues[0].size = 8;
        state.driver_features |= 1 << 28;
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(MmioTransport::restore(Probe::default(), mem, irq, &state).is_err());
    }

    #[test]
    fn test_mmio_inactive_device_saved_without_pause_restored_inactive() {
        let (mut t, _irq) = transport();
        write(&mut t, 0x070, STATUS_ACKNOWLEDGE);
        let state = t.save().unwrap();
        assert_eq!(state.positions, None);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let restored = MmioTransport::restore(Probe::default(), mem, irq, &state).unwrap();
        assert_eq!(restored.device().activations, 0);
        assert_eq!(restored.status, STATUS_ACKNOWLEDGE);
    }
}
