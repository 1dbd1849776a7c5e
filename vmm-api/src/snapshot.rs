//! `PUT /snapshot/create` (Firecracker's `SnapshotCreateParams`) and
//! `PUT /snapshot/load` (`SnapshotLoadParams`, plus Ember's overrides).

use serde::{Deserialize, Serialize};

use crate::drive::FillFrom;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum SnapshotType {
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot (KVM dirty log).
    Diff,
}

/// `PUT /snapshot/create`; the VM must be paused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum MemBackendType {
    /// Map the memory file privately (copy-on-write, lazy).
    File,
    /// Hand the guest memory to a page-fault handler over userfaultfd.
    Uffd,
}

/// Where a restored guest's memory comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    /// The memory file (`File`) or the handler's unix socket (`Uffd`).
    pub backend_path: String,
}

/// A drive's backing file, changed at load time (each clone its own).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub drive_id: String,
    /// The new backing file; for a drive saved with `nbd_uri`, the NBD URI
    /// to reconnect to instead of the saved one.
    pub path_on_host: String,
}

/// A file drive made to fill from a source at load time (a migration's
/// destination: the source host exports the disk with `ember-export`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FillOverride {
    pub drive_id: String,
    pub fill_from: FillFrom,
}

/// A vhost-user drive's backend socket, changed at load time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VhostUserOverride {
    pub drive_id: String,
    pub socket: String,
}

/// The vsock device's host socket, changed at load time (Firecracker's
/// `vsock_override`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// A network interface's tap, changed at load time (Firecracker's
/// `network_overrides`): each clone its own tap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`; only before any other configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotParams {
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older spelling of a File backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user_overrides: Vec<VhostUserOverride>,
    /// Drives whose (overridden) file fills from a source while the guest
    /// runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fill_overrides: Vec<FillOverride>,
    /// Where the restored guest's serial console goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Record this clone's working set, or prefetch one recorded earlier
    /// (File backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<WorkingSetLoad>,
    /// Firecracker's: the restored VM's page size; the snapshot's unless
    /// given. 2 MiB pages (and a memfd) get a copy of the memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<LoadHugePages>,
    /// Ember's: restore into a memfd (a copy of the memory file) or a
    /// private mapping of the file; the snapshot's unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<crate::MemoryBacking>,
}

/// Firecracker's `huge_pages` at load: `Snapshot` keeps the snapshot's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum LoadHugePages {
    Snapshot,
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl LoadHugePages {
    /// The page size a VM saved with `saved` is restored with.
    pub fn resolve(this: Option<Self>, saved: crate::HugePages) -> crate::HugePages {
        match this {
            None | Some(LoadHugePages::Snapshot) => saved,
            Some(LoadHugePages::None) => crate::HugePages::None,
            Some(LoadHugePages::Transparent) => crate::HugePages::Transparent,
            Some(LoadHugePages::Hugetlbfs2M) => crate::HugePages::Hugetlbfs2M,
        }
    }
}

impl LoadSnapshotParams {
    /// Loads `snapshot_path` with its memory from `backend`, paused, with
    /// nothing overridden.
    pub fn new(snapshot_path: impl Into<String>, backend: MemBackend) -> Self {
        LoadSnapshotParams {
            snapshot_path: snapshot_path.into(),
            mem_backend: Some(backend),
            mem_file_path: None,
            resume_vm: false,
            enable_diff_snapshots: false,
            vsock_override: None,
            drive_overrides: Vec::new(),
            network_overrides: Vec::new(),
            vhost_user_overrides: Vec::new(),
            fill_overrides: Vec::new(),
            serial_out_path: None,
            working_set: None,
            huge_pages: None,
            memory_backing: None,
        }
    }

    /// The memory backend, from `mem_backend` or the older `mem_file_path`.
    pub fn backend(&self) -> Result<MemBackend, String> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) => Ok(b.clone()),
            (None, Some(p)) => Ok(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: p.clone(),
            }),
            (Some(_), Some(_)) => Err("give mem_backend or mem_file_path, not both".into()),
            (None, None) => Err("mem_backend is required".into()),
        }
    }
}

/// What a load does about the snapshot's working set: the guest pages a
/// clone touches up to its first answer. Both need the File backend (a Uffd
/// backend's handler is the one to prefetch there).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetLoad {
    /// Serve each page's first touch from the memory file through a
    /// userfaultfd and note it, for `PUT /snapshot/working-set`.
    #[serde(default)]
    pub record: bool,
    /// A working set saved from an earlier clone of the same snapshot: its
    /// pages are read in before the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_path: Option<String>,
}

/// `PUT /snapshot/working-set`: saves a working set (a versioned,
/// checksummed file, like a snapshot's): the pages a recording clone has
/// touched so far, or the `pages` given (runs of pages of the memory file,
/// `[first, count]`), e.g. found resident by a privileged reader of this
/// process's pagemap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SaveWorkingSetParams {
    pub working_set_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<(u64, u64)>>,
}

/// Where one guest memory region lies in the VMM process, for a privileged
/// reader of its `/proc/<pid>/pagemap` (the host daemon).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestMemoryMapping {
    pub host_address: u64,
    pub size: u64,
    /// Where the region's pages are in the snapshot's memory file.
    pub file_offset: u64,
}

/// `GET /snapshot/working-set`: what the load did and what it cost since.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkingSetStatus {
    /// Whether this clone records its working set.
    pub recording: bool,
    /// Pages recorded so far (first touches served from the memory file).
    pub pages_recorded: u64,
    /// Pages read in before the guest ran.
    pub pages_prefetched: u64,
    /// How long the prefetch took, in milliseconds.
    pub prefetch_ms: f64,
    /// Host page faults this VMM process took since the load (getrusage:
    /// the guest's first touches of pages not prefetched, and the VMM's).
    pub host_faults_since_load: u64,
    /// Where guest memory lies in this process, when it is a private
    /// mapping of the memory file (a File backend load).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_memory: Vec<GuestMemoryMapping>,
}
