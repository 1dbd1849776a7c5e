//! The virtio device in front of a vhost-user-blk backend: features and
//! config space come from the backend; activation hands it the rings; the
//! backend's "call" eventfd is turned into the virtio-mmio interrupt here,
//! because InterruptStatus lives in the VMM.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::Frontend;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend;
use super::watchdog::Watchdog;
use super::VhostUserBlockError;
use crate::devices::virtio::block::QUEUE_SIZE;
use crate::devices::virtio::{
    read_config_bytes, virtio_common_accessors, VirtioCommon, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::vmm_config::drive::BlockDeviceConfig;

/// Backend features the VMM passes on to the guest: the single-queue
/// virtio-blk features whose config fields fit in `CONFIG_SPACE_LEN`.
/// Everything else the backend offers (MQ, packed rings, ...) is withheld.
const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << 1) // SIZE_MAX
    | (1 << 2) // SEG_MAX
    | (1 << 4) // GEOMETRY
    | (1 << 5) // RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 10) // TOPOLOGY
    | (1 << 13) // DISCARD
    | (1 << 14); // WRITE_ZEROES

/// Event-loop data tags.
const EV_CALL: u32 = 0;
const EV_HANGUP: u32 = 1;

pub struct VhostUserBlock {
    config: BlockDeviceConfig,
    socket: String,
    frontend: Frontend,
    watch: UnixStream,
    watchdog: Watchdog,
    /// Its queue EventFds are the transport's ioeventfds, handed to the
    /// backend as the rings' kick eventfds.
    common: VirtioCommon,
    config_space: Vec<u8>,
    /// Written by the backend when it used buffers.
    call_evt: EventFd,
    /// The active rings were stopped in the backend at a pause; restarted
    /// at resume.
    stopped: bool,
    /// The backend hung up or failed; nothing more is sent to it.
    disconnected: bool,
}

impl VhostUserBlock {
    /// Connects to the backend at `config.socket` and negotiates features.
    pub fn new(config: &BlockDeviceConfig) -> Result<VhostUserBlock, VhostUserBlockError> {
        let socket = config.socket.clone().unwrap_or_default();
        let c = backend::connect(&config.drive_id, &socket)?;
        let evt_err = |source| VhostUserBlockError::EventFd {
            drive_id: config.drive_id.clone(),
            source,
        };
        let mut avail_features = c.features & GUEST_FEATURES;
        if config.is_read_only {
            avail_features |= 1 << 5;
        }
        Ok(VhostUserBlock {
            config: config.clone(),
            socket,
            frontend: c.frontend,
            watch: c.watch,
            watchdog: c.watchdog,
            common: VirtioCommon::new(
                TYPE_BLOCK,
                format!("vhost-user-blk {}", config.drive_id),
                &[QUEUE_SIZE],
                avail_features,
            )
            .map_err(evt_err)?,
            config_space: c.config_space,
            call_evt: EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
            stopped: false,
            disconnected: false,
        })
    }

    pub fn id(&self) -> &str {
        &self.config.drive_id
    }

    pub fn config(&self) -> &BlockDeviceConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        let mut b = [0u8; 8];
        read_config_bytes(&self.config_space, 0, &mut b);
        u64::from_le_bytes(b)
    }

    pub(super) fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// Starts the active rings in the backend and kicks them once, since
    /// the backend only looks at a ring on a kick.
    fn start(&mut self) {
        let Some(a) = self.common.active() else {
            return;
        };
        let started = if self.disconnected {
            Err("backend already disconnected".to_string())
        } else {
            let kicks: Vec<&EventFd> = self
                .common
                .queue_events()
                .iter()
                .map(|e| e.as_ref())
                .collect();
            let _guard = self.watchdog.guard();
            backend::start_rings(
                &mut self.frontend,
                self.common.acked_features(),
                &a.mem,
                &a.queues,
                &kicks,
                &self.call_evt,
            )
        };
        match started {
            Ok(()) => self.common.kick(0),
            Err(e) => self.on_disconnect(&format!("failed to start the rings ({e})")),
        }
    }

    /// Stops the rings in the backend and takes over their positions.
    fn stop(&mut self) {
        if self.disconnected {
            return;
        }
        let Some(a) = self.common.active_mut() else {
            return;
        };
        let res = {
            let _guard = self.watchdog.guard();
            vhost::VhostBackend::get_vring_base(&self.frontend, 0)
        };
        self.stopped = true;
        match res {
            Ok(base) => {
                let q = &mut a.queues[0];
                q.set_next_avail(base as u16);
                // Everything the backend finished is in the used ring.
                match q.used_idx(&a.mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(used) => q.set_next_used(used.0),
                    Err(e) => crate::guest_warn!("vhost-user-blk: cannot read used index: {e}"),
                }
            }
            Err(e) => self.on_disconnect(&format!("failed to stop its ring ({e})")),
        }
    }

    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    fn on_disconnect(&mut self, why: &str) {
        if self.disconnected {
            return;
        }
        self.disconnected = true;
        log::error!(
            "vhost-user drive {}: backend at {} {why}; the device reports \
             DEVICE_NEEDS_RESET to the guest and its pending I/O will not complete",
            self.config.drive_id,
            self.socket
        );
        self.common.signal_needs_reset();
    }
}

impl VirtioDevice for VhostUserBlock {
    virtio_common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn on_activate(&mut self) {
        self.stopped = false;
        self.start();
    }

    fn on_pause(&mut self) {
        self.stop();
    }

    fn on_resume(&mut self) {
        if self.common.is_activated() && self.stopped {
            self.stopped = false;
            self.start();
        }
    }

    fn on_reset(&mut self) {
        // GET_VRING_BASE stops the ring in the backend.
        self.stop();
    }
}

impl MutEventSubscriber for VhostUserBlock {
    fn init(&mut self, ops: &mut EventOps) {
        let call = Events::with_data(&self.call_evt, EV_CALL, EventSet::IN);
        // Only hang-ups: replies to our own requests also make it readable.
        let hangup = Events::with_data(
            &self.watch,
            EV_HANGUP,
            EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        );
        for ev in [call, hangup] {
            if let Err(e) = ops.add(ev) {
                log::error!(
                    "vhost-user drive {}: cannot register event: {e:?}",
                    self.config.drive_id
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_CALL => {
                if let Err(e) = self.call_evt.read() {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        crate::guest_warn!("vhost-user-blk: call event read failed: {e}");
                    }
                }
                // The backend already applied EVENT_IDX suppression.
                if let Some(a) = self.common.active() {
                    a.interrupt.signal_used();
                }
            }
            _ => {
                // Stop watching, or the level-triggered hang-up spins.
                let fd = self.watch.as_raw_fd();
                if let Err(e) = ops.remove(Events::with_data_raw(fd, EV_HANGUP, events.event_set()))
                {
                    crate::guest_warn!("vhost-user-blk: cannot unregister hang-up watch: {e:?}");
                }
                self.on_disconnect("closed the connection");
            }
        }
    }
}
