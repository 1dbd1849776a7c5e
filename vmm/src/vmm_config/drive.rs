use serde::{Deserialize, Serialize};

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Firecracker's `cache_type`: "Unsafe" (default) or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Serial id reported to the guest (VIRTIO_BLK_T_GET_ID); defaults to drive_id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Firecracker's `socket`: the unix socket of a vhost-user-blk backend
    /// serving this drive (then `path_on_host` stays empty). Absent in
    /// snapshots taken before vhost-user support, hence the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}
