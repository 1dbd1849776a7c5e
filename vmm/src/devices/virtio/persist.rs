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

/// Declares `VirtQueueState` with the fields named, and the conversions
/// to and from virtio-queue's `QueueState`, which has the same fields.
macro_rules! queue_state_mirror {
    ($(#[$meta:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl From<QueueState> for $name {
            fn from(q: QueueState) -> Self {
                $name { $($field: q.$field,)* }
            }
        }

        impl From<&$name> for QueueState {
            fn from(q: &$name) -> Self {
                QueueState { $($field: q.$field,)* }
            }
        }
    };
}

queue_state_mirror! {
    /// Serializable mirror of virtio-queue's `QueueState` (which has no serde
    /// support): the driver's queue configuration and the device's positions.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
    VirtQueueState {
        max_size: u16,
        size: u16,
        ready: bool,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
        next_avail: u16,
        next_used: u16,
        event_idx_enabled: bool,
    }
}
