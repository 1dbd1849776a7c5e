//! `PUT /boot-source` (Firecracker's `BootSource`).

use serde::{Deserialize, Serialize};

/// The guest kernel, its initrd and its command line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// None: the VMM's default command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSourceConfig {
    /// A kernel with the VMM's default command line and no initrd.
    pub fn new(kernel_image_path: impl Into<String>) -> Self {
        BootSourceConfig {
            kernel_image_path: kernel_image_path.into(),
            initrd_path: None,
            boot_args: None,
        }
    }
}
