//! Linux 64-bit boot protocol: the zero page with its e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemoryMmap;

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("too many e820 entries")]
    E820Full,
    #[error("cannot write the zero page: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64, ty: u32) -> Result<(), BootError> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        return Err(BootError::E820Full);
    }
    params.e820_table[i] = boot_e820_entry {
        addr,
        size,
        r#type: ty,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Writes `boot_params` for a kernel entered at its 64-bit entry point.
pub fn configure_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = cmdline_addr.raw_value() as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    add_e820(&mut params, 0, EBDA_START, E820_RAM)?;
    add_e820(
        &mut params,
        EBDA_START,
        HIMEM_START - EBDA_START,
        E820_RESERVED,
    )?;
    for region in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            add_e820(&mut params, start, end - start, E820_RAM)?;
        }
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_bios_area() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        configure_boot_params(&mem, GuestAddress(CMDLINE_START), 10, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.e820_entries }, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
        assert_eq!({ p.e820_table[2].size }, (64 << 20) - HIMEM_START);
        assert_eq!({ p.e820_table[1].r#type }, E820_RESERVED);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    }
}
