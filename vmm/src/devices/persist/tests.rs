//! Save -> JSON -> restore of virtio devices behind their transports, with
//! the guest driving them through MMIO registers and rings in memory.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::vsock::packet::VSOCK_EVENT_TRANSPORT_RESET;
use crate::devices::virtio::{status, VIRTIO_MMIO_INT_VRING};
use crate::vmm_config::drive::BlockDeviceConfig;
use crate::vmm_config::vsock::VsockConfig;

const STATUS: u64 = 0x70;
const INTERRUPT_STATUS: u64 = 0x60;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const BSTATUS: u64 = 0x30_0000;

/// What Linux's virtio_mmio driver does up to DRIVER_OK.
fn bring_up(t: &mut MmioTransport, features: u64, queues: &[&TestQueue]) {
    w(t, STATUS, status::ACKNOWLEDGE);
    w(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2u32 {
        w(t, 0x24, sel);
        w(t, 0x20, (features >> (32 * sel)) as u32);
    }
    w(
        t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (i, tq) in queues.iter().enumerate() {
        let q = tq.create_queue();
        w(t, 0x30, i as u32);
        w(t, 0x38, u32::from(q.size()));
        for (off, addr) in [
            (0x80, q.desc_table()),
            (0x90, q.avail_ring()),
            (0xa0, q.used_ring()),
        ] {
            w(t, off, addr as u32);
            w(t, off + 4, (addr >> 32) as u32);
        }
        w(t, 0x44, 1);
    }
    w(t, STATUS, ALL_OK);
    assert_eq!(r(t, STATUS), ALL_OK);
}

fn json<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: &T) -> T {
    let back: T = serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap();
    assert_eq!(&back, v);
    back
}

fn disk(sectors: u64) -> TempFile {
    sector_disk(sectors)
}

fn block_config(path: &str) -> BlockDeviceConfig {
    BlockDeviceConfig {
        cache_type: Some("Writeback".into()),
        serial: Some("SN1".into()),
        ..root_drive(path)
    }
}

/// Queues a read of `sector` into DATA.
fn read_request(vq: &mut TestQueue, mem: &Mem, sector: u64) -> u16 {
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    write_bytes(mem, HDR, &h);
    write_bytes(mem, BSTATUS, &[0xff]);
    vq.add_chain(&[rd(HDR, 16), wr(DATA, 512), wr(BSTATUS, 1)])
}

fn restored_block(r: VirtioDeviceHandle) -> Arc<Mutex<Block>> {
    match r {
        VirtioDeviceHandle::Block(b) => b,
        _ => panic!("expected a block device"),
    }
}

#[test]
fn block_restored_mid_use_continues_on_its_queue() {
    let mem = test_mem();
    let file = disk(16);
    let mut vq = TestQueue::new(&mem, 0, 16);
    let block = Arc::new(Mutex::new(
        Block::new(&block_config(file.as_path().to_str().unwrap())).unwrap(),
    ));
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    bring_up(&mut t, F_VERSION_1 | F_EVENT_IDX, &[&vq]);
    // One request completed, one still pending when the snapshot is taken.
    read_request(&mut vq, &mem, 3);
    block.lock().unwrap().process_queue();
    assert_eq!(vq.used_idx(), 1);
    let pending = read_request(&mut vq, &mem, 5);
    let regs_before: Vec<u32> = [0x08, 0x70, 0x60, 0xfc].map(|o| r(&mut t, o)).to_vec();

    let t = Arc::new(Mutex::new(t));
    let saved = json(&save_virtio(&[(VirtioDeviceHandle::Block(block), t)]));
    assert_eq!(saved.len(), 1);
    let VirtioDeviceState::Block(bs) = &saved[0].device else {
        panic!("not a block state: {:?}", saved[0].device);
    };
    assert_eq!(bs.capacity, 16);
    assert_eq!(bs.config.serial.as_deref(), Some("SN1"));
    let q = &saved[0].transport.queues[0];
    assert_eq!(
        (q.next_avail, q.next_used, q.event_idx_enabled),
        (1, 1, true)
    );

    // Restore onto a copy of the disk at another path (a clone).
    let copy = disk(16);
    let overrides = RestoreOverrides {
        drive_paths: HashMap::from([(
            "rootfs".to_string(),
            copy.as_path().to_str().unwrap().to_string(),
        )]),
        vsock_uds_path: None,
        ..Default::default()
    };
    let (dev, mut t2) = restore_virtio(&mem, 0, &saved[0], &overrides).unwrap();
    let block2 = restored_block(dev);
    assert_eq!(
        block2.lock().unwrap().config().path_on_host,
        copy.as_path().to_str().unwrap()
    );
    let regs_after: Vec<u32> = [0x08, 0x70, 0x60, 0xfc].map(|o| r(&mut t2, o)).to_vec();
    assert_eq!(regs_after, regs_before);
    assert_eq!(t2.state().queues, saved[0].transport.queues);

    // The queue is kicked once so the pending request is noticed.
    let kick = block2.lock().unwrap().queue_events()[0].read().unwrap();
    assert!(kick >= 1);
    block2.lock().unwrap().process_queue();
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(vq.used_elem(1), (u32::from(pending), 513));
    assert_eq!(read_bytes(&mem, BSTATUS, 1), [0]);
    assert_eq!(read_bytes(&mem, DATA, 512), [5u8; 512]);
    // And new requests follow.
    read_request(&mut vq, &mem, 9);
    block2.lock().unwrap().process_queue();
    assert_eq!(vq.used_idx(), 3);
    assert_eq!(read_bytes(&mem, DATA, 512), [9u8; 512]);
    assert_ne!(r(&mut t2, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn block_with_a_different_capacity_is_refused() {
    let mem = test_mem();
    let file = disk(16);
    let block = Block::new(&block_config(file.as_path().to_str().unwrap())).unwrap();
    let state = json(&block.state());
    let small = disk(8);
    let err = Block::restore(&state, small.as_path().to_str(), None)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, BlockError::CapacityMismatch { .. }), "{msg}");
    assert!(msg.contains("8 sectors (4096 bytes)"), "{msg}");
    assert!(msg.contains("16 sectors (8192 bytes)"), "{msg}");
    assert!(msg.contains(small.as_path().to_str().unwrap()), "{msg}");
    // The same file restores fine, inactive until the transport activates it.
    let b = Block::restore(&state, None, None).unwrap();
    assert_eq!(b.state(), state);
    assert!(!b.is_activated());
    drop(mem);
}

#[test]
fn block_state_with_bad_queue_address_is_refused() {
    let mem = test_mem();
    let file = disk(16);
    let vq = TestQueue::new(&mem, 0, 16);
    let block = Arc::new(Mutex::new(
        Block::new(&block_config(file.as_path().to_str().unwrap())).unwrap(),
    ));
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    bring_up(&mut t, F_VERSION_1, &[&vq]);
    let mut saved = save_virtio(&[(VirtioDeviceHandle::Block(block), Arc::new(Mutex::new(t)))]);
    saved[0].transport.queues[0].avail_ring = 0x2000_0000;
    let err = restore_virtio(&mem, 3, &saved[0], &RestoreOverrides::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            DevicePersistError::Transport {
                slot: 3,
                source: MmioRestoreError::QueueOutsideMemory { .. }
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("avail 0x20000000"), "{err}");
}

#[test]
fn vsock_restored_from_an_older_state_resets_the_guest_transport() {
    vsock_restore(false);
}

#[test]
fn vsock_restored_from_a_state_listing_connections_sends_no_reset() {
    vsock_restore(true);
}

/// Saves a vsock device and restores it, from the state as saved (which
/// lists the host's connections: none here) or from it as an older VMM
/// wrote it, without the list.
fn vsock_restore(listed: bool) {
    let mem = test_mem();
    let dir = TempDir::new().unwrap();
    let uds = dir.as_path().join("v.sock");
    let rxq = TestQueue::new(&mem, 0, 64);
    let txq = TestQueue::new(&mem, 0x4000, 64);
    let mut evq = TestQueue::new(&mem, 0x8000, 64);
    let vsock = Arc::new(Mutex::new(
        Vsock::new(&VsockConfig {
            vsock_id: None,
            guest_cid: 7,
            uds_path: uds.to_str().unwrap().into(),
        })
        .unwrap(),
    ));
    let mut t = MmioTransport::new(mem.clone(), vsock.clone()).unwrap();
    bring_up(&mut t, F_VERSION_1 | F_EVENT_IDX, &[&rxq, &txq, &evq]);
    // Linux keeps event buffers posted.
    let ev_buf = 0x50_0000;
    write_bytes(&mem, ev_buf, &[0xff; 4]);
    let head = evq.add_chain(&[wr(ev_buf, 4)]);
    evq.add_chain(&[wr(ev_buf + 0x100, 4)]);

    let t = Arc::new(Mutex::new(t));
    let mut saved = json(&save_virtio(&[(
        VirtioDeviceHandle::Vsock(vsock.clone()),
        t,
    )]));
    let VirtioDeviceState::Vsock(vs) = &mut saved[0].device else {
        panic!("not a vsock state");
    };
    assert_eq!((vs.guest_cid, vs.uds_path.as_path()), (7, uds.as_path()));
    assert_eq!(
        vs.host_connections.as_ref().map(|h| h.ports.len()),
        Some(0),
        "no connection was made"
    );
    if !listed {
        vs.host_connections = None;
    }
    drop(vsock);

    let uds2 = dir.as_path().join("clone.sock");
    let overrides = RestoreOverrides {
        drive_paths: HashMap::new(),
        vsock_uds_path: Some(uds2.to_str().unwrap().into()),
        ..Default::default()
    };
    let (dev, mut t2) = restore_virtio(&mem, 0, &saved[0], &overrides).unwrap();
    let VirtioDeviceHandle::Vsock(vsock2) = dev else {
        panic!("expected vsock");
    };
    if listed {
        // Nothing to reset: the event queue is untouched, the guest is not
        // interrupted, and connections are not held back.
        assert_eq!(evq.used_idx(), 0);
        assert_eq!(r(&mut t2, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, 0);
        assert_eq!(t2.state().queues[2].next_used, 0);
        UnixStream::connect(&uds2).unwrap();
        return;
    }
    // The transport reset went out on the restored event queue.
    assert_eq!(evq.used_idx(), 1);
    assert_eq!(evq.used_elem(0), (u32::from(head), 4));
    assert_eq!(
        read_bytes(&mem, ev_buf, 4),
        VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    assert_ne!(r(&mut t2, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, 0);
    assert!(t2.irq_evt().read().unwrap() >= 1);
    assert_eq!(t2.state().queues[2].next_used, 1);
    // It listens on the new path, with the saved CID in config space.
    let v = vsock2.lock().unwrap();
    assert_eq!(v.uds_path(), uds2.as_path());
    let mut cid = [0u8; 8];
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 7);
    UnixStream::connect(&uds2).unwrap();
}

#[test]
fn inactive_vsock_restores_without_a_reset() {
    let mem = test_mem();
    let dir = TempDir::new().unwrap();
    let uds = dir.as_path().join("v.sock");
    let vsock = Arc::new(Mutex::new(
        Vsock::new(&VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: uds.to_str().unwrap().into(),
        })
        .unwrap(),
    ));
    let t = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), vsock.clone()).unwrap(),
    ));
    let saved = save_virtio(&[(VirtioDeviceHandle::Vsock(vsock.clone()), t)]);
    drop(vsock);
    let (dev, t2) = restore_virtio(&mem, 0, &saved[0], &RestoreOverrides::default()).unwrap();
    let VirtioDeviceHandle::Vsock(v) = dev else {
        panic!("expected vsock");
    };
    assert!(!v.lock().unwrap().is_activated());
    assert!(t2.irq_evt().read().is_err());

    let mut bad = saved[0].clone();
    if let VirtioDeviceState::Vsock(s) = &mut bad.device {
        s.guest_cid = 1 << 40;
    }
    let err = restore_virtio(&mem, 0, &bad, &RestoreOverrides::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not fit in 32 bits"), "{err}");
}
