//! Guest memory: anonymous private mappings laid out by the arch module.

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout::arch_memory_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {err}")]
    Create { mib: usize, err: String },
}

/// Anonymous guest memory of `mem_size_mib` MiB.
pub fn create_anonymous(mem_size_mib: usize) -> Result<GuestMemoryMmap, MemoryError> {
    let size = (mem_size_mib as u64) << 20;
    GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).map_err(|e| MemoryError::Create {
        mib: mem_size_mib,
        err: e.to_string(),
    })
}
