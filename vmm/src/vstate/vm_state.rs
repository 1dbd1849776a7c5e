//! The VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT and
//! the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Debug, thiserror::Error)]
#[error("{0} failed: {1}")]
pub struct VmStateError(&'static str, kvm_ioctls::Error);

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<VmState, VmStateError> {
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        for c in [&mut pic_master, &mut pic_slave, &mut ioapic] {
            fd.get_irqchip(c)
                .map_err(|e| VmStateError("KVM_GET_IRQCHIP", e))?;
        }
        let pit = fd.get_pit2().map_err(|e| VmStateError("KVM_GET_PIT2", e))?;
        let mut clock = fd
            .get_clock()
            .map_err(|e| VmStateError("KVM_GET_CLOCK", e))?;
        // Only the clock value is restorable; the flags describe this host.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Restores into a VM whose irqchip and PIT already exist.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        fd.set_pit2(&self.pit)
            .map_err(|e| VmStateError("KVM_SET_PIT2", e))?;
        let mut clock = self.clock;
        clock.flags = 0;
        fd.set_clock(&clock)
            .map_err(|e| VmStateError("KVM_SET_CLOCK", e))?;
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(c)
                .map_err(|e| VmStateError("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
