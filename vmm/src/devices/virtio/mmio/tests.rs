use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState, QueueT};

use super::*;
use crate::devices::virtio::test_utils::{r, test_mem, w};
use crate::devices::virtio::{
    read_config_bytes, virtio_common_accessors, VirtioCommon, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
};

const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_DEVICE: u64 = 1 << 5;

struct Fake {
    common: VirtioCommon,
    config: [u8; 8],
    resets: usize,
}

impl Fake {
    fn activated(&self) -> Option<(&[Queue], &Arc<Interrupt>)> {
        self.common
            .active()
            .map(|a| (a.queues.as_slice(), &a.interrupt))
    }
}

impl VirtioDevice for Fake {
    virtio_common_accessors!(common);
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.config[o..o + data.len()].copy_from_slice(data);
    }
    fn on_reset(&mut self) {
        self.resets += 1;
    }
}

fn setup() -> (MmioTransport, Arc<Mutex<Fake>>) {
    let fake = new_fake();
    let t = MmioTransport::new(test_mem(), fake.clone()).unwrap();
    (t, fake)
}

fn new_fake() -> Arc<Mutex<Fake>> {
    let features = F_VERSION_1 | F_EVENT_IDX | F_DEVICE;
    Arc::new(Mutex::new(Fake {
        common: VirtioCommon::new(42, "fake", &[16, 32], features).unwrap(),
        config: *b"abcdefgh",
        resets: 0,
    }))
}

/// Driver init up to FEATURES_OK with `features`.
fn negotiate(t: &mut MmioTransport, features: u64) {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

/// Configures queue `i` with rings at `base` (valid in test memory).
fn setup_queue(t: &mut MmioTransport, i: u32, size: u32, base: u64) {
    w(t, reg::QUEUE_SEL, i);
    w(t, reg::QUEUE_NUM, size);
    w(t, reg::QUEUE_DESC_LOW, base as u32);
    w(t, reg::QUEUE_DESC_HIGH, 0);
    w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    w(t, reg::QUEUE_DRIVER_HIGH, 0);
    w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    w(t, reg::QUEUE_DEVICE_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _) = setup();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(r(&mut t, reg::VENDOR_ID), 0);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        r(&mut t, reg::DEVICE_FEATURES),
        (F_EVENT_IDX | F_DEVICE) as u32
    );
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 32);
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(t.queue_evts().len(), 2);
}

#[test]
fn full_init_activates_device_with_driver_queues() {
    let (mut t, fake) = setup();
    negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(
        r(&mut t, reg::STATUS) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    assert_eq!(
        fake.lock().unwrap().acked_features(),
        F_VERSION_1 | F_EVENT_IDX
    );
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_eq!(r(&mut t, reg::STATUS), ALL_OK);
    let dev = fake.lock().unwrap();
    let (queues, _) = dev.activated().expect("activated");
    assert_eq!(queues[0].size(), 8);
    assert_eq!(queues[0].desc_table(), 0x10_0000);
    assert_eq!(queues[0].avail_ring(), 0x10_1000);
    assert_eq!(queues[0].used_ring(), 0x10_2000);
    assert_eq!(queues[1].size(), 32);
    assert!(queues.iter().all(|q| q.event_idx_enabled()));
}

#[test]
fn bad_features_are_refused() {
    let (mut t, fake) = setup();
    // Without VERSION_1 (a legacy driver).
    negotiate(&mut t, F_DEVICE);
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    w(&mut t, reg::STATUS, 0);
    // With a bit that was not offered.
    negotiate(&mut t, F_VERSION_1 | (1 << 40));
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does nothing.
    w(&mut t, reg::STATUS, ALL_OK & !status::FEATURES_OK);
    assert_eq!(r(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
    assert!(fake.lock().unwrap().activated().is_none());
}

#[test]
fn invalid_queues_make_device_need_reset() {
    let (mut t, fake) = setup();
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    // Queue 1 is never made ready.
    w(&mut t, reg::STATUS, ALL_OK);
    assert!(fake.lock().unwrap().activated().is_none());
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    // Reset clears it and the driver can start over.
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);

    // Rings outside guest memory; a size that is not a power of two.
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x7fff_f000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    w(&mut t, reg::STATUS, 0);
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 12, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(fake.lock().unwrap().activated().is_none());

    // An activation the device refuses (the activate guard: it already is).
    w(&mut t, reg::STATUS, 0);
    let queues = vec![Queue::new(16).unwrap(), Queue::new(32).unwrap()];
    let irq = Arc::new(Interrupt::new().unwrap());
    fake.lock()
        .unwrap()
        .common
        .activate(test_mem(), irq.clone(), queues)
        .unwrap();
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    let f = fake.lock().unwrap();
    assert!(Arc::ptr_eq(f.activated().unwrap().1, &irq), "kept its own");
}

#[test]
fn queue_registers_only_change_between_features_ok_and_driver_ok() {
    let (mut t, fake) = setup();
    // Before FEATURES_OK.
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert!(fake.lock().unwrap().activated().is_some());
    // After DRIVER_OK.
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    // Driver features are fixed after FEATURES_OK.
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.state().driver_features, F_VERSION_1);
}

#[test]
fn status_must_follow_the_init_sequence() {
    let (mut t, _) = setup();
    // Skipping ACKNOWLEDGE.
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // Clearing a bit without a reset.
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // FAILED sticks and blocks further progress.
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_ne!(r(&mut t, reg::STATUS) & status::FAILED, 0);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED | status::FEATURES_OK,
    );
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let (mut t, fake) = setup();
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    let interrupt = fake.lock().unwrap().activated().unwrap().1.clone();
    interrupt.signal_used();
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(fake.lock().unwrap().resets, 1);
    assert!(fake.lock().unwrap().activated().is_none());
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    let st = t.state();
    assert_eq!(
        (st.status, st.driver_features, st.interrupt_status),
        (0, 0, 0)
    );
    assert!(st.queues.iter().all(|q| !q.ready && q.size == q.max_size));
}

#[test]
fn notify_and_interrupt_ack() {
    let (mut t, fake) = setup();
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(fake.lock().unwrap().queue_events()[1].read().unwrap(), 1);
    assert!(fake.lock().unwrap().queue_events()[0].read().is_err());
    // Out of range: ignored.
    w(&mut t, reg::QUEUE_NOTIFY, 7);

    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    let interrupt = fake.lock().unwrap().activated().unwrap().1.clone();
    interrupt.trigger(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
    w(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn config_space_and_odd_accesses() {
    let (mut t, fake) = setup();
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(&b, b"cd");
    let mut b = [0u8; 4];
    t.read(0x106, &mut b);
    assert_eq!(&b, b"gh\0\0");
    t.write(0x100, b"XY");
    assert_eq!(&fake.lock().unwrap().config[..2], b"XY");
    // Wrong sizes and alignment on registers are ignored, reads give 0.
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(0x2, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS + 1, &1u32.to_le_bytes());
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, 0x0f0), 0);
    w(&mut t, 0x0f0, 1);
}

/// The builder's wiring end to end: a block device behind the transport,
/// driven by register writes and the device thread's event loop.
#[test]
fn block_device_through_transport_and_event_manager() {
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::test_utils::{rd, read_bytes, wr, write_bytes, TestQueue};
    use crate::vmm_config::drive::BlockDeviceConfig;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::os::unix::fs::FileExt;

    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    file.as_file().write_all_at(&[9u8; 1024], 0).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(&BlockDeviceConfig {
            drive_id: "d".into(),
            path_on_host: file.as_path().to_str().unwrap().into(),
            is_root_device: false,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            serial: None,
            ..Default::default()
        })
        .unwrap(),
    ));
    let mem = test_mem();
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(block.clone());

    // A request queued before DRIVER_OK is served after activation.
    let mut vq = TestQueue::new(&mem, 0x10_0000, 16);
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&1u64.to_le_bytes()); // IN, sector 1
    write_bytes(&mem, 0x20_0000, &hdr);
    vq.add_chain(&[rd(0x20_0000, 16), wr(0x21_0000, 512), wr(0x22_0000, 1)]);

    negotiate(&mut t, F_VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 16);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x10_0000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x10_1000);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x10_2000);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_eq!(r(&mut t, reg::STATUS), ALL_OK);

    em.run_with_timeout(1000).unwrap();
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(read_bytes(&mem, 0x22_0000, 1), [0]);
    assert_eq!(read_bytes(&mem, 0x21_0000, 512), vec![9u8; 512]);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    w(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

    // A notify through the bus (no ioeventfd registered).
    vq.add_chain(&[rd(0x20_0000, 16), wr(0x21_0000, 512), wr(0x22_0000, 1)]);
    w(&mut t, NOTIFY_REG_OFFSET, 0);
    em.run_with_timeout(1000).unwrap();
    assert_eq!(vq.used_idx(), 2);

    // Reset and re-init: the device works again.
    w(&mut t, reg::STATUS, 0);
    assert!(!block.lock().unwrap().is_activated());
}

/// Every register a driver can read, with each queue and feature page selected.
fn guest_view(t: &mut MmioTransport) -> Vec<u32> {
    let (qsel, fsel) = (t.regs.queue_sel, t.regs.device_features_sel);
    let mut v = Vec::new();
    for off in [
        reg::MAGIC_VALUE,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
    ] {
        v.push(r(t, off));
    }
    for off in [reg::STATUS, reg::INTERRUPT_STATUS, reg::CONFIG_GENERATION] {
        v.push(r(t, off));
    }
    for sel in 0..2 {
        w(t, reg::DEVICE_FEATURES_SEL, sel);
        v.push(r(t, reg::DEVICE_FEATURES));
    }
    for sel in 0..3 {
        w(t, reg::QUEUE_SEL, sel);
        v.push(r(t, reg::QUEUE_NUM_MAX));
        v.push(r(t, reg::QUEUE_READY));
    }
    w(t, reg::QUEUE_SEL, qsel);
    w(t, reg::DEVICE_FEATURES_SEL, fsel);
    v
}

fn json_round_trip(st: &MmioTransportState) -> MmioTransportState {
    let back: MmioTransportState =
        serde_json::from_str(&serde_json::to_string(st).unwrap()).unwrap();
    assert_eq!(&back, st);
    back
}

#[test]
fn restore_activated_transport_shows_the_same_registers() {
    let (mut t, fake) = setup();
    negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    fake.lock().unwrap().activated().unwrap().1.signal_used();
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    let before = guest_view(&mut t);
    let st = json_round_trip(&t.state());
    assert_eq!(st.device_type, 42);
    assert_eq!(st.queues.len(), 2);
    assert!(st.queues.iter().all(|q| q.ready && q.event_idx_enabled));
    assert_eq!((st.queues[0].size, st.queues[0].desc_table), (8, 0x10_0000));

    let fake2 = new_fake();
    let mut t2 = MmioTransport::restore(test_mem(), fake2.clone(), &st).unwrap();
    assert_eq!(guest_view(&mut t2), before);
    assert_eq!(t2.state(), st);
    // Activated without a handshake, with the saved queues and features.
    {
        let f = fake2.lock().unwrap();
        let (queues, _) = f.activated().unwrap();
        assert_eq!(queues[1].state(), QueueState::from(&st.queues[1]));
        assert_eq!(f.acked_features(), F_VERSION_1 | F_EVENT_IDX);
    }
    // The pending interrupt is signalled again, and can be acknowledged.
    assert_eq!(t2.irq_evt().read().unwrap(), 1);
    w(&mut t2, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t2, reg::INTERRUPT_STATUS), 0);
    // A driver reset still works on a restored transport.
    w(&mut t2, reg::STATUS, 0);
    assert!(fake2.lock().unwrap().activated().is_none());
}

#[test]
fn restore_mid_handshake_lets_the_driver_finish() {
    let (mut t, _) = setup();
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    let st = json_round_trip(&t.state());
    let fake2 = new_fake();
    let mut t2 = MmioTransport::restore(test_mem(), fake2.clone(), &st).unwrap();
    assert!(fake2.lock().unwrap().activated().is_none());
    assert!(t2.irq_evt().read().is_err(), "no interrupt pending");
    setup_queue(&mut t2, 1, 32, 0x20_0000);
    w(&mut t2, reg::STATUS, ALL_OK);
    let f = fake2.lock().unwrap();
    let (queues, _) = f.activated().expect("activated by DRIVER_OK");
    assert_eq!(queues[0].desc_table(), 0x10_0000);
}

#[test]
fn corrupt_transport_state_is_refused() {
    let (mut t, _) = setup();
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x10_0000);
    setup_queue(&mut t, 1, 32, 0x20_0000);
    w(&mut t, reg::STATUS, ALL_OK);
    let good = t.state();
    let restore = |st: &MmioTransportState| {
        MmioTransport::restore(test_mem(), new_fake(), st)
            .err()
            .expect("corrupt state restored")
    };

    let mut st = good.clone();
    st.queues[1].used_ring = 0x4000_0000; // beyond the 16 MiB of test memory
    let e = restore(&st);
    assert!(
        matches!(e, MmioRestoreError::QueueOutsideMemory { index: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("0x40000000"), "{e}");

    let mut st = good.clone();
    st.queues[0].desc_table = u64::MAX - 15; // aligned, but the table would wrap around
    assert!(matches!(
        restore(&st),
        MmioRestoreError::QueueOutsideMemory { .. }
    ));

    let mut st = good.clone();
    st.queues[0].size = 3;
    let e = restore(&st);
    assert!(
        matches!(e, MmioRestoreError::InvalidQueue { index: 0, .. }),
        "{e}"
    );

    let mut st = good.clone();
    st.queues[0].next_used = 7; // memory's used.idx is still 0
    let e = restore(&st);
    assert!(
        matches!(
            e,
            MmioRestoreError::UsedIndexMismatch {
                index: 0,
                saved: 7,
                in_memory: 0
            }
        ),
        "{e}"
    );

    let mut st = good.clone();
    st.device_type = 2;
    assert!(matches!(
        restore(&st),
        MmioRestoreError::DeviceType {
            saved: 2,
            actual: 42
        }
    ));

    let mut st = good.clone();
    st.queues.pop();
    assert!(matches!(
        restore(&st),
        MmioRestoreError::QueueCount {
            saved: 1,
            actual: 2
        }
    ));

    let mut st = good.clone();
    st.queues[1].max_size = 64;
    assert!(matches!(
        restore(&st),
        MmioRestoreError::QueueMaxSize { index: 1, .. }
    ));

    let mut st = good;
    st.driver_features |= 1 << 40;
    assert!(matches!(restore(&st), MmioRestoreError::Features { .. }));
}
