//! x86_64 vCPU setup: what a vCPU needs before its first guest instruction.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};
use crate::VmmError;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The GDT the VMM installs: null, 64-bit code (selector 0x8), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// A segment descriptor from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The `kvm_segment` KVM wants for GDT entry `index`.
fn segment(index: u16) -> kvm_segment {
    let entry = GDT[usize::from(index)];
    let bit = |shift: u32, mask: u64| u8::try_from((entry >> shift) & mask).unwrap_or(0);
    let g = bit(55, 1);
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let base = ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff);
    let present = bit(47, 1);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: bit(40, 0xf),
        present,
        dpl: bit(45, 3),
        db: bit(54, 1),
        s: bit(44, 1),
        l: bit(53, 1),
        g,
        avl: bit(52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// CPUID: what KVM supports, with this vCPU's APIC id.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8) -> Result<(), VmmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::ioctl("get supported cpuid"))?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb => entry.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(VmmError::ioctl("set cpuid"))
}

/// MSRs Linux expects a firmware to have set.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WB,
            ..Default::default()
        },
    ];
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| VmmError::Memory(format!("msrs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(VmmError::ioctl("set msrs"))?;
    if set != entries.len() {
        return Err(VmmError::Image(format!(
            "KVM took {set} of {} boot MSRs",
            entries.len()
        )));
    }
    Ok(())
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmmError::ioctl("set fpu"))
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI: what the MP spec's virtual-wire mode expects.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let mut lapic = vcpu.get_lapic().map_err(VmmError::ioctl("get lapic"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i].to_ne_bytes()[0]);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = i8::from_ne_bytes([b]) as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(VmmError::ioctl("set lapic"))
}

/// General registers for a 64-bit entry at `rip` with `rsi` (the zero page for Linux).
pub fn setup_regs_long(vcpu: &VcpuFd, rip: u64, rsi: u64) -> Result<(), VmmError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::ioctl("set regs"))
}

/// Writes the GDT, an empty IDT and identity page tables (first 4 GiB, 2 MiB pages), and puts
/// the vCPU in 64-bit long mode with them.
pub fn setup_sregs_long(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), VmmError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(format!("boot tables: {e}")))
    };
    for (i, entry) in (0u64..).zip(GDT) {
        write(entry, GDT_ADDR + i * 8)?;
    }
    write(0, IDT_ADDR)?;
    write(PDPT_ADDR | 0x03, PML4_ADDR)?;
    for pd in 0..PD_COUNT {
        write((PD_ADDR + pd * 0x1000) | 0x03, PDPT_ADDR + pd * 8)?;
    }
    for i in 0..512 * PD_COUNT {
        write((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(VmmError::ioctl("get sregs"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(1);
    let data = segment(2);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(3);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(VmmError::ioctl("set sregs"))
}

/// Real mode at `ip` with all segments based at 0 (tiny test payloads).
pub fn setup_real_mode(vcpu: &VcpuFd, ip: u64) -> Result<(), VmmError> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::ioctl("get sregs"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::ioctl("set sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: ip,
        rsp: BOOT_STACK,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::ioctl("set regs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_segment_code64_fields() {
        let cs = segment(1);
        assert_eq!(
            (cs.selector, cs.type_, cs.present, cs.l, cs.db, cs.s, cs.g),
            (8, 0xb, 1, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let tr = segment(3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
    }
}
