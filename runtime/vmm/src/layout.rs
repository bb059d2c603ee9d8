//! Guest-physical memory layout (x86_64), as the boot protocol and our devices use it.

/// GDT: null, 64-bit code, data, TSS descriptors.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (limit 0): the guest installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for 64-bit entry: PML4, one PDPT, four PDs of 2 MiB pages (4 GiB:
/// RAM and the MMIO hole).
pub const PML4_ADDR: u64 = 0x9000;
/// See [`PML4_ADDR`].
pub const PDPT_ADDR: u64 = 0xa000;
/// See [`PML4_ADDR`]; the four PDs follow each other.
pub const PD_ADDR: u64 = 0xb000;
/// Number of PDs (GiB identity-mapped).
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line the VMM writes (including NUL).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio device; each device gets [`MMIO_DEVICE_SIZE`] bytes.
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Guest RAM must end below the MMIO hole.
pub const MAX_RAM: u64 = MMIO_START;
/// KVM's TSS (three pages) for real-mode emulation on Intel, under 4 GiB and above RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// GSI of the serial port.
pub const SERIAL_IRQ: u32 = 4;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// I/O port of the serial port (COM1) and its width.
pub const SERIAL_PORT: (u16, u16) = (0x3f8, 8);
/// I/O ports of the i8042 controller (data at 0x60, command at 0x64).
pub const I8042_PORT: (u16, u16) = (0x60, 5);
/// I/O port a guest writes a byte to in order to end the VM with that status (QEMU's
/// isa-debug-exit convention): test payloads and the capability probe use it.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
