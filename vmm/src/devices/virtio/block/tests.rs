use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::tempfile::TempFile;

use super::request::*;
use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, Mem, VirtioDevice, VIRTIO_MMIO_INT_VRING};
use crate::vmm_config::drive::BlockDeviceConfig;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 16;

fn config(path: &str) -> BlockDeviceConfig {
    BlockDeviceConfig {
        drive_id: "rootfs".into(),
        path_on_host: path.into(),
        is_root_device: true,
        is_read_only: false,
        partuuid: None,
        cache_type: None,
        serial: None,
        socket: None,
    }
}

/// A disk whose byte at offset `i` is `i / 512` (the sector number).
fn disk_file() -> TempFile {
    let f = TempFile::new().unwrap();
    for s in 0..DISK_SECTORS {
        f.as_file().write_all_at(&[s as u8; 512], s * 512).unwrap();
    }
    f
}

struct Harness<'a> {
    mem: &'a Mem,
    vq: TestQueue<'a>,
    block: Block,
    interrupt: Arc<Interrupt>,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a Mem, cfg: &BlockDeviceConfig) -> Self {
        Self::with_event_idx(mem, cfg, false)
    }

    fn with_event_idx(mem: &'a Mem, cfg: &BlockDeviceConfig, event_idx: bool) -> Self {
        let vq = TestQueue::new(mem, 0, 16);
        let mut block = Block::new(cfg).unwrap();
        let interrupt = Arc::new(Interrupt::new().unwrap());
        let mut queue = vq.create_queue();
        queue.set_event_idx(event_idx);
        block
            .activate(mem.clone(), interrupt.clone(), vec![queue])
            .unwrap();
        // Activation kicks the queue; start from a clean interrupt line.
        let _ = interrupt.irq_evt().read();
        Harness {
            mem,
            vq,
            block,
            interrupt,
        }
    }

    /// Submits one request and returns (status byte, used length).
    fn submit(&mut self, bufs: &[Buf]) -> (u8, u32) {
        let head = self.vq.add_chain(bufs);
        let before = self.vq.used_idx();
        write_bytes(self.mem, STATUS, &[0xff]);
        self.block.process_queue();
        assert_eq!(self.vq.used_idx(), before.wrapping_add(1));
        let (id, len) = self.vq.used_elem(before);
        assert_eq!(id, u32::from(head));
        (read_bytes(self.mem, STATUS, 1)[0], len)
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        write_bytes(self.mem, HDR, &h);
    }
}

#[test]
fn new_reports_missing_file_and_bad_config() {
    let err = Block::new(&config("/nonexistent/ember/disk.img"))
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ember/disk.img"));
    assert!(matches!(
        Block::new(&config("")).err().unwrap(),
        BlockError::EmptyPath { .. }
    ));
    let f = disk_file();
    let mut cfg = config(f.as_path().to_str().unwrap());
    cfg.cache_type = Some("Bogus".into());
    assert!(matches!(
        Block::new(&cfg).err().unwrap(),
        BlockError::CacheType { .. }
    ));
}

#[test]
fn capacity_and_features() {
    let f = disk_file();
    // A trailing partial sector is not exposed.
    f.as_file()
        .write_all_at(&[1; 100], DISK_SECTORS * 512)
        .unwrap();
    let mut cfg = config(f.as_path().to_str().unwrap());
    let block = Block::new(&cfg).unwrap();
    assert_eq!(block.capacity(), DISK_SECTORS);
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 128);
    // Reads past the end of config space give zeros.
    let mut past = [0xaau8; 6];
    block.read_config(12, &mut past);
    assert_eq!(past, [128, 0, 0, 0, 0, 0]);
    let f_ro = 1u64 << 5;
    let f_flush = 1u64 << 9;
    assert_eq!(block.avail_features() & (f_ro | f_flush), 0);
    assert_ne!(block.avail_features() & (1 << 32), 0);

    cfg.is_read_only = true;
    cfg.cache_type = Some("Writeback".into());
    let block = Block::new(&cfg).unwrap();
    assert_eq!(block.avail_features() & (f_ro | f_flush), f_ro | f_flush);
}

#[test]
fn read_request() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    h.header(VIRTIO_BLK_T_IN, 3);
    let (status, len) = h.submit(&[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 1025);
    let data = read_bytes(&mem, DATA, 1024);
    assert!(data[..512].iter().all(|&b| b == 3));
    assert!(data[512..].iter().all(|&b| b == 4));
    assert_ne!(h.interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
    assert_eq!(h.interrupt.irq_evt().read().unwrap(), 1);
}

#[test]
fn read_with_data_and_status_in_one_descriptor() {
    // Framing is not assumed: data and status may share a buffer, and the
    // header may be split.
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    h.header(VIRTIO_BLK_T_IN, 5);
    h.vq.add_chain(&[rd(HDR, 4), rd(HDR + 4, 12), wr(DATA, 513)]);
    h.block.process_queue();
    assert_eq!(h.vq.used_elem(0), (0, 513));
    let data = read_bytes(&mem, DATA, 513);
    assert!(data[..512].iter().all(|&b| b == 5));
    assert_eq!(data[512], VIRTIO_BLK_S_OK);
}

#[test]
fn write_request() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    h.header(VIRTIO_BLK_T_OUT, 2);
    write_bytes(&mem, DATA, &[0x5a; 512]);
    let (status, len) = h.submit(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    let mut back = [0u8; 512];
    f.as_file().read_exact_at(&mut back, 2 * 512).unwrap();
    assert_eq!(back, [0x5a; 512]);
    // Neighbouring sectors are untouched.
    f.as_file().read_exact_at(&mut back, 3 * 512).unwrap();
    assert_eq!(back, [3; 512]);
}

#[test]
fn large_write_then_read_crosses_bounce_buffer() {
    let mem = test_mem();
    let f = TempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    let pattern: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    write_bytes(&mem, DATA, &pattern);
    h.header(VIRTIO_BLK_T_OUT, 8);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, pattern.len() as u32), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    write_bytes(&mem, DATA, &vec![0; pattern.len()]);
    h.header(VIRTIO_BLK_T_IN, 8);
    let (status, len) = h.submit(&[rd(HDR, 16), wr(DATA, pattern.len() as u32), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len as usize, pattern.len() + 1);
    assert_eq!(read_bytes(&mem, DATA, pattern.len()), pattern);
}

#[test]
fn flush_request() {
    let mem = test_mem();
    let f = disk_file();
    for cache in [None, Some("Writeback".to_string())] {
        let mut cfg = config(f.as_path().to_str().unwrap());
        cfg.cache_type = cache;
        let mut h = Harness::new(&mem, &cfg);
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        let (status, len) = h.submit(&[rd(HDR, 16), wr(STATUS, 1)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    }
}

#[test]
fn get_id_request() {
    let mem = test_mem();
    let f = disk_file();
    let mut cfg = config(f.as_path().to_str().unwrap());
    let mut h = Harness::new(&mem, &cfg);
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    write_bytes(&mem, DATA, &[0xff; 20]);
    let (status, len) = h.submit(&[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    let mut want = [0u8; 20];
    want[..6].copy_from_slice(b"rootfs");
    assert_eq!(read_bytes(&mem, DATA, 20), want);

    cfg.serial = Some("a-serial-longer-than-twenty-bytes".into());
    let mut h = Harness::new(&mem, &cfg);
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(read_bytes(&mem, DATA, 20), b"a-serial-longer-than");
}

#[test]
fn read_only_refuses_writes() {
    let mem = test_mem();
    let f = disk_file();
    let mut cfg = config(f.as_path().to_str().unwrap());
    cfg.is_read_only = true;
    let mut h = Harness::new(&mem, &cfg);
    h.header(VIRTIO_BLK_T_OUT, 1);
    write_bytes(&mem, DATA, &[0x77; 512]);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let mut back = [0u8; 512];
    f.as_file().read_exact_at(&mut back, 512).unwrap();
    assert_eq!(back, [1; 512]);
    // Reads still work.
    h.header(VIRTIO_BLK_T_IN, 1);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn out_of_range_and_partial_sectors_are_io_errors() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    for (sector, len) in [
        (DISK_SECTORS, 512),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
        (0, 100),
    ] {
        h.header(VIRTIO_BLK_T_IN, sector);
        let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, len), wr(STATUS, 1)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector {sector} len {len}");
        h.header(VIRTIO_BLK_T_OUT, sector);
        let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, len), wr(STATUS, 1)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector {sector} len {len}");
    }
    // The last sector itself is fine.
    h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_chains_do_not_panic() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));

    // Unsupported request type.
    h.header(11, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);

    // Short header.
    h.header(VIRTIO_BLK_T_IN, 0);
    let (status, _) = h.submit(&[rd(HDR, 8), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);

    // No header at all.
    let (status, _) = h.submit(&[wr(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);

    // No writable byte for the status: returned with length 0.
    h.header(VIRTIO_BLK_T_IN, 0);
    let (_, len) = h.submit(&[rd(HDR, 16), rd(DATA, 512)]);
    assert_eq!(len, 0);

    // Data buffer outside guest memory.
    h.header(VIRTIO_BLK_T_IN, 0);
    let (_, len) = h.submit(&[rd(HDR, 16), wr(0x1_0000_0000, 512), wr(STATUS, 1)]);
    assert_eq!(len, 0);

    // The device keeps working afterwards.
    h.header(VIRTIO_BLK_T_IN, 7);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(read_bytes(&mem, DATA, 1)[0], 7);
}

#[test]
fn bogus_avail_index_marks_device_needs_reset() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    h.vq.set_avail_idx(100);
    h.block.process_queue();
    assert!(h.interrupt.needs_reset());
    assert_eq!(h.vq.used_idx(), 0);
    // Reset revives it.
    h.block.reset();
    assert!(!h.block.is_activated());
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::with_event_idx(&mem, &config(f.as_path().to_str().unwrap()), true);
    // Interrupt only once used entry 1 (the second) is written.
    h.vq.set_used_event(1);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.submit(&[rd(HDR, 16), wr(STATUS, 1)]);
    assert!(
        h.interrupt.irq_evt().read().is_err(),
        "no interrupt expected"
    );
    h.submit(&[rd(HDR, 16), wr(STATUS, 1)]);
    assert_eq!(h.interrupt.irq_evt().read().unwrap(), 1);
    // The device asks to be kicked at the next avail entry.
    assert_eq!(h.vq.avail_event(), 2);
}

#[test]
fn many_requests_wrap_the_rings() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    for i in 0..100u64 {
        let sector = i % DISK_SECTORS;
        h.header(VIRTIO_BLK_T_IN, sector);
        let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(read_bytes(&mem, DATA, 1)[0], sector as u8);
    }
}
