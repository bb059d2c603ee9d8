//! The Intel MultiProcessor table (MP spec 1.4): how a Linux guest without ACPI finds its
//! vCPUs, its I/O APIC and how the ISA interrupts are wired to it.
//!
//! Layout at [`MPTABLE_ADDR`] (the start of the EBDA, where Linux scans for it): the 16-byte
//! floating pointer, then the configuration table header and its entries: one processor entry
//! per vCPU (APIC id = vCPU index, vCPU 0 the bootstrap processor), the ISA bus, the I/O APIC,
//! one interrupt entry per I/O APIC pin (ISA IRQ n -> pin n, so the virtio-mmio lines from
//! GSI 5 up reach the guest) and the two local interrupts of virtual-wire mode (ExtINT on
//! LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, HIMEM_START};
use crate::VmmError;

/// Where the floating pointer (and right after it the table) goes.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// Most vCPUs the table describes: what fits below 1 MiB is far more, the guest kernel is
/// built with `NR_CPUS=32`.
pub const MAX_VCPUS: u8 = 32;

const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Pins of KVM's in-kernel I/O APIC.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 in the processor signature.
const CPU_SIGNATURE: u32 = 6 << 8;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 9) | 1;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// A local interrupt entry's destination meaning "every local APIC".
const ALL_LAPICS: u8 = 0xff;

/// Writes the MP table for `vcpus` vCPUs into guest memory.
///
/// # Errors
/// `vcpus` is 0 or above [`MAX_VCPUS`], or the table cannot be written.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), VmmError> {
    let (floating, table) = build(vcpus)?;
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(format!("MP table: {e}")))
    };
    write(&floating, MPTABLE_ADDR)?;
    write(&table, MPTABLE_ADDR + 16)
}

/// The floating pointer and the configuration table, checksummed.
fn build(vcpus: u8) -> Result<([u8; 16], Vec<u8>), VmmError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(VmmError::Image(format!(
            "{vcpus} vCPUs: the built-in VMM runs 1 to {MAX_VCPUS}"
        )));
    }
    let table_addr = u32::try_from(MPTABLE_ADDR + 16).unwrap_or(0);
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut entry = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for id in 0..vcpus {
        let flags = if id == 0 {
            CPU_ENABLED | CPU_BSP
        } else {
            CPU_ENABLED
        };
        let mut cpu = vec![ENTRY_PROCESSOR, id, APIC_VERSION, flags];
        cpu.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        cpu.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        cpu.extend_from_slice(&[0; 8]);
        entry(&cpu);
    }
    entry(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entry(&ioapic);
    for pin in 0..IOAPIC_PINS {
        // Type, flags (conforming polarity and trigger), source bus 0 IRQ `pin`, to the I/O
        // APIC's pin `pin`.
        entry(&[ENTRY_IOINT, INT_VECTORED, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entry(&[ENTRY_LINT, INT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entry(&[ENTRY_LINT, INT_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);

    let length = u16::try_from(44 + entries.len())
        .map_err(|_| VmmError::Image("MP table too long".into()))?;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]);
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"HUSK-VMM    ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; 16];
    floating[..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = SPEC_REV;
    floating[10] = checksum(&floating);
    if MPTABLE_ADDR + 16 + u64::from(length) > HIMEM_START {
        return Err(VmmError::Image("MP table does not fit below 1 MiB".into()));
    }
    Ok((floating, table))
}

/// The byte that makes `bytes` sum to zero (mod 256), given its slot is still 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn test_build_two_vcpus_checksums_and_entries() {
        let (floating, table) = build(2).unwrap();
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(&floating), 0);
        assert_eq!(
            u32::from_le_bytes(floating[4..8].try_into().unwrap()),
            u32::try_from(MPTABLE_ADDR + 16).unwrap()
        );
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(sum(&table), 0);
        let length = u16::from_le_bytes([table[4], table[5]]);
        assert_eq!(usize::from(length), table.len());
        // 2 processors, bus, I/O APIC, 24 interrupts, 2 local interrupts.
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            2 + 1 + 1 + 24 + 2
        );
        assert_eq!(table.len(), 44 + 2 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
        // First processor is the enabled BSP with APIC id 0, the second APIC id 1, not BSP.
        assert_eq!(&table[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[ENTRY_PROCESSOR, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn test_build_max_vcpus_fits_below_1mib() {
        let (_, table) = build(MAX_VCPUS).unwrap();
        assert_eq!(sum(&table), 0);
    }

    #[test]
    fn test_build_zero_or_too_many_vcpus_error() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn test_write_lands_at_ebda() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 4).unwrap();
        let mut magic = [0u8; 4];
        mem.read_slice(&mut magic, GuestAddress(MPTABLE_ADDR))
            .unwrap();
        assert_eq!(&magic, b"_MP_");
    }
}
