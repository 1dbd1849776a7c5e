//! Initial vCPU register state for the Linux 64-bit boot protocol: long
//! mode, an identity map of the first GiB, a flat GDT.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot GDT/IDT/page tables: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// Packs a GDT entry from its flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// General-purpose registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the boot GDT, IDT and page tables, and sets `sregs` for long mode.
pub fn setup_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Memory)?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    // Identity-map the first GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(RegsError::Memory)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(RegsError::Memory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(RegsError::Memory)?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let seg = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.l, 0);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pde1: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde1, (1 << 21) | 0x83);
    }
}
