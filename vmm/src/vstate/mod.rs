//! KVM state: the VM, its vCPUs and guest memory, and their saved forms.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
