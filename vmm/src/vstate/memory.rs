//! Guest memory: anonymous private mappings laid out by the arch module.

use vm_memory::bitmap::AtomicBitmap;

use crate::arch::x86_64::layout::arch_memory_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {err}")]
    Create { mib: usize, err: String },
}

/// Guest memory everywhere in the VMM (vCPU set-up, devices, snapshots):
/// every region carries a page-granular dirty bitmap that vm-memory sets on
/// each write the VMM itself makes (virtio DMA, used rings, boot set-up), so
/// Diff snapshots also see pages KVM's dirty log does not. The bitmap costs
/// one bit per 4 KiB page (32 KiB per GiB) and an atomic OR per page
/// written through vm-memory, whether or not dirty tracking is on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The name guest memory carries in /proc/<pid>/maps and smaps.
pub const GUEST_MEMORY_VMA_NAME: &str = "ember-guest-memory";

/// Anonymous guest memory of `mem_size_mib` MiB.
pub fn create_anonymous(mem_size_mib: usize) -> Result<GuestMemoryMmap, MemoryError> {
    create_anonymous_regions(&arch_memory_regions((mem_size_mib as u64) << 20))
}

/// Anonymous guest memory with the given regions (a migration destination
/// takes the source's layout).
pub fn create_anonymous_regions(
    regions: &[(vm_memory::GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let size: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let mem = GuestMemoryMmap::from_ranges(regions).map_err(|e| MemoryError::Create {
        mib: (size >> 20) as usize,
        err: e.to_string(),
    })?;
    name_regions(&mem);
    Ok(mem)
}

/// Guest memory of `mem_size_mib` MiB in one memfd, mapped MAP_SHARED, so
/// an out-of-process device backend (vhost-user) can map the same pages
/// from the file descriptor. Each region maps its own slice of the memfd.
pub fn create_shared(mem_size_mib: usize) -> Result<GuestMemoryMmap, MemoryError> {
    create_shared_regions(&arch_memory_regions((mem_size_mib as u64) << 20))
}

/// Shared guest memory (as `create_shared`) with the given regions.
pub fn create_shared_regions(
    regions: &[(vm_memory::GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let size: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let mem_size_mib = (size >> 20) as usize;
    use std::os::fd::FromRawFd;
    use vm_memory::FileOffset;
    let err = |e: String| MemoryError::Create {
        mib: mem_size_mib,
        err: e,
    };
    let name = std::ffi::CString::new(GUEST_MEMORY_VMA_NAME).expect("no NUL in name");
    // SAFETY: the name is a valid NUL-terminated string that outlives the
    // call; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| err(format!("sizing the memfd: {e}")))?;
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(addr, len)| {
            let r = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            r
        })
        .collect();
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| err(e.to_string()))?;
    name_regions(&mem);
    Ok(mem)
}

/// Marks guest memory mappings: MADV_DONTFORK keeps guest memory out of
/// any child process and makes each region a mapping of its own in
/// /proc/<pid>/smaps (measurable apart from the VMM's heap); where the host
/// kernel supports VMA names it is also named `[anon:ember-guest-memory]`.
/// Best effort: a failure only costs observability.
fn name_regions(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const PR_SET_VMA: libc::c_int = 0x53564d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    let name = std::ffi::CString::new(GUEST_MEMORY_VMA_NAME).expect("no NUL in name");
    for region in mem.iter() {
        let (addr, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: the range is a live mapping owned by `mem`; MADV_DONTFORK
        // changes no contents.
        if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTFORK) } != 0 {
            log::debug!(
                "madvise(MADV_DONTFORK) on guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above; the kernel only reads the NUL-terminated name,
        // which outlives the call.
        let r = unsafe {
            libc::prctl(
                PR_SET_VMA,
                PR_SET_VMA_ANON_NAME,
                addr as libc::c_ulong,
                len as libc::c_ulong,
                name.as_ptr() as libc::c_ulong,
            )
        };
        if r != 0 {
            log::debug!(
                "cannot name guest memory mapping: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
