//! Snapshots of a whole microVM: the saved state of every component (each
//! saved by the component's own code) plus the guest memory file.

pub mod format;
pub mod memory;
pub mod uffd;
pub mod working_set;

use serde::{Deserialize, Serialize};

pub use crate::devices::persist::{DevicesState, VirtioDeviceState, VirtioSlotState};
use crate::vmm_config::VmResources;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;
use memory::GuestMemoryState;

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The VMM that wrote it, for diagnostics.
    pub vmm_version: String,
    pub resources: VmResources,
    pub memory: GuestMemoryState,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}
