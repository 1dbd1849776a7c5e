//! Live migration, pre-copy: guest memory goes to the destination VMM in
//! rounds while the guest runs (KVM's dirty log says what to send again),
//! then the source pauses, sends what is still dirty with the state of
//! every component (the snapshot state code, `Vmm::capture_state`), and
//! the destination resumes.
//!
//! Post-copy ([`postcopy`]): the source pauses at once (or after some
//! pre-copy rounds) and sends only the state and which pages the
//! destination still lacks; the destination resumes on userfaultfd-
//! registered memory, fetches a missing page from the source when it is
//! touched, and the source pushes the rest meanwhile.
//!
//! The stream is worked on by a thread of its own, so the VMM thread keeps
//! running devices and the API meanwhile; what must touch the VM (dirty
//! log, pause, state, resume, building the destination VM) it asks of the
//! VMM thread through [`SourceVm`] and [`TargetVm`], which tests implement
//! over plain memory.

pub mod plain;
pub mod postcopy;
pub mod protocol;
pub mod receive;
pub mod send;
pub mod transport;
pub(crate) mod vmm_side;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::snapshot::memory::GuestMemoryState;
use crate::vmm_config::snapshot::DriveOverride;
use crate::vstate::memory::GuestMemoryMmap;

/// What a VM's side of a migration failed at, and why (Cloud
/// Hypervisor's `MigratableError` is the model): the migration loops tell
/// a failed step from a lost stream, and say which step.
#[derive(Debug, thiserror::Error)]
pub enum MigratableError {
    #[error("dirty-page tracking: {0}")]
    DirtyLog(#[source] VmStepError),
    #[error("pausing and saving the VM: {0}")]
    Capture(#[source] VmStepError),
    #[error("resuming the VM: {0}")]
    Resume(#[source] VmStepError),
    #[error("guest memory: {0}")]
    Memory(#[source] VmStepError),
    #[error("loading the VM: {0}")]
    Load(#[source] VmStepError),
}

/// Why one step of [`SourceVm`] or [`TargetVm`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStepError {
    #[error("the microVM is gone")]
    NoVm,
    /// The step never ran: the VMM thread is gone (the event loop's own
    /// error is text).
    #[error("{0}")]
    VmmThread(String),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error(transparent)]
    Snapshot(#[from] crate::vmm::SnapshotError),
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error(transparent)]
    Format(#[from] crate::snapshot::format::FormatError),
    #[error("reading guest memory at {gpa:#x}: {source}")]
    ReadMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing guest memory at {gpa:#x}: {source}")]
    WriteMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the state's memory layout {state:?} differs from the stream's {stream:?}")]
    LayoutMismatch {
        state: GuestMemoryState,
        stream: Option<GuestMemoryState>,
    },
    /// A step of the VMM that reports its failure as text: turning the
    /// dirty log on, encoding the state, building the VM.
    #[error("{0}")]
    Vmm(String),
    /// A failure a test asked for ([`plain`]).
    #[error("{0}")]
    Injected(&'static str),
}

/// The source's side, as the migration thread sees it.
pub trait SourceVm: Send {
    /// Guest memory (the thread reads it while the guest runs).
    fn memory(&self) -> GuestMemoryMmap;
    /// Starts dirty tracking and forgets what was dirty before: the first
    /// round sends everything.
    fn start_dirty_tracking(&mut self) -> Result<(), MigratableError>;
    /// Pages written since the last call, a bitmap per memory region.
    fn take_dirty(&mut self) -> Result<Vec<Vec<u64>>, MigratableError>;
    /// Pauses the VM and, in one step on the VMM thread (so no device can
    /// write in between), copies out the pages in `pending` and those
    /// dirtied since the last `take_dirty`, and saves the state of every
    /// component (snapshot format bytes).
    fn pause_and_capture(&mut self, pending: Vec<Vec<u64>>) -> Result<FinalCopy, MigratableError>;
    /// Post-copy's pause: pauses the VM and saves the state, as
    /// `pause_and_capture` does, but copies no pages; returns the pages the
    /// destination lacks (those in `pending` and dirtied since the last
    /// `take_dirty`; every page when `pending` is None: nothing was sent).
    fn pause_for_postcopy(
        &mut self,
        pending: Option<Vec<Vec<u64>>>,
    ) -> Result<PostCopyPause, MigratableError>;
    /// Post-copy: pages written since `pause_for_postcopy` through the
    /// VMM's own mapping (a device delivering into guest memory while the
    /// VM is paused: net or vsock receive). Those would reach the
    /// destination out of step with the state saved at the pause.
    fn written_since_pause(&mut self) -> u64;
    /// Lets the VM run again here (the migration failed or was cancelled).
    fn resume(&mut self) -> Result<(), MigratableError>;
    /// The destination runs the VM now: it must never run here again.
    fn handed_over(&mut self);
}

/// What the source sends once paused.
pub struct FinalCopy {
    /// (guest address, bytes) of every page still dirty.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// The microVM state in the snapshot file format.
    pub state: Vec<u8>,
}

/// What the source sends once paused for post-copy.
pub struct PostCopyPause {
    /// A bitmap per memory region of the pages the destination must get.
    pub needed: Vec<Vec<u64>>,
    /// The microVM state in the snapshot file format.
    pub state: Vec<u8>,
}

/// The destination's side.
pub trait TargetVm: Send {
    /// Fresh guest memory laid out as the source's.
    fn create_memory(
        &mut self,
        layout: &GuestMemoryState,
    ) -> Result<GuestMemoryMmap, MigratableError>;
    /// Builds the VM, paused, from `state` (snapshot format bytes) and the
    /// received memory.
    fn load(&mut self, state: &[u8], memory: GuestMemoryMmap) -> Result<(), MigratableError>;
    fn resume(&mut self) -> Result<(), MigratableError>;
    /// Drive overrides the source sent at the switch-over, over those the
    /// destination was started with.
    fn add_overrides(&mut self, overrides: Vec<DriveOverride>);
    /// Drops a VM loaded but never resumed (the source kept it).
    fn discard(&mut self);
    /// Post-copy lost the source after the resume: part of the guest's
    /// memory is gone, so the VM must stop here, for good.
    fn fail(&mut self, why: &str);
}

/// `GET /migrate` and its parts, as the API answers them.
pub use ember_vmm_api::migration::{MigrationMode, MigrationStatus, Phase, Role};

/// Shared between the migration thread, the VMM thread and the API.
#[derive(Clone, Default)]
pub struct Progress {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// The stream, so a cancel can wake a thread blocked on it.
    stream: Arc<Mutex<Option<transport::Stream>>>,
    /// A manual switch-over's go-ahead (with its drive overrides).
    go: Arc<(Mutex<Option<Vec<DriveOverride>>>, Condvar)>,
}

impl Progress {
    pub fn new(role: Role, peer: String) -> Progress {
        let p = Progress::default();
        p.update(|s| {
            s.role = role;
            s.peer = Some(peer);
        });
        p
    }

    pub fn status(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Asks the migration to stop; false once the switch-over has begun
    /// (the destination may already run the VM). Decided under the status
    /// lock, as [`Progress::begin_switch_over`] is, so exactly one wins.
    pub fn cancel(&self) -> bool {
        {
            let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if !s.is_active() || matches!(s.state, Phase::SwitchOver | Phase::PostCopy) {
                return false;
            }
            self.cancel.store(true, Ordering::Release);
        }
        if let Some(st) = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            st.shutdown();
        }
        true
    }

    /// Enters the switch-over unless a cancel came first.
    pub(crate) fn begin_switch_over(&self) -> bool {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancelled() {
            return false;
        }
        s.state = Phase::SwitchOver;
        true
    }

    /// `PUT /migrate/switch-over`: lets a source waiting in
    /// [`Phase::AwaitingSwitchOver`] go on; false in any other state.
    pub fn switch_over(&self, overrides: Vec<DriveOverride>) -> bool {
        if self.status().state != Phase::AwaitingSwitchOver {
            return false;
        }
        let (lock, cv) = &*self.go;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(overrides);
        cv.notify_all();
        true
    }

    /// Waits for [`Progress::switch_over`]; None on a cancel or after
    /// `timeout` (the destination gives up on a silent source too).
    pub(crate) fn wait_switch_over(&self, timeout: Duration) -> Option<Vec<DriveOverride>> {
        let deadline = std::time::Instant::now() + timeout;
        let (lock, cv) = &*self.go;
        let mut go = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = go.take() {
                return Some(o);
            }
            let now = std::time::Instant::now();
            if self.cancelled() || now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            go = cv
                .wait_timeout(go, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends the stream for good (the migration is over either way), so the
    /// peer sees it close even though a copy was kept here for cancels.
    pub(crate) fn end_stream(&self) {
        if let Some(st) = self.stream.lock().unwrap_or_else(|e| e.into_inner()).take() {
            st.shutdown();
        }
    }

    pub(crate) fn set_stream(&self, s: &transport::Stream) {
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = s.try_clone().ok();
    }
}
