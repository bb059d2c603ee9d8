//! Direct Linux boot (x86_64 64-bit boot protocol): the ELF `vmlinux` loaded at its physical
//! addresses, the initramfs at the top of RAM, the command line, and the zero page with the e820
//! map. The vCPU then enters the kernel's 64-bit entry with `rsi` = the zero page.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, ZERO_PAGE};
use crate::VmmError;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The highest address the initramfs may end at (the boot protocol's default limit).
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Where the kernel starts.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The zero page, for `rsi`.
    pub zero_page: u64,
}

/// Loads kernel, initramfs and command line into `mem` and writes the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
) -> Result<KernelEntry, VmmError> {
    let image = |what: &str, e: &dyn std::fmt::Display| VmmError::Image(format!("{what}: {e}"));
    let mut file =
        File::open(kernel).map_err(|e| image(&format!("open kernel {}", kernel.display()), &e))?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| image(&format!("load ELF kernel {}", kernel.display()), &e))?;

    let mem_end = mem.last_addr().0 + 1;
    let initrd = std::fs::read(initramfs)
        .map_err(|e| image(&format!("read initramfs {}", initramfs.display()), &e))?;
    let initrd_size = u64::try_from(initrd.len()).map_err(|e| image("initramfs size", &e))?;
    let initrd_addr = mem_end
        .min(INITRD_ADDR_MAX + 1)
        .checked_sub(initrd_size)
        .map(|a| a & !0xfff);
    let initrd_addr = initrd_addr
        .filter(|&a| a >= loaded.kernel_end)
        .ok_or_else(|| {
            VmmError::Image(format!(
                "initramfs of {initrd_size} bytes does not fit in guest RAM above the kernel"
            ))
        })?;
    mem.write_slice(&initrd, GuestAddress(initrd_addr))
        .map_err(|e| image("write initramfs", &e))?;

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| image("command line", &e))?;
    line.insert_str(cmdline)
        .map_err(|e| image("command line", &e))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| image("write command line", &e))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_ADDR).map_err(|e| image("cmdline address", &e))?;
    params.hdr.cmdline_size =
        u32::try_from(cmdline.len() + 1).map_err(|e| image("cmdline size", &e))?;
    params.hdr.ramdisk_image =
        u32::try_from(initrd_addr).map_err(|e| image("initramfs address", &e))?;
    params.hdr.ramdisk_size =
        u32::try_from(initrd_size).map_err(|e| image("initramfs size", &e))?;
    let e820 = [(0, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)];
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = 2;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| image("write zero page", &e))?;
    Ok(KernelEntry {
        entry: loaded.kernel_load.0,
        zero_page: ZERO_PAGE,
    })
}
