//! A built microVM and the VMM thread's control over it.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use std::path::Path;

use crate::builder::VirtioDevices;
use crate::devices::bus::lock;
use crate::devices::legacy::{SerialConsole, I8042};
use crate::devices::persist::save_virtio;
use crate::snapshot::uffd::UffdBackend;
use crate::snapshot::{self, DevicesState, MicrovmState};
use crate::vmm_config::snapshot::SnapshotType;
use crate::vmm_config::{CreateSnapshotParams, VmResources};
use crate::vstate::vcpu::{VcpuHandle, VmExitNotifier};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::VmState as VmStateSaved;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
}

pub struct Vmm {
    // Field order matters for drop: vCPUs stop before the VM and memory go.
    vcpus: Vec<VcpuHandle>,
    virtio: VirtioDevices,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    exit: VmExitNotifier,
    vm: Vm,
    guest_memory: GuestMemoryMmap,
    state: VmState,
    /// The configuration this VM was built (or restored) with.
    resources: VmResources,
    /// The userfaultfd and handler connection of a Uffd-backed restore:
    /// must outlive guest memory, or untouched pages would read as zeroes.
    uffd: Option<UffdBackend>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the microVM must be paused to snapshot it (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("{0}")]
    Unsupported(String),
    #[error("saving vCPU state: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("saving VM state: {0}")]
    Vm(#[from] crate::vstate::vm_state::VmStateError),
    #[error(transparent)]
    Memory(#[from] crate::snapshot::memory::MemoryFileError),
    #[error(transparent)]
    Format(#[from] crate::snapshot::format::FormatError),
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: Vm,
        guest_memory: GuestMemoryMmap,
        vcpus: Vec<VcpuHandle>,
        exit: VmExitNotifier,
        serial: Arc<Mutex<SerialConsole>>,
        i8042: Arc<Mutex<I8042>>,
        virtio: VirtioDevices,
        resources: VmResources,
        state: VmState,
    ) -> Self {
        Vmm {
            vcpus,
            virtio,
            serial,
            i8042,
            exit,
            vm,
            guest_memory,
            state,
            resources,
            uffd: None,
        }
    }

    pub(crate) fn set_uffd_backend(&mut self, uffd: Option<UffdBackend>) {
        self.uffd = uffd;
    }

    /// Writes a snapshot of the paused VM: guest memory first, then the
    /// state file, so a state file always has complete memory beside it.
    pub fn create_snapshot(&self, params: &CreateSnapshotParams) -> Result<(), SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::NotPaused);
        }
        if params.snapshot_type == SnapshotType::Diff {
            return Err(SnapshotError::Unsupported(
                "Diff snapshots are not supported yet; use Full".into(),
            ));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save_state(self.vm.msr_indices()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmStateSaved::save(self.vm.fd())?;
        let virtio = save_virtio(&self.virtio.slots);
        let devices = DevicesState {
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            virtio,
        };
        let memory = snapshot::memory::dump(&self.guest_memory, Path::new(&params.mem_file_path))?;
        let state = MicrovmState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            resources: self.resources.clone(),
            memory,
            vm,
            vcpus,
            devices,
        };
        snapshot::format::write(Path::new(&params.snapshot_path), &state)?;
        log::info!(
            "snapshot written: {} (memory {})",
            params.snapshot_path,
            params.mem_file_path
        );
        Ok(())
    }

    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn exit_notifier(&self) -> &VmExitNotifier {
        &self.exit
    }

    pub fn send_ctrl_alt_del(&self) {
        lock(&self.i8042).trigger_ctrl_alt_del();
    }

    pub fn pause(&mut self) -> Result<(), crate::vstate::vcpu::VcpuError> {
        for v in &self.vcpus {
            v.pause()?;
        }
        self.state = VmState::Paused;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), crate::vstate::vcpu::VcpuError> {
        for v in &self.vcpus {
            v.resume()?;
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Stops every vCPU thread.
    pub fn stop(&mut self) {
        for v in self.vcpus.drain(..) {
            if let Err(e) = v.exit() {
                log::warn!("stopping vCPU: {e}");
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
