//! A snapshot's working set, kept beside it as `working-set`: the pages of
//! its memory file a clone had touched by its first answer. Recorded once
//! per snapshot, from outside the jail: hostd reads the clone's
//! `/proc/<pid>/pagemap` (a privilege the jailed VMM does not get) over the
//! guest memory the VMM says it maps, and the VMM writes the file (its
//! format is the VMM's). Later clones of the snapshot read those pages in
//! before their guest runs (`PUT /snapshot/load`'s `working_set`).

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ember_vmm_api::{GuestMemoryMapping, SaveWorkingSetParams};

use super::{vm_paths, Instance, InstanceError};

/// The working set's name in a snapshot's directory.
pub const FILE: &str = "working-set";
const PAGE: u64 = 4096;
/// A saved working set is a header and its runs as JSON: far below this.
const MAX_FILE: u64 = 64 << 20;
/// Pagemap entries read at a time (8 bytes a page).
const CHUNK_PAGES: u64 = 32 * 1024;

/// Snapshot directories whose working set a clone is recording now.
static RECORDING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// The right to record one snapshot's working set; given up when dropped
/// (after a failed try, kept with [`Claim::keep`]: one try per daemon run).
pub struct Claim(PathBuf);

impl Claim {
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        RECORDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// The working set saved beside the snapshot in `snapshot_dir`, if any.
pub fn saved(snapshot_dir: &Path) -> Option<PathBuf> {
    let p = snapshot_dir.join(FILE);
    p.is_file().then_some(p)
}

/// The claim to record `snapshot_dir`'s working set: none when it has one
/// already, or another clone is recording it.
pub fn claim(snapshot_dir: &Path) -> Option<Claim> {
    if saved(snapshot_dir).is_some() {
        return None;
    }
    RECORDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(snapshot_dir.to_path_buf())
        .then(|| Claim(snapshot_dir.to_path_buf()))
}

/// Runs `(first, count)` of memory file pages whose pagemap entries say
/// present (bit 63): `entries` are those of consecutive pages from file
/// page `first_page`, appended to `runs` (joined with its last run).
pub fn present_runs(entries: &[u8], first_page: u64, runs: &mut Vec<(u64, u64)>) {
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let word = u64::from_ne_bytes(e.try_into().unwrap_or_default());
        if word >> 63 == 0 {
            continue;
        }
        let page = first_page + i as u64;
        match runs.last_mut() {
            Some((f, c)) if *f + *c == page => *c += 1,
            _ => runs.push((page, 1)),
        }
    }
}

/// The memory file pages resident in process `pid`'s mappings `maps`.
fn resident_pages(pid: u32, maps: &[GuestMemoryMapping]) -> std::io::Result<Vec<(u64, u64)>> {
    check_mappings(maps).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut sorted = maps.to_vec();
    sorted.sort_by_key(|m| m.file_offset);
    let mut runs = Vec::new();
    let mut buf = Vec::new();
    for m in &sorted {
        let (pages, first_vpage) = (m.size / PAGE, m.host_address / PAGE);
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK_PAGES);
            buf.resize((n * 8) as usize, 0);
            pagemap.read_exact_at(&mut buf, (first_vpage + done) * 8)?;
            present_runs(&buf, m.file_offset / PAGE + done, &mut runs);
            done += n;
        }
    }
    Ok(runs)
}

/// The mappings a VMM reported, before hostd reads the pagemap over them:
/// page-aligned, not wrapping, and no more memory than a VM may have (so
/// a hostile VMM cannot make hostd read without end).
fn check_mappings(maps: &[GuestMemoryMapping]) -> Result<(), String> {
    let max = (ember_vmm_api::machine_config::MAX_MEM_SIZE_MIB as u64) << 20;
    let mut total = 0u64;
    for m in maps {
        let aligned = [m.host_address, m.size, m.file_offset]
            .iter()
            .all(|v| v % PAGE == 0);
        let wraps = m.host_address.checked_add(m.size).is_none()
            || m.file_offset.checked_add(m.size).is_none();
        total = total.saturating_add(m.size);
        if !aligned || wraps || total > max {
            return Err(format!(
                "the VMM reported guest memory it cannot have: {m:?}"
            ));
        }
    }
    Ok(())
}

/// Copies the working set a VMM wrote at `out` (in its jail, where it may
/// write anything) to `snapshot_dir`: opened without following a link it
/// could have planted (nor a hard link), read bounded, written under a
/// temporary name (`tag`) and renamed into place.
fn copy_out(out: &Path, snapshot_dir: &Path, tag: &str) -> std::io::Result<()> {
    let dir = out.parent().unwrap_or(Path::new("/"));
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let mut bytes = Vec::new();
    crate::beneath::Dir::open(dir)?
        .open_file(&name, false)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {MAX_FILE} bytes"),
        ));
    }
    let tmp = snapshot_dir.join(format!("{FILE}.{tag}"));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, snapshot_dir.join(FILE)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl Instance {
    /// The snapshot directory this clone was restored from, the first time
    /// it is asked (at the clone's first answer); None ever after, so later
    /// answers cost nothing.
    pub fn first_answer_of_restore(&self) -> Option<&Path> {
        let first = !self
            .answered
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        first.then(|| self.restored_from.get().map(PathBuf::as_path))?
    }

    /// Records the working set of the snapshot in `snapshot_dir` from this
    /// clone (restored from it, with the File backend, and past its first
    /// answer) and saves it there; returns how many pages it holds.
    pub async fn record_working_set(&self, snapshot_dir: &Path) -> Result<u64, InstanceError> {
        let fail = InstanceError::WorkingSet;
        let status = self.client().working_set_status().await?;
        if status.guest_memory.is_empty() {
            return Err(fail(
                "guest memory is not a mapping of the memory file".into(),
            ));
        }
        let pid = self
            .pid()
            .ok_or_else(|| fail("the VMM has exited".into()))?;
        let maps = status.guest_memory;
        let runs = tokio::task::spawn_blocking(move || resident_pages(pid, &maps))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("/proc/{pid}/pagemap: {e}")))?;
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        let out = self.host(vm_paths::WORKING_SET_OUT);
        let _ = std::fs::remove_file(&out);
        self.client()
            .save_working_set(&SaveWorkingSetParams {
                working_set_path: self.vm_str(vm_paths::WORKING_SET_OUT)?,
                pages: Some(runs),
            })
            .await?;
        let copied = copy_out(&out, snapshot_dir, &self.id);
        let _ = std::fs::remove_file(&out);
        copied.map_err(|e| fail(format!("{}: {e}", out.display())))?;
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(present: &[bool]) -> Vec<u8> {
        present
            .iter()
            .flat_map(|&p| (if p { (1u64 << 63) | 0x1234 } else { 0x1234 }).to_ne_bytes())
            .collect()
    }

    #[test]
    fn present_pages_become_runs_of_file_pages_joined_across_regions() {
        let mut runs = Vec::new();
        present_runs(
            &entries(&[false, true, true, false, true, true]),
            10,
            &mut runs,
        );
        assert_eq!(runs, vec![(11, 2), (14, 2)]);
        // The next region starts at file page 16: its first page joins.
        present_runs(&entries(&[true, false, true]), 16, &mut runs);
        assert_eq!(runs, vec![(11, 2), (14, 3), (18, 1)]);
    }

    #[test]
    fn one_clone_at_a_time_records_a_snapshot_and_none_once_it_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = claim(dir.path()).expect("the first claim");
        assert!(claim(dir.path()).is_none(), "a second recorder");
        drop(c);
        let c = claim(dir.path()).expect("claimable again once given up");
        drop(c);
        std::fs::write(dir.path().join(FILE), b"saved").unwrap();
        assert!(claim(dir.path()).is_none(), "it has one already");
        assert_eq!(saved(dir.path()), Some(dir.path().join(FILE)));
    }

    /// What a VMM could leave at its working set's path instead of one:
    /// nothing of the host is copied, and no oversized file is read whole.
    #[test]
    fn a_vmm_cannot_get_a_host_file_or_a_huge_one_copied_out() {
        let jail = tempfile::tempdir().unwrap();
        let snap = tempfile::tempdir().unwrap();
        let host_secret = snap.path().join("secret");
        std::fs::write(&host_secret, b"host only").unwrap();
        let out = jail.path().join("working-set");
        let mut tries = 0;
        let mut copied = 0;
        let mut attempt = |plant: &dyn Fn()| {
            let _ = std::fs::remove_file(&out);
            plant();
            tries += 1;
            if copy_out(&out, snap.path(), "t").is_ok() {
                copied += 1;
            }
            let _ = std::fs::remove_file(snap.path().join(FILE));
        };
        attempt(&|| std::os::unix::fs::symlink(&host_secret, &out).unwrap());
        attempt(&|| std::fs::hard_link(&host_secret, &out).unwrap());
        attempt(&|| std::os::unix::fs::symlink("/etc/hostname", &out).unwrap());
        attempt(&|| {
            std::fs::File::create(&out)
                .unwrap()
                .set_len(MAX_FILE + 1)
                .unwrap()
        });
        attempt(&|| std::fs::create_dir(&out).unwrap());
        let _ = std::fs::remove_dir(&out);
        assert_eq!((tries, copied), (5, 0), "planted files copied out");
        assert!(!snap.path().join(format!("{FILE}.t")).exists());

        // A plain file the VMM wrote is copied.
        std::fs::write(&out, b"EMBERSNP...").unwrap();
        copy_out(&out, snap.path(), "t").unwrap();
        assert_eq!(
            std::fs::read(snap.path().join(FILE)).unwrap(),
            b"EMBERSNP..."
        );
    }

    /// Mappings a hostile VMM could report: each refused before a byte of
    /// the pagemap is read (pid 0 has none: reaching it would be an I/O
    /// error, not this one).
    #[test]
    fn mappings_a_vmm_cannot_have_are_refused_before_any_read() {
        let m = |host_address, size, file_offset| GuestMemoryMapping {
            host_address,
            size,
            file_offset,
        };
        let hostile = [
            vec![m(0x1000, 1 << 62, 0)],
            vec![m(u64::MAX - PAGE + 1, 2 * PAGE, 0)],
            vec![m(0x1000, PAGE, u64::MAX - PAGE + 1)],
            vec![m(0x1001, PAGE, 0)],
            vec![m(0x1000, 100, 0)],
            vec![m(0x1000, 48 << 30, 0), m(1 << 40, 48 << 30, 48 << 30)],
        ];
        let mut refused = 0;
        for maps in &hostile {
            let e = resident_pages(0, maps).unwrap_err();
            if e.kind() == std::io::ErrorKind::InvalidData {
                refused += 1;
            }
        }
        assert_eq!(refused, hostile.len());
    }

    #[test]
    fn this_process_reads_its_own_resident_pages() {
        // Four pages, the second and fourth touched.
        let mut mem = vec![0u8; 4 * PAGE as usize + PAGE as usize];
        let base = (mem.as_ptr() as u64).div_ceil(PAGE) * PAGE;
        let off = (base - mem.as_ptr() as u64) as usize;
        // SAFETY: the range lies inside `mem`; MADV_DONTNEED on our own
        // private anonymous heap pages only zeroes them, which we then set.
        unsafe {
            libc::madvise(
                base as *mut libc::c_void,
                4 * PAGE as usize,
                libc::MADV_DONTNEED,
            )
        };
        mem[off + PAGE as usize] = 1;
        mem[off + 3 * PAGE as usize] = 1;
        let maps = [GuestMemoryMapping {
            host_address: base,
            size: 4 * PAGE,
            file_offset: 8 * PAGE,
        }];
        let runs = resident_pages(std::process::id(), &maps).unwrap();
        assert_eq!(runs, vec![(9, 1), (11, 1)]);
    }
}
