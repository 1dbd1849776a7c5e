//! The vhost-user conversation with the backend, on top of the rust-vmm
//! `vhost` crate's `Frontend`: connection, feature negotiation, config
//! space, memory table and ring set-up.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::watchdog::Watchdog;
use super::VhostUserBlockError;
use crate::devices::virtio::Mem;

/// Bit 30: the backend speaks vhost-user protocol features (never offered
/// to the guest).
pub(super) const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// `struct virtio_blk_config` as far as Linux reads it.
pub(super) const CONFIG_SPACE_LEN: u32 = 60;

/// Bounds each stretch of requests to the backend: one that neither answers
/// nor closes must not hold a vCPU (activation) or InstanceStart forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected backend after feature negotiation.
pub(super) struct Connected {
    pub frontend: Frontend,
    /// A second handle on the socket, watched for the backend hanging up.
    pub watch: UnixStream,
    pub watchdog: Watchdog,
    pub features: u64,
    pub config_space: Vec<u8>,
}

/// Connects to `path` and negotiates: the backend must offer VIRTIO_F_VERSION_1,
/// protocol features, and the CONFIG protocol feature (capacity comes from it).
pub(super) fn connect(drive_id: &str, path: &str) -> Result<Connected, VhostUserBlockError> {
    let proto = |what: &'static str| {
        move |source| VhostUserBlockError::Protocol {
            drive_id: drive_id.into(),
            path: path.into(),
            what,
            source,
        }
    };
    let io_err = |source| VhostUserBlockError::Connect {
        drive_id: drive_id.into(),
        path: path.into(),
        source,
    };
    let sock = UnixStream::connect(path).map_err(io_err)?;
    let watch = sock.try_clone().map_err(io_err)?;
    let watchdog = Watchdog::new(sock.try_clone().map_err(io_err)?, REQUEST_TIMEOUT, drive_id)
        .map_err(io_err)?;
    let guard = watchdog.guard();
    let mut frontend = Frontend::from_stream(sock, 1);
    frontend.set_owner().map_err(proto("SET_OWNER"))?;
    let features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
    let lacks = |what: &str| VhostUserBlockError::Features {
        drive_id: drive_id.into(),
        path: path.into(),
        what: what.into(),
    };
    if features & (1 << crate::devices::virtio::VIRTIO_F_VERSION_1) == 0 {
        return Err(lacks("VIRTIO_F_VERSION_1"));
    }
    if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Err(lacks("VHOST_USER_F_PROTOCOL_FEATURES"));
    }
    // The crate only sends protocol-feature requests once the bit is acked;
    // libvhost-user refuses a device without VERSION_1 at once.
    frontend
        .set_features(
            VHOST_USER_F_PROTOCOL_FEATURES | (1 << crate::devices::virtio::VIRTIO_F_VERSION_1),
        )
        .map_err(proto("SET_FEATURES"))?;
    let offered = frontend
        .get_protocol_features()
        .map_err(proto("GET_PROTOCOL_FEATURES"))?;
    if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(lacks("the CONFIG protocol feature"));
    }
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .map_err(proto("SET_PROTOCOL_FEATURES"))?;
    let config_space = read_config(&mut frontend).map_err(proto("GET_CONFIG"))?;
    drop(guard);
    Ok(Connected {
        frontend,
        watch,
        watchdog,
        features,
        config_space,
    })
}

fn read_config(frontend: &mut Frontend) -> vhost::Result<Vec<u8>> {
    let buf = vec![0u8; CONFIG_SPACE_LEN as usize];
    let (_, payload) =
        frontend.get_config(0, CONFIG_SPACE_LEN, VhostUserConfigFlags::empty(), &buf)?;
    Ok(payload.to_vec())
}

/// Hands the backend everything it needs to run the queues: the acked
/// features, guest memory by file descriptor, then per queue its size,
/// addresses, position, and the kick/call eventfds; finally enables them.
pub(super) fn start_rings(
    frontend: &mut Frontend,
    acked_features: u64,
    mem: &Mem,
    queues: &[Queue],
    kicks: &[&EventFd],
    call: &EventFd,
) -> Result<(), String> {
    let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
    frontend
        .set_features(acked_features | VHOST_USER_F_PROTOCOL_FEATURES)
        .map_err(e("SET_FEATURES"))?;
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("guest memory is not shareable: {err}"))?;
    frontend
        .set_mem_table(&regions)
        .map_err(e("SET_MEM_TABLE"))?;
    for (i, (queue, kick)) in queues.iter().zip(kicks).enumerate() {
        let host = |a: u64| -> Result<u64, String> {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|err| format!("queue {i}: ring address {a:#x}: {err}"))
        };
        let ring = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host(queue.desc_table())?,
            used_ring_addr: host(queue.used_ring())?,
            avail_ring_addr: host(queue.avail_ring())?,
            log_addr: None,
        };
        frontend
            .set_vring_num(i, queue.size())
            .map_err(e("SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(i, &ring)
            .map_err(e("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(i, queue.next_avail())
            .map_err(e("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(i, call)
            .map_err(e("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(i, kick)
            .map_err(e("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(i, true)
            .map_err(e("SET_VRING_ENABLE"))?;
    }
    Ok(())
}
