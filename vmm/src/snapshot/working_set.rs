//! A snapshot's working set: the pages of its memory file that a clone
//! touched up to its first answer. Recorded once (a recording load serves
//! each page's first touch itself, through a userfaultfd, and notes it) and
//! stored beside the snapshot in the snapshot file format (versioned,
//! checksummed); later loads read those pages in before the guest runs, so
//! its first answer does not wait on one host fault per page (REAP's idea).
//!
//! Pages are named by their index in the memory file, whose regions follow
//! each other from offset 0 (`memory::check_layout`), so a set does not
//! depend on where a VMM maps guest memory.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{dirty_runs, GuestMemoryState, PAGE_SIZE};
use super::uffd::{self, sys, Filled, UffdError};
use crate::vstate::memory::GuestMemoryMmap;

/// The payload's `kind`, so neither file is taken for the other.
const KIND: &str = "ember-working-set";

/// The saved working set of one memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    kind: String,
    /// The memory file's size: a set is only ever applied to the snapshot
    /// it was recorded from (or one of the same size, which is harmless).
    pub memory_bytes: u64,
    /// Runs of pages of the memory file, `(first, count)`: ascending,
    /// disjoint, not empty, inside the file.
    pub runs: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error(transparent)]
    Format(#[from] super::format::FormatError),
    #[error("{path} is not a working set of this snapshot: {why}")]
    Mismatch { path: String, why: String },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("cannot map memory file {path}: {err}")]
    MapFile { path: String, err: String },
    #[error("cannot start the working-set recorder: {0}")]
    Thread(io::Error),
}

impl WorkingSet {
    /// The set of the pages marked in `bits` (one bitmap per region of
    /// `state`, 64 pages a word, low bit first).
    pub fn from_bitmaps(state: &GuestMemoryState, bits: &[Vec<u64>]) -> WorkingSet {
        let mut runs = Vec::new();
        for (r, b) in state.regions.iter().zip(bits) {
            let first_page = r.file_offset / PAGE_SIZE;
            for (first, count) in dirty_runs(b, (r.size / PAGE_SIZE) as usize) {
                let first = first_page + first as u64;
                match runs.last_mut() {
                    Some((f, c)) if *f + *c == first => *c += count as u64,
                    _ => runs.push((first, count as u64)),
                }
            }
        }
        WorkingSet {
            kind: KIND.into(),
            memory_bytes: state.total_size(),
            runs,
        }
    }

    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// A set of the given runs of a memory file of `memory_bytes`, checked
    /// as a saved one is when read.
    pub fn from_runs(memory_bytes: u64, runs: Vec<(u64, u64)>) -> Result<WorkingSet, String> {
        let ws = WorkingSet {
            kind: KIND.into(),
            memory_bytes,
            runs,
        };
        ws.check(memory_bytes)?;
        Ok(ws)
    }

    /// Runs ascending, disjoint, not empty, inside the memory file.
    fn check(&self, memory_bytes: u64) -> Result<(), String> {
        if self.kind != KIND {
            return Err(format!("kind {:?}", self.kind));
        }
        if self.memory_bytes != memory_bytes {
            return Err(format!(
                "recorded for {} bytes of memory, the snapshot has {memory_bytes}",
                self.memory_bytes
            ));
        }
        let pages = memory_bytes / PAGE_SIZE;
        let mut next = 0u64;
        for &(first, count) in &self.runs {
            if count == 0 || first < next || first.checked_add(count).is_none_or(|e| e > pages) {
                return Err(format!(
                    "run ({first}, {count}) is empty, out of order or past page {pages}"
                ));
            }
            next = first + count;
        }
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<(), WorkingSetError> {
        Ok(super::format::write(path, self)?)
    }

    /// Reads a set saved by [`WorkingSet::write`] and checks it against
    /// the size of the memory file being loaded.
    pub fn read(path: &Path, memory_bytes: u64) -> Result<WorkingSet, WorkingSetError> {
        let ws: WorkingSet = super::format::read(path)?;
        ws.check(memory_bytes)
            .map_err(|why| WorkingSetError::Mismatch {
                path: path.display().to_string(),
                why,
            })?;
        Ok(ws)
    }

    /// Each run cut to a region that starts at `file_offset` in the memory
    /// file, is `size` bytes long and is mapped at `host`: host address and
    /// length of each piece.
    pub fn pieces_in(&self, file_offset: u64, size: u64, host: u64) -> Vec<(u64, u64)> {
        let end = file_offset.saturating_add(size);
        self.runs
            .iter()
            .filter_map(|&(first, count)| {
                let s = (first * PAGE_SIZE).max(file_offset);
                let e = ((first + count) * PAGE_SIZE).min(end);
                (s < e).then(|| (host + (s - file_offset), e - s))
            })
            .collect()
    }

    /// Each run cut to the regions of `mem` (laid out as `state`): host
    /// address and length.
    fn host_ranges(&self, mem: &GuestMemoryMmap, state: &GuestMemoryState) -> Vec<(u64, u64)> {
        mem.iter()
            .zip(&state.regions)
            .flat_map(|(region, r)| self.pieces_in(r.file_offset, r.size, region.as_ptr() as u64))
            .collect()
    }
}

/// What a prefetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prefetched {
    pub pages: u64,
    pub ms: f64,
}

/// `MADV_POPULATE_READ` (Linux 5.14; `libc` may lack it).
const MADV_POPULATE_READ: libc::c_int = 22;

/// Reads the pages of `ws` into `mem`, a private mapping of the memory file
/// laid out as `state`: each becomes present without a fault. Kernels
/// without `MADV_POPULATE_READ` get one read per page instead.
pub fn prefetch(mem: &GuestMemoryMmap, state: &GuestMemoryState, ws: &WorkingSet) -> Prefetched {
    let start = Instant::now();
    for (addr, len) in ws.host_ranges(mem, state) {
        // SAFETY: the range lies inside a guest memory mapping of ours; the
        // advice only reads the pages in, changing no content.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_POPULATE_READ) };
        if rc != 0 {
            let mut a = addr;
            while a < addr + len {
                // SAFETY: `a` is inside the same readable mapping.
                unsafe { std::ptr::read_volatile(a as *const u8) };
                a += PAGE_SIZE;
            }
        }
    }
    Prefetched {
        pages: ws.pages(),
        ms: start.elapsed().as_secs_f64() * 1e3,
    }
}

/// A recording load's guest memory: anonymous, registered with a
/// userfaultfd whose faults a thread of its own serves from a private
/// mapping of the memory file, noting each page. It serves for the VM's
/// whole life; [`Recorder::working_set`] can be taken at any time.
pub struct Recorder {
    /// Held open while the recorder lives even if its thread died: closing
    /// it would unregister the memory, and pages not served yet would read
    /// as zeroes instead of blocking.
    _uffd: Arc<OwnedFd>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    state: GuestMemoryState,
    /// (host address, pages) of each region.
    regions: Vec<(u64, usize)>,
    /// The memory file, mapped read-only: where page copies come from.
    src: MmapRegion<()>,
    touched: Mutex<Vec<Vec<u64>>>,
    pages: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn by_host(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, &(h, n))| {
            (addr >= h && addr < h + (n as u64) * PAGE_SIZE)
                .then(|| (i, ((addr - h) / PAGE_SIZE) as usize))
        })
    }
}

impl Recorder {
    /// Guest memory laid out as `state` for the memory file at `path`
    /// (already checked to have the size `state` needs), and its recorder.
    pub fn start(
        path: &Path,
        state: &GuestMemoryState,
    ) -> Result<(GuestMemoryMmap, Recorder), WorkingSetError> {
        let p = path.display().to_string();
        let map_err = |e: String| WorkingSetError::MapFile {
            path: p.clone(),
            err: e,
        };
        let file = std::fs::File::open(path).map_err(|e| map_err(e.to_string()))?;
        let len = file.metadata().map_err(|e| map_err(e.to_string()))?.len();
        if len != state.total_size() {
            return Err(map_err(format!(
                "{len} bytes, the snapshot needs {}",
                state.total_size()
            )));
        }
        let src = MmapRegion::<()>::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let mem = uffd::anonymous_memory(state)?;
        let uffd = Arc::new(uffd::register_memory(&mem)?);
        let regions: Vec<_> = mem
            .iter()
            .map(|r| (r.as_ptr() as u64, (r.len() / PAGE_SIZE) as usize))
            .collect();
        let shared = Arc::new(Shared {
            touched: Mutex::new(regions.iter().map(|r| vec![0; r.1.div_ceil(64)]).collect()),
            state: state.clone(),
            regions,
            src,
            pages: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let (u, s) = (uffd.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("ember-wset-rec".into())
            .spawn(move || {
                if let Err(e) = serve(&u, &s) {
                    log::error!("working-set recorder stopped: {e}");
                    *s.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            })
            .map_err(WorkingSetError::Thread)?;
        Ok((
            mem,
            Recorder {
                _uffd: uffd,
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Pages touched so far.
    pub fn pages(&self) -> u64 {
        self.shared.pages.load(Ordering::Relaxed)
    }

    /// The pages touched so far, as a set to save.
    pub fn working_set(&self) -> Result<WorkingSet, String> {
        if let Some(e) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(e);
        }
        let bits = self
            .shared
            .touched
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(WorkingSet::from_bitmaps(&self.shared.state, &bits))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Closing the userfaultfd (the last Arc, with this) unregisters
        // what is left: the VM must be gone by now.
    }
}

/// The recorder's thread: copies each faulting page from the memory file
/// (zeroes where the guest discarded pages) and notes it, until stopped.
fn serve(uffd: &OwnedFd, s: &Shared) -> Result<(), String> {
    // Faults the kernel asked to retry (EAGAIN while the mappings change),
    // and ranges the guest discarded (balloon): those read as zeroes.
    let mut retry: Vec<(u64, bool)> = Vec::new();
    let mut removed: Vec<(u64, u64)> = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        let timeout = if retry.is_empty() { 50 } else { 1 };
        let mut faults = std::mem::take(&mut retry);
        uffd::wait_events(uffd, timeout, |e| match e.kind {
            sys::UFFD_EVENT_PAGEFAULT => {
                let page = e.args[1] & !(PAGE_SIZE - 1);
                let zero = removed.iter().any(|&(a, b)| a <= page && page < b);
                faults.push((page, zero));
            }
            sys::UFFD_EVENT_REMOVE => removed.push((e.args[0], e.args[1])),
            _ => {}
        })
        .map_err(|e| e.to_string())?;
        for (addr, zero) in faults {
            let Some((ri, p)) = s.by_host(addr) else {
                log::warn!("working-set recorder: fault at {addr:#x}, outside guest memory");
                continue;
            };
            // Noted before the copy wakes the toucher, so whoever it tells
            // next already sees the page in the set.
            {
                let mut t = s.touched.lock().unwrap_or_else(|e| e.into_inner());
                if t[ri][p / 64] & (1 << (p % 64)) == 0 {
                    t[ri][p / 64] |= 1 << (p % 64);
                    s.pages.fetch_add(1, Ordering::Relaxed);
                }
            }
            let offset = s.state.regions[ri].file_offset + p as u64 * PAGE_SIZE;
            let src = (!zero).then(|| s.src.as_ptr() as u64 + offset);
            match uffd::fill(uffd.as_fd(), addr, src, PAGE_SIZE, PAGE_SIZE) {
                Ok(Filled::Retry { .. }) => retry.push((addr, zero)),
                Ok(Filled::Done | Filled::Gone) => {}
                Err(e) => return Err(format!("cannot fill guest page {addr:#x}: {e}")),
            }
        }
        if !retry.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// This process's page faults so far (minor and major): a vCPU's first
/// touch of a guest page the host has not mapped yet is one (KVM counts it
/// on the faulting thread).
pub fn process_faults() -> u64 {
    // SAFETY: getrusage writes one rusage we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    (ru.ru_minflt as u64).saturating_add(ru.ru_majflt as u64)
}

/// What a load did about the working set, kept with the VM.
#[derive(Default)]
pub struct Loaded {
    /// Last of the VM's parts to go: it serves guest memory.
    pub recorder: Option<Recorder>,
    pub prefetched: Prefetched,
    pub faults_at_load: u64,
    /// The memory file's layout, when guest memory is a private mapping
    /// of it (whose resident pages a pagemap reader can name).
    pub file_mapped: Option<GuestMemoryState>,
}

impl Loaded {
    /// `GET /snapshot/working-set` for guest memory `mem`.
    pub fn status(&self, mem: &GuestMemoryMmap) -> ember_vmm_api::WorkingSetStatus {
        let guest_memory = match &self.file_mapped {
            Some(state) => mem
                .iter()
                .zip(&state.regions)
                .map(|(region, r)| ember_vmm_api::GuestMemoryMapping {
                    host_address: region.as_ptr() as u64,
                    size: r.size,
                    file_offset: r.file_offset,
                })
                .collect(),
            None => Vec::new(),
        };
        ember_vmm_api::WorkingSetStatus {
            recording: self.recorder.is_some(),
            pages_recorded: self.recorder.as_ref().map_or(0, Recorder::pages),
            pages_prefetched: self.prefetched.pages,
            prefetch_ms: self.prefetched.ms,
            host_faults_since_load: process_faults().saturating_sub(self.faults_at_load),
            guest_memory,
        }
    }

    /// Saves at `path` the `pages` given (runs of memory file pages), or
    /// else what the recorder has noted so far; returns how many pages.
    pub fn save(&self, path: &Path, pages: Option<Vec<(u64, u64)>>) -> Result<u64, String> {
        let ws = match (pages, &self.recorder, &self.file_mapped) {
            (Some(runs), _, Some(state)) => WorkingSet::from_runs(state.total_size(), runs)?,
            (Some(_), _, None) => {
                return Err(
                    "pages can be given only for a File backend load mapping the memory file".into(),
                )
            }
            (None, Some(rec), _) => rec.working_set()?,
            (None, None, _) => {
                return Err("this microVM does not record its working set (load it with \"working_set\": {\"record\": true}, or give its pages)".into())
            }
        };
        ws.write(path).map_err(|e| e.to_string())?;
        Ok(ws.pages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory::MemoryRegionState;
    use std::io::Write;

    fn state(regions: &[(u64, u64)]) -> GuestMemoryState {
        let mut offset = 0;
        GuestMemoryState {
            regions: regions
                .iter()
                .map(|&(base, pages)| {
                    let r = MemoryRegionState {
                        base_address: base,
                        size: pages * PAGE_SIZE,
                        file_offset: offset,
                    };
                    offset += pages * PAGE_SIZE;
                    r
                })
                .collect(),
        }
    }

    /// A memory file whose page `n` is filled with byte `n % 251 + 1`.
    fn memory_file(dir: &Path, pages: u64) -> std::path::PathBuf {
        let path = dir.join("mem");
        let mut f = std::fs::File::create(&path).unwrap();
        for n in 0..pages {
            f.write_all(&vec![(n % 251 + 1) as u8; PAGE_SIZE as usize])
                .unwrap();
        }
        path
    }

    #[test]
    fn runs_join_across_regions_and_name_file_pages() {
        let st = state(&[(0, 128), (1 << 32, 64)]);
        let mut bits = vec![vec![0u64; 2], vec![0u64; 1]];
        bits[0][0] = 0b1110; // pages 1..4
        bits[0][1] = 1 << 63; // page 127
        bits[1][0] = 0b11; // file pages 128, 129
        let ws = WorkingSet::from_bitmaps(&st, &bits);
        assert_eq!(ws.runs, vec![(1, 3), (127, 3)]);
        assert_eq!(ws.pages(), 6);
        assert_eq!(ws.memory_bytes, 192 * PAGE_SIZE);
    }

    #[test]
    fn a_saved_set_reads_back_and_is_refused_for_another_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&[(0, 64)]);
        let mut bits = vec![vec![0u64; 1]];
        bits[0][0] = 0xf0;
        let ws = WorkingSet::from_bitmaps(&st, &bits);
        let path = dir.path().join("ws");
        ws.write(&path).unwrap();
        assert_eq!(WorkingSet::read(&path, st.total_size()).unwrap(), ws);

        let other = state(&[(0, 32)]);
        let e = WorkingSet::read(&path, other.total_size())
            .unwrap_err()
            .to_string();
        assert!(e.contains("recorded for 262144 bytes"), "{e}");

        // A flipped byte fails the checksum, not the guest.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = WorkingSet::read(&path, st.total_size())
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn pages_given_for_a_mapped_file_are_saved_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&[(0, 64)]);
        let mem = crate::snapshot::memory::map_file(&memory_file(dir.path(), 64), &st).unwrap();
        let loaded = Loaded {
            file_mapped: Some(st.clone()),
            ..Default::default()
        };
        let status = loaded.status(&mem);
        assert_eq!(status.guest_memory.len(), 1);
        assert_eq!(status.guest_memory[0].size, 64 * PAGE_SIZE);
        let path = dir.path().join("ws");
        assert_eq!(loaded.save(&path, Some(vec![(1, 2), (10, 1)])).unwrap(), 3);
        assert_eq!(
            WorkingSet::read(&path, st.total_size()).unwrap().runs,
            vec![(1, 2), (10, 1)]
        );
        let e = loaded.save(&path, Some(vec![(60, 8)])).unwrap_err();
        assert!(e.contains("past page 64"), "{e}");
        // Neither pages nor a recorder: nothing to save.
        let e = loaded.save(&path, None).unwrap_err();
        assert!(e.contains("does not record"), "{e}");
        // A VM whose memory is not a mapping of the file cannot take pages.
        let e = Loaded::default()
            .save(&path, Some(vec![(1, 1)]))
            .unwrap_err();
        assert!(e.contains("File backend"), "{e}");
    }

    #[test]
    fn runs_past_the_memory_or_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&[(0, 64)]);
        for runs in [
            vec![(60, 5)],
            vec![(10, 2), (5, 1)],
            vec![(3, 0)],
            vec![(u64::MAX, 2)],
        ] {
            let ws = WorkingSet {
                kind: KIND.into(),
                memory_bytes: st.total_size(),
                runs: runs.clone(),
            };
            let path = dir.path().join("ws");
            ws.write(&path).unwrap();
            assert!(
                matches!(
                    WorkingSet::read(&path, st.total_size()),
                    Err(WorkingSetError::Mismatch { .. })
                ),
                "{runs:?} was accepted"
            );
        }
    }

    /// Whether this process has the page at `addr` mapped (pagemap bit 63).
    fn present(addr: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, addr / PAGE_SIZE * 8).unwrap();
        u64::from_ne_bytes(e) >> 63 == 1
    }

    #[test]
    fn prefetch_makes_the_set_present() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(&[(0, 64), (1 << 20, 64)]);
        let path = memory_file(dir.path(), 128);
        let mem = crate::snapshot::memory::map_file(&path, &st).unwrap();
        // The second run crosses from the first region into the second.
        let ws = WorkingSet {
            kind: KIND.into(),
            memory_bytes: st.total_size(),
            runs: vec![(2, 3), (62, 4)],
        };
        let host: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
        let page = |n: u64| host[(n / 64) as usize] + (n % 64) * PAGE_SIZE;
        assert!(!present(page(2)));
        let done = prefetch(&mem, &st, &ws);
        assert_eq!(done.pages, 7);
        for n in [2, 3, 4, 62, 63, 64, 65] {
            assert!(present(page(n)), "page {n} is not present");
        }
        // The kernel maps a read fault's neighbours too (fault-around, up
        // to 64 KiB), but nothing far from the set.
        for n in [40, 104, 127] {
            assert!(!present(page(n)), "page {n} was read in");
        }
    }

    #[test]
    fn a_recorder_serves_the_file_and_notes_exactly_the_pages_touched() {
        if uffd::register_memory(&uffd::anonymous_memory(&state(&[(0, 1)])).unwrap()).is_err() {
            eprintln!("skipped: no userfaultfd for this user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let st = state(&[(0, 16), (1 << 20, 16)]);
        let path = memory_file(dir.path(), 32);
        let (mem, rec) = Recorder::start(&path, &st).unwrap();
        let host: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
        // Another thread touches, as a vCPU would; it blocks until served.
        let touched = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (region, page) in [(0usize, 3u64), (0, 4), (1, 0), (1, 15), (0, 3)] {
                let a = host[region] + page * PAGE_SIZE + 17;
                // SAFETY: inside guest memory, kept alive by the test.
                seen.push(unsafe { std::ptr::read_volatile(a as *const u8) });
            }
            seen
        })
        .join()
        .unwrap();
        assert_eq!(
            touched,
            vec![4, 5, 17, 32, 4],
            "the bytes of file pages 3, 4, 16, 31, 3"
        );
        let ws = rec.working_set().unwrap();
        assert_eq!(ws.runs, vec![(3, 2), (16, 1), (31, 1)]);
        assert_eq!(rec.pages(), 4);
        drop(rec);
        drop(mem);
    }
}
