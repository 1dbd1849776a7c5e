//! Snapshot state shared by the virtio devices.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// The part of every device's snapshot that [`VirtioCommon`](super::VirtioCommon)
/// answers (queues and interrupt state are the transport's). Devices embed it
/// with `#[serde(flatten)]`, so their saved JSON keeps its flat
/// `"acked_features"` field.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioCommonState {
    /// The features the driver negotiated.
    pub acked_features: u64,
}

/// Serializable mirror of virtio-queue's `QueueState` (which has no serde
/// support): the driver's queue configuration and the device's positions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtQueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for VirtQueueState {
    fn from(q: QueueState) -> Self {
        VirtQueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&VirtQueueState> for QueueState {
    fn from(q: &VirtQueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}
