//! Shared helpers for Ember's integration tests: the guest artifacts (built
//! by the project's own scripts, cached), `ember-vmm` processes, and API
//! calls made with curl, an HTTP client Ember did not write.

pub mod artifacts;
pub mod emberd;
pub mod snapshots;
pub mod vmm_process;
pub mod volumed;

pub use artifacts::{kernel_path, rootfs_path, workspace_root};
pub use vmm_process::{ApiReply, VmmProcess};

/// True when /dev/kvm can be opened; KVM tests say so and skip otherwise.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
