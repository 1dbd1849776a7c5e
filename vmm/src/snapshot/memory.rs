//! Guest memory in a snapshot: written region by region to the memory file,
//! and mapped back privately (copy-on-write) from it, so restore is lazy and
//! every clone of one snapshot shares the file's pages in the page cache.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, WriteVolatile,
};

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
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
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
        let mmap = MmapRegionBuilder::new(r.size as usize)
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

pub(crate) fn check_layout(state: &GuestMemoryState) -> Result<(), MemoryFileError> {
    if state.regions.is_empty() {
        return Err(MemoryFileError::Layout("no memory regions".into()));
    }
    let mut offset = 0;
    for r in &state.regions {
        if r.size == 0 || r.size % 4096 != 0 || r.base_address % 4096 != 0 {
            return Err(MemoryFileError::Layout(format!(
                "region {r:?} is not page-aligned"
            )));
        }
        if r.file_offset != offset {
            return Err(MemoryFileError::Layout(format!(
                "region {r:?} does not follow the previous one in the file"
            )));
        }
        offset += r.size;
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
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
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
}
