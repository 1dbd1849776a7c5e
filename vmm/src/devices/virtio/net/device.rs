//! The virtio-net device: config space, features, and moving frames
//! between the queues and the tap, under the rate limiters.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};

use super::conntrack::{ConnTracker, RemoteVerdict};
use super::features::*;
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
use super::{NetError, MAX_FRAME_LEN, QUEUE_SIZE, RX_INDEX, TX_INDEX, VNET_HDR_LEN};
use crate::devices::virtio::queue::{notify, pop_or_enable};
use crate::devices::virtio::{
    read_config_bytes, virtio_common_accessors, Mem, VirtioCommon, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::vmm_config::net::NetworkInterfaceConfig;

// Event-loop data tags.
const EV_RX_QUEUE: u32 = 0;
const EV_TX_QUEUE: u32 = 1;
const EV_TAP: u32 = 2;
const EV_RX_LIMITER: u32 = 3;
const EV_TX_LIMITER: u32 = 4;

/// Frame and byte counts, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames dropped: a guest buffer too small, a malformed TX chain, or
    /// a tap write error.
    pub dropped: u64,
    /// Times a frame waited for the rate limiter.
    pub throttled: u64,
    /// TCP connections ended with RSTs at a pause.
    pub connections_terminated: u64,
}

pub struct Net {
    config: NetworkInterfaceConfig,
    mac: Option<[u8; 6]>,
    tap: Tap,
    common: VirtioCommon,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// A frame read from the tap that is not in the guest yet (no buffer,
    /// or the limiter said wait): `rx_buf[..rx_pending]`, 0 when none.
    rx_buf: Vec<u8>,
    rx_pending: usize,
    /// The pending frame was already paid to the RX limiter.
    rx_paid: bool,
    tx_buf: Vec<u8>,
    /// Frames the VMM made for the guest (the RSTs of a pause), delivered
    /// before anything from the tap; kept in snapshots.
    rx_inject: VecDeque<Vec<u8>>,
    /// `terminate_connections_on_pause`: None is off, and then the data
    /// path does nothing for it.
    conntrack: Option<ConnTracker>,
    counters: NetCounters,
}

impl Net {
    /// Opens the tap named in `config` (which must exist) and builds the
    /// device. The MAC and limiters are validated here too.
    pub fn new(config: &NetworkInterfaceConfig) -> Result<Net, NetError> {
        let iface_id = config.iface_id.clone();
        let mac = config.validate().map_err(|reason| NetError::Config {
            iface_id: iface_id.clone(),
            reason,
        })?;
        let tap = Tap::open(&config.host_dev_name).map_err(|source| NetError::Tap {
            iface_id: iface_id.clone(),
            source,
        })?;
        let fd_err = |source| NetError::Fd {
            iface_id: iface_id.clone(),
            source,
        };
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << CSUM)
            | (1 << GUEST_CSUM)
            | (1 << GUEST_TSO4)
            | (1 << GUEST_TSO6)
            | (1 << GUEST_UFO)
            | (1 << HOST_TSO4)
            | (1 << HOST_TSO6)
            | (1 << HOST_UFO);
        if mac.is_some() {
            avail_features |= 1 << MAC;
        }
        Ok(Net {
            config: config.clone(),
            mac,
            tap,
            common: VirtioCommon::new(
                TYPE_NET,
                format!("virtio-net {iface_id}"),
                &[QUEUE_SIZE, QUEUE_SIZE],
                avail_features,
            )
            .map_err(fd_err)?,
            rx_limiter: RateLimiter::new(&config.rx_rate_limiter.unwrap_or_default())
                .map_err(fd_err)?,
            tx_limiter: RateLimiter::new(&config.tx_rate_limiter.unwrap_or_default())
                .map_err(fd_err)?,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: 0,
            rx_paid: false,
            tx_buf: vec![0; MAX_FRAME_LEN],
            rx_inject: VecDeque::new(),
            conntrack: config
                .terminate_connections_on_pause
                .then(ConnTracker::default),
            counters: NetCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.config.iface_id
    }

    /// The configuration, with the limiters as they are now.
    pub fn config(&self) -> &NetworkInterfaceConfig {
        &self.config
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// `PATCH /network-interfaces/{id}`: replaces the limiters given.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update(rx);
            self.config.rx_rate_limiter = Some(*rx);
        }
        if let Some(tx) = tx {
            self.tx_limiter.update(tx);
            self.config.tx_rate_limiter = Some(*tx);
        }
    }

    /// `PATCH /network-interfaces/{id}`: connection tracking on or off.
    /// Switched on, it learns connections from their next segments.
    pub fn set_terminate_connections(&mut self, on: bool) {
        self.config.terminate_connections_on_pause = on;
        match (on, self.conntrack.is_some()) {
            (true, false) => self.conntrack = Some(ConnTracker::default()),
            (false, true) => self.conntrack = None,
            _ => {}
        }
    }

    /// Connections that a pause would end now (None when tracking is off).
    pub fn tracked_connections(&self) -> Option<usize> {
        self.conntrack.as_ref().map(ConnTracker::len)
    }

    pub(crate) fn pending_rx_frames(&self) -> Vec<Vec<u8>> {
        self.rx_inject.iter().cloned().collect()
    }

    pub(crate) fn set_pending_rx_frames(&mut self, frames: &[Vec<u8>]) {
        self.rx_inject = frames
            .iter()
            .filter(|f| f.len() > VNET_HDR_LEN && f.len() <= MAX_FRAME_LEN)
            .cloned()
            .collect();
    }

    /// The vCPUs have stopped: with tracking on, ends every connection the
    /// guest took part in, with an RST to the remote (on the tap, now) and
    /// one to the guest (into its receive ring, now or when it has room).
    fn end_connections(&mut self) {
        if self.conntrack.is_none() {
            return;
        }
        // What the guest queued before it stopped goes out first, so the
        // RST's sequence number follows it.
        self.process_tx();
        let Some(ct) = self.conntrack.as_mut() else {
            return;
        };
        let ended = ct.terminate();
        for t in &ended {
            if let Err(e) = self.tap.write_frame(&t.to_remote) {
                crate::guest_warn!(
                    "virtio-net {}: cannot send the RST for {:?}: {e}",
                    self.config.iface_id,
                    t.key
                );
                self.counters.dropped += 1;
            }
        }
        let n = ended.len() as u64;
        self.rx_inject.extend(ended.into_iter().map(|t| t.to_guest));
        self.counters.connections_terminated += n;
        crate::metrics::METRICS.net.connections_terminated.add(n);
        log::info!(
            "virtio-net {}: paused; ended {n} TCP connection(s) with RSTs both ways",
            self.config.iface_id
        );
        self.process_rx();
    }

    fn offloads(&self) -> u32 {
        let acked = |f: u32| self.common.is_acked(f);
        let mut flags = 0;
        if acked(GUEST_CSUM) {
            flags |= TUN_F_CSUM;
        }
        if acked(GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if acked(GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
        if acked(GUEST_UFO) {
            flags |= TUN_F_UFO;
        }
        flags
    }

    /// Moves frames into the guest's receive buffers (first the VMM's own,
    /// then the tap's) until there are none, the guest has no buffer, or
    /// the limiter says wait. A frame read but not delivered is kept for
    /// the next attempt.
    pub fn process_rx(&mut self) {
        if self.common.is_broken() || !self.common.is_activated() {
            return;
        }
        let mut used_any = false;
        let mut error = None;
        loop {
            let injected = !self.rx_inject.is_empty();
            if !injected && !self.next_tap_frame() {
                break;
            }
            let Some(active) = self.common.active_mut() else {
                break;
            };
            let mem = &active.mem;
            let rx = &mut active.queues[RX_INDEX];
            let chain = match pop_or_enable(rx, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break, // wait for the guest's next RX kick
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            };
            let head = chain.head_index();
            let frame: &mut [u8] = if injected {
                match self.rx_inject.front_mut() {
                    Some(f) => f,
                    None => break,
                }
            } else {
                &mut self.rx_buf[..self.rx_pending]
            };
            let written = write_frame(mem, chain, frame);
            let len = match written {
                Some(n) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
                    if let (false, Some(ct)) = (injected, self.conntrack.as_mut()) {
                        ct.on_remote_frame(&self.rx_buf[VNET_HDR_LEN..n]);
                    }
                    n as u32
                }
                None => {
                    crate::guest_warn!(
                        "virtio-net {}: receive buffer too small or unwritable for a \
                         {}-byte frame; dropped",
                        self.config.iface_id,
                        frame.len()
                    );
                    self.counters.dropped += 1;
                    0
                }
            };
            if injected {
                self.rx_inject.pop_front();
            } else {
                self.rx_pending = 0;
                self.rx_paid = false;
            }
            if let Err(e) = rx.add_used(mem, head, len) {
                error = Some(e.to_string());
                break;
            }
            used_any = true;
        }
        if let Some(a) = self.common.active_mut() {
            if used_any {
                notify(&mut a.queues[RX_INDEX], &a.mem, &a.interrupt);
            }
        }
        if let Some(e) = error {
            self.common
                .mark_broken(format_args!("receive queue error: {e}"));
        }
    }

    /// Makes `rx_buf[..rx_pending]` a tap frame that may go to the guest
    /// now (read, allowed by connection tracking, paid to the limiter).
    /// False when there is none or the limiter says wait.
    fn next_tap_frame(&mut self) -> bool {
        loop {
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => {
                        self.rx_pending = n;
                        self.rx_paid = false;
                    }
                    Ok(_) => continue, // runt: nothing to deliver
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::guest_warn!("virtio-net {}: tap read: {e}", self.config.iface_id);
                        return false;
                    }
                }
            }
            if let Some(ct) = &self.conntrack {
                match ct.check_remote_frame(&self.rx_buf[VNET_HDR_LEN..self.rx_pending]) {
                    RemoteVerdict::Deliver => {}
                    RemoteVerdict::Drop => {
                        self.rx_pending = 0;
                        continue;
                    }
                    RemoteVerdict::DropAndReply(rst) => {
                        if let Err(e) = self.tap.write_frame(&rst) {
                            log::debug!("virtio-net {}: tap write: {e}", self.config.iface_id);
                        }
                        self.rx_pending = 0;
                        continue;
                    }
                }
            }
            if !self.rx_paid {
                if !self
                    .rx_limiter
                    .consume((self.rx_pending - VNET_HDR_LEN) as u64)
                {
                    self.counters.throttled += 1;
                    return false;
                }
                self.rx_paid = true;
            }
            return true;
        }
    }

    /// Sends every frame the guest queued, unless the limiter says wait
    /// (the frame then stays in the ring for the timer).
    pub fn process_tx(&mut self) {
        let Some(active) = self.common.working_mut() else {
            return;
        };
        let mem = &active.mem;
        let tx = &mut active.queues[TX_INDEX];
        let mut used_any = false;
        let mut error = None;
        loop {
            if self.tx_limiter.is_blocked() {
                break;
            }
            let chain = match pop_or_enable(tx, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            };
            let head = chain.head_index();
            let mut frame_len = None;
            if let Ok(mut r) = Reader::new(mem, chain) {
                let n = r.available_bytes();
                if n > VNET_HDR_LEN && n <= self.tx_buf.len() {
                    if !self.tx_limiter.consume((n - VNET_HDR_LEN) as u64) {
                        // Keep the frame in the ring until the timer fires.
                        self.counters.throttled += 1;
                        tx.go_to_previous_position();
                        break;
                    }
                    if r.read_exact(&mut self.tx_buf[..n]).is_ok() {
                        frame_len = Some(n);
                    }
                }
            }
            if let (Some(n), Some(ct)) = (frame_len, self.conntrack.as_mut()) {
                if !ct.on_guest_frame(&self.tx_buf[VNET_HDR_LEN..n]) {
                    // A connection already ended by a pause: the remote
                    // has its RST. Some(0): used, not sent.
                    frame_len = Some(0);
                }
            }
            match frame_len {
                Some(0) => {}
                Some(n) => match self.tap.write_frame(&self.tx_buf[..n]) {
                    Ok(_) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (n - VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        log::debug!("virtio-net {}: tap write: {e}", self.config.iface_id);
                        self.counters.dropped += 1;
                    }
                },
                None => {
                    crate::guest_warn!(
                        "virtio-net {}: malformed transmit chain; dropped",
                        self.config.iface_id
                    );
                    self.counters.dropped += 1;
                }
            }
            if let Err(e) = tx.add_used(mem, head, 0) {
                error = Some(e.to_string());
                break;
            }
            used_any = true;
        }
        if used_any {
            notify(tx, mem, &active.interrupt);
        }
        if let Some(e) = error {
            self.common
                .mark_broken(format_args!("transmit queue error: {e}"));
        }
    }

    pub(crate) fn on_rx_limiter_event(&mut self) {
        self.rx_limiter.event_handler();
        self.process_rx();
    }

    pub(crate) fn on_tx_limiter_event(&mut self) {
        self.tx_limiter.event_handler();
        self.process_tx();
    }

    #[cfg(test)]
    pub(crate) fn rx_limiter_fd(&self) -> i32 {
        self.rx_limiter.as_raw_fd()
    }

    #[cfg(test)]
    pub(crate) fn tx_limiter_fd(&self) -> i32 {
        self.tx_limiter.as_raw_fd()
    }

    #[cfg(test)]
    pub(crate) fn rx_inject_len(&self) -> usize {
        self.rx_inject.len()
    }

    #[cfg(test)]
    pub(crate) fn conntrack_mut(&mut self) -> Option<&mut ConnTracker> {
        self.conntrack.as_mut()
    }
}

impl VirtioDevice for Net {
    virtio_common_accessors!(common);

    /// `struct virtio_net_config`: only `mac` (no STATUS, no MQ, no MTU).
    /// Writing the MAC is legacy-only (virtio 1.1 5.1.4.2): read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.unwrap_or_default(), offset, data);
    }

    fn on_activate(&mut self) {
        if let Err(e) = self.tap.set_offload(self.offloads()) {
            crate::guest_warn!(
                "virtio-net {}: cannot set tap offloads {:#x}: {e}",
                self.config.iface_id,
                self.offloads()
            );
        }
        // Buffers and frames queued before DRIVER_OK, and frames the tap
        // queued meanwhile, are picked up on the device thread.
        self.common.kick(RX_INDEX);
        self.common.kick(TX_INDEX);
    }

    fn on_pause(&mut self) {
        self.end_connections();
    }

    fn on_resume(&mut self) {
        if let Some(ct) = self.conntrack.as_mut() {
            ct.forget_terminated();
        }
    }

    fn on_reset(&mut self) {
        if let Err(e) = self.tap.set_offload(0) {
            crate::guest_warn!(
                "virtio-net {}: cannot clear tap offloads: {e}",
                self.config.iface_id
            );
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, tag: u32, set: EventSet| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, set)) {
                log::error!("virtio-net: cannot register event {tag}: {e:?}");
            }
        };
        let evts = self.common.queue_events();
        add(evts[RX_INDEX].as_raw_fd(), EV_RX_QUEUE, EventSet::IN);
        add(evts[TX_INDEX].as_raw_fd(), EV_TX_QUEUE, EventSet::IN);
        // Edge-triggered: a frame kept back (no guest buffer) must not make
        // the loop spin; it is retried on the next RX kick.
        add(
            self.tap.as_raw_fd(),
            EV_TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        add(self.rx_limiter.as_raw_fd(), EV_RX_LIMITER, EventSet::IN);
        add(self.tx_limiter.as_raw_fd(), EV_TX_LIMITER, EventSet::IN);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EV_RX_QUEUE => {
                let _ = self.common.queue_events()[RX_INDEX].read();
                self.process_rx();
            }
            EV_TX_QUEUE => {
                let _ = self.common.queue_events()[TX_INDEX].read();
                self.process_tx();
            }
            EV_TAP => self.process_rx(),
            EV_RX_LIMITER => self.on_rx_limiter_event(),
            EV_TX_LIMITER => self.on_tx_limiter_event(),
            other => crate::guest_warn!("virtio-net: unexpected event {other}"),
        }
    }
}

/// Writes one frame into a receive chain, `num_buffers` set to 1 (no
/// MRG_RXBUF). Returns the length written, None if it does not fit.
fn write_frame(
    mem: &Mem,
    chain: crate::devices::virtio::queue::Chain<'_>,
    frame: &mut [u8],
) -> Option<usize> {
    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    match Writer::new(mem, chain) {
        Ok(mut w) if w.available_bytes() >= frame.len() => {
            w.write_all(frame).ok().map(|_| frame.len())
        }
        _ => None,
    }
}
