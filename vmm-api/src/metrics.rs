//! `PUT /metrics` (Firecracker's `Metrics`).

use serde::{Deserialize, Serialize};

/// Where the counters are appended as JSON lines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
}
