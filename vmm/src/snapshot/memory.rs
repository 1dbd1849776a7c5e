//! Guest memory in a snapshot: written region by region to the memory file,
//! and mapped back privately (copy-on-write) from it, so restore is lazy and
//! every clone of one snapshot shares the file's pages in the page cache.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, WriteVolatile,
};

use crate::vstate::memory::GuestMemoryMmap;

/// The page size of dirty bitmaps (KVM's dirty log and vm-memory's) and of
/// Diff memory files.
pub const PAGE_SIZE: u64 = 4096;

/// Where each guest memory region lives in the memory file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryRegionState {
    pub base_address: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestMemoryState {
    pub regions: Vec<MemoryRegionState>,
}

impl GuestMemoryState {
    /// The sum of the regions' sizes (saturating: a layout that passes
    /// `check_layout` is far below the limit).
    pub fn total_size(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.size))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write memory file {path}: {err}")]
    Write { path: String, err: String },
    #[error("cannot open memory file {path}: {err}")]
    Open { path: String, err: String },
    #[error("memory file {path} is {found} bytes; the snapshot needs {expected}")]
    Size {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("snapshot memory layout is invalid: {0}")]
    Layout(String),
    #[error("cannot map memory file {path}: {err}")]
    Map { path: String, err: String },
}

/// The layout of `mem` as it is written by [`dump`].
pub fn describe(mem: &GuestMemoryMmap) -> GuestMemoryState {
    let mut offset = 0;
    let regions = mem
        .iter()
        .map(|r| {
            let s = MemoryRegionState {
                base_address: r.start_addr().raw_value(),
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            s
        })
        .collect();
    GuestMemoryState { regions }
}

/// Writes all guest memory to `path` (through a temporary name).
pub fn dump(mem: &GuestMemoryMmap, path: &Path) -> Result<GuestMemoryState, MemoryFileError> {
    let err = |e: String| MemoryFileError::Write {
        path: path.display().to_string(),
        err: e,
    };
    let tmp = super::format::temp_path(path);
    let r = (|| -> Result<(), String> {
        let mut f = File::create(&tmp).map_err(|e| e.to_string())?;
        for region in mem.iter() {
            let slice = region
                .get_slice(vm_memory::MemoryRegionAddress(0), region.len() as usize)
                .map_err(|e| e.to_string())?;
            f.write_all_volatile(&slice).map_err(|e| e.to_string())?;
        }
        f.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(describe(mem))
}

/// Guest memory laid out as `state` says in a memfd (shared: vhost-user
/// backends map it; of 2 MiB hugetlbfs pages with `hugetlb`), filled with
/// a copy of `path`.
pub fn load_copy(
    path: &Path,
    state: &GuestMemoryState,
    hugetlb: bool,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    use crate::vmm_config::machine_config::{HugePages, MemoryBacking};
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let p = path.display().to_string();
    let map_err = |e: String| MemoryFileError::Map {
        path: p.clone(),
        err: e,
    };
    check_layout(state)?;
    let file = File::open(path).map_err(|e| MemoryFileError::Open {
        path: p.clone(),
        err: e.to_string(),
    })?;
    let found = file.metadata().map_err(|e| map_err(e.to_string()))?.len();
    if found != state.total_size() {
        return Err(MemoryFileError::Size {
            path: p,
            found,
            expected: state.total_size(),
        });
    }
    let layout: Vec<_> = state
        .regions
        .iter()
        .map(|r| (GuestAddress(r.base_address), r.size as usize))
        .collect();
    let pages = if hugetlb {
        HugePages::Hugetlbfs2M
    } else {
        HugePages::None
    };
    let mem = crate::vstate::memory::create_regions(&layout, pages, MemoryBacking::Memfd)
        .map_err(|e| map_err(e.to_string()))?;
    for (region, r) in mem.iter().zip(&state.regions) {
        // SAFETY: the region is a live mapping of exactly `r.size` bytes
        // owned by `mem`; no vCPU or device uses it yet.
        let dst = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
        file.read_exact_at(dst, r.file_offset)
            .map_err(|e| map_err(e.to_string()))?;
    }
    Ok(mem)
}

/// Maps `path` privately as guest memory laid out as `state` says, after
/// checking that the file has exactly the size the snapshot needs.
pub fn map_file(path: &Path, state: &GuestMemoryState) -> Result<GuestMemoryMmap, MemoryFileError> {
    let p = path.display().to_string();
    check_layout(state)?;
    let file = File::open(path).map_err(|e| MemoryFileError::Open {
        path: p.clone(),
        err: e.to_string(),
    })?;
    let found = file
        .metadata()
        .map_err(|e| MemoryFileError::Open {
            path: p.clone(),
            err: e.to_string(),
        })?
        .len();
    if found != state.total_size() {
        return Err(MemoryFileError::Size {
            path: p,
            found,
            expected: state.total_size(),
        });
    }
    let mut regions = Vec::new();
    for r in &state.regions {
        let map_err = |e: String| MemoryFileError::Map {
            path: p.clone(),
            err: e,
        };
        let f = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        // With a dirty bitmap, so Diff snapshots of a restored VM also see
        // the VMM's own writes (the builder's default is an empty bitmap).
        let bitmap = AtomicBitmap::with_len(r.size as usize);
        let mmap = MmapRegionBuilder::new_with_bitmap(r.size as usize, bitmap)
            .with_file_offset(FileOffset::new(f, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mmap, GuestAddress(r.base_address))
                .ok_or_else(|| map_err("region wraps the address space".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Layout(e.to_string()))
}

/// Takes the pages of each region of `mem` written since the last call:
/// `kvm_logs[i]` (KVM's dirty log of slot `i`, guest CPU writes) OR'd with
/// the region's vm-memory bitmap (writes the VMM made: virtio DMA, used
/// rings), which this resets. One bitmap per region, bit `n` for page `n`
/// of the region, in KVM's layout (64 pages a word, low bit first).
pub fn take_dirty_pages(mem: &GuestMemoryMmap, kvm_logs: &[Vec<u64>]) -> Vec<Vec<u64>> {
    mem.iter()
        .enumerate()
        .map(|(i, region)| {
            let mmap: &MmapRegion<AtomicBitmap> = region;
            let mut bits = mmap.bitmap().get_and_reset();
            let words = (region.len().div_ceil(PAGE_SIZE) as usize).div_ceil(64);
            bits.resize(words, 0);
            if let Some(log) = kvm_logs.get(i) {
                for (b, k) in bits.iter_mut().zip(log) {
                    *b |= k;
                }
            }
            bits
        })
        .collect()
}

/// How many pages the VMM wrote through `mem` since the vm-memory bitmaps
/// were last reset (without resetting them).
pub fn count_written(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|region| {
            let mmap: &MmapRegion<AtomicBitmap> = region;
            let pages = region.len().div_ceil(PAGE_SIZE) as usize;
            (0..pages).filter(|&p| mmap.bitmap().is_bit_set(p)).count() as u64
        })
        .sum()
}

/// Marks `dirty` (as [`take_dirty_pages`] returned it) dirty again in the
/// vm-memory bitmaps: for a snapshot that failed after taking the pages,
/// so the next Diff still includes them.
pub fn mark_dirty(mem: &GuestMemoryMmap, dirty: &[Vec<u64>]) {
    for (region, bits) in mem.iter().zip(dirty) {
        let mmap: &MmapRegion<AtomicBitmap> = region;
        for (first, count) in dirty_runs(bits, usize::MAX) {
            for page in first..first + count {
                mmap.bitmap().set_bit(page);
            }
        }
    }
}

/// The runs of set bits in `bits` below `pages`: (first page, page count).
pub fn dirty_runs(bits: &[u64], pages: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (w, word) in bits.iter().enumerate() {
        let mut word = *word;
        while word != 0 {
            let page = w * 64 + word.trailing_zeros() as usize;
            word &= word - 1;
            if page >= pages {
                return runs;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

/// Writes the pages `dirty` marks (one bitmap per region of `mem`, as
/// [`take_dirty_pages`] returns) at their offsets in the memory file layout
/// to a new file of the full memory size (through a temporary name), with
/// holes everywhere else: a Diff memory file, for [`merge_diff`]. Fails if
/// the file system would not report every clean page as a hole.
pub fn dump_dirty(
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
    path: &Path,
) -> Result<GuestMemoryState, MemoryFileError> {
    let state = describe(mem);
    if dirty.len() != state.regions.len() {
        return Err(MemoryFileError::Layout(format!(
            "{} dirty bitmaps for {} memory regions",
            dirty.len(),
            state.regions.len()
        )));
    }
    let tmp = super::format::temp_path(path);
    let r = (|| -> Result<(), String> {
        let mut f = File::create(&tmp).map_err(|e| e.to_string())?;
        f.set_len(state.total_size()).map_err(|e| e.to_string())?;
        let mut written = Vec::new();
        for ((region, rs), bits) in mem.iter().zip(&state.regions).zip(dirty) {
            let pages = rs.size.div_ceil(PAGE_SIZE) as usize;
            for (first, count) in dirty_runs(bits, pages) {
                let offset = first as u64 * PAGE_SIZE;
                let len = (count as u64 * PAGE_SIZE).min(rs.size - offset);
                let slice = region
                    .get_slice(MemoryRegionAddress(offset), len as usize)
                    .map_err(|e| e.to_string())?;
                f.seek(SeekFrom::Start(rs.file_offset + offset))
                    .map_err(|e| e.to_string())?;
                f.write_all_volatile(&slice).map_err(|e| e.to_string())?;
                written.push((rs.file_offset + offset, rs.file_offset + offset + len));
            }
        }
        f.sync_all().map_err(|e| e.to_string())?;
        // Merging copies every data extent: one spanning a clean page (a
        // file system with blocks larger than a page, or no hole support)
        // would overwrite the base with zeros there.
        for (start, end) in data_extents(&f, state.total_size()).map_err(|e| e.to_string())? {
            if !covered(&written, start, end) {
                return Err(format!(
                    "the file system reports data at {start:#x}..{end:#x} where no page was \
                     written; Diff memory files need one that keeps page-sized holes \
                     (ext4, xfs, btrfs, tmpfs)"
                ));
            }
        }
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(MemoryFileError::Write {
            path: path.display().to_string(),
            err: e,
        });
    }
    Ok(state)
}

/// Whether the sorted, disjoint ranges `runs` cover `start..end` entirely.
fn covered(runs: &[(u64, u64)], start: u64, end: u64) -> bool {
    let mut at = start;
    for (s, e) in runs {
        if *s <= at && at < *e {
            at = *e;
        }
        if at >= end {
            return true;
        }
    }
    at >= end
}

/// The data extents of `f` (of `size` bytes) as the file system reports
/// them with SEEK_DATA / SEEK_HOLE: (start, end) pairs in order.
fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a file descriptor `f` owns; no memory is passed.
        let r = unsafe { libc::lseek(fd, offset, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

/// Merges a Diff memory file onto the memory file of the snapshot it was
/// taken after (or onto an earlier merge): copies every data extent of
/// `diff` to the same offset in `base`, in place. Both must be the same size.
pub fn merge_diff(base: &Path, diff: &Path) -> Result<(), MemoryFileError> {
    let open_err = |p: &Path, e: std::io::Error| MemoryFileError::Open {
        path: p.display().to_string(),
        err: e.to_string(),
    };
    let write_err = |e: std::io::Error| MemoryFileError::Write {
        path: base.display().to_string(),
        err: e.to_string(),
    };
    let base_f = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(|e| open_err(base, e))?;
    let diff_f = File::open(diff).map_err(|e| open_err(diff, e))?;
    let base_len = base_f.metadata().map_err(|e| open_err(base, e))?.len();
    let diff_len = diff_f.metadata().map_err(|e| open_err(diff, e))?.len();
    if base_len != diff_len {
        return Err(MemoryFileError::Size {
            path: diff.display().to_string(),
            found: diff_len,
            expected: base_len,
        });
    }
    let extents = data_extents(&diff_f, diff_len).map_err(|e| open_err(diff, e))?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in extents {
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            diff_f
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| open_err(diff, e))?;
            base_f.write_all_at(&buf[..n], at).map_err(write_err)?;
            at += n as u64;
        }
    }
    base_f.sync_all().map_err(write_err)
}

/// Most memory regions a layout may have (the x86_64 layout has at most
/// two: below and above the 32-bit hole).
const MAX_REGIONS: usize = 16;

/// Checks a layout that came from a file or a peer before anything is
/// allocated or mapped for it: page-aligned regions, back to back in the
/// file, at most [`MAX_REGIONS`] of them, disjoint and ascending in the
/// guest's address space without wrapping it, and no more memory in all
/// than a microVM may have.
pub(crate) fn check_layout(state: &GuestMemoryState) -> Result<(), MemoryFileError> {
    let bad = |why: String| Err(MemoryFileError::Layout(why));
    if state.regions.is_empty() {
        return bad("no memory regions".into());
    }
    if state.regions.len() > MAX_REGIONS {
        return bad(format!(
            "{} memory regions (at most {MAX_REGIONS})",
            state.regions.len()
        ));
    }
    let max_total = (crate::vmm_config::machine_config::MAX_MEM_SIZE_MIB as u64) << 20;
    let mut offset = 0u64;
    let mut next_free = 0u64;
    for r in &state.regions {
        if r.size == 0 || r.size % PAGE_SIZE != 0 || r.base_address % PAGE_SIZE != 0 {
            return bad(format!("region {r:?} is not page-aligned"));
        }
        if r.file_offset != offset {
            return bad(format!(
                "region {r:?} does not follow the previous one in the file"
            ));
        }
        if r.base_address < next_free {
            return bad(format!(
                "region {r:?} overlaps or precedes the previous one"
            ));
        }
        let Some(end) = r.base_address.checked_add(r.size) else {
            return bad(format!("region {r:?} wraps the address space"));
        };
        next_free = end;
        offset = match offset.checked_add(r.size) {
            Some(o) if o <= max_total => o,
            _ => {
                return bad(format!(
                    "more guest memory than a microVM may have ({max_total} bytes)"
                ))
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn dump_then_map_private_and_size_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 128 << 10),
        ])
        .unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x100)).unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress((1 << 20) + 8))
            .unwrap();
        let state = dump(&mem, &path).unwrap();
        assert_eq!(state.total_size(), 192 << 10);
        assert_eq!(state.regions[1].file_offset, 64 << 10);

        let restored = map_file(&path, &state).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x100)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored
                .read_obj::<u32>(GuestAddress((1 << 20) + 8))
                .unwrap(),
            0x1234_5678
        );
        // Private mapping: writes stay in this process, the file is unchanged.
        restored.write_obj(1u32, GuestAddress(0x100)).unwrap();
        let again = map_file(&path, &state).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x100)).unwrap(),
            0xdead_beef
        );

        // A memory file of the wrong size is refused, naming both sizes.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(100 << 10).unwrap();
        let e = map_file(&path, &state).unwrap_err().to_string();
        assert!(e.contains("102400") && e.contains("196608"), "{e}");

        let mut bad = state.clone();
        bad.regions[1].file_offset = 0;
        assert!(matches!(
            map_file(&path, &bad),
            Err(MemoryFileError::Layout(_))
        ));
    }

    /// Layouts a peer or a file could send that must be refused before
    /// anything is allocated: overlapping, wrapping, descending, too many
    /// regions, or more memory than a microVM may have.
    #[test]
    fn hostile_layouts_are_refused() {
        let r = |base: u64, size: u64, file_offset: u64| MemoryRegionState {
            base_address: base,
            size,
            file_offset,
        };
        let ok = GuestMemoryState {
            regions: vec![r(0, 1 << 20, 0), r(4 << 30, 1 << 20, 1 << 20)],
        };
        check_layout(&ok).unwrap();
        let cases = [
            (
                "overlap",
                vec![r(0, 2 << 20, 0), r(1 << 20, 1 << 20, 2 << 20)],
            ),
            (
                "descending",
                vec![r(4 << 30, 1 << 20, 0), r(0, 1 << 20, 1 << 20)],
            ),
            ("wraps", vec![r(u64::MAX - 4095, 8192, 0)]),
            ("too large", vec![r(0, 65 << 30, 0)]),
            (
                "too large in sum",
                vec![r(0, 40 << 30, 0), r(40 << 30, 40 << 30, 40 << 30)],
            ),
            (
                "offsets overflow",
                vec![
                    r(0, 1 << 62, 0),
                    r(1 << 62, 1 << 62, 1 << 62),
                    r(2 << 62, 1 << 62, 2 << 62),
                    r(3 << 62, (1 << 62) - 4096, 3 << 62),
                ],
            ),
            (
                "too many",
                (0..17).map(|i| r(i << 20, 1 << 20, i << 20)).collect(),
            ),
            ("unaligned", vec![r(0, 1000, 0)]),
            ("empty", vec![]),
        ];
        for (what, regions) in cases {
            let state = GuestMemoryState { regions };
            assert!(
                matches!(check_layout(&state), Err(MemoryFileError::Layout(_))),
                "{what}: {state:?}"
            );
        }
    }

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 512 << 10),
        ])
        .unwrap()
    }

    fn bit(page: usize) -> (usize, u64) {
        (page / 64, 1 << (page % 64))
    }

    #[test]
    fn dirty_pages_combine_kvm_log_and_vmm_writes() {
        let mem = two_regions();
        // Pages the VMM writes: page 3 of region 0; pages 0 and 1 of
        // region 1 (one write across the boundary).
        mem.write_obj(1u32, GuestAddress(3 * 4096 + 8)).unwrap();
        mem.write_obj(1u64, GuestAddress((1 << 20) + 4096 - 4))
            .unwrap();
        // Pages the guest wrote, per KVM: page 5 of region 0, page 70 of
        // region 1 (second word).
        let mut kvm = vec![vec![0u64; 1], vec![0u64; 2]];
        kvm[0][0] |= 1 << 5;
        kvm[1][1] |= 1 << 6;
        let dirty = take_dirty_pages(&mem, &kvm);
        assert_eq!(dirty[0], vec![(1 << 3) | (1 << 5)]);
        assert_eq!(dirty[1], vec![0b11, 1 << 6]);
        assert_eq!(dirty_runs(&dirty[1], 128), vec![(0, 2), (70, 1)]);

        // Taking resets the VMM's bitmap.
        let none = vec![vec![], vec![]];
        assert_eq!(take_dirty_pages(&mem, &none), vec![vec![0], vec![0, 0]]);

        // A failed snapshot puts the pages back for the next one.
        mark_dirty(&mem, &dirty);
        assert_eq!(take_dirty_pages(&mem, &none), dirty);
    }

    #[test]
    fn dirty_runs_coalesce_and_stop_at_the_region_end() {
        let mut bits = vec![0u64; 3];
        for p in [0, 1, 2, 63, 64, 65, 100, 130, 131] {
            let (w, b) = bit(p);
            bits[w] |= b;
        }
        assert_eq!(
            dirty_runs(&bits, 131),
            vec![(0, 3), (63, 3), (100, 1), (130, 1)]
        );
        assert_eq!(dirty_runs(&[0, 0], 128), vec![]);
        assert_eq!(dirty_runs(&[u64::MAX], 64), vec![(0, 64)]);
    }

    #[test]
    fn file_mapped_memory_tracks_vmm_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let state = dump(&two_regions(), &path).unwrap();
        let mem = map_file(&path, &state).unwrap();
        mem.write_obj(7u8, GuestAddress((1 << 20) + 9 * 4096))
            .unwrap();
        let dirty = take_dirty_pages(&mem, &[]);
        assert_eq!(dirty[0], vec![0]);
        assert_eq!(dirty[1], vec![1 << 9, 0]);
    }

    /// Fills every page with a byte of its own, so misplaced pages show.
    fn fill(mem: &GuestMemoryMmap, salt: u8) {
        for region in mem.iter() {
            for page in 0..region.len() / 4096 {
                let addr = region.start_addr().unchecked_add(page * 4096);
                mem.write_slice(&[page as u8 ^ salt; 4096], addr).unwrap();
            }
        }
    }

    #[test]
    fn diff_file_holds_only_dirty_pages_and_merges_onto_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff, full) = (
            dir.path().join("base"),
            dir.path().join("diff"),
            dir.path().join("full"),
        );
        let mem = two_regions();
        fill(&mem, 0x5a);
        dump(&mem, &base).unwrap();
        take_dirty_pages(&mem, &[]);

        // Change a few pages, some by "the guest" (KVM log only: the
        // bitmap does not see writes into the mapping behind its back).
        mem.write_obj(0x11u8, GuestAddress(2 * 4096)).unwrap();
        mem.write_slice(&[0x22; 3 * 4096], GuestAddress((1 << 20) + 63 * 4096))
            .unwrap();
        let region1 = mem.iter().nth(1).unwrap();
        let guest_write = region1
            .get_host_address(MemoryRegionAddress(100 * 4096))
            .unwrap();
        // SAFETY: a byte inside region 1's live mapping, written as the
        // guest would (bypassing vm-memory and its bitmap).
        unsafe { *guest_write = 0x33 };
        let mut kvm = vec![vec![0u64; 1], vec![0u64; 2]];
        kvm[1][1] |= 1 << (100 - 64);
        let dirty = take_dirty_pages(&mem, &kvm);

        let state = dump_dirty(&mem, &dirty, &diff).unwrap();
        assert_eq!(state, describe(&mem));
        let diff_bytes = std::fs::read(&diff).unwrap();
        assert_eq!(diff_bytes.len() as u64, state.total_size());
        let r1 = 64 << 10;
        let dirty_pages = [
            2,
            r1 / 4096 + 63,
            r1 / 4096 + 64,
            r1 / 4096 + 65,
            r1 / 4096 + 100,
        ];
        let full_bytes = {
            dump(&mem, &full).unwrap();
            std::fs::read(&full).unwrap()
        };
        for (page, (d, f)) in diff_bytes
            .chunks(4096)
            .zip(full_bytes.chunks(4096))
            .enumerate()
        {
            if dirty_pages.contains(&page) {
                assert_eq!(d, f, "dirty page {page}");
            } else {
                assert!(d.iter().all(|b| *b == 0), "clean page {page} is not zero");
            }
        }
        // Only dirty pages are data (dump_dirty refuses a file system that
        // does not report page-sized holes).
        let f = File::open(&diff).unwrap();
        let pages: Vec<u64> = data_extents(&f, state.total_size())
            .unwrap()
            .iter()
            .flat_map(|(s, e)| (*s / 4096)..(*e / 4096))
            .collect();
        assert_eq!(pages, dirty_pages.map(|p| p as u64));

        merge_diff(&base, &diff).unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), full_bytes);

        // Files of different sizes are refused, and the base is untouched.
        let short = dir.path().join("short");
        std::fs::write(&short, [1u8; 4096]).unwrap();
        let e = merge_diff(&base, &short).unwrap_err();
        assert!(matches!(e, MemoryFileError::Size { .. }), "{e}");
        assert_eq!(std::fs::read(&base).unwrap(), full_bytes);
        assert!(matches!(
            merge_diff(&base, &dir.path().join("missing")),
            Err(MemoryFileError::Open { .. })
        ));
    }

    #[test]
    fn covered_ranges() {
        let runs = [(0, 10), (10, 20), (30, 40)];
        assert!(covered(&runs, 0, 20));
        assert!(covered(&runs, 5, 15));
        assert!(covered(&runs, 30, 40));
        assert!(!covered(&runs, 15, 25));
        assert!(!covered(&runs, 20, 30));
        assert!(!covered(&[], 0, 1));
    }
}
