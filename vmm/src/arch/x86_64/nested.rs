//! Run-time detection of the nested "PVM" KVM (kvm_pvm), whose instruction
//! emulator cannot run some guest kernel code. The boot arguments that
//! avoid it are added only where it is detected; real hosts keep the
//! guest's full CPU feature set and its paravirtual features.

use std::path::Path;

/// Kernel arguments that keep a guest off instructions the kvm_pvm emulator
/// cannot execute (see the project's NESTED-KVM notes).
pub const PVM_CPU_ARGS: &str = "noxsave nokaslr tsc=reliable no_timer_check \
clearcpuid=cx16,popcnt,avx,avx2,bmi1,bmi2,erms,fsrm,movbe,rdrand,rdseed,clwb,clflushopt,\
sha_ni,aes,pclmulqdq,fsgsbase,smap,smep,xsaveopt,avx512f,rdpid,umip,pku,ospke,pcid,invpcid";

/// True when this host's KVM is the paging-based nested hypervisor.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The boot arguments a kvm_pvm host needs.
///
/// `nopv`: the guest reads CPUID unintercepted there, so it sees the outer
/// hypervisor's KVM paravirt features, but kvm_pvm does not serve their
/// hypercalls: a second vCPU spins forever in the PV send-IPI `vmcall`
/// during SMP bring-up. Without kvmclock the guest has no way to calibrate
/// its TSC (no PIT answer, HPET or ACPI PM timer), so the host's TSC rate
/// (KVM_GET_TSC_KHZ) is passed as `tsc_early_khz`.
pub fn pvm_boot_args(tsc_khz: Option<u32>) -> String {
    match tsc_khz {
        Some(khz) if khz > 0 => format!("{PVM_CPU_ARGS} nopv tsc_early_khz={khz}"),
        _ => format!("{PVM_CPU_ARGS} nopv"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_carry_tsc_rate_when_known() {
        assert!(pvm_boot_args(Some(2_445_404)).ends_with(" nopv tsc_early_khz=2445404"));
        assert!(pvm_boot_args(None).ends_with(" nopv"));
        assert!(pvm_boot_args(Some(0)).ends_with(" nopv"));
    }
}
