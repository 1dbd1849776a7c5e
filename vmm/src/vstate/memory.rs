//! Guest memory, laid out by the arch module: anonymous private mappings,
//! or a memfd (shared; of 4 KiB or 2 MiB hugetlbfs pages).

use vm_memory::bitmap::AtomicBitmap;

use crate::arch::x86_64::layout::arch_memory_regions;
use crate::vmm_config::machine_config::{HugePages, MemoryBacking};

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

/// Guest memory with the given regions, as machine-config asks:
/// anonymous (with transparent huge pages advised, if asked), a memfd, or a
/// memfd of 2 MiB hugetlbfs pages.
pub fn create_regions(
    regions: &[(vm_memory::GuestAddress, usize)],
    huge_pages: HugePages,
    backing: MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    match (huge_pages, backing) {
        (HugePages::Hugetlbfs2M, _) => create_memfd_regions(regions, true),
        (_, MemoryBacking::Memfd) => create_memfd_regions(regions, false),
        (HugePages::None, MemoryBacking::Anonymous) => create_anonymous_regions(regions),
        (HugePages::Transparent, MemoryBacking::Anonymous) => {
            let mem = create_anonymous_regions(regions)?;
            advise_huge_pages(&mem);
            Ok(mem)
        }
    }
}

/// Asks for transparent huge pages on every region (best effort: a kernel
/// with THP off just keeps 4 KiB pages).
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        // SAFETY: the range is a live mapping owned by `mem`; the advice
        // changes no contents.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            log::warn!(
                "madvise(MADV_HUGEPAGE) on guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `MFD_HUGE_2MB`: log2(2 MiB) in the flag's size bits (`libc` may lack it).
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;

/// Guest memory in one memfd mapped MAP_SHARED, each region its own slice.
/// With `hugetlb`, the memfd is of 2 MiB hugetlbfs pages, all reserved by
/// the mapping: a host without enough free ones fails here, with the
/// number to set, instead of the guest taking SIGBUS later.
fn create_memfd_regions(
    regions: &[(vm_memory::GuestAddress, usize)],
    hugetlb: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    use std::os::fd::FromRawFd;
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let size: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let mem_size_mib = (size >> 20) as usize;
    let err = |e: String| MemoryError::Create {
        mib: mem_size_mib,
        err: e,
    };
    const HUGE: usize = 2 << 20;
    if hugetlb
        && regions
            .iter()
            .any(|r| !(r.0 .0 as usize).is_multiple_of(HUGE) || !r.1.is_multiple_of(HUGE))
    {
        return Err(err("2M huge pages need regions aligned to 2 MiB".into()));
    }
    let name = std::ffi::CString::new(GUEST_MEMORY_VMA_NAME).expect("no NUL in name");
    let flags = if hugetlb {
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | MFD_HUGE_2MB
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: the name is a valid NUL-terminated string that outlives the
    // call; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
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
    // Hugetlbfs pages are reserved at mmap time unless MAP_NORESERVE.
    let map_flags = if hugetlb {
        libc::MAP_SHARED
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    let mut offset = 0u64;
    let mut out = Vec::new();
    for &(addr, len) in regions {
        let mmap = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(map_flags)
            .build()
            .map_err(|e| {
                if hugetlb {
                    err(format!(
                        "{e}: too few free 2 MiB huge pages ({} needed; see HugePages_Free in \
                         /proc/meminfo and set vm.nr_hugepages)",
                        size / HUGE as u64
                    ))
                } else {
                    err(e.to_string())
                }
            })?;
        out.push(
            GuestRegionMmap::new(mmap, addr)
                .ok_or_else(|| err("region wraps the address space".into()))?,
        );
        offset += len as u64;
    }
    let mem = GuestMemoryMmap::from_regions(out).map_err(|e| err(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const LAYOUT: [(GuestAddress, usize); 2] =
        [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)];

    /// The `/proc/self/smaps` entry of the mapping holding `addr`: its
    /// header line and its KernelPageSize in KiB.
    fn smaps_of(addr: u64) -> (String, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let range = l.split(' ').next().unwrap_or("");
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            if a <= addr && addr < b {
                let page = lines
                    .by_ref()
                    .find(|l| l.starts_with("KernelPageSize:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                    .unwrap();
                return (l.to_string(), page);
            }
        }
        panic!("no mapping at {addr:#x}")
    }

    fn free_huge_pages() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn each_backing_is_what_it_says_and_holds_what_is_written() {
        for (pages, backing, memfd) in [
            (HugePages::None, MemoryBacking::Anonymous, false),
            (HugePages::Transparent, MemoryBacking::Anonymous, false),
            (HugePages::None, MemoryBacking::Memfd, true),
        ] {
            let mem = create_regions(&LAYOUT, pages, backing).unwrap();
            for r in mem.iter() {
                let (line, page_kib) = smaps_of(r.as_ptr() as u64);
                assert_eq!(
                    line.contains("memfd:"),
                    memfd,
                    "{pages:?} {backing:?}: {line}"
                );
                assert_eq!(page_kib, 4, "{line}");
            }
            mem.write_obj(0xfeed_u64, GuestAddress((1 << 32) + 8))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress((1 << 32) + 8)).unwrap(),
                0xfeed
            );
        }
    }

    /// 2 MiB pages: on a host with enough free, the memory is made of them;
    /// on one without, the VM is refused at once with what to set.
    #[test]
    fn huge_pages_are_reserved_up_front_or_refused_with_the_fix() {
        let needed = 3;
        let r = create_regions(&LAYOUT, HugePages::Hugetlbfs2M, MemoryBacking::Anonymous);
        if free_huge_pages() >= needed {
            let mem = r.unwrap();
            for r in mem.iter() {
                let (line, page_kib) = smaps_of(r.as_ptr() as u64);
                assert_eq!(page_kib, 2048, "{line}");
            }
            mem.write_obj(7u8, GuestAddress(3 << 20)).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(3 << 20)).unwrap(), 7);
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("vm.nr_hugepages"), "{e}");
        }
        // Regions that 2 MiB pages cannot tile are refused either way.
        let odd = [(GuestAddress(0), 3 << 20)];
        let e = create_regions(&odd, HugePages::Hugetlbfs2M, MemoryBacking::Memfd).unwrap_err();
        assert!(e.to_string().contains("aligned to 2 MiB"), "{e}");
    }
}
