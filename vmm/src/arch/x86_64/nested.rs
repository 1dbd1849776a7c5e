//! Run-time detection of the nested "PVM" KVM (kvm_pvm), whose instruction
//! emulator cannot run some guest kernel code. The boot arguments that
//! avoid it are added only where it is detected; real hosts keep the
//! guest's full CPU feature set.

use std::path::Path;

/// Kernel arguments that keep a guest off instructions the kvm_pvm emulator
/// cannot execute (see the project's NESTED-KVM notes).
pub const PVM_BOOT_ARGS: &str = "noxsave nokaslr tsc=reliable no_timer_check \
clearcpuid=cx16,popcnt,avx,avx2,bmi1,bmi2,erms,fsrm,movbe,rdrand,rdseed,clwb,clflushopt,\
sha_ni,aes,pclmulqdq,fsgsbase,smap,smep,xsaveopt,avx512f,rdpid,umip,pku,ospke,pcid,invpcid";

/// True when this host's KVM is the paging-based nested hypervisor.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Extra boot arguments this host needs, if any.
pub fn host_boot_args() -> Option<&'static str> {
    is_pvm_host().then_some(PVM_BOOT_ARGS)
}
