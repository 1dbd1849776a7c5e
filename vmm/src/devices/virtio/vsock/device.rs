//! The virtio-vsock device: queues, config space, events.

use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::Muxer;
use super::packet::{self, HDR_LEN, VSOCK_EVENT_TRANSPORT_RESET};
use super::{VsockError, EVT_QUEUE, MAX_PKT_DATA, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::queue::{drain, kick_on_next_add, notify, pop, pop_or_enable};
use crate::devices::virtio::{
    read_config_bytes, virtio_common_accessors, VirtioCommon, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::vmm_config::vsock::VsockConfig;

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    common: VirtioCommon,
    /// Also saved and restored by `persist.rs`.
    pub(super) muxer: Muxer,
    tx_payload: Vec<u8>,
    /// Set after a transport reset: the event queue's avail index then, and
    /// when. Nothing goes to the guest's RX queue until the guest has
    /// re-posted an event buffer (it has processed the reset) or a second
    /// has passed: a connection request that overtook the reset would be
    /// dropped by the guest's reset handling, silently for the host.
    reset_pending: Option<(Wrapping<u16>, Instant)>,
    /// Wakes the device thread when the grace period above ends.
    reset_timer: TimerFd,
    /// Set by a restore from a state that does not list the guest's
    /// connections (an older snapshot): only a transport reset ends them.
    pub(super) reset_after_restore: bool,
}

/// How long delivery waits for the guest to process a transport reset.
const RESET_GRACE: Duration = Duration::from_secs(1);

impl Vsock {
    /// Creates the device and starts listening on `config.uds_path`.
    pub fn new(config: &VsockConfig) -> Result<Vsock, VsockError> {
        Vsock::with_uds_path(config.guest_cid, PathBuf::from(&config.uds_path))
    }

    /// `new` with a path that need not be UTF-8 (restore keeps it as saved).
    pub(super) fn with_uds_path(cid: u32, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if cid < 3 || cid == u32::MAX {
            return Err(VsockError::InvalidCid(cid));
        }
        let muxer = Muxer::new(u64::from(cid), &uds_path)?;
        let avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        let common = VirtioCommon::new(TYPE_VSOCK, "vsock", &[QUEUE_SIZE; 3], avail_features)
            .map_err(VsockError::EventFd)?;
        Ok(Vsock {
            guest_cid: u64::from(cid),
            uds_path,
            common,
            muxer,
            tx_payload: Vec::with_capacity(MAX_PKT_DATA),
            reset_pending: None,
            reset_timer: TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?,
            reset_after_restore: true,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live guest<->host connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Drops every connection and tells the guest with a
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event (after a snapshot restore the
    /// guest's connections refer to peers that no longer exist).
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset();
        // The dropped streams are unregistered and closed on the device thread.
        self.common.kick(EVT_QUEUE);
        let Some(active) = self.common.working_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVT_QUEUE];
        let chain = match pop(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => {
                crate::guest_warn!("vsock: no event buffer for the transport reset event");
                return;
            }
            Err(e) => {
                self.common.mark_broken(format_args!("event queue: {e}"));
                return;
            }
        };
        let head = chain.head_index();
        let id = VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let len = match Writer::new(mem, chain) {
            Ok(mut w) if w.available_bytes() >= id.len() => {
                std::io::Write::write_all(&mut w, &id).map_or(0, |()| id.len() as u32)
            }
            _ => {
                crate::guest_warn!("vsock: unusable event buffer");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            self.common.mark_broken(format_args!("event queue: {e}"));
            return;
        }
        let avail = queue.avail_idx(mem, Ordering::Acquire).unwrap_or_default();
        // Ask for a kick when the guest re-posts the buffer: that is our
        // sign the reset is done. Before the interrupt, so the re-post
        // cannot come first.
        if let Err(e) = kick_on_next_add(queue, mem) {
            log::debug!("vsock: event queue notification: {e}");
        }
        notify(queue, mem, &active.interrupt);
        self.reset_pending = Some((avail, Instant::now()));
        if let Err(e) = self.reset_timer.reset(RESET_GRACE, None) {
            crate::guest_warn!("vsock: cannot arm the reset timer: {e}");
        }
    }

    /// Whether the guest may still be processing a transport reset.
    fn reset_in_progress(&mut self) -> bool {
        let Some((avail_then, since)) = self.reset_pending else {
            return false;
        };
        let refilled = self.common.active().is_some_and(|a| {
            a.queues[EVT_QUEUE]
                .avail_idx(&a.mem, Ordering::Acquire)
                .is_ok_and(|now| now != avail_then)
        });
        if refilled {
            log::info!(
                "vsock: the guest handled the transport reset in {:?}",
                since.elapsed()
            );
        } else if since.elapsed() >= RESET_GRACE {
            log::warn!(
                "vsock: no event buffer re-posted within {RESET_GRACE:?} of the transport \
                 reset; delivering to the guest anyway"
            );
        } else {
            return true;
        }
        self.reset_pending = None;
        false
    }

    /// Hands every packet the guest queued to the muxer.
    fn process_tx(&mut self) {
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let (muxer, payload) = (&mut self.muxer, &mut self.tx_payload);
        let res = drain(&mut active.queues[TX_QUEUE], mem, |chain| {
            let pkt = Reader::new(mem, chain)
                .map_err(|e| e.to_string())
                .and_then(|mut r| packet::read_tx(&mut r, payload).map_err(|e| e.to_string()));
            match pkt {
                Ok(hdr) => muxer.handle_tx(&hdr, payload),
                Err(e) => crate::guest_warn!("vsock: dropping malformed TX packet: {e}"),
            }
            0
        });
        match res {
            Ok(true) => notify(&mut active.queues[TX_QUEUE], mem, &active.interrupt),
            Ok(false) => {}
            Err(e) => self.common.mark_broken(format_args!("TX queue: {e}")),
        }
    }

    /// Fills guest RX buffers with whatever the muxer has for the guest.
    fn process_rx(&mut self) {
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = false;
        let mut error = None;
        while self.muxer.has_rx() {
            let chain = match pop_or_enable(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            let head = chain.head_index();
            let len = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let max = (w.available_bytes() - HDR_LEN).min(MAX_PKT_DATA);
                    let Some((hdr, data)) = self.muxer.recv_pkt(max) else {
                        // Nothing after all; leave the buffer to the guest.
                        queue.go_to_previous_position();
                        break;
                    };
                    match packet::write_rx(&mut w, &hdr, data) {
                        Ok(n) => n as u32,
                        Err(e) => {
                            crate::guest_warn!("vsock: lost an RX packet: {e}");
                            0
                        }
                    }
                }
                Ok(_) => {
                    crate::guest_warn!("vsock: RX buffer smaller than a packet header");
                    0
                }
                Err(e) => {
                    crate::guest_warn!("vsock: unusable RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                error = Some(e);
                break;
            }
            used = true;
        }
        if used {
            notify(queue, mem, &active.interrupt);
        }
        if let Some(e) = error {
            self.common.mark_broken(format_args!("RX queue: {e}"));
        }
    }
}

impl VirtioDevice for Vsock {
    virtio_common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    /// Work queued before DRIVER_OK (TX packets, pending host
    /// connections) is picked up on the device thread.
    fn on_activate(&mut self) {
        self.common.kick(TX_QUEUE);
        self.common.kick(RX_QUEUE);
    }

    /// The guest's connections died with the old VMM. A state that listed
    /// them has queued a RST for each (sent with the RX work `on_activate`
    /// kicked); otherwise tell the driver with a transport reset, so it
    /// drops them all.
    fn after_restore(&mut self) {
        if self.common.is_activated() && self.reset_after_restore {
            self.send_transport_reset();
        }
    }

    fn on_reset(&mut self) {
        self.muxer.reset();
        self.common.kick(EVT_QUEUE);
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in self.common.queue_events() {
            let fd = evt.as_raw_fd();
            if let Err(e) = ops.add(Events::with_data(evt.as_ref(), fd as u32, EventSet::IN)) {
                log::error!("vsock: cannot register queue event: {e:?}");
            }
        }
        let fd = self.reset_timer.as_raw_fd();
        if let Err(e) = ops.add(Events::with_data(
            &self.reset_timer,
            fd as u32,
            EventSet::IN,
        )) {
            log::error!("vsock: cannot register the reset timer: {e:?}");
        }
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let evts = self.common.queue_events();
        match evts.iter().position(|e| e.as_raw_fd() == fd) {
            Some(index) => {
                // Reading first re-arms it for notifications that race with us.
                let _ = evts[index].read();
                if index == TX_QUEUE && !self.common.is_broken() {
                    self.process_tx();
                }
            }
            None if fd == self.reset_timer.as_raw_fd() => {
                let _ = self.reset_timer.wait();
            }
            None => self.muxer.handle_event(fd, events.event_set()),
        }
        if !self.common.is_broken() && !self.reset_in_progress() {
            self.process_rx();
        }
        self.muxer.sync(ops);
    }
}
