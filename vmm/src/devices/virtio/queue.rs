//! Small helpers over virtio-queue's split `Queue` shared by the devices:
//! popping chains with correct notification suppression (with or without
//! VIRTIO_RING_F_EVENT_IDX) and deciding when to interrupt the guest.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Error, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{Interrupt, Mem};

pub(crate) type Chain<'a> = DescriptorChain<&'a Mem>;

/// Pops the next available chain. An error means the driver broke the ring
/// protocol (e.g. an avail index more than a queue size ahead).
pub(crate) fn pop<'a>(queue: &mut Queue, mem: &'a Mem) -> Result<Option<Chain<'a>>, Error> {
    Ok(queue.iter(mem)?.next())
}

/// Pops the next chain; when the queue is empty, re-enables driver
/// notifications (so the driver kicks us when it adds buffers) and checks
/// once more to close the race with a concurrent add.
pub(crate) fn pop_or_enable<'a>(
    queue: &mut Queue,
    mem: &'a Mem,
) -> Result<Option<Chain<'a>>, Error> {
    if let Some(chain) = pop(queue, mem)? {
        return Ok(Some(chain));
    }
    if queue.enable_notification(mem)? {
        return pop(queue, mem);
    }
    Ok(None)
}

/// Processes every available chain with `handle` (which returns the number of
/// bytes it wrote to the chain), with driver notifications disabled meanwhile.
/// Returns whether any chain was used.
pub(crate) fn drain<'a, F>(queue: &mut Queue, mem: &'a Mem, mut handle: F) -> Result<bool, Error>
where
    F: FnMut(Chain<'a>) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        while let Some(chain) = pop(queue, mem)? {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len)?;
            progressed = true;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            return Ok(used_any);
        }
        if !progressed {
            // Entries announced but unreadable: don't spin on them.
            return Err(Error::InvalidAvailRingIndex);
        }
    }
}

/// Interrupts the guest if it wants to hear about newly used buffers.
pub(crate) fn notify(queue: &mut Queue, mem: &Mem, interrupt: &Interrupt) {
    // On a read error, interrupting is the safe side.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Asks the driver to kick the device the next time it makes a buffer
/// available, however many buffers it has already made available.
///
/// `enable_notification` is not enough with VIRTIO_RING_F_EVENT_IDX: it
/// sets `avail_event` to the device's own position, so while buffers the
/// device has not consumed remain (the vsock event queue keeps eight), the
/// avail index is already past it and the driver's next add does not kick
/// (`vring_need_event(event, new, old)` is false). Setting `avail_event` to
/// the current avail index makes exactly the next add kick.
pub(crate) fn kick_on_next_add(queue: &mut Queue, mem: &Mem) -> Result<(), Error> {
    if !queue.event_idx_enabled() {
        return queue.enable_notification(mem).map(drop);
    }
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    // The used ring: flags (2), idx (2), `size` elements of 8, then avail_event.
    let at = queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(Error::AddressOverflow)?;
    mem.store(avail.0.to_le(), GuestAddress(at), Ordering::Release)
        .map_err(Error::GuestMemory)
}
