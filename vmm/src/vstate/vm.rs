//! The KVM VM: memory slots, the in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and do you have access to /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    MemoryRegion(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    DirtyLog(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    Pit(kvm_ioctls::Error),
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
    msr_indices: Vec<u32>,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
            return Err(VmError::MissingCap(cap));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::TssAddress)?;
        // The MSRs a snapshot saves: every one KVM knows for this host.
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid,
            msr_indices,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers every region of `mem` as a KVM memory slot (slot = index).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if track_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps alive (and unmoved) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(VmError::MemoryRegion)?;
        }
        Ok(())
    }

    /// Removes every slot of `mem` and adds it again, so KVM maps each page
    /// anew (with `track_dirty`, write-protected: every later write is in
    /// the log). The vCPUs must be out of KVM_RUN meanwhile.
    pub fn reregister_memory(
        &self,
        mem: &GuestMemoryMmap,
        track_dirty: bool,
    ) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let gone = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: 0,
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: a zero size deletes the slot; no memory is handed over.
            unsafe { self.fd.set_user_memory_region(gone) }.map_err(VmError::MemoryRegion)?;
        }
        self.register_memory(mem, track_dirty)
    }

    /// Takes (and clears) KVM's dirty log of memory slot `slot` of `size`
    /// bytes, registered with tracking on: one bit per page.
    pub fn take_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(VmError::DirtyLog)
    }

    /// Creates the in-kernel PIC, IOAPIC and PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }
}
