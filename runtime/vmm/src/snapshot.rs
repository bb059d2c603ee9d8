//! A paused VM's state, saved to a directory and loaded back: the first half of restoring a
//! guest instead of booting it (see the built-in VMM in README.md).
//!
//! A snapshot directory holds two files, both 0600:
//! - `state`: [`VmState`] as JSON (a QEMU door snapshot holds QEMU's migration stream here):
//!   every vCPU's registers, special registers, FPU/SSE/AVX state (xsave), extended control registers, debug registers, local APIC, the MSRs KVM lists as
//!   saveable, pending events and run state; the in-kernel PIC and IOAPIC, the PIT and the
//!   kvmclock; the serial console's registers; each virtio-mmio device's transport registers
//!   and queue positions (the devices' host sides are not saved: a restored VM gets new ones);
//! - `memory`: guest RAM as a sparse file, only the pages the guest touched written.
//!
//! Saving happens from the vCPU threads of a paused VM ([`crate::ExitReason::Paused`]); loading
//! checks everything it reads (version, sizes, counts), because a snapshot that cannot be used
//! must fail with a reason (the caller then boots cold), never half-restore a VM. A block
//! device is saved as its queue's position (the restored VM's disk is its own file; the
//! agent probes it again); network devices cannot be saved yet (their VMs boot cold).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use husk_devices::MmioTransportState;

use crate::legacy::SerialSnapshot;
use crate::VmmError;

/// Version of the [`VmState`] layout; a snapshot of another version is not loaded.
pub const SNAPSHOT_VERSION: u32 = 1;
/// The state file of a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file of a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest state file loaded: a few KiB per vCPU, so 1 MiB is far more than any VM needs.
const MAX_STATE_BYTES: u64 = 1 << 20;

/// One vCPU's architectural state, as KVM gives it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state (the legacy 4 KiB xsave area).
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// DR0-DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers (absent without the in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Every MSR of KVM's saveable list that this vCPU has.
    pub msrs: Vec<kvm_msr_entry>,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
}

/// The in-kernel interrupt controllers and timer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// PIC master, PIC slave, IOAPIC.
    pub chips: Vec<kvm_irqchip>,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
}

/// A paused VM's CPU and chipset state (guest memory is beside it, [`MEMORY_FILE`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPU 0 first.
    pub vcpus: Vec<VcpuState>,
    /// Present when the VM has the in-kernel irqchip.
    pub irqchip: Option<IrqchipState>,
    /// The kvmclock.
    pub clock: kvm_clock_data,
    /// The serial console's registers.
    pub serial: SerialSnapshot,
    /// The virtio-mmio devices in bus order.
    pub devices: Vec<DeviceState>,
}

/// One virtio-mmio device of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// Its virtio device id: a restored VM must have the same devices in the same order.
    pub device_type: u32,
    /// Its transport's registers and queue positions.
    pub transport: MmioTransportState,
}

/// Reads a paused vCPU's state. Call it from the vCPU's thread after a `KVM_RUN` with
/// `immediate_exit` set, so that no emulated instruction is left half done.
///
/// # Errors
/// A KVM ioctl failed.
pub fn save_vcpu(kvm: &Kvm, vcpu: &VcpuFd, lapic: bool) -> Result<VcpuState, VmmError> {
    Ok(VcpuState {
        mp_state: vcpu
            .get_mp_state()
            .map_err(VmmError::ioctl("get mp state"))?,
        regs: vcpu.get_regs().map_err(VmmError::ioctl("get regs"))?,
        sregs: vcpu.get_sregs().map_err(VmmError::ioctl("get sregs"))?,
        xsave: vcpu.get_xsave().map_err(VmmError::ioctl("get xsave"))?,
        xcrs: vcpu.get_xcrs().map_err(VmmError::ioctl("get xcrs"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(VmmError::ioctl("get debug regs"))?,
        lapic: match lapic {
            true => Some(vcpu.get_lapic().map_err(VmmError::ioctl("get lapic"))?),
            false => None,
        },
        msrs: save_msrs(kvm, vcpu)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(VmmError::ioctl("get vcpu events"))?,
    })
}

/// Every MSR of KVM's list that this vCPU can read (one at a time: `KVM_GET_MSRS` stops at the
/// first it cannot, and which those are depends on the CPU).
fn save_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>, VmmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VmmError::ioctl("get msr index list"))?;
    let mut saved = Vec::new();
    for &index in list.as_slice() {
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs =
            Msrs::from_entries(&[entry]).map_err(|e| VmmError::Memory(format!("msrs: {e:?}")))?;
        if vcpu
            .get_msrs(&mut msrs)
            .map_err(VmmError::ioctl("get msrs"))?
            == 1
        {
            saved.extend_from_slice(msrs.as_slice());
        }
    }
    Ok(saved)
}

/// Puts a saved state into a freshly created vCPU whose CPUID is already set, in the order KVM
/// needs: the run state, registers, then the LAPIC (after the special registers, which hold
/// the APIC base), the MSRs, and the pending events last.
///
/// # Errors
/// A KVM ioctl failed or KVM took fewer MSRs than saved.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VmmError> {
    vcpu.set_mp_state(state.mp_state)
        .map_err(VmmError::ioctl("set mp state"))?;
    vcpu.set_regs(&state.regs)
        .map_err(VmmError::ioctl("set regs"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(VmmError::ioctl("set sregs"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (the legacy 4 KiB area, which is all that
    // `KVM_GET_XSAVE` filled), so KVM reads no byte beyond it.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(VmmError::ioctl("set xsave"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(VmmError::ioctl("set xcrs"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(VmmError::ioctl("set debug regs"))?;
    if let Some(lapic) = &state.lapic {
        vcpu.set_lapic(lapic)
            .map_err(VmmError::ioctl("set lapic"))?;
    }
    let msrs =
        Msrs::from_entries(&state.msrs).map_err(|e| VmmError::Memory(format!("msrs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(VmmError::ioctl("set msrs"))?;
    if set != state.msrs.len() {
        return Err(VmmError::Snapshot(format!(
            "KVM took {set} of {} saved MSRs",
            state.msrs.len()
        )));
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(VmmError::ioctl("set vcpu events"))
}

/// Reads the in-kernel PIC, IOAPIC and PIT of a paused VM.
///
/// # Errors
/// A KVM ioctl failed.
pub fn save_irqchip(fd: &VmFd) -> Result<IrqchipState, VmmError> {
    let mut chips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(VmmError::ioctl("get irqchip"))?;
        chips.push(chip);
    }
    let pit = fd.get_pit2().map_err(VmmError::ioctl("get pit"))?;
    Ok(IrqchipState { chips, pit })
}

/// Puts saved interrupt controllers and PIT into a VM that has created its own.
///
/// # Errors
/// A KVM ioctl failed, or the state does not have the three chips in order.
pub fn restore_irqchip(fd: &VmFd, state: &IrqchipState) -> Result<(), VmmError> {
    let ids: Vec<u32> = state.chips.iter().map(|c| c.chip_id).collect();
    if ids
        != [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
    {
        return Err(VmmError::Snapshot(format!("irqchips {ids:?}")));
    }
    fd.set_pit2(&state.pit)
        .map_err(VmmError::ioctl("set pit"))?;
    for chip in &state.chips {
        fd.set_irqchip(chip)
            .map_err(VmmError::ioctl("set irqchip"))?;
    }
    Ok(())
}

/// Sets the kvmclock to where it was when saved, so that the guest's monotonic time goes on
/// from there (KVM refuses the "TSC stable" flag it reported, so it is cleared).
///
/// # Errors
/// A KVM ioctl failed.
pub fn restore_clock(fd: &VmFd, clock: &kvm_clock_data) -> Result<(), VmmError> {
    let clock = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(VmmError::ioctl("set clock"))
}

/// The two files of a snapshot being made, created (0600, in a new 0700 directory) while the
/// VMM may still create files: the confined VMM that fills them at the pause may not.
#[derive(Debug)]
pub struct SnapshotFiles {
    state: File,
    memory: File,
}

impl SnapshotFiles {
    /// Makes the directory `dir` and its two empty files. The caller names a directory of its
    /// own and renames it into place once it is filled, so that a reader never sees half a
    /// snapshot.
    ///
    /// # Errors
    /// `dir` exists or cannot be made.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        Ok(Self {
            state: create_private(&dir.join(STATE_FILE))?,
            memory: create_private(&dir.join(MEMORY_FILE))?,
        })
    }
}

/// Writes `state` and the first `len` bytes of guest RAM (the memfd `memory`, only its
/// populated ranges) into `files`.
///
/// # Errors
/// A file cannot be written.
pub fn save(
    files: SnapshotFiles,
    state: &VmState,
    memory: &File,
    len: u64,
) -> Result<(), VmmError> {
    let json = serde_json::to_vec(state).map_err(|e| VmmError::Snapshot(e.to_string()))?;
    let SnapshotFiles {
        state: mut state_file,
        memory: memory_file,
    } = files;
    state_file.write_all(&json)?;
    copy_sparse(memory, &memory_file, len, Copy::SkipZeroPages)
}

fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Loads the snapshot in `dir`: its checked state and guest RAM copied into a fresh memfd of
/// exactly the saved size (only the saved ranges: the rest stays unallocated).
///
/// # Errors
/// [`VmmError::Snapshot`] naming what is wrong: a missing, oversized or malformed state file,
/// another version, a state that does not match itself, or a memory file of the wrong size.
pub fn load(dir: &Path) -> Result<(VmState, File), VmmError> {
    let state = read_state(&dir.join(STATE_FILE))?;
    let (source, memory) = memory_copy_files(&dir.join(MEMORY_FILE))?;
    let (len, size) = (memory.metadata()?.len(), u64::from(state.memory_mib) << 20);
    if len != size {
        return Err(VmmError::Snapshot(format!(
            "memory file has {len} bytes, the state says {size}"
        )));
    }
    fill_memfd(&source, &memory)?;
    Ok((state, memory))
}

fn read_state(path: &Path) -> Result<VmState, VmmError> {
    let file =
        File::open(path).map_err(|e| VmmError::Snapshot(format!("{}: {e}", path.display())))?;
    let mut json = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut json)?;
    if json.len() as u64 > MAX_STATE_BYTES {
        return Err(VmmError::Snapshot(format!(
            "{} is larger than {MAX_STATE_BYTES} bytes",
            path.display()
        )));
    }
    let state: VmState = serde_json::from_slice(&json)
        .map_err(|e| VmmError::Snapshot(format!("{}: {e}", path.display())))?;
    check(&state)?;
    Ok(state)
}

/// What [`load`] requires of a state before any of it reaches KVM.
fn check(state: &VmState) -> Result<(), VmmError> {
    if state.version != SNAPSHOT_VERSION {
        return Err(VmmError::Snapshot(format!(
            "version {} (this VMM reads {SNAPSHOT_VERSION})",
            state.version
        )));
    }
    let size = u64::from(state.memory_mib) << 20;
    if !(2 << 20..=crate::layout::MAX_RAM).contains(&size) {
        return Err(VmmError::Snapshot(format!(
            "{} MiB of memory",
            state.memory_mib
        )));
    }
    let vcpus = state.vcpus.len();
    if vcpus == 0 || vcpus > usize::from(crate::mptable::MAX_VCPUS) {
        return Err(VmmError::Snapshot(format!("{vcpus} vCPUs")));
    }
    let lapics = state.vcpus.iter().filter(|v| v.lapic.is_some()).count();
    let expected = if state.irqchip.is_some() { vcpus } else { 0 };
    if lapics != expected {
        return Err(VmmError::Snapshot(format!(
            "{lapics} local APICs for {vcpus} vCPUs"
        )));
    }
    Ok(())
}

/// How [`copy_sparse`] copies a populated range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// Through this process, leaving out pages of zeros (a guest's freed pages), with reads and
    /// writes only: the confined VMM saves with it.
    SkipZeroPages,
    /// `sendfile`, the kernel copying page to page: a snapshot was written without zero
    /// pages already, and loading it is on every restored VM's path.
    InKernel,
}

/// Copies the memory file `from` (never through a link) to a new private (0600) file `to` of
/// the same size, leaving out pages of zeros, as [`copy_sparse`] does: what is not copied
/// reads as zeros and takes no memory. The QEMU door saves its guest's RAM with it (QEMU
/// wrote every page the guest touched, zeroed ones too).
///
/// # Errors
/// `from` is a link or cannot be read, `to` exists, or the copy failed.
pub fn copy_memory_file(from: &Path, to: &Path) -> Result<(), VmmError> {
    let (source, len) = open_memory_file(from)?;
    let dest = create_private(to)?;
    copy_sparse(&source, &dest, len, Copy::SkipZeroPages)
}

/// The descriptors `husk-vmm copy-memory` ([`copy_passed`]) takes: the saved memory, and the
/// memfd it copies it into.
pub const COPY_FDS: [i32; 2] = [3, 4];

/// What a restore copies: the saved memory file `from` (never through a link, a regular file),
/// and a fresh memfd of its size to copy it into ([`fill_memfd`]: by [`load`] on the built-in
/// VMM, by [`copy_passed`] on the QEMU door). Guest RAM
/// is never a file on a disk, whose page cache the host would write back (and a guest's `sync`
/// flush).
///
/// # Errors
/// `from` is a link or cannot be opened, or no memfd.
pub fn memory_copy_files(from: &Path) -> Result<(File, File), VmmError> {
    let (source, len) = open_memory_file(from)?;
    Ok((source, crate::vm::memfd(len)?))
}

/// `husk-vmm copy-memory`: joins the VM's host cgroup (every `cgroup.procs` file of
/// `cgroup_procs`), then copies the saved ranges of the memory file passed as descriptor 3
/// into the memfd of the same size passed as descriptor 4, by the kernel; the rest stays
/// unallocated. The copy is charged to the cgroup that holds the rest of the VM's memory, not
/// to the runtime that restores it.
///
/// # Errors
/// A descriptor is not a regular file or the sizes differ, a cgroup cannot be joined, or the
/// copy failed.
pub fn copy_passed(cgroup_procs: &[std::path::PathBuf]) -> Result<(), VmmError> {
    use std::os::fd::FromRawFd;
    let err = |what: String| VmmError::Snapshot(format!("copy-memory: {what}"));
    let [source_fd, memory_fd] = COPY_FDS;
    // SAFETY: close_range on this process's own descriptors above the two passed ones; no Rust
    // object holds one.
    unsafe {
        libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
    }
    // SAFETY: descriptors 3 and 4 are the files the caller passed (each checked below to be a
    // regular file); the process owns them from here.
    let (source, memory) = unsafe { (File::from_raw_fd(source_fd), File::from_raw_fd(memory_fd)) };
    crate::jail::join_cgroups(cgroup_procs).map_err(err)?;
    fill_memfd(&source, &memory).map_err(|e| err(e.to_string()))
}

/// Copies the saved ranges of `source` into `memory`, a regular file (a memfd) of its size.
fn fill_memfd(source: &File, memory: &File) -> Result<(), VmmError> {
    let size = |file: &File, what: &str| match file.metadata() {
        Ok(meta) if meta.is_file() => Ok(meta.len()),
        _ => Err(VmmError::Snapshot(format!(
            "the {what} is not a regular file"
        ))),
    };
    let len = size(source, "saved memory")?;
    if size(memory, "memfd")? != len {
        return Err(VmmError::Snapshot(
            "the memfd is not the saved memory's size".into(),
        ));
    }
    copy_sparse(source, memory, len, Copy::InKernel)
}

/// Opens the memory file `from` to be copied, and its size: never through a link, and only a
/// regular file.
fn open_memory_file(from: &Path) -> Result<(File, u64), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a FIFO in its place (put there by a VMM the guest took over) would block
    // the open; it is refused below instead.
    let source = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .map_err(|e| VmmError::Snapshot(format!("{}: {e}", from.display())))?;
    let meta = source.metadata()?;
    if !meta.is_file() {
        return Err(VmmError::Snapshot(format!(
            "{} is not a regular file",
            from.display()
        )));
    }
    Ok((source, meta.len()))
}

/// Copies the populated ranges of the first `len` bytes of `from` (`SEEK_DATA`/`SEEK_HOLE`:
/// a memfd or tmpfs file reports the pages it holds) to the same offsets of `to`, and makes
/// `to` `len` bytes long: what is not copied reads as zeros and takes no memory.
fn copy_sparse(from: &File, to: &File, len: u64, how: Copy) -> Result<(), VmmError> {
    use nix::unistd::{lseek, Whence};
    to.set_len(len)?;
    let end = i64::try_from(len).map_err(|e| VmmError::Memory(e.to_string()))?;
    let mut offset = 0i64;
    while offset < end {
        let data = match lseek(from.as_fd(), offset, Whence::SeekData) {
            Ok(data) => data,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(VmmError::Io(e.into())),
        };
        let hole = lseek(from.as_fd(), data, Whence::SeekHole).map_err(std::io::Error::from)?;
        let range = |v: i64| u64::try_from(v).map_err(|e| VmmError::Memory(e.to_string()));
        let (start, end) = (range(data)?, range(hole)?.min(len));
        match how {
            Copy::SkipZeroPages => copy_range(from, to, start, end)?,
            Copy::InKernel => copy_range_in_kernel(from, to, start, end)?,
        }
        offset = hole;
    }
    Ok(())
}

/// Page size of the copy: what is all zeros in a page is not written.
const PAGE: usize = 4096;

/// Copies `[start, end)` to the same offsets, one chunk at a time, skipping zero pages.
fn copy_range(from: &File, to: &File, start: u64, end: u64) -> Result<(), VmmError> {
    use std::os::unix::fs::FileExt;
    let mut chunk = vec![0u8; 64 * PAGE];
    let mut at = start;
    while at < end {
        let want = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        let buf = chunk.get_mut(..want).unwrap_or_default();
        from.read_exact_at(buf, at)
            .map_err(|e| VmmError::Snapshot(format!("reading memory at {at:#x}: {e}")))?;
        let mut page_at = at;
        for page in buf.chunks(PAGE) {
            if page.iter().any(|&b| b != 0) {
                to.write_all_at(page, page_at)?;
            }
            page_at += page.len() as u64;
        }
        at += want as u64;
    }
    Ok(())
}

/// `sendfile` of `[start, end)` to the same offsets: the kernel copies page to page, also
/// between file systems (`copy_file_range` will not copy from a tmpfs into a memfd).
fn copy_range_in_kernel(from: &File, to: &File, start: u64, end: u64) -> Result<(), VmmError> {
    use nix::unistd::{lseek, Whence};
    let offset = |v: u64| i64::try_from(v).map_err(|e| VmmError::Memory(e.to_string()));
    lseek(to.as_fd(), offset(start)?, Whence::SeekSet).map_err(std::io::Error::from)?;
    let mut at = start;
    while at < end {
        let mut off_in = offset(at)?;
        let want = usize::try_from(end - at).unwrap_or(usize::MAX);
        let n = nix::sys::sendfile::sendfile64(to.as_fd(), from.as_fd(), Some(&mut off_in), want)
            .map_err(|e| VmmError::Snapshot(format!("copying memory at {at:#x}: {e}")))?;
        if n == 0 {
            return Err(VmmError::Snapshot("memory file ended early".into()));
        }
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(vcpus: usize) -> VmState {
        let vcpu = || VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: None,
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 7,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
        };
        VmState {
            version: SNAPSHOT_VERSION,
            memory_mib: 2,
            vcpus: (0..vcpus).map(|_| vcpu()).collect(),
            irqchip: None,
            clock: kvm_clock_data::default(),
            serial: SerialSnapshot::default(),
            devices: Vec::new(),
        }
    }

    fn saved(state: &VmState) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let memory = crate::vm::memfd(2 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&memory, b"guest", 4096 * 3).unwrap();
        let snap = dir.path().join("snap");
        save(
            SnapshotFiles::create(&snap).unwrap(),
            state,
            &memory,
            2 << 20,
        )
        .unwrap();
        (dir, snap)
    }

    #[test]
    fn test_copy_memory_file_keeps_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&from).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 10000], 5 << 20).unwrap();
        copy_memory_file(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(meta.blocks() * 512 < 1 << 20, "holes were filled");
        assert!(
            copy_memory_file(&from, &to).is_err(),
            "an existing file is not overwritten"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&from, &link).unwrap();
        assert!(
            copy_memory_file(&link, &dir.path().join("c")).is_err(),
            "a link is never followed"
        );
        assert!(
            memory_copy_files(&link).is_err(),
            "a link is never followed"
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(
            copy_memory_file(&fifo, &dir.path().join("d")).is_err(),
            "a FIFO is refused, not waited on"
        );
        assert!(memory_copy_files(&fifo).is_err(), "a FIFO is refused");
    }

    #[test]
    fn test_memory_copy_is_a_sparse_memfd_copy() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let f = File::create(&from).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 10000], 5 << 20).unwrap();
        let (source, memory) = memory_copy_files(&from).unwrap();
        fill_memfd(&source, &memory).unwrap();
        let other = crate::vm::memfd(4 << 20).unwrap();
        assert!(
            fill_memfd(&source, &other).is_err(),
            "a memfd of another size"
        );
        let mut copied = vec![0u8; 8 << 20];
        memory.read_exact_at(&mut copied, 0).unwrap();
        assert_eq!(copied, std::fs::read(&from).unwrap());
        let meta = memory.metadata().unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "holes were filled");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&memory);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
    }

    #[test]
    fn test_copy_memory_file_leaves_out_zero_pages() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&from).unwrap();
        // Pages: data, zero, zero, data, a hole, zero, then a short tail: all written.
        let mut contents = vec![0u8; 6 * PAGE + 100];
        contents[10] = 1;
        contents[3 * PAGE + 7] = 2;
        f.write_all_at(&contents[..4 * PAGE], 0).unwrap();
        f.write_all_at(&contents[5 * PAGE..], 5 * PAGE as u64)
            .unwrap();
        f.sync_all().unwrap();
        copy_memory_file(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), contents);
        let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks();
        assert!(blocks(&to) < blocks(&from), "zero pages were written");
    }

    #[test]
    fn test_save_load_round_trip_keeps_state_and_touched_pages() {
        let (_dir, snap) = saved(&state(2));
        let (loaded, memory) = load(&snap).unwrap();
        assert_eq!(loaded.vcpus.len(), 2);
        assert_eq!(loaded.vcpus[1].msrs[0].data, 7);
        let mut buf = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&memory, &mut buf, 4096 * 3).unwrap();
        assert_eq!(&buf, b"guest");
        assert_eq!(memory.metadata().unwrap().len(), 2 << 20);
        let on_disk = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(snap.join(MEMORY_FILE)).unwrap(),
        );
        assert!(
            on_disk < (2 << 20) / 512,
            "only touched pages are written: {on_disk} blocks"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(snap.join(STATE_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn test_load_truncated_memory_is_refused_with_sizes() {
        let (_dir, snap) = saved(&state(1));
        File::options()
            .write(true)
            .open(snap.join(MEMORY_FILE))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = load(&snap).unwrap_err().to_string();
        assert!(err.contains("memory file has 4096 bytes"), "{err}");
    }

    #[test]
    fn test_load_corrupted_state_is_refused() {
        let (_dir, snap) = saved(&state(1));
        std::fs::write(snap.join(STATE_FILE), b"{\"version\": 1, \"memory").unwrap();
        let err = load(&snap).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE), "{err}");
    }

    #[test]
    fn test_load_other_version_or_no_vcpu_is_refused() {
        let mut other = state(1);
        other.version = 99;
        let (_dir, snap) = saved(&other);
        assert!(load(&snap).unwrap_err().to_string().contains("version 99"));
        let (_dir, snap) = saved(&state(0));
        assert!(load(&snap).unwrap_err().to_string().contains("0 vCPUs"));
    }

    #[test]
    fn test_snapshot_files_in_existing_directory_refused() {
        let (_dir, snap) = saved(&state(1));
        assert!(SnapshotFiles::create(&snap).is_err());
    }
}
