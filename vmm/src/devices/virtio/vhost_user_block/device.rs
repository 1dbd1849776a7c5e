//! The virtio device in front of a vhost-user-blk backend: features and
//! config space come from the backend; activation hands it the rings; the
//! backend's "call" eventfd is turned into the virtio-mmio interrupt here,
//! because InterruptStatus lives in the VMM.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::Frontend;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend;
use super::watchdog::Watchdog;
use super::VhostUserBlockError;
use crate::devices::virtio::block::QUEUE_SIZE;
use crate::devices::virtio::{
    new_queue_events, read_config_bytes, ActivateError, Interrupt, Mem, VirtioDevice, TYPE_BLOCK,
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

struct Active {
    mem: Mem,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    /// Stopped in the backend at a pause; restarted at resume.
    stopped: bool,
}

pub struct VhostUserBlock {
    config: BlockDeviceConfig,
    socket: String,
    frontend: Frontend,
    watch: UnixStream,
    watchdog: Watchdog,
    avail_features: u64,
    acked_features: u64,
    config_space: Vec<u8>,
    /// Kick eventfds: the transport's ioeventfds, handed to the backend.
    queue_evts: Vec<Arc<EventFd>>,
    /// Written by the backend when it used buffers.
    call_evt: EventFd,
    active: Option<Active>,
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
            avail_features,
            acked_features: 0,
            config_space: c.config_space,
            queue_evts: new_queue_events(1).map_err(evt_err)?,
            call_evt: EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
            active: None,
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
        let Some(a) = &self.active else {
            return;
        };
        let started = if self.disconnected {
            Err("backend already disconnected".to_string())
        } else {
            let kicks: Vec<&EventFd> = self.queue_evts.iter().map(|e| e.as_ref()).collect();
            let _guard = self.watchdog.guard();
            backend::start_rings(
                &mut self.frontend,
                self.acked_features,
                &a.mem,
                &a.queues,
                &kicks,
                &self.call_evt,
            )
        };
        match started {
            Ok(()) => {
                if let Err(e) = self.queue_evts[0].write(1) {
                    crate::guest_warn!("vhost-user-blk: cannot kick queue: {e}");
                }
            }
            Err(e) => self.on_disconnect(&format!("failed to start the rings ({e})")),
        }
    }

    /// Stops the rings in the backend and takes over their positions.
    fn stop(&mut self) {
        if self.disconnected {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let res = {
            let _guard = self.watchdog.guard();
            vhost::VhostBackend::get_vring_base(&self.frontend, 0)
        };
        a.stopped = true;
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
        if let Some(a) = &self.active {
            a.interrupt.signal_needs_reset();
        }
    }
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!("vhost-user-blk: guest write to read-only config space at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            stopped: false,
        });
        self.start();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    fn on_pause(&mut self) {
        self.stop();
    }

    fn on_resume(&mut self) {
        if self.active.as_ref().is_some_and(|a| a.stopped) {
            if let Some(a) = self.active.as_mut() {
                a.stopped = false;
            }
            self.start();
        }
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops the ring in the backend.
        self.stop();
        self.active = None;
        self.acked_features = 0;
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
                if let Some(a) = &self.active {
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
