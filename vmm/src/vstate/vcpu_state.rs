//! A vCPU's complete KVM state, saved while it is paused and restored into
//! a fresh vCPU of the same index.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// XCR0 and friends; absent where KVM has no XCRs (no XSAVE exposed).
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC rate, restored so a clone on another host of a
    /// different TSC rate keeps the guest's view (where KVM can scale).
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {0}: {1} failed: {2}")]
    Ioctl(u8, &'static str, kvm_ioctls::Error),
    #[error("vCPU {0}: invalid saved {1}")]
    Invalid(u8, &'static str),
}

fn msr_entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

/// Reads every MSR in `indices` that KVM lets this vCPU read. KVM_GET_MSRS
/// stops at the first MSR it refuses; that one is skipped and the rest read.
fn read_msrs(
    fd: &VcpuFd,
    index: u8,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let mut msrs = Msrs::from_entries(&msr_entries(chunk))
            .map_err(|_| VcpuStateError::Invalid(index, "MSR list"))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Ioctl(index, "KVM_GET_MSRS", e))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the refused one, if any.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Writes `entries`, skipping (and logging) any KVM refuses.
fn write_msrs(fd: &VcpuFd, index: u8, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs =
            Msrs::from_entries(chunk).map_err(|_| VcpuStateError::Invalid(index, "MSR list"))?;
        let n = fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuStateError::Ioctl(index, "KVM_SET_MSRS", e))?;
        if n < chunk.len() {
            log::warn!(
                "vCPU {index}: KVM refused MSR {:#x} on restore",
                chunk[n].index
            );
        }
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(())
}

impl VcpuState {
    /// Saves the state of a vCPU that is out of KVM_RUN.
    pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
        let e = |what| move |err| VcpuStateError::Ioctl(index, what, err);
        // Registers first: saving the MP state and events flushes pending
        // KVM-internal work into them.
        let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, index, msr_indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            index,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Restores into a fresh vCPU, in the order KVM needs (CPUID before
    /// anything that depends on it; events last).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let i = self.index;
        let e = |what| move |err| VcpuStateError::Ioctl(i, what, err);
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::Invalid(i, "CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if let Err(err) = fd.set_tsc_khz(khz) {
                // Only scaling hosts can; same-host restores need nothing.
                log::debug!("vCPU {i}: cannot set TSC rate {khz} kHz: {err}");
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: the xsave area was produced by KVM_GET_XSAVE for a vCPU
        // with the same CPUID, so its size and layout match this vCPU's.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(e("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        write_msrs(fd, i, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
