//! [`SourceVm`] and [`TargetVm`] over the real VMM: each step that touches
//! the VM runs on the VMM thread as a task.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::VmStepError;
use super::{FinalCopy, MigratableError, PostCopyPause, SourceVm, TargetVm};
use crate::builder::EventMgr;
use crate::controller::Controller;
use crate::event_loop::TaskSender;
use crate::snapshot::memory::{describe, dirty_runs, GuestMemoryState, PAGE_SIZE};
use crate::snapshot::MicrovmState;
use crate::vmm::Vmm;
use crate::vmm_config::LoadSnapshotParams;
use crate::vstate::memory::GuestMemoryMmap;

pub(crate) struct VmmSource {
    pub tasks: TaskSender,
    pub mem: GuestMemoryMmap,
}

/// Runs `step` on the VMM thread; its failure, or the thread's, is a
/// failure of `phase`.
fn on_vmm_thread<R: Send + 'static>(
    tasks: &TaskSender,
    phase: fn(VmStepError) -> MigratableError,
    step: impl FnOnce(&mut Controller, &mut EventMgr) -> Result<R, VmStepError> + Send + 'static,
) -> Result<R, MigratableError> {
    tasks
        .run(step)
        .map_err(|e| phase(VmStepError::VmmThread(e)))?
        .map_err(phase)
}

fn vmm_of(c: &mut Controller) -> Result<&mut Vmm, VmStepError> {
    c.vmm_mut().ok_or(VmStepError::NoVm)
}

/// Pauses the VM and runs `capture`; resumes it if that fails (nothing is
/// left here then: the VM runs on).
fn pause_and<R>(
    vmm: &mut Vmm,
    capture: impl FnOnce(&mut Vmm) -> Result<R, VmStepError>,
) -> Result<R, VmStepError> {
    vmm.pause()?;
    let r = capture(vmm);
    if r.is_err() {
        if let Err(e) = vmm.resume() {
            log::error!("migration: cannot resume after a failed capture: {e}");
        }
    }
    r
}

/// The components' state, as a snapshot saves it, in the snapshot format.
fn encoded_state(vmm: &Vmm) -> Result<Vec<u8>, VmStepError> {
    let state = vmm.capture_state(describe(vmm.guest_memory()))?;
    crate::snapshot::format::encode(&state).map_err(VmStepError::Vmm)
}

impl SourceVm for VmmSource {
    fn memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    fn start_dirty_tracking(&mut self) -> Result<(), MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::DirtyLog, |c, _| {
            let vmm = vmm_of(c)?;
            vmm.enable_dirty_log().map_err(VmStepError::Vmm)?;
            // Forget what was dirty before: round 1 sends everything.
            vmm.take_dirty_pages()?;
            Ok(())
        })
    }

    fn take_dirty(&mut self) -> Result<Vec<Vec<u64>>, MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::DirtyLog, |c, _| {
            Ok(vmm_of(c)?.take_dirty_pages()?)
        })
    }

    fn pause_and_capture(&mut self, pending: Vec<Vec<u64>>) -> Result<FinalCopy, MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::Capture, move |c, _| {
            pause_and(vmm_of(c)?, |vmm| {
                // The components' state, then memory, as a snapshot does.
                let state = encoded_state(vmm)?;
                let mut dirty = vmm.take_dirty_pages()?;
                add_pages(&mut dirty, &pending);
                let pages = copy_pages(vmm.guest_memory(), &dirty)?;
                Ok(FinalCopy { pages, state })
            })
        })
    }

    fn pause_for_postcopy(
        &mut self,
        pending: Option<Vec<Vec<u64>>>,
    ) -> Result<PostCopyPause, MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::Capture, move |c, _| {
            pause_and(vmm_of(c)?, |vmm| {
                let state = encoded_state(vmm)?;
                let needed = match pending {
                    // Nothing was sent: every page.
                    None => all_pages(vmm.guest_memory()),
                    Some(p) => {
                        let mut d = vmm.take_dirty_pages()?;
                        add_pages(&mut d, &p);
                        d
                    }
                };
                // From here on the VMM's own writes show in the vm-memory
                // bitmap (`written_since_pause`).
                crate::snapshot::memory::take_dirty_pages(vmm.guest_memory(), &[]);
                Ok(PostCopyPause { needed, state })
            })
        })
    }

    fn written_since_pause(&mut self) -> u64 {
        crate::snapshot::memory::count_written(&self.mem)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::Resume, |c, _| {
            let vmm = vmm_of(c)?;
            if let Err(e) = vmm.restore_dirty_log_setting() {
                log::warn!("migration: cannot restore the dirty log setting: {e}");
            }
            if vmm.state() == crate::vmm::VmState::Paused {
                vmm.resume()?;
            }
            Ok(())
        })
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
) -> Result<Vec<(u64, Vec<u8>)>, VmStepError> {
    let mut out = Vec::new();
    for (region, bits) in mem.iter().zip(dirty) {
        let npages = (region.len() / PAGE_SIZE) as usize;
        for (first, count) in dirty_runs(bits, npages) {
            let gpa = region.start_addr().raw_value() + first as u64 * PAGE_SIZE;
            let mut data = vec![0u8; count * PAGE_SIZE as usize];
            mem.read_slice(&mut data, GuestAddress(gpa))
                .map_err(|source| VmStepError::ReadMemory { gpa, source })?;
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
            .map_err(|e| MigratableError::Memory(e.into()))?;
        self.layout = Some(layout.clone());
        Ok(mem)
    }

    fn load(&mut self, state: &[u8], memory: GuestMemoryMmap) -> Result<(), MigratableError> {
        let state: MicrovmState = crate::snapshot::format::decode(state, "the migration stream")
            .map_err(|e| MigratableError::Load(e.into()))?;
        if self.layout.as_ref() != Some(&state.memory) {
            return Err(MigratableError::Load(VmStepError::LayoutMismatch {
                state: state.memory,
                stream: self.layout.clone(),
            }));
        }
        let params = self.params.clone();
        on_vmm_thread(&self.tasks, MigratableError::Load, move |c, em| {
            c.load_migrated(state, memory, &params, em)
                .map_err(VmStepError::Vmm)
        })
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        on_vmm_thread(&self.tasks, MigratableError::Resume, |c, _| {
            Ok(vmm_of(c)?.resume()?)
        })
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
