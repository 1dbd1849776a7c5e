use serde::{Deserialize, Serialize};

pub const MAX_VCPUS: u8 = 32;
/// Most guest memory one microVM may have (64 GiB); also the most a
/// snapshot or a migration may ask a VMM to allocate.
pub const MAX_MEM_SIZE_MIB: usize = 64 * 1024;

/// `PUT /machine-config`, `GET /machine-config`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
        }
    }
}

impl MachineConfig {
    /// Checks the limits a VM can actually be built with.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(format!(
                "vcpu_count must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpu_count
            ));
        }
        if self.smt {
            return Err("smt is not supported".into());
        }
        if self.mem_size_mib < 16 || self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(format!(
                "mem_size_mib must be between 16 and {MAX_MEM_SIZE_MIB}, got {}",
                self.mem_size_mib
            ));
        }
        Ok(())
    }
}
