//! [`SourceVm`] and [`TargetVm`] over the real VMM: each step that touches
//! the VM runs on the VMM thread as a task.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{FinalCopy, MigratableError, PostCopyPause, SourceVm, TargetVm};
use crate::event_loop::TaskSender;
use crate::snapshot::memory::{describe, dirty_runs, GuestMemoryState, PAGE_SIZE};
use crate::snapshot::MicrovmState;
use crate::vmm_config::LoadSnapshotParams;
use crate::vstate::memory::GuestMemoryMmap;

fn no_vm() -> String {
    "the microVM is gone".to_string()
}

pub(crate) struct VmmSource {
    pub tasks: TaskSender,
    pub mem: GuestMemoryMmap,
}

impl SourceVm for VmmSource {
    fn memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    fn start_dirty_tracking(&mut self) -> Result<(), MigratableError> {
        self.tasks
            .run(|c, _| {
                let vmm = c.vmm_mut().ok_or_else(no_vm)?;
                vmm.enable_dirty_log()?;
                // Forget what was dirty before: round 1 sends everything.
                vmm.take_dirty_pages()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .map_err(MigratableError::DirtyLog)?
            .map_err(MigratableError::DirtyLog)
    }

    fn take_dirty(&mut self) -> Result<Vec<Vec<u64>>, MigratableError> {
        self.tasks
            .run(|c, _| {
                c.vmm_mut()
                    .ok_or_else(no_vm)?
                    .take_dirty_pages()
                    .map_err(|e| e.to_string())
            })
            .map_err(MigratableError::DirtyLog)?
            .map_err(MigratableError::DirtyLog)
    }

    fn pause_and_capture(&mut self, pending: Vec<Vec<u64>>) -> Result<FinalCopy, MigratableError> {
        self.tasks
            .run(move |c, _| {
                let vmm = c.vmm_mut().ok_or_else(no_vm)?;
                vmm.pause().map_err(|e| e.to_string())?;
                let r = (|| {
                    // The components' state, then memory, as a snapshot does.
                    let state = vmm
                        .capture_state(describe(vmm.guest_memory()))
                        .map_err(|e| e.to_string())?;
                    let mut dirty = vmm.take_dirty_pages().map_err(|e| e.to_string())?;
                    add_pages(&mut dirty, &pending);
                    let pages = copy_pages(vmm.guest_memory(), &dirty)?;
                    let state = crate::snapshot::format::encode(&state)?;
                    Ok(FinalCopy { pages, state })
                })();
                if r.is_err() {
                    // Nothing left here: the VM runs on.
                    if let Err(e) = vmm.resume() {
                        log::error!("migration: cannot resume after a failed capture: {e}");
                    }
                }
                r
            })
            .map_err(MigratableError::Capture)?
            .map_err(MigratableError::Capture)
    }

    fn pause_for_postcopy(
        &mut self,
        pending: Option<Vec<Vec<u64>>>,
    ) -> Result<PostCopyPause, MigratableError> {
        self.tasks
            .run(move |c, _| {
                let vmm = c.vmm_mut().ok_or_else(no_vm)?;
                vmm.pause().map_err(|e| e.to_string())?;
                let r = (|| {
                    let state = vmm
                        .capture_state(describe(vmm.guest_memory()))
                        .map_err(|e| e.to_string())?;
                    let needed = match pending {
                        // Nothing was sent: every page.
                        None => all_pages(vmm.guest_memory()),
                        Some(p) => {
                            let mut d = vmm.take_dirty_pages().map_err(|e| e.to_string())?;
                            add_pages(&mut d, &p);
                            d
                        }
                    };
                    let state = crate::snapshot::format::encode(&state)?;
                    // From here on the VMM's own writes show in the vm-memory
                    // bitmap (`written_since_pause`).
                    crate::snapshot::memory::take_dirty_pages(vmm.guest_memory(), &[]);
                    Ok(PostCopyPause { needed, state })
                })();
                if r.is_err() {
                    if let Err(e) = vmm.resume() {
                        log::error!("migration: cannot resume after a failed capture: {e}");
                    }
                }
                r
            })
            .map_err(MigratableError::Capture)?
            .map_err(MigratableError::Capture)
    }

    fn written_since_pause(&mut self) -> u64 {
        crate::snapshot::memory::count_written(&self.mem)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.tasks
            .run(|c, _| {
                let vmm = c.vmm_mut().ok_or_else(no_vm)?;
                if let Err(e) = vmm.restore_dirty_log_setting() {
                    log::warn!("migration: cannot restore the dirty log setting: {e}");
                }
                if vmm.state() == crate::vmm::VmState::Paused {
                    vmm.resume().map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .map_err(MigratableError::Resume)?
            .map_err(MigratableError::Resume)
    }

    fn handed_over(&mut self) {
        if self.tasks.run(|c, _| c.set_migrated_away()).is_err() {
            log::warn!("migration: the VMM thread is gone");
        }
    }
}

/// Adds the pages of `pending` to `dirty` (a bitmap per region each).
pub(crate) fn add_pages(dirty: &mut [Vec<u64>], pending: &[Vec<u64>]) {
    for (d, p) in dirty.iter_mut().zip(pending) {
        for (w, pw) in d.iter_mut().zip(p) {
            *w |= pw;
        }
    }
}

/// A bitmap per region with every page set.
pub(crate) fn all_pages(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| {
            let pages = (r.len() / PAGE_SIZE) as usize;
            let mut bits = vec![u64::MAX; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                bits[pages / 64] = (1u64 << (pages % 64)) - 1;
            }
            bits
        })
        .collect()
}

/// Copies out the pages `dirty` marks, in runs.
pub(crate) fn copy_pages(
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (region, bits) in mem.iter().zip(dirty) {
        let npages = (region.len() / PAGE_SIZE) as usize;
        for (first, count) in dirty_runs(bits, npages) {
            let gpa = region.start_addr().raw_value() + first as u64 * PAGE_SIZE;
            let mut data = vec![0u8; count * PAGE_SIZE as usize];
            mem.read_slice(&mut data, GuestAddress(gpa))
                .map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
            out.push((gpa, data));
        }
    }
    Ok(out)
}

pub(crate) struct VmmTarget {
    pub tasks: TaskSender,
    pub params: LoadSnapshotParams,
    layout: Option<GuestMemoryState>,
}

impl VmmTarget {
    pub fn new(tasks: TaskSender, params: LoadSnapshotParams) -> VmmTarget {
        VmmTarget {
            tasks,
            params,
            layout: None,
        }
    }
}

impl TargetVm for VmmTarget {
    fn create_memory(
        &mut self,
        layout: &GuestMemoryState,
    ) -> Result<GuestMemoryMmap, MigratableError> {
        let regions: Vec<_> = layout
            .regions
            .iter()
            .map(|r| (GuestAddress(r.base_address), r.size as usize))
            .collect();
        let mem = crate::vstate::memory::create_anonymous_regions(&regions)
            .map_err(|e| MigratableError::Memory(e.to_string()))?;
        self.layout = Some(layout.clone());
        Ok(mem)
    }

    fn load(&mut self, state: &[u8], memory: GuestMemoryMmap) -> Result<(), MigratableError> {
        let state: MicrovmState = crate::snapshot::format::decode(state, "the migration stream")
            .map_err(|e| MigratableError::Load(e.to_string()))?;
        if self.layout.as_ref() != Some(&state.memory) {
            return Err(MigratableError::Load(format!(
                "the state's memory layout {:?} differs from the stream's {:?}",
                state.memory, self.layout
            )));
        }
        let params = self.params.clone();
        self.tasks
            .run(move |c, em| c.load_migrated(state, memory, &params, em))
            .map_err(MigratableError::Load)?
            .map_err(MigratableError::Load)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.tasks
            .run(|c, _| {
                c.vmm_mut()
                    .ok_or_else(no_vm)?
                    .resume()
                    .map_err(|e| e.to_string())
            })
            .map_err(MigratableError::Resume)?
            .map_err(MigratableError::Resume)
    }

    fn add_overrides(&mut self, overrides: Vec<crate::vmm_config::snapshot::DriveOverride>) {
        for o in overrides {
            self.params
                .drive_overrides
                .retain(|d| d.drive_id != o.drive_id);
            self.params.drive_overrides.push(o);
        }
    }

    fn discard(&mut self) {
        if self.tasks.run(|c, _| c.discard_vm()).is_err() {
            log::warn!("migration: the VMM thread is gone");
        }
    }

    fn fail(&mut self, why: &str) {
        log::error!("migration: post-copy failed ({why}); stopping the VM");
        // The vCPUs are kicked out of KVM_RUN (a fault waiting on the
        // userfaultfd is interrupted by the kick) and end; the VM is
        // dropped by `discard` after.
        let r = self.tasks.run(|c, _| {
            if let Some(vmm) = c.vmm_mut() {
                vmm.stop();
            }
        });
        if r.is_err() {
            log::warn!("migration: the VMM thread is gone");
        }
    }
}
