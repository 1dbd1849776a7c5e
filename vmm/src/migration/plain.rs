//! A "VM" that is only guest memory, behind [`SourceVm`] and [`TargetVm`]:
//! the send and receive loops run against it, over real sockets, in the
//! unit tests and in the host-level rows of `benches/benches/migrate.rs`.
//! A writer thread ([`dirty`]) may play the guest on the source: it writes
//! through vm-memory, so the dirty bitmap sees it, and stops at the pause.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{FinalCopy, MigratableError, PostCopyPause, SourceVm, TargetVm, VmStepError};
use crate::snapshot::memory::{describe, take_dirty_pages, GuestMemoryState};
use crate::vmm_config::snapshot::DriveOverride;
use crate::vstate::memory::{create_anonymous_regions, GuestMemoryMmap};

pub struct PlainSource {
    pub mem: GuestMemoryMmap,
    /// Set at the pause (the writer holds still), cleared on resume.
    pub paused: Arc<AtomicBool>,
    pub resumed: Arc<AtomicU64>,
    pub handed_over: Arc<AtomicBool>,
    /// The capture fails (before any pause).
    pub fail_capture: bool,
    /// Post-copy: a "device" writes a page after the pause.
    pub device_writes_after_pause: bool,
}

impl PlainSource {
    pub fn new(mem: GuestMemoryMmap) -> PlainSource {
        PlainSource {
            mem,
            paused: Arc::default(),
            resumed: Arc::default(),
            handed_over: Arc::default(),
            fail_capture: false,
            device_writes_after_pause: false,
        }
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        // The writer may be mid-write; let it see the pause.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// The "state" is the memory layout: the target checks it.
    fn state(&self) -> Result<Vec<u8>, MigratableError> {
        crate::snapshot::format::encode(&describe(&self.mem))
            .map_err(|e| MigratableError::Capture(VmStepError::Vmm(e)))
    }

    /// The dirty bitmap since the last look, with `pending` added.
    fn dirty_with(&self, pending: &[Vec<u64>]) -> Vec<Vec<u64>> {
        let mut dirty = take_dirty_pages(&self.mem, &[]);
        super::vmm_side::add_pages(&mut dirty, pending);
        dirty
    }
}

impl SourceVm for PlainSource {
    fn memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }
    fn start_dirty_tracking(&mut self) -> Result<(), MigratableError> {
        take_dirty_pages(&self.mem, &[]);
        Ok(())
    }
    fn take_dirty(&mut self) -> Result<Vec<Vec<u64>>, MigratableError> {
        Ok(take_dirty_pages(&self.mem, &[]))
    }
    fn pause_and_capture(&mut self, pending: Vec<Vec<u64>>) -> Result<FinalCopy, MigratableError> {
        if self.fail_capture {
            return Err(MigratableError::Capture(VmStepError::Injected(
                "capture failed on purpose",
            )));
        }
        self.pause();
        let pages = super::vmm_side::copy_pages(&self.mem, &self.dirty_with(&pending))
            .map_err(MigratableError::Capture)?;
        Ok(FinalCopy {
            pages,
            state: self.state()?,
        })
    }
    fn pause_for_postcopy(
        &mut self,
        pending: Option<Vec<Vec<u64>>>,
    ) -> Result<PostCopyPause, MigratableError> {
        if self.fail_capture {
            return Err(MigratableError::Capture(VmStepError::Injected(
                "capture failed on purpose",
            )));
        }
        self.pause();
        let needed = match pending {
            None => super::vmm_side::all_pages(&self.mem),
            Some(p) => self.dirty_with(&p),
        };
        take_dirty_pages(&self.mem, &[]);
        if self.device_writes_after_pause {
            self.mem
                .write_obj(0xdead_u64, GuestAddress(0x5000))
                .map_err(|source| {
                    MigratableError::Capture(VmStepError::WriteMemory {
                        gpa: 0x5000,
                        source,
                    })
                })?;
        }
        Ok(PostCopyPause {
            needed,
            state: self.state()?,
        })
    }
    fn written_since_pause(&mut self) -> u64 {
        crate::snapshot::memory::count_written(&self.mem)
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused.store(false, Ordering::SeqCst);
        self.resumed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn handed_over(&mut self) {
        self.handed_over.store(true, Ordering::SeqCst);
    }
}

/// What happened to a [`PlainTarget`].
#[derive(Default)]
pub struct TargetLog {
    pub overrides: Vec<DriveOverride>,
    pub loaded: Option<GuestMemoryMmap>,
    pub resumed: bool,
    pub discarded: bool,
    pub failed: Option<String>,
}

/// Hook run at the resume with the loaded memory (a "guest" that starts).
pub type OnResume = Box<dyn FnMut(&GuestMemoryMmap) + Send>;

pub struct PlainTarget {
    pub log: Arc<Mutex<TargetLog>>,
    /// The load fails ("no tap here").
    pub refuse_load: bool,
    pub on_resume: Option<OnResume>,
}

impl PlainTarget {
    pub fn new() -> PlainTarget {
        PlainTarget {
            log: Arc::default(),
            refuse_load: false,
            on_resume: None,
        }
    }
}

impl Default for PlainTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetVm for PlainTarget {
    fn create_memory(
        &mut self,
        layout: &GuestMemoryState,
    ) -> Result<GuestMemoryMmap, MigratableError> {
        let r: Vec<_> = layout
            .regions
            .iter()
            .map(|r| (GuestAddress(r.base_address), r.size as usize))
            .collect();
        create_anonymous_regions(&r).map_err(|e| MigratableError::Memory(e.into()))
    }
    fn load(&mut self, state: &[u8], memory: GuestMemoryMmap) -> Result<(), MigratableError> {
        let layout: GuestMemoryState = crate::snapshot::format::decode(state, "stream")
            .map_err(|e| MigratableError::Load(e.into()))?;
        let memory_layout = describe(&memory);
        if layout != memory_layout {
            return Err(MigratableError::Load(VmStepError::LayoutMismatch {
                state: layout,
                stream: Some(memory_layout),
            }));
        }
        if self.refuse_load {
            return Err(MigratableError::Load(VmStepError::Injected("no tap here")));
        }
        self.log.lock().unwrap_or_else(|e| e.into_inner()).loaded = Some(memory);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.resumed = true;
        if let (Some(f), Some(mem)) = (self.on_resume.as_mut(), log.loaded.as_ref()) {
            f(mem);
        }
        Ok(())
    }
    fn add_overrides(&mut self, overrides: Vec<DriveOverride>) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overrides
            .extend(overrides);
    }
    fn discard(&mut self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).discarded = true;
    }
    fn fail(&mut self, why: &str) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(why.to_string());
    }
}

/// `mib` MiB of guest memory with a word in every other page (the rest
/// stays zero, as much of an idle guest's memory is).
pub fn patterned_memory(mib: usize) -> Result<GuestMemoryMmap, VmStepError> {
    let mem = crate::vstate::memory::create_anonymous(mib)?;
    for i in 0..(mib << 20) as u64 / 4096 / 2 {
        let gpa = i * 4096 * 2;
        mem.write_obj(i * 7 + 1, GuestAddress(gpa))
            .map_err(|source| VmStepError::WriteMemory { gpa, source })?;
    }
    Ok(mem)
}

/// The guest's writes on the source until `stop`, holding still while
/// `paused`: `per_ms` pages a millisecond scattered over the first `span`
/// pages, or (`per_ms` None) one word of every page of `span`, over and
/// over, as fast as it goes.
pub fn dirty(
    mem: GuestMemoryMmap,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    per_ms: Option<u64>,
    span: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            match per_ms {
                Some(k) => {
                    for _ in 0..k {
                        n += 1;
                        let page = n.wrapping_mul(2654435761) % span;
                        let _ = mem.write_obj(n, GuestAddress(page * 4096 + 8));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => {
                    n += 1;
                    for page in 0..span {
                        if paused.load(Ordering::Relaxed) {
                            break;
                        }
                        let _ = mem.write_obj(n, GuestAddress(page * 4096 + 8));
                    }
                }
            }
        }
    })
}
