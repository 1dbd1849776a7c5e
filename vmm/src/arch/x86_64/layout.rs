//! Guest physical memory layout.

use vm_memory::GuestAddress;

/// Boot GDT and IDT live in low memory the kernel does not use at entry.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The "zero page": Linux `boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table is placed.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel and everything else goes above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// 32-bit MMIO hole: devices live here, RAM is split around it.
pub const MMIO_MEM_START: u64 = 0xd000_0000;
pub const MMIO_MEM_SIZE: u64 = 0x3000_0000; // up to 4 GiB
/// The IOAPIC and LAPIC sit at their architectural addresses inside the hole.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// KVM needs three pages for the TSS below 4 GiB, out of the guest's RAM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// First GSI handed to virtio-mmio devices (0-4 are legacy: PIT, i8042, COM1).
pub const IRQ_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// Guest RAM ranges for `mem_size` bytes: below the MMIO hole first, the rest
/// above 4 GiB.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let hole_end = MMIO_MEM_START + MMIO_MEM_SIZE;
    if mem_size <= MMIO_MEM_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_MEM_START as usize),
            (GuestAddress(hole_end), (mem_size - MMIO_MEM_START) as usize),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_mmio_hole() {
        assert_eq!(
            arch_memory_regions(128 << 20),
            vec![(GuestAddress(0), 128 << 20)]
        );
        let r = arch_memory_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_MEM_START as usize));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
