//! `PUT /vsock` (Firecracker's `Vsock`).

use serde::{Deserialize, Serialize};

/// The guest's vsock device and the host unix socket it is reached by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's optional device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}
