//! A built microVM and the VMM thread's control over it.

use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;

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
    /// A recording load's page server (it too must outlive guest memory)
    /// and what a prefetching load did.
    working_set: snapshot::working_set::Loaded,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the microVM must be paused to snapshot it (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("{0}")]
    Unsupported(String),
    #[error("saving vCPU state: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("taking dirty pages: {0}")]
    DirtyLog(#[from] crate::vstate::vm::VmError),
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
            working_set: Default::default(),
        }
    }

    pub(crate) fn set_uffd_backend(&mut self, uffd: Option<UffdBackend>) {
        self.uffd = uffd;
    }

    pub(crate) fn set_working_set(&mut self, ws: snapshot::working_set::Loaded) {
        self.working_set = ws;
    }

    /// `GET /snapshot/working-set`.
    pub fn working_set_status(&self) -> ember_vmm_api::WorkingSetStatus {
        self.working_set.status(&self.guest_memory)
    }

    /// `PUT /snapshot/working-set`: how many pages were saved.
    pub fn save_working_set(
        &self,
        path: &Path,
        pages: Option<Vec<(u64, u64)>>,
    ) -> Result<u64, String> {
        self.working_set.save(path, pages)
    }

    /// Writes a snapshot of the paused VM: guest memory first, then the
    /// state file, so a state file always has complete memory beside it.
    /// A Diff writes only the pages dirtied since the previous snapshot (of
    /// either kind; with dirty tracking on, every snapshot restarts it).
    pub fn create_snapshot(&self, params: &CreateSnapshotParams) -> Result<(), SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::NotPaused);
        }
        let tracking = self.resources.machine_config.track_dirty_pages;
        let diff = params.snapshot_type == SnapshotType::Diff;
        // A vhost-user backend writes guest memory behind both KVM's dirty
        // log and the VMM's bitmap: a Diff would miss those pages.
        if diff && self.resources.drives.iter().any(|d| d.socket.is_some()) {
            return Err(SnapshotError::Unsupported(
                "Diff snapshots cannot track the guest memory that vhost-user backends \
                 write; take a Full snapshot"
                    .into(),
            ));
        }
        if diff && !tracking {
            return Err(SnapshotError::Unsupported(
                "Diff snapshots need track_dirty_pages in machine-config, or \
                 enable_diff_snapshots at load"
                    .into(),
            ));
        }
        // The components' state first, then memory, as before migration
        // shared this code (the layout is filled in once memory is written).
        let mut state = self.capture_state(snapshot::memory::describe(&self.guest_memory))?;
        // Taken before memory is written, so a write after it is in the
        // next Diff (a Full one just restarts tracking).
        let dirty = if tracking {
            Some(self.take_dirty_pages()?)
        } else {
            None
        };
        let mem_path = Path::new(&params.mem_file_path);
        let r = (|| -> Result<(), SnapshotError> {
            let memory = match &dirty {
                Some(d) if diff => snapshot::memory::dump_dirty(&self.guest_memory, d, mem_path)?,
                _ => snapshot::memory::dump(&self.guest_memory, mem_path)?,
            };
            state.memory = memory;
            snapshot::format::write(Path::new(&params.snapshot_path), &state)?;
            Ok(())
        })();
        if let (Err(_), Some(d)) = (&r, &dirty) {
            // No snapshot: the pages stay dirty for the next one.
            snapshot::memory::mark_dirty(&self.guest_memory, d);
        }
        r?;
        log::info!(
            "{:?} snapshot written: {} (memory {})",
            params.snapshot_type,
            params.snapshot_path,
            params.mem_file_path
        );
        Ok(())
    }

    /// The state of every component of the paused VM but guest memory,
    /// whose layout is `memory`: what a snapshot file and a migration
    /// stream both carry.
    pub(crate) fn capture_state(
        &self,
        memory: snapshot::memory::GuestMemoryState,
    ) -> Result<MicrovmState, SnapshotError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save_state(self.vm.msr_indices()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmStateSaved::save(self.vm.fd())?;
        let devices = DevicesState {
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            virtio: save_virtio(&self.virtio.slots),
        };
        Ok(MicrovmState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            resources: self.resources.clone(),
            memory,
            vm,
            vcpus,
            devices,
        })
    }

    pub(crate) fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    /// Turns KVM's dirty log on for every memory slot (live migration needs
    /// it whether or not the VM was booted with `track_dirty_pages`).
    pub(crate) fn enable_dirty_log(&self) -> Result<(), String> {
        if self.resources.machine_config.track_dirty_pages {
            return Ok(());
        }
        if !crate::arch::x86_64::nested::is_pvm_host() {
            return self
                .vm
                .register_memory(&self.guest_memory, true)
                .map_err(|e| e.to_string());
        }
        // kvm_pvm does not write-protect pages already mapped when the flag
        // is turned on, so their writes never reach the log (measured:
        // migrated guests hung). There the slots are removed and added
        // again, with the vCPUs out of the guest for that moment.
        let running = self.state == VmState::Running;
        if running {
            for v in &self.vcpus {
                v.pause().map_err(|e| e.to_string())?;
            }
        }
        let r = self.vm.reregister_memory(&self.guest_memory, true);
        if running {
            for v in &self.vcpus {
                v.resume().map_err(|e| e.to_string())?;
            }
        }
        r.map_err(|e| e.to_string())
    }

    /// Back to what the VM was configured with (after a cancelled migration).
    pub(crate) fn restore_dirty_log_setting(&self) -> Result<(), crate::vstate::vm::VmError> {
        let on = self.resources.machine_config.track_dirty_pages;
        self.vm.register_memory(&self.guest_memory, on)
    }

    /// The pages written since the last call (KVM's dirty log of each slot
    /// OR'd with vm-memory's bitmap of the VMM's own writes), clearing both.
    pub(crate) fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, SnapshotError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut logs = Vec::new();
        for (slot, region) in self.guest_memory.iter().enumerate() {
            match self.vm.take_dirty_log(slot as u32, region.len()) {
                Ok(log) => logs.push(log),
                Err(e) => {
                    // Keep what earlier slots' logs said for the next try.
                    snapshot::memory::mark_dirty(&self.guest_memory, &logs);
                    return Err(e.into());
                }
            }
        }
        Ok(snapshot::memory::take_dirty_pages(
            &self.guest_memory,
            &logs,
        ))
    }

    /// `PATCH /network-interfaces/{id}` on a running (or paused) VM: the
    /// device's limiters and connection tracking, and the configuration
    /// saved in snapshots.
    pub fn update_net_rate_limiters(
        &mut self,
        update: &crate::vmm_config::NetworkInterfaceUpdate,
    ) -> Result<(), String> {
        let net = self
            .virtio
            .net(&update.iface_id)
            .ok_or_else(|| format!("no network interface {:?}", update.iface_id))?;
        let mut dev = lock(net);
        dev.update_rate_limiters(
            update.rx_rate_limiter.as_ref(),
            update.tx_rate_limiter.as_ref(),
        );
        if let Some(on) = update.terminate_connections_on_pause {
            dev.set_terminate_connections(on);
        }
        drop(dev);
        if let Some(cfg) = self
            .resources
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
        {
            update.apply_to(cfg);
        }
        Ok(())
    }

    /// `PATCH /drives/{id}` on a running (or paused) VM: the device reopens
    /// its backend or takes new limits, and the configuration saved in
    /// snapshots follows.
    pub fn update_drive(
        &mut self,
        update: &crate::vmm_config::BlockDeviceUpdate,
    ) -> Result<(), String> {
        let block = self.virtio.block(&update.drive_id).ok_or_else(|| {
            format!(
                "no drive {:?} served by the VMM (vhost-user drives cannot be changed)",
                update.drive_id
            )
        })?;
        let mut dev = lock(block);
        dev.update(update).map_err(|e| e.to_string())?;
        let cfg = dev.config().clone();
        drop(dev);
        if let Some(d) = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
        {
            *d = cfg;
        }
        Ok(())
    }

    /// `GET /drives/{id}/fill`.
    pub fn drive_fill_status(
        &self,
        drive_id: &str,
    ) -> Result<crate::devices::virtio::block::FillStatus, String> {
        let block = self
            .virtio
            .block(drive_id)
            .ok_or_else(|| format!("no drive {drive_id:?} served by the VMM"))?;
        let status = lock(block).fill_status();
        status
            .ok_or_else(|| format!("drive {drive_id} is not filling from a source (no fill_from)"))
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

    /// Stops the vCPUs, then lets the devices act on the stop (the net
    /// device ends the guest's TCP connections), so the guest cannot send
    /// anything after that.
    pub fn pause(&mut self) -> Result<(), crate::vstate::vcpu::VcpuError> {
        for v in &self.vcpus {
            v.pause()?;
        }
        self.state = VmState::Paused;
        for (dev, _) in &self.virtio.slots {
            dev.with_device(|d| d.on_pause());
        }
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), crate::vstate::vcpu::VcpuError> {
        for (dev, _) in &self.virtio.slots {
            dev.with_device(|d| d.on_resume());
        }
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
