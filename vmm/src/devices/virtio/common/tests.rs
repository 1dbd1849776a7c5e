//! A new device is its own state plus about fifteen lines of glue: the
//! transport, feature negotiation, activation, the broken state, reset and
//! snapshots all work from `VirtioCommon` and the trait's defaults.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::*;
use crate::devices::bus::lock;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::net::NetState;
use crate::devices::virtio::queue::{drain, notify};
use crate::devices::virtio::test_utils::{r, rd, test_mem, w, TestQueue};
use crate::devices::virtio::vhost_user_block::VhostUserBlockState;
use crate::devices::virtio::vsock::{HostConnections, VsockState};
use crate::devices::virtio::{
    status, virtio_common_accessors, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::vmm_config::drive::BlockDeviceConfig;
use crate::vmm_config::net::NetworkInterfaceConfig;

// ---- The whole glue of a device with one queue that uses every chain. ----
struct Sink {
    common: VirtioCommon,
}

impl Sink {
    fn new(avail_features: u64) -> Sink {
        let common = VirtioCommon::new(99, "sink", &[8], avail_features).unwrap();
        Sink { common }
    }
}

impl VirtioDevice for Sink {
    virtio_common_accessors!(common);
}
// ---- End of the glue; what follows is the device's own work. ----

impl Sink {
    fn process(&mut self) {
        let Some(a) = self.common.working_mut() else {
            return;
        };
        match drain(&mut a.queues[0], &a.mem, |_| 0) {
            Ok(true) => notify(&mut a.queues[0], &a.mem, &a.interrupt),
            Ok(false) => {}
            Err(e) => self.common.mark_broken(format_args!("queue: {e}")),
        }
    }
}

const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_OWN: u64 = 1 << 3;
const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn driver_init(t: &mut MmioTransport, features: u64, q: &TestQueue) -> u32 {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2 {
        w(t, reg::DRIVER_FEATURES_SEL, sel);
        w(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    w(t, reg::STATUS, ALL_OK & !status::DRIVER_OK);
    let qs = q.create_queue();
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_NUM, u32::from(qs.size()));
    w(t, reg::QUEUE_DESC_LOW, qs.desc_table() as u32);
    w(t, reg::QUEUE_DRIVER_LOW, qs.avail_ring() as u32);
    w(t, reg::QUEUE_DEVICE_LOW, qs.used_ring() as u32);
    w(t, reg::QUEUE_READY, 1);
    w(t, reg::STATUS, ALL_OK);
    r(t, reg::STATUS)
}

#[test]
fn a_device_of_glue_only_works_behind_the_transport() {
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(Sink::new(F_VERSION_1 | F_OWN)));
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();

    // Identity and features come from the common part.
    assert_eq!(r(&mut t, reg::DEVICE_ID), 99);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), F_OWN as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    assert_eq!(t.queue_evts().len(), 1);
    // The default config space is empty and read-only.
    let mut cfg = [0xffu8; 4];
    crate::devices::bus::BusDevice::write(&mut t, 0x100, &[1, 2, 3, 4]);
    crate::devices::bus::BusDevice::read(&mut t, 0x100, &mut cfg);
    assert_eq!(cfg, [0; 4]);

    // Full init: features acked, device activated with the driver's queue.
    let mut q = TestQueue::new(&mem, 0x10_0000, 8);
    assert_eq!(driver_init(&mut t, F_VERSION_1 | F_OWN, &q), ALL_OK);
    {
        let d = lock(&dev);
        assert_eq!(d.acked_features(), F_VERSION_1 | F_OWN);
        assert!(d.common().is_acked(3));
        assert!(!d.common().is_acked(4));
        assert!(!d.common().is_acked(200));
        assert!(d.is_activated());
    }

    // It uses what the driver queues and interrupts the guest.
    q.add_chain(&[rd(0x30_0000, 16)]);
    q.add_chain(&[rd(0x30_1000, 16)]);
    lock(&dev).process();
    assert_eq!(q.used_idx(), 2);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    let states = lock(&dev).queue_states();
    assert_eq!(states.len(), 1);
    assert_eq!((states[0].next_avail, states[0].next_used), (2, 2));

    // The activate guard: no second activation.
    let again = lock(&dev).activate(mem.clone(), Arc::new(Interrupt::new().unwrap()), vec![]);
    assert!(matches!(again, Err(ActivateError::AlreadyActive)));

    // A driver reset returns it to the start, and it can be set up again.
    w(&mut t, reg::STATUS, 0);
    {
        let d = lock(&dev);
        assert!(!d.is_activated());
        assert_eq!(d.acked_features(), 0);
        assert!(d.queue_states().is_empty());
    }
    let q = TestQueue::new(&mem, 0x20_0000, 8);
    assert_eq!(driver_init(&mut t, F_VERSION_1, &q), ALL_OK);
    assert_eq!(lock(&dev).acked_features(), F_VERSION_1);
}

#[test]
fn the_activate_guard_counts_queues() {
    let mem = test_mem();
    let mut dev = Sink::new(F_VERSION_1);
    let q = TestQueue::new(&mem, 0x10_0000, 8);
    let irq = Arc::new(Interrupt::new().unwrap());
    for queues in [vec![], vec![q.create_queue(), q.create_queue()]] {
        let got = queues.len();
        let res = dev.activate(mem.clone(), irq.clone(), queues);
        assert!(
            matches!(res, Err(ActivateError::QueueCount { expected: 1, got: g }) if g == got),
            "{got} queues"
        );
        assert!(!dev.is_activated());
    }
    dev.activate(mem.clone(), irq, vec![q.create_queue()])
        .unwrap();
    assert!(dev.is_activated());
}

#[test]
fn a_broken_device_stops_and_asks_for_a_reset_until_it_gets_one() {
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(Sink::new(F_VERSION_1)));
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut q = TestQueue::new(&mem, 0x10_0000, 8);
    driver_init(&mut t, F_VERSION_1, &q);
    // The driver announces far more buffers than the ring holds.
    q.set_avail_idx(100);
    lock(&dev).process();
    assert!(lock(&dev).common().is_broken());
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    // Broken: even a well-formed chain is left alone.
    q.set_avail_idx(0);
    q.add_chain(&[rd(0x30_0000, 16)]);
    lock(&dev).process();
    assert_eq!(q.used_idx(), 0);
    // A reset and a new init make it work again.
    w(&mut t, reg::STATUS, 0);
    assert!(!lock(&dev).common().is_broken());
    let mut q = TestQueue::new(&mem, 0x20_0000, 8);
    driver_init(&mut t, F_VERSION_1, &q);
    assert_eq!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    q.add_chain(&[rd(0x30_0000, 16)]);
    lock(&dev).process();
    assert_eq!(q.used_idx(), 1);
}

#[test]
fn a_glue_only_device_snapshots_and_restores() {
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(Sink::new(F_VERSION_1 | F_OWN)));
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut q = TestQueue::new(&mem, 0x10_0000, 8);
    driver_init(&mut t, F_VERSION_1 | F_OWN, &q);
    q.add_chain(&[rd(0x30_0000, 16)]);
    lock(&dev).process();

    let saved = lock(&dev).common().state();
    assert_eq!(
        serde_json::to_string(&saved).unwrap(),
        format!(r#"{{"acked_features":{}}}"#, F_VERSION_1 | F_OWN)
    );
    let transport = t.state();

    // A device that no longer offers a negotiated feature is refused.
    let mut lesser = Sink::new(F_VERSION_1);
    let err = lesser.common_mut().restore(&saved).unwrap_err();
    assert_eq!(err.missing(), F_OWN);
    assert_eq!(
        err.to_string(),
        format!(
            "saved features {:#x} are not all offered ({F_VERSION_1:#x})",
            F_VERSION_1 | F_OWN
        )
    );
    assert_eq!(lesser.acked_features(), 0);

    // The same device comes back activated where it left off.
    let mut fresh = Sink::new(F_VERSION_1 | F_OWN);
    fresh.common_mut().restore(&saved).unwrap();
    let fresh = Arc::new(Mutex::new(fresh));
    let _t2 = MmioTransport::restore(mem.clone(), fresh.clone(), &transport).unwrap();
    assert!(lock(&fresh).is_activated());
    assert_eq!(lock(&fresh).acked_features(), F_VERSION_1 | F_OWN);
    q.add_chain(&[rd(0x30_1000, 16)]);
    lock(&fresh).process();
    assert_eq!(q.used_idx(), 2);
}

/// The devices' saved JSON is what it was before `VirtioCommonState`:
/// one flat `acked_features` in the same place.
#[test]
fn device_states_keep_their_json_shape() {
    let common = VirtioCommonState { acked_features: 5 };
    let drive = BlockDeviceConfig {
        drive_id: "rootfs".into(),
        path_on_host: "/d".into(),
        ..Default::default()
    };
    let drive_json = serde_json::to_string(&drive).unwrap();
    let block = BlockState {
        config: drive.clone(),
        capacity: 8,
        common,
        fill: None,
    };
    let expect = format!(r#"{{"config":{drive_json},"capacity":8,"acked_features":5}}"#);
    assert_eq!(serde_json::to_string(&block).unwrap(), expect);
    assert_eq!(serde_json::from_str::<BlockState>(&expect).unwrap(), block);

    let vsock = VsockState {
        guest_cid: 3,
        uds_path: "/v.sock".into(),
        host_connections: Some(HostConnections {
            ports: vec![(1 << 30, 52)],
            next_local_port: (1 << 30) + 1,
        }),
        common,
    };
    let expect = r#"{"guest_cid":3,"uds_path":"/v.sock","host_connections":{"ports":[[1073741824,52]],"next_local_port":1073741825},"acked_features":5}"#;
    assert_eq!(serde_json::to_string(&vsock).unwrap(), expect);
    assert_eq!(serde_json::from_str::<VsockState>(expect).unwrap(), vsock);
    // A snapshot from before the field: its connections are unknown.
    let old = r#"{"guest_cid":3,"uds_path":"/v.sock","acked_features":5}"#;
    assert_eq!(
        serde_json::from_str::<VsockState>(old)
            .unwrap()
            .host_connections,
        None
    );

    let iface: NetworkInterfaceConfig =
        serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#).unwrap();
    let iface_json = serde_json::to_string(&iface).unwrap();
    let net = NetState {
        config: iface,
        common,
        pending_rx_frames: vec![vec![1, 2]],
    };
    let expect =
        format!(r#"{{"config":{iface_json},"acked_features":5,"pending_rx_frames":[[1,2]]}}"#);
    assert_eq!(serde_json::to_string(&net).unwrap(), expect);
    assert_eq!(serde_json::from_str::<NetState>(&expect).unwrap(), net);

    let vhost = VhostUserBlockState {
        config: drive,
        common,
        config_space: vec![7],
    };
    let expect = format!(r#"{{"config":{drive_json},"acked_features":5,"config_space":[7]}}"#);
    assert_eq!(serde_json::to_string(&vhost).unwrap(), expect);
    assert_eq!(
        serde_json::from_str::<VhostUserBlockState>(&expect).unwrap(),
        vhost
    );
}
