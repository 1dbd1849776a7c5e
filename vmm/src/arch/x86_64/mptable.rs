//! MP table (Intel MultiProcessor Specification 1.4): tells a guest without
//! ACPI how many CPUs it has and where the IOAPIC is, and how ISA IRQs are
//! routed to it. Built as bytes to avoid unsafe struct casts.

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
#[cfg(test)]
const CPU_ENTRY_LEN: usize = 20;
#[cfg(test)]
const SHORT_ENTRY_LEN: usize = 8;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 9) | 1; // APIC, FPU
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooLarge(u8),
    #[error("cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: one past the last vCPU's APIC id.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Returns the floating pointer structure followed by the configuration table.
pub fn build(num_cpus: u8) -> Vec<u8> {
    let table_addr = EBDA_START as u32 + FLOATING_LEN as u32;
    let ioapic = ioapic_id(num_cpus);

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0u8); // processor
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"EMBER   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus);
    // The EBDA is 1 KiB below 640 KiB.
    if bytes.len() > 0x400 {
        return Err(MpTableError::TooLarge(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(checksum(&b[..FLOATING_LEN]), 0);
            let t = &b[FLOATING_LEN..];
            assert_eq!(&t[0..4], b"PCMP");
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
            assert_eq!(checksum(t), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            assert_eq!(
                t.len(),
                HEADER_LEN + cpus as usize * CPU_ENTRY_LEN + (2 + 24 + 2) * SHORT_ENTRY_LEN
            );
            assert!(b.len() <= 0x400);
        }
    }
}
