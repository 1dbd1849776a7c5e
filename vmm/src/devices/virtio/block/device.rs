//! The virtio-blk device: config space, features, queue processing.
//!
//! Requests are popped and parsed on the VMM thread, wait for the rate
//! limiter and the write scheduler, and go to the backend: a file answers
//! at once, an NBD export later through its engine's completion eventfd.
//! Either way a request is completed into the used ring only with the
//! backend's answer.

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;

use super::disk::Disk;
use super::nbd::Completion;
use super::request::{self, Request, Work, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use super::scheduler::WriteScheduler;
use super::{BlockError, CacheType, FillState, FillStatus, QUEUE_SIZE};
use crate::devices::virtio::queue::{notify, pop};
use crate::devices::virtio::{
    read_config_bytes, virtio_common_accessors, VirtioCommon, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::rate_limiter::RateLimiter;
use crate::vmm_config::drive::BlockDeviceConfig;
use crate::vmm_config::drive::BlockDeviceUpdate;

const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Most sectors in one DISCARD or WRITE_ZEROES segment (1 GiB); one
/// segment per request.
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap`
/// and its padding.
const CONFIG_LEN: usize = 60;

/// Data segments per request the driver may use (SEG_MAX). Without it Linux
/// sends one segment per request; more segments mean fewer, larger requests,
/// and every request costs guest kernel time and a VM exit.
const SEG_MAX: u32 = 128;
/// Largest data segment (SIZE_MAX). With SEG_MAX it bounds a request's
/// data, which the device buffers: a driver that keeps to both never sends
/// more than [`MAX_DATA_BYTES`], and a larger request is refused before
/// anything is allocated for it.
const SIZE_MAX: u32 = 256 << 10;
/// Most data bytes in one request (32 MiB).
pub(super) const MAX_DATA_BYTES: usize = SEG_MAX as usize * SIZE_MAX as usize;

/// Event ids of the device's subscriptions.
const EV_QUEUE: u32 = 0;
const EV_COMPLETION: u32 = 1;
const EV_LIMITER: u32 = 2;

/// The backend's answer to a request: the completion, whether it was a
/// write, and when it was sent.
type Answer = (Completion, bool, Instant);

/// A request at the backend.
struct InFlight {
    req: Request,
    write: bool,
    sent: Instant,
}

pub struct Block {
    config: BlockDeviceConfig,
    disk: Disk,
    /// `struct virtio_blk_config`: capacity (le64), size_max (le32),
    /// seg_max (le32), then at 36.. the discard and at 48.. the
    /// write-zeroes limits.
    config_space: [u8; CONFIG_LEN],
    common: VirtioCommon,
    /// Parsed, waiting for the rate limiter or the write scheduler.
    waiting: VecDeque<Request>,
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    limiter: RateLimiter,
    scheduler: WriteScheduler,
}

impl Block {
    pub fn new(config: &BlockDeviceConfig) -> Result<Block, BlockError> {
        Block::open(config, None)
    }

    /// `fill` continues a fill a snapshot interrupted.
    pub(super) fn open(
        config: &BlockDeviceConfig,
        fill: Option<&FillState>,
    ) -> Result<Block, BlockError> {
        let disk = Disk::open(config, fill)?;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if disk.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.cache_type == CacheType::Writeback {
            avail_features |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if !disk.read_only && disk.can_discard() {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if !disk.read_only && disk.can_write_zeroes() {
            avail_features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let fd_err = |source| BlockError::EventFd {
            drive_id: config.drive_id.clone(),
            source,
        };
        let name = format!("virtio-blk {}", config.drive_id);
        let common =
            VirtioCommon::new(TYPE_BLOCK, name, &[QUEUE_SIZE], avail_features).map_err(fd_err)?;
        let limiter = RateLimiter::new(&config.rate_limiter.unwrap_or_default()).map_err(fd_err)?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config_space[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment.
        config_space[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config_space[40..44].copy_from_slice(&1u32.to_le_bytes());
        config_space[44..48].copy_from_slice(&1u32.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg; may_unmap stays 0.
        config_space[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config_space[52..56].copy_from_slice(&1u32.to_le_bytes());
        Ok(Block {
            config: config.clone(),
            config_space,
            disk,
            common,
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            next_id: 0,
            limiter,
            scheduler: WriteScheduler::new(config.io_scheduler),
        })
    }

    /// Connects to the drive's NBD export and hangs up: tells at
    /// configuration time whether the server is there and speaks NBD.
    pub fn probe(config: &BlockDeviceConfig) -> Result<(), BlockError> {
        if let Some(uri) = &config.nbd_uri {
            let cache_type = CacheType::parse(&config.drive_id, config.cache_type.as_deref())?;
            super::disk::open_nbd(config, uri, cache_type)?;
        }
        if let Some(from) = &config.fill_from {
            let err = |reason: String| BlockError::Fill {
                drive_id: config.drive_id.clone(),
                reason,
            };
            let uri = super::nbd::NbdUri::parse(&from.nbd_uri).map_err(err)?;
            let timeout = from
                .nbd_timeout_ms
                .map_or(super::nbd::DEFAULT_TIMEOUT, Duration::from_millis);
            super::nbd::probe(&uri, timeout)
                .map_err(|e| err(format!("source {}: {e}", from.nbd_uri)))?;
        }
        Ok(())
    }

    /// `GET /drives/{id}/fill`: `None` unless the drive has `fill_from`.
    pub fn fill_status(&self) -> Option<FillStatus> {
        self.disk.fill_status(&self.config.drive_id)
    }

    pub(super) fn fill_state(&self) -> Option<FillState> {
        self.disk.fill_state()
    }

    pub fn id(&self) -> &str {
        &self.config.drive_id
    }

    pub fn config(&self) -> &BlockDeviceConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// Requests at the backend, not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Pops and parses every available request, sends what the limiter and
    /// scheduler allow, and completes what the backend answered.
    pub fn process_queue(&mut self) {
        let Some(active) = self.common.working_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[0];
        let res: Result<(), virtio_queue::Error> = (|| loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = pop(queue, mem)? {
                self.waiting
                    .push_back(request::parse(&self.disk, chain, mem));
            }
            if !queue.enable_notification(mem)? {
                return Ok(());
            }
        })();
        if let Err(e) = res {
            self.common.mark_broken(format_args!("queue error: {e}"));
            return;
        }
        self.dispatch(false);
    }

    /// Sends waiting requests to the backend in order, except that writes
    /// held by the scheduler let later requests pass; stops when the rate
    /// limiter says wait. `all` ignores both (draining for a pause).
    fn dispatch(&mut self, all: bool) {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let req = &self.waiting[i];
            let io = matches!(req.work, Work::Io { .. });
            if io && !all {
                if req.is_write() && !self.scheduler.may_send_write() {
                    i += 1;
                    continue;
                }
                if !self.limiter.consume(req.bytes()) {
                    break;
                }
            }
            let Some(mut req) = self.waiting.remove(i) else {
                break;
            };
            if !io {
                // Answered without the backend.
                done.push((req, None));
                continue;
            }
            let Work::Io { op, offset } =
                std::mem::replace(&mut req.work, Work::Done(VIRTIO_BLK_S_OK, Vec::new()))
            else {
                continue;
            };
            self.next_id += 1;
            let id = self.next_id;
            let write = op.is_write();
            if write {
                self.scheduler.write_sent();
            }
            let sent = Instant::now();
            self.in_flight.insert(id, InFlight { req, write, sent });
            if let Some(c) = self.disk.submit(id, op, offset) {
                if let Some(f) = self.in_flight.remove(&c.id) {
                    done.push((f.req, Some((c, f.write, f.sent))));
                }
            }
        }
        self.finish(done);
    }

    /// Completes requests into the used ring and interrupts the guest.
    fn finish(&mut self, done: Vec<(Request, Option<Answer>)>) {
        if done.is_empty() {
            return;
        }
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[0];
        for (req, answer) in done {
            let len = match (&req.work, answer) {
                (_, Some((c, write, sent))) => {
                    if write {
                        self.scheduler.write_done(sent.elapsed());
                    }
                    match c.result {
                        Ok(data) => request::complete(mem, &req, VIRTIO_BLK_S_OK, &data),
                        Err(e) => {
                            crate::guest_warn!(
                                "virtio-blk {}: I/O failed: {e}",
                                self.config.drive_id
                            );
                            request::complete(mem, &req, VIRTIO_BLK_S_IOERR, &[])
                        }
                    }
                }
                (Work::Done(status, data), None) => request::complete(mem, &req, *status, data),
                (Work::Io { .. }, None) => request::complete(mem, &req, VIRTIO_BLK_S_IOERR, &[]),
            };
            if let Err(e) = queue.add_used(mem, req.head, len) {
                crate::guest_warn!("virtio-blk {}: cannot add used: {e}", self.config.drive_id);
            }
        }
        notify(queue, mem, &active.interrupt);
    }

    /// The backend answered: complete those requests, then send what the
    /// scheduler held back for them.
    fn on_completions(&mut self) {
        let done: Vec<_> = self
            .disk
            .take_completions()
            .into_iter()
            .filter_map(|c| {
                let f = self.in_flight.remove(&c.id)?;
                Some((f.req, Some((c, f.write, f.sent))))
            })
            .collect();
        self.finish(done);
        self.dispatch(false);
    }

    /// Sends everything waiting and completes everything in flight (up to
    /// the backend's timeout and its retries), so that the queue's saved
    /// state holds no request popped but unanswered.
    pub fn drain_in_flight(&mut self) {
        self.dispatch(true);
        let bound = self.disk.timeout() * 5 + Duration::from_secs(1);
        let deadline = Instant::now() + bound;
        while !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let idle = self.disk.wait_idle(left.min(Duration::from_millis(100)));
            self.on_completions();
            if !idle && left.is_zero() {
                log::error!(
                    "virtio-blk {}: {} requests still unanswered after {bound:?}",
                    self.config.drive_id,
                    self.in_flight.len()
                );
                break;
            }
        }
    }

    /// `PATCH /drives/{id}`: new limits, or the backend reopened where the
    /// configuration now points and its size read again; a changed
    /// capacity is announced to the guest with a config-change interrupt.
    pub fn update(&mut self, update: &BlockDeviceUpdate) -> Result<(), BlockError> {
        let mut config = self.config.clone();
        update.apply_to(&mut config);
        if update.reopens() {
            if !self.disk.is_nbd() {
                // A file is replaced whole; nothing may be in flight on it.
                self.drain_in_flight();
            }
            let sectors = self.disk.reopen(&config)?;
            if sectors != self.capacity_in_config() {
                self.config_space[..8].copy_from_slice(&sectors.to_le_bytes());
                log::info!(
                    "virtio-blk {}: capacity now {sectors} sectors",
                    self.config.drive_id
                );
                if let Some(a) = self.common.active() {
                    a.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
                }
            }
        }
        if let Some(rl) = &update.rate_limiter {
            self.limiter.update(rl);
        }
        if update.io_scheduler.is_some() {
            self.scheduler.set_config(update.io_scheduler);
        }
        self.config = config;
        self.dispatch(false);
        Ok(())
    }

    /// The rate limiter's timer fired: send what it now allows.
    pub(crate) fn on_limiter_event(&mut self) {
        self.limiter.event_handler();
        self.dispatch(false);
    }

    /// Parsed requests held by the rate limiter or the scheduler.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn capacity_in_config(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config_space[..8]);
        u64::from_le_bytes(b)
    }
}

impl VirtioDevice for Block {
    virtio_common_accessors!(common);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    /// Requests queued before DRIVER_OK are picked up on the device thread.
    fn on_activate(&mut self) {
        self.common.kick(0);
    }

    /// Drains requests in flight so the saved queue is consistent.
    fn on_pause(&mut self) {
        self.drain_in_flight();
    }

    fn on_reset(&mut self) {
        // Answers still to come belong to the old queue: dropped.
        self.waiting.clear();
        self.in_flight.clear();
        self.scheduler.reset();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let id = self.config.drive_id.clone();
        let mut add = |fd: i32, data: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("virtio-blk {id}: cannot register event {data}: {e:?}");
            }
        };
        add(self.common.queue_events()[0].as_raw_fd(), EV_QUEUE);
        if let Some(fd) = self.disk.completion_fd() {
            add(fd.as_raw_fd(), EV_COMPLETION);
        }
        add(self.limiter.as_raw_fd(), EV_LIMITER);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            crate::guest_warn!("virtio-blk: unexpected event set {:?}", events.event_set());
            return;
        }
        match events.data() {
            EV_QUEUE => {
                // Drain the eventfd first so a notification that races with
                // processing re-arms it instead of being lost.
                if let Err(e) = self.common.queue_events()[0].read() {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        crate::guest_warn!("virtio-blk: queue event read failed: {e}");
                    }
                }
                self.process_queue();
            }
            EV_COMPLETION => self.on_completions(),
            EV_LIMITER => self.on_limiter_event(),
            other => crate::guest_warn!("virtio-blk: unknown event {other}"),
        }
    }
}
