//! A KVM virtual machine: memory, one thread per vCPU, buses, legacy devices; runs until the
//! guest ends it (reset, debug exit, halt without interrupts, a KVM error) or the host stops it.

use std::io::Write;
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use husk_devices::{MmioTransport, MmioTransportState, VirtioMmioDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{Bus, BusDevice};
use crate::layout::{
    DEBUG_EXIT_PORT, I8042_PORT, KVM_TSS_ADDR, MAX_RAM, MMIO_DEVICE_SIZE, MMIO_START, SERIAL_IRQ,
    SERIAL_PORT, VIRTIO_IRQ_BASE,
};
use crate::legacy::{DebugExit, ExitSignal, SerialDevice, SerialSnapshot, I8042};
use crate::report::{monotonic_now, MemoryUsage, RunReport};
use crate::snapshot::{self, DeviceState, SnapshotFiles, VcpuState, VmState};
use crate::{boot, mptable, x86, VmmError};

/// How the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode, segments at 0.
    Real,
    /// 64-bit long mode with the VMM's GDT and identity page tables.
    Long,
}

/// What the VM runs.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Raw machine code loaded at `addr` and entered there in `mode`.
    Payload {
        /// The code.
        code: Vec<u8>,
        /// Guest-physical load and entry address.
        addr: u64,
        /// CPU mode at entry.
        mode: CpuMode,
    },
    /// A Linux kernel (ELF `vmlinux`) booted directly, with its initramfs and command line (to
    /// which the VMM appends its virtio-mmio devices), on `vcpus` vCPUs listed in an MP table
    /// (vCPU 0 boots; the others wait in KVM for the guest's INIT/SIPI). Needs the irqchip.
    Linux {
        /// The `vmlinux`.
        kernel: std::path::PathBuf,
        /// The initramfs (cpio).
        initramfs: std::path::PathBuf,
        /// Kernel command line.
        cmdline: String,
        /// Number of vCPUs, 1 to [`crate::mptable::MAX_VCPUS`].
        vcpus: u8,
    },
}

/// How to build a VM.
pub struct VmConfig {
    /// Guest RAM in MiB (from 2 up to the MMIO hole).
    pub memory_mib: u32,
    /// In-kernel interrupt controllers and PIT (Linux guests); without them a guest HLT exits.
    pub irqchip: bool,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// What to run.
    pub entry: Entry,
    /// virtio-mmio devices, mapped from [`crate::layout::MMIO_START`] on, one window and one
    /// interrupt line each.
    pub virtio: Vec<Box<dyn VirtioMmioDevice>>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory_mib", &self.memory_mib)
            .field("irqchip", &self.irqchip)
            .finish()
    }
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, triple fault): a Linux guest's reboot or panic.
    Reset,
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The vCPU halted with no interrupt controller to wake it.
    Halted,
    /// KVM could not emulate what the guest did.
    InternalError,
    /// KVM refused to enter the guest (bad vCPU state); the hardware reason.
    FailEntry(u64),
    /// Something this VMM does not handle; the guest cannot continue.
    Unhandled(String),
    /// The host stopped the VM ([`Vm::run`]'s timeout).
    TimedOut,
    /// The host paused the VM ([`Pauser`]) to snapshot it.
    Paused,
}

/// A built VM, ready to run.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// Whether the VM has the in-kernel irqchip (and so LAPICs to save).
    irqchip: bool,
    mem: GuestMemoryMmap,
    io_bus: Bus,
    mmio_bus: Bus,
    /// The console, for its registers in a snapshot.
    serial: SharedSerial,
    /// The virtio-mmio devices in bus order, for their state in a snapshot.
    transports: Vec<SharedTransport>,
    exit: ExitSignal,
    /// vCPU 0 first.
    vcpus: Vec<VcpuFd>,
    _irqs: Vec<EventFd>,
    /// /proc/self/status, opened while files may still be opened, for [`RunReport::memory`].
    status: Option<std::fs::File>,
}

/// The serial console as the VM keeps it.
type SharedSerial = Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>;
/// A virtio-mmio device as the VM keeps it.
type SharedTransport = Arc<Mutex<MmioTransport<Box<dyn VirtioMmioDevice>>>>;

/// How to rebuild a VM from a snapshot ([`Vm::restore`]).
pub struct RestoreConfig {
    /// The snapshot directory ([`snapshot::SnapshotFiles`]).
    pub snapshot: std::path::PathBuf,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// The devices, fresh, in the order and of the types of the saved VM's (their host sides
    /// are new: the vsock socket, virtiofsd).
    pub virtio: Vec<Box<dyn VirtioMmioDevice>>,
    /// The guest RAM (MiB) the caller sized the VM's host resources for: the snapshot's must
    /// be the same.
    pub memory_mib: u32,
    /// The vCPUs the caller expects: the snapshot's must be as many.
    pub vcpus: u8,
}

impl std::fmt::Debug for RestoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreConfig")
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("io_bus", &self.io_bus)
            .field("mmio_bus", &self.mmio_bus)
            .finish()
    }
}

impl Vm {
    /// Creates the VM, its memory, devices and vCPU, and loads the entry.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let mem = guest_memory(memfd(memory_bytes(config.memory_mib)?)?)?;
        let fd = create_vm(&kvm, &mem, config.irqchip)?;
        let exit = ExitSignal::new()?;
        let (io_bus, serial, serial_irq) =
            legacy_bus(&fd, config.irqchip, config.console, None, &exit)?;
        let virtio_count =
            u32::try_from(config.virtio.len()).map_err(|e| VmmError::Image(e.to_string()))?;
        let devices = config.virtio.into_iter().map(|d| (d, None)).collect();
        let (mmio_bus, transports, mut irqs) = virtio_bus(&fd, &mem, config.irqchip, devices)?;
        let count = match &config.entry {
            Entry::Payload { .. } => 1,
            Entry::Linux { vcpus, .. } if !config.irqchip && *vcpus > 1 => {
                return Err(VmmError::Image(format!(
                    "{vcpus} vCPUs need the in-kernel irqchip"
                )));
            }
            Entry::Linux { vcpus, .. } => *vcpus,
        };
        let mut vcpus = Vec::new();
        for id in 0..count {
            let vcpu = create_vcpu(&kvm, &fd, id)?;
            x86::setup_msrs(&vcpu)?;
            x86::setup_fpu(&vcpu)?;
            if config.irqchip {
                x86::setup_lapic(&vcpu)?;
            }
            vcpus.push(vcpu);
        }
        let vcpu = vcpus
            .first()
            .ok_or_else(|| VmmError::Image("no vCPU".into()))?;
        load_entry(&mem, vcpu, &config.entry, count, virtio_count)?;
        irqs.push(serial_irq);
        Ok(Self {
            kvm,
            fd,
            irqchip: config.irqchip,
            mem,
            io_bus,
            mmio_bus,
            serial,
            transports,
            exit,
            vcpus,
            _irqs: irqs,
            status: std::fs::File::open("/proc/self/status").ok(),
        })
    }

    /// Rebuilds the VM saved in a snapshot directory ([`snapshot`]): its memory (copied, so
    /// that the snapshot is never written), interrupt controllers, PIT, clock, console
    /// registers, virtio devices (`config.virtio`, restored where their queues were) and
    /// vCPUs, ready to run from where it was paused.
    ///
    /// # Errors
    /// [`VmmError::Snapshot`] when the snapshot cannot be loaded; a KVM error when its state
    /// is refused. Nothing is left behind either way.
    pub fn restore(config: RestoreConfig) -> Result<Self, VmmError> {
        let (state, memory) = snapshot::load(&config.snapshot)?;
        let shape = (state.memory_mib, state.vcpus.len());
        if shape != (config.memory_mib, usize::from(config.vcpus)) {
            return Err(VmmError::Snapshot(format!(
                "saved VM has {} MiB and {} vCPUs, {} MiB and {} expected",
                shape.0, shape.1, config.memory_mib, config.vcpus
            )));
        }
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let mem = guest_memory(memory)?;
        let irqchip = state.irqchip.is_some();
        let fd = create_vm(&kvm, &mem, irqchip)?;
        if let Some(chips) = &state.irqchip {
            snapshot::restore_irqchip(&fd, chips)?;
        }
        snapshot::restore_clock(&fd, &state.clock)?;
        let exit = ExitSignal::new()?;
        let (io_bus, serial, serial_irq) =
            legacy_bus(&fd, irqchip, config.console, Some(&state.serial), &exit)?;
        let types: Vec<u32> = config.virtio.iter().map(|d| d.device_type()).collect();
        let saved: Vec<u32> = state.devices.iter().map(|d| d.device_type).collect();
        if types != saved {
            return Err(VmmError::Snapshot(format!(
                "devices {types:?} differ from the saved VM's {saved:?}"
            )));
        }
        let devices = config
            .virtio
            .into_iter()
            .zip(&state.devices)
            .map(|(d, saved)| (d, Some(&saved.transport)))
            .collect();
        let (mmio_bus, transports, mut irqs) = virtio_bus(&fd, &mem, irqchip, devices)?;
        irqs.push(serial_irq);
        let mut vcpus = Vec::new();
        for (id, saved) in (0u8..).zip(&state.vcpus) {
            let vcpu = create_vcpu(&kvm, &fd, id)?;
            snapshot::restore_vcpu(&vcpu, saved)?;
            vcpus.push(vcpu);
        }
        for transport in &transports {
            transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .resignal();
        }
        Ok(Self {
            kvm,
            fd,
            irqchip,
            mem,
            io_bus,
            mmio_bus,
            serial,
            transports,
            exit,
            vcpus,
            _irqs: irqs,
            status: std::fs::File::open("/proc/self/status").ok(),
        })
    }

    /// A handle that pauses this VM once it runs ([`Pauser::pause`]).
    pub fn pauser(&self) -> Pauser {
        Pauser(self.exit.clone())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the guest until it ends or `timeout` passes; returns why it ended.
    pub fn run(self, timeout: Duration) -> Result<ExitReason, VmmError> {
        self.run_report(timeout).map(|report| report.reason)
    }

    /// [`Vm::run`], also reporting when the guest first ran and the process's memory use.
    pub fn run_report(self, timeout: Duration) -> Result<RunReport, VmmError> {
        self.run_inner(timeout, None)
    }

    /// [`Vm::run_report`]; if the run ends because the VM was paused ([`Pauser`]), saves the
    /// paused VM into `files` ([`snapshot::save`]): its vCPUs, chipset, console, devices (each
    /// paused; a device that cannot be saved fails the snapshot) and memory.
    ///
    /// # Errors
    /// As [`Vm::run_report`], and [`VmmError::Snapshot`] or an I/O error when the state
    /// cannot be read or written.
    pub fn run_to_snapshot(
        self,
        timeout: Duration,
        files: SnapshotFiles,
    ) -> Result<RunReport, VmmError> {
        self.run_inner(timeout, Some(files))
    }

    fn run_inner(
        self,
        timeout: Duration,
        snapshot: Option<SnapshotFiles>,
    ) -> Result<RunReport, VmmError> {
        install_kick_handler()?;
        let Self {
            kvm,
            fd,
            irqchip,
            mem,
            vcpus,
            io_bus,
            mmio_bus,
            serial,
            transports,
            exit,
            mut status,
            ..
        } = self;
        let (io_bus, mmio_bus) = (Arc::new(io_bus), Arc::new(mmio_bus));
        let kvm = Arc::new(kvm);
        let first_exit = Arc::new(OnceLock::new());
        let mut threads: Vec<JoinHandle<Option<Result<VcpuState, VmmError>>>> = Vec::new();
        for (id, mut vcpu) in vcpus.into_iter().enumerate() {
            let (io_bus, mmio_bus, kvm) = (io_bus.clone(), mmio_bus.clone(), kvm.clone());
            let (thread_exit, first_exit) = (exit.clone(), first_exit.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    run_vcpu(&mut vcpu, &io_bus, &mmio_bus, &thread_exit, &first_exit);
                    paused_state(&kvm, &mut vcpu, &thread_exit, irqchip)
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    exit.exit(ExitReason::Unhandled(format!("vCPU thread: {e}")));
                    break;
                }
            }
        }
        if exit.wait_timeout(timeout).is_none() {
            exit.exit(ExitReason::TimedOut);
        }
        // Kick every vCPU out of KVM_RUN until its thread sees the exit.
        let mut saved = Vec::new();
        for thread in threads {
            while !thread.is_finished() {
                let _ = thread.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
            saved.push(thread.join().ok().flatten());
        }
        let reason = exit.reason().unwrap_or(ExitReason::TimedOut);
        if let (ExitReason::Paused, Some(files)) = (&reason, snapshot) {
            let vcpus = saved
                .into_iter()
                .map(|s| s.unwrap_or_else(|| Err(VmmError::Snapshot("a vCPU thread died".into()))))
                .collect::<Result<Vec<_>, _>>()?;
            let devices = Devices {
                irqchip,
                serial: &serial,
                transports: &transports,
            };
            save_snapshot(&fd, &mem, vcpus, devices, files)?;
        }
        Ok(RunReport {
            reason,
            first_exit: first_exit.get().copied(),
            memory: status.as_mut().map(MemoryUsage::read).unwrap_or_default(),
        })
    }
}

/// Pauses a running VM: its vCPUs leave the guest at the next instruction boundary and the run
/// ends with [`ExitReason::Paused`] (and, with [`Vm::run_to_snapshot`], a snapshot).
#[derive(Debug, Clone)]
pub struct Pauser(ExitSignal);

impl Pauser {
    /// Pauses the VM (once: a VM that already ended keeps its reason).
    pub fn pause(&self) {
        self.0.exit(ExitReason::Paused);
    }
}

/// A vCPU's state once its loop ended because of a pause: one more `KVM_RUN` with
/// `immediate_exit` completes an instruction whose port or MMIO access was being emulated,
/// without running the guest further. `None` when the VM was not paused.
fn paused_state(
    kvm: &Kvm,
    vcpu: &mut VcpuFd,
    exit: &ExitSignal,
    irqchip: bool,
) -> Option<Result<VcpuState, VmmError>> {
    if exit.reason() != Some(ExitReason::Paused) {
        return None;
    }
    vcpu.set_kvm_immediate_exit(1);
    let completed = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(VmmError::ioctl("complete pending I/O")(e)),
        Ok(other) => Err(VmmError::Snapshot(format!(
            "vCPU exited with {other:?} while pausing"
        ))),
    };
    vcpu.set_kvm_immediate_exit(0);
    Some(completed.and_then(|()| snapshot::save_vcpu(kvm, vcpu, irqchip)))
}

/// A paused VM's devices, to be saved.
struct Devices<'a> {
    /// Whether it has the in-kernel PIC, IOAPIC and PIT.
    irqchip: bool,
    serial: &'a SharedSerial,
    transports: &'a [SharedTransport],
}

/// Writes a paused VM (its vCPUs already read) into `files`: each device is paused and read,
/// then the chipset and clock, then memory (which the devices no longer touch).
fn save_snapshot(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    vcpus: Vec<VcpuState>,
    devices: Devices<'_>,
    files: SnapshotFiles,
) -> Result<(), VmmError> {
    let mut saved = Vec::new();
    for transport in devices.transports {
        let mut transport = transport.lock().unwrap_or_else(PoisonError::into_inner);
        saved.push(DeviceState {
            device_type: transport.device().device_type(),
            transport: transport.save().map_err(VmmError::Snapshot)?,
        });
    }
    let serial = devices
        .serial
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .snapshot();
    let irqchip = match devices.irqchip {
        true => Some(snapshot::save_irqchip(fd)?),
        false => None,
    };
    let clock = fd.get_clock().map_err(VmmError::ioctl("get clock"))?;
    let len = mem.last_addr().0.saturating_add(1);
    let memory_mib = u32::try_from(len >> 20).map_err(|e| VmmError::Memory(e.to_string()))?;
    let state = VmState {
        version: snapshot::SNAPSHOT_VERSION,
        memory_mib,
        vcpus,
        irqchip,
        clock,
        serial,
        devices: saved,
    };
    let file = mem
        .iter()
        .next()
        .and_then(|region| region.file_offset())
        .ok_or_else(|| VmmError::Snapshot("guest memory has no file".into()))?;
    snapshot::save(files, &state, file.file(), len)
}

/// Offset of the QueueNotify register in a virtio-mmio window.
const MMIO_QUEUE_NOTIFY: u64 = 0x50;

impl<D: VirtioMmioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// Guest RAM size in bytes, checked: from 2 MiB up to the MMIO hole.
fn memory_bytes(memory_mib: u32) -> Result<u64, VmmError> {
    let size = u64::from(memory_mib) << 20;
    if !(2 << 20..=MAX_RAM).contains(&size) {
        return Err(VmmError::Memory(format!(
            "{memory_mib} MiB is outside 2..{} MiB",
            MAX_RAM >> 20
        )));
    }
    Ok(size)
}

/// A fresh memfd of `size` bytes (unallocated until touched) for guest RAM.
pub(crate) fn memfd(size: u64) -> Result<std::fs::File, VmmError> {
    let fd = memfd_create(c"husk-guest-ram", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| VmmError::Memory(format!("memfd_create: {e}")))?;
    let file = std::fs::File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

/// Guest RAM as one shared mapping of the memfd `file`: shareable with vhost-user backends
/// (virtiofsd).
fn guest_memory(file: std::fs::File) -> Result<GuestMemoryMmap, VmmError> {
    let size = memory_bytes(u32::try_from(file.metadata()?.len() >> 20).unwrap_or(u32::MAX))?;
    let size = usize::try_from(size).map_err(|e| VmmError::Memory(e.to_string()))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| VmmError::Memory(e.to_string()))
}

/// The KVM VM with `mem` registered, the TSS placed, and, with `irqchip`, the in-kernel PIC,
/// IOAPIC and PIT.
fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, irqchip: bool) -> Result<VmFd, VmmError> {
    let fd = kvm.create_vm().map_err(VmmError::ioctl("create vm"))?;
    register_memory(&fd, mem)?;
    fd.set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or(usize::MAX))
        .map_err(VmmError::ioctl("set tss"))?;
    if irqchip {
        fd.create_irq_chip()
            .map_err(VmmError::ioctl("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmmError::ioctl("create pit"))?;
    }
    Ok(fd)
}

/// The port-IO bus with the serial console (as `saved` left it, if given), i8042 and
/// debug-exit port; the console; and the serial interrupt's event fd (wired to its line with
/// `irqchip`).
fn legacy_bus(
    fd: &VmFd,
    irqchip: bool,
    console: Box<dyn Write + Send>,
    saved: Option<&SerialSnapshot>,
    exit: &ExitSignal,
) -> Result<(Bus, SharedSerial, EventFd), VmmError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK)?;
    if irqchip {
        fd.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(VmmError::ioctl("register serial irqfd"))?;
    }
    let serial = match saved {
        Some(state) => SerialDevice::restore(serial_irq.try_clone()?, console, state)
            .map_err(VmmError::Snapshot)?,
        None => SerialDevice::new(serial_irq.try_clone()?, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut io_bus = Bus::default();
    let devices: [(u16, u16, crate::bus::SharedDevice); 3] = [
        (SERIAL_PORT.0, SERIAL_PORT.1, serial.clone()),
        (
            I8042_PORT.0,
            I8042_PORT.1,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        ),
        (
            DEBUG_EXIT_PORT,
            1,
            Arc::new(Mutex::new(DebugExit(exit.clone()))),
        ),
    ];
    for (base, len, device) in devices {
        io_bus
            .insert(u64::from(base), u64::from(len), device)
            .map_err(VmmError::Image)?;
    }
    Ok((io_bus, serial, serial_irq))
}

/// The MMIO bus with one virtio-mmio window per device from [`MMIO_START`] on, each with its
/// interrupt line and queue-notify ioeventfds (a device with a saved transport state is
/// restored to it); the transports; and the interrupts' event fds.
fn virtio_bus(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    irqchip: bool,
    devices: Vec<(Box<dyn VirtioMmioDevice>, Option<&MmioTransportState>)>,
) -> Result<(Bus, Vec<SharedTransport>, Vec<EventFd>), VmmError> {
    let mut mmio_bus = Bus::default();
    let mut transports = Vec::new();
    let mut irqs = Vec::new();
    for (i, (device, saved)) in (0u32..).zip(devices) {
        let base = MMIO_START + u64::from(i) * MMIO_DEVICE_SIZE;
        let irq = EventFd::new(EFD_NONBLOCK)?;
        if irqchip {
            fd.register_irqfd(&irq, VIRTIO_IRQ_BASE + i)
                .map_err(VmmError::ioctl("register virtio irqfd"))?;
        }
        let transport = match saved {
            None => MmioTransport::new(device, mem.clone(), irq.try_clone()?)?,
            Some(state) => MmioTransport::restore(device, mem.clone(), irq.try_clone()?, state)
                .map_err(VmmError::Snapshot)?,
        };
        for (queue, kick) in (0u32..).zip(transport.kick_events()) {
            let notify = IoEventAddress::Mmio(base + MMIO_QUEUE_NOTIFY);
            fd.register_ioevent(kick, &notify, queue)
                .map_err(VmmError::ioctl("register ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(base, MMIO_DEVICE_SIZE, transport.clone())
            .map_err(VmmError::Image)?;
        transports.push(transport);
        irqs.push(irq);
    }
    Ok((mmio_bus, transports, irqs))
}

/// vCPU `id` with KVM's supported CPUID (and `id` as its APIC id).
fn create_vcpu(kvm: &Kvm, fd: &VmFd, id: u8) -> Result<VcpuFd, VmmError> {
    let vcpu = fd
        .create_vcpu(u64::from(id))
        .map_err(VmmError::ioctl("create vcpu"))?;
    x86::setup_cpuid(kvm, &vcpu, id)?;
    Ok(vcpu)
}

/// Loads what the VM runs and points vCPU 0 at it.
fn load_entry(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: &Entry,
    vcpus: u8,
    virtio_count: u32,
) -> Result<(), VmmError> {
    match entry {
        Entry::Payload { code, addr, mode } => {
            load(mem, code, *addr)?;
            match mode {
                CpuMode::Real if *addr > 0xffff => Err(VmmError::Image(format!(
                    "real-mode entry {addr:#x} is above 64 KiB"
                ))),
                CpuMode::Real => x86::setup_real_mode(vcpu, *addr),
                CpuMode::Long => {
                    x86::setup_sregs_long(mem, vcpu)?;
                    x86::setup_regs_long(vcpu, *addr, 0)
                }
            }
        }
        Entry::Linux {
            kernel,
            initramfs,
            cmdline,
            vcpus: _,
        } => {
            mptable::write(mem, vcpus)?;
            let mut line = cmdline.clone();
            for i in 0..virtio_count {
                let base = MMIO_START + u64::from(i) * MMIO_DEVICE_SIZE;
                line.push_str(&format!(
                    " virtio_mmio.device=4K@{base:#x}:{}",
                    VIRTIO_IRQ_BASE + i
                ));
            }
            let entry = boot::load_linux(mem, kernel, initramfs, &line)?;
            x86::setup_sregs_long(mem, vcpu)?;
            x86::setup_regs_long(vcpu, entry.entry, entry.zero_page)
        }
    }
}

fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which the
        // `Vm` keeps for as long as the VM fd (and so the slot) exists.
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(VmmError::ioctl("set memory region"))?;
    }
    Ok(())
}

fn load(mem: &GuestMemoryMmap, code: &[u8], addr: u64) -> Result<(), VmmError> {
    let fits = addr >= 0x1000
        && addr
            .checked_add(code.len() as u64)
            .is_some_and(|end| end <= mem.last_addr().0 + 1);
    if !fits {
        return Err(VmmError::Image(format!(
            "payload of {} bytes does not fit at {addr:#x}",
            code.len()
        )));
    }
    mem.write_slice(code, GuestAddress(addr))
        .map_err(|e| VmmError::Image(e.to_string()))
}

fn run_vcpu(
    vcpu: &mut VcpuFd,
    io: &Bus,
    mmio: &Bus,
    exit: &ExitSignal,
    first_exit: &OnceLock<Duration>,
) {
    while exit.reason().is_none() {
        let run = vcpu.run();
        if first_exit.get().is_none() {
            let _ = first_exit.set(monotonic_now());
        }
        let reason = match run {
            Ok(VcpuExit::IoOut(port, data)) => {
                io.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                io.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Hlt) => ExitReason::Halted,
            Ok(VcpuExit::Shutdown | VcpuExit::SystemEvent(..)) => ExitReason::Reset,
            Ok(VcpuExit::InternalError) => ExitReason::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => ExitReason::FailEntry(reason),
            Ok(other) => ExitReason::Unhandled(format!("{other:?}")),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
            Err(e) => ExitReason::Unhandled(format!("KVM_RUN: {e}")),
        };
        exit.exit(reason);
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal only interrupts KVM_RUN; its handler does nothing.
fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(SIGRTMIN(), kick_handler));
    result.map_err(|e| VmmError::Io(std::io::Error::from_raw_os_error(e.errno())))
}
