//! `GET`, `PUT` and `PATCH /machine-config` (Firecracker's
//! `MachineConfiguration`), and the limits a VM may be built with.

use serde::{Deserialize, Serialize};

/// Most vCPUs one microVM may have.
pub const MAX_VCPUS: u8 = 32;
/// Most guest memory one microVM may have (64 GiB); also the most a
/// snapshot or a migration may ask a VMM to allocate.
pub const MAX_MEM_SIZE_MIB: usize = 64 * 1024;
/// Least guest memory a microVM is built with.
pub const MIN_MEM_SIZE_MIB: usize = 16;

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
    /// Firecracker's `huge_pages`: 4 KiB pages, transparent huge pages
    /// (`madvise`), or hugetlbfs 2 MiB pages (reserved when the VM is
    /// built: an error then, never a fault later, when the host has too few).
    #[serde(default, skip_serializing_if = "HugePages::is_none")]
    pub huge_pages: HugePages,
    /// Ember's: private anonymous memory, or a memfd (shared, so one file
    /// descriptor reaches all of it). Hugetlbfs pages are always a memfd.
    #[serde(default, skip_serializing_if = "MemoryBacking::is_anonymous")]
    pub memory_backing: MemoryBacking,
}

/// Firecracker's `huge_pages` values.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum HugePages {
    #[default]
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// What guest memory is made of, besides its page size.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum MemoryBacking {
    #[default]
    Anonymous,
    Memfd,
}

impl HugePages {
    pub fn is_none(&self) -> bool {
        *self == HugePages::None
    }
}

impl MemoryBacking {
    pub fn is_anonymous(&self) -> bool {
        *self == MemoryBacking::Anonymous
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            memory_backing: MemoryBacking::Anonymous,
        }
    }
}

impl MachineConfig {
    /// `vcpu_count` vCPUs and `mem_size_mib` MiB, the rest as by default.
    pub fn new(vcpu_count: u8, mem_size_mib: usize) -> Self {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            ..MachineConfig::default()
        }
    }

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
        if self.mem_size_mib < MIN_MEM_SIZE_MIB || self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(format!(
                "mem_size_mib must be between {MIN_MEM_SIZE_MIB} and {MAX_MEM_SIZE_MIB}, got {}",
                self.mem_size_mib
            ));
        }
        if self.huge_pages == HugePages::Hugetlbfs2M && !self.mem_size_mib.is_multiple_of(2) {
            return Err(format!(
                "mem_size_mib must be a multiple of 2 with 2M huge pages, got {}",
                self.mem_size_mib
            ));
        }
        Ok(())
    }
}

/// `PATCH /machine-config` body: every field optional. The API thread does
/// not know the current config, so it forwards this typed partial and the
/// VMM merges it with [`MachineConfigUpdate::apply_to`] and validates the
/// result. Typed (rather than a raw JSON value) so unknown fields and wrong
/// types are refused by the API thread with serde's message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<MemoryBacking>,
}

impl MachineConfigUpdate {
    /// No field given (Firecracker treats `{}` like a missing body).
    pub fn is_empty(&self) -> bool {
        *self == MachineConfigUpdate::default()
    }

    /// `current` with the given fields replaced; validation is the caller's.
    pub fn apply_to(&self, current: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(current.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(current.mem_size_mib),
            smt: self.smt.unwrap_or(current.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(current.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(current.huge_pages),
            memory_backing: self.memory_backing.unwrap_or(current.memory_backing),
        }
    }
}
