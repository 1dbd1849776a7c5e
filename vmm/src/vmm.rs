//! A built microVM and the VMM thread's control over it.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::builder::VirtioDevices;
use crate::devices::bus::lock;
use crate::devices::legacy::{SerialConsole, I8042};
use crate::vstate::vcpu::{VcpuHandle, VmExitNotifier};
use crate::vstate::vm::Vm;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
}

pub struct Vmm {
    // Field order matters for drop: vCPUs stop before the VM and memory go.
    vcpus: Vec<VcpuHandle>,
    #[allow(dead_code)]
    virtio: VirtioDevices,
    #[allow(dead_code)]
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    exit: VmExitNotifier,
    #[allow(dead_code)]
    vm: Vm,
    #[allow(dead_code)]
    guest_memory: GuestMemoryMmap,
    state: VmState,
}

impl Vmm {
    pub(crate) fn new(
        vm: Vm,
        guest_memory: GuestMemoryMmap,
        vcpus: Vec<VcpuHandle>,
        exit: VmExitNotifier,
        serial: Arc<Mutex<SerialConsole>>,
        i8042: Arc<Mutex<I8042>>,
        virtio: VirtioDevices,
    ) -> Self {
        Vmm {
            vcpus,
            virtio,
            serial,
            i8042,
            exit,
            vm,
            guest_memory,
            state: VmState::Running,
        }
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
