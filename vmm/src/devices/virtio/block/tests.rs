use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::tempfile::TempFile;

use super::request::*;
use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, Mem, VirtioDevice, VIRTIO_MMIO_INT_VRING};
use crate::vmm_config::drive::{validate_config, BlockDeviceConfig, FillPhase};

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 16;

fn config(path: &str) -> BlockDeviceConfig {
    root_drive(path)
}

/// A disk whose byte at offset `i` is `i / 512` (the sector number).
fn disk_file() -> TempFile {
    sector_disk(DISK_SECTORS)
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
        // An NBD backend answers on its own threads.
        self.block.drain_in_flight();
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

    // Data buffer outside guest memory: an I/O error, only the status used.
    h.header(VIRTIO_BLK_T_IN, 0);
    let res = h.submit(&[rd(HDR, 16), wr(0x1_0000_0000, 512), wr(STATUS, 1)]);
    assert_eq!(res, (VIRTIO_BLK_S_IOERR, 1));

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

/// qemu-nbd serving `image` on `sock`; `None` (with a message) if it is not
/// installed. Killed by the caller.
fn qemu_nbd(image: &std::path::Path, sock: &std::path::Path) -> Option<std::process::Child> {
    let _ = std::fs::remove_file(sock);
    let child = std::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "--shared=0", "-k"])
        .arg(sock)
        .arg(image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIPPED: qemu-nbd is not installed");
        return None;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Some(child)
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn nbd_backend_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 64 * 1024]).unwrap();
    let sock = dir.path().join("nbd.sock");
    let Some(server) = qemu_nbd(&image, &sock) else {
        return;
    };
    let mut cfg = config("");
    cfg.nbd_uri = Some(format!("nbd+unix:///?socket={}", sock.display()));
    cfg.cache_type = Some("Writeback".into());
    cfg.nbd_timeout_ms = Some(500);
    validate_config(&cfg).unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, &cfg);
    assert_eq!(h.block.capacity(), 128);

    h.header(VIRTIO_BLK_T_OUT, 4);
    write_bytes(&mem, DATA, &[0x6b; 1024]);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 1024), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(
        &std::fs::read(&image).unwrap()[4 * 512..6 * 512],
        &[0x6b; 1024]
    );

    // Server gone for longer than the timeout: an I/O error, no hang.
    stop(server);
    h.header(VIRTIO_BLK_T_IN, 4);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);

    // Back again: the same device reconnects on the next request.
    let server = qemu_nbd(&image, &sock).unwrap();
    write_bytes(&mem, DATA, &[0; 1024]);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(read_bytes(&mem, DATA, 1024), vec![0x6b; 1024]);

    // A snapshot's state reconnects at restore, to an overriding URI too.
    let state = h.block.state();
    let restored = Block::restore(&state, None, None).unwrap();
    assert_eq!(restored.capacity(), 128);
    assert_eq!(restored.config().nbd_uri, cfg.nbd_uri);
    let bad = Block::restore(&state, Some("nbd+unix:///?socket=/nonexistent.sock"), None)
        .err()
        .unwrap();
    assert!(bad.to_string().contains("NBD export"), "{bad}");
    stop(server);
}

#[test]
fn nbd_config_errors() {
    let mut cfg = config("/some/file");
    cfg.nbd_uri = Some("nbd://h/e".into());
    assert!(validate_config(&cfg).unwrap_err().contains("not both"));
    cfg.path_on_host.clear();
    cfg.nbd_uri = Some("http://h/e".into());
    assert!(validate_config(&cfg).unwrap_err().contains("bad nbd_uri"));
    cfg.nbd_uri = Some("nbd+unix:///?socket=/nonexistent.sock".into());
    validate_config(&cfg).unwrap();
    let err = Block::probe(&cfg).unwrap_err().to_string();
    assert!(err.contains("NBD export"), "{err}");
    let mut file_cfg = config("/nonexistent");
    assert!(validate_config(&file_cfg)
        .unwrap_err()
        .contains("does not exist"));
    file_cfg.nbd_timeout_ms = Some(5);
    assert!(validate_config(&file_cfg).is_err());
}

#[test]
fn nbd_discard_and_write_zeroes_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0x11u8; 64 * 1024]).unwrap();
    let sock = dir.path().join("nbd.sock");
    let Some(server) = qemu_nbd(&image, &sock) else {
        return;
    };
    let mut cfg = config("");
    cfg.nbd_uri = Some(format!("nbd+unix:///?socket={}", sock.display()));
    let mem = test_mem();
    let mut h = Harness::new(&mem, &cfg);
    let features = h.block.avail_features();
    assert_ne!(features & (1 << 13), 0, "DISCARD offered");
    assert_ne!(features & (1 << 14), 0, "WRITE_ZEROES offered");
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&4u32.to_le_bytes());
    write_bytes(&mem, DATA, &seg);
    h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let data = std::fs::read(&image).unwrap();
    assert!(data[8 * 512..12 * 512].iter().all(|&b| b == 0));
    assert!(data[12 * 512..13 * 512].iter().all(|&b| b == 0x11));
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    // Out of range, a bad payload length, and flags on a discard.
    seg[..8].copy_from_slice(&126u64.to_le_bytes());
    write_bytes(&mem, DATA, &seg);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 15), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    seg[..8].copy_from_slice(&0u64.to_le_bytes());
    seg[12] = 1;
    write_bytes(&mem, DATA, &seg);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    stop(server);
}

#[test]
fn file_backend_offers_no_discard() {
    let mem = test_mem();
    let f = disk_file();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    assert_eq!(h.block.avail_features() & (3 << 13), 0);
    write_bytes(&mem, DATA, &[0u8; 16]);
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (status, _) = h.submit(&[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
}

/// Queues a 4 KiB read or write of slot `i` (own header, data and status
/// buffers) without processing it; returns the status address.
fn queue_io(h: &mut Harness<'_>, i: u64, write: bool, sector: u64) -> u64 {
    let (hdr, data, status) = (HDR + i * 0x100, DATA + i * 0x1000, STATUS + i * 0x10);
    let mut b = [0u8; 16];
    let t = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    b[0..4].copy_from_slice(&t.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    write_bytes(h.mem, hdr, &b);
    write_bytes(h.mem, status, &[0xff]);
    let d = if write {
        rd(data, 4096)
    } else {
        wr(data, 4096)
    };
    h.vq.add_chain(&[rd(hdr, 16), d, wr(status, 1)]);
    status
}

fn nbdkit_paused(
    dir: &std::path::Path,
    image: &std::path::Path,
) -> Option<(
    std::process::Child,
    std::path::PathBuf,
    std::os::unix::net::UnixStream,
)> {
    let sock = dir.join("nbd.sock");
    let control = dir.join("pause.sock");
    let child = std::process::Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=pause", "file"])
        .arg(image)
        .arg(format!("pause-control={}", control.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIPPED: nbdkit is not installed");
        return None;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() || !control.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdkit did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ctl = std::os::unix::net::UnixStream::connect(&control).unwrap();
    Some((child, sock, ctl))
}

fn pause_ctl(ctl: &mut std::os::unix::net::UnixStream, cmd: u8) {
    use std::io::{Read, Write};
    ctl.write_all(&[cmd]).unwrap();
    let mut answer = [0u8; 1];
    ctl.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], cmd.to_ascii_uppercase());
}

/// Several requests at the NBD server at once; with the write scheduler
/// holding writes beyond one outstanding, a read queued after them passes.
#[test]
fn nbd_requests_in_flight_and_held_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0x22u8; 64 * 1024]).unwrap();
    let Some((server, sock, mut ctl)) = nbdkit_paused(dir.path(), &image) else {
        return;
    };
    let mut cfg = config("");
    cfg.nbd_uri = Some(format!("nbd+unix:///?socket={}", sock.display()));
    cfg.io_scheduler = Some(IoSchedulerConfig {
        max_outstanding_writes: Some(1),
        max_write_latency_us: None,
    });
    let mem = test_mem();
    let mut h = Harness::new(&mem, &cfg);
    pause_ctl(&mut ctl, b'p');
    let statuses = [
        queue_io(&mut h, 0, false, 0),
        queue_io(&mut h, 1, true, 8),
        queue_io(&mut h, 2, true, 16),
        queue_io(&mut h, 3, false, 24),
    ];
    h.block.process_queue();
    // Two reads and the first write at the paused server; one write held.
    assert_eq!(h.block.in_flight(), 3);
    assert_eq!(h.block.waiting(), 1);
    assert_eq!(
        h.vq.used_idx(),
        0,
        "nothing completes before the server answers"
    );
    pause_ctl(&mut ctl, b'r');
    h.block.drain_in_flight();
    assert_eq!(h.vq.used_idx(), 4);
    for s in statuses {
        assert_eq!(read_bytes(&mem, s, 1)[0], VIRTIO_BLK_S_OK);
    }
    assert_eq!(read_bytes(&mem, DATA + 3 * 0x1000, 1)[0], 0x22);
    stop(server);
}

/// An ops limit lets a burst of the bucket's size through and holds the
/// rest until the limiter's timer; PATCH lifts it at run time.
#[test]
fn rate_limiter_holds_requests_until_lifted() {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let mem = test_mem();
    let f = disk_file();
    let mut cfg = config(f.as_path().to_str().unwrap());
    cfg.rate_limiter = Some(RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 2,
            one_time_burst: None,
            refill_time: 1_000_000,
        }),
    });
    let mut h = Harness::new(&mem, &cfg);
    for i in 0..4 {
        queue_io(&mut h, i, false, 0);
    }
    h.block.process_queue();
    assert_eq!(h.vq.used_idx(), 2, "the bucket's two tokens");
    assert_eq!(h.block.waiting(), 2);
    let update = crate::vmm_config::BlockDeviceUpdate {
        drive_id: cfg.drive_id.clone(),
        rate_limiter: Some(RateLimiterConfig::default()),
        ..Default::default()
    };
    h.block.update(&update).unwrap();
    assert_eq!(
        h.block.config().rate_limiter,
        Some(RateLimiterConfig::default())
    );
    // The limiter's timer fires at once after an update.
    std::thread::sleep(std::time::Duration::from_millis(5));
    h.block.on_limiter_event();
    assert_eq!(h.vq.used_idx(), 4);
}

/// A grown backing file, re-read by PATCH, is the new capacity in config
/// space, announced with a config-change interrupt; a snapshot keeps it.
#[test]
fn resize_updates_config_space_and_interrupts() {
    let mem = test_mem();
    let f = disk_file();
    let path = f.as_path().to_str().unwrap().to_string();
    let mut h = Harness::new(&mem, &config(&path));
    f.as_file().set_len(DISK_SECTORS * 2 * 512).unwrap();
    let update = crate::vmm_config::BlockDeviceUpdate {
        drive_id: "rootfs".into(),
        path_on_host: Some(path),
        ..Default::default()
    };
    h.block.update(&update).unwrap();
    assert_eq!(h.block.capacity(), DISK_SECTORS * 2);
    let mut cap = [0u8; 8];
    h.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS * 2);
    assert_ne!(
        h.interrupt.status() & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // The new sectors are usable.
    h.header(VIRTIO_BLK_T_IN, DISK_SECTORS * 2 - 1);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.block.state().capacity, DISK_SECTORS * 2);
    // A file drive cannot become an NBD one.
    let bad = crate::vmm_config::BlockDeviceUpdate {
        drive_id: "rootfs".into(),
        nbd_uri: Some("nbd+unix:///?socket=/x".into()),
        ..Default::default()
    };
    assert!(h.block.update(&bad).is_err());
}

#[test]
fn a_filling_drive_serves_the_guest_and_a_snapshot_keeps_its_map() {
    use crate::vmm_config::drive::FillFrom;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i / 512) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let sock = dir.path().join("export.sock");
    ember_volumed::nbd::export_file(&src, "disk", &format!("unix:{}", sock.display())).unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let local = dir.path().join("local.img");
    let mut cfg = config(local.to_str().unwrap());
    // Slow background: chunk 40 is still missing when the guest reads it.
    cfg.fill_from = Some(FillFrom {
        nbd_uri: uri.clone(),
        background_bytes_per_sec: Some(64 << 10),
        ..Default::default()
    });
    let mem = test_mem();
    let mut h = Harness::new(&mem, &cfg);
    assert_eq!(h.block.capacity(), 8192, "the source's size");
    assert_eq!(h.block.avail_features() & (1 << 13), 0, "no DISCARD");
    let sector = 40 * 128 + 3;
    h.header(VIRTIO_BLK_T_IN, sector);
    let (status, _) = h.submit(&[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let at = (sector * 512) as usize;
    assert_eq!(read_bytes(&mem, DATA, 1024), data[at..at + 1024]);
    let st = h.block.fill_status().unwrap();
    assert_eq!((st.state, st.bytes_on_demand), (FillPhase::Filling, 65536));

    // The snapshot state keeps the source and the map (JSON, as saved).
    let state = h.block.state();
    let saved = state.fill.clone().expect("filling");
    assert!(state.config.fill_from.is_some());
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(serde_json::from_str::<BlockState>(&json).unwrap(), state);
    drop(h);
    let other = dir.path().join("other.img");
    let e = Block::restore(&state, other.to_str(), None).err().unwrap();
    assert!(e.to_string().contains("in that file only"), "{e}");
    let moved = dir.path().join("moved.img");
    std::fs::rename(&local, &moved).unwrap();
    let e = Block::restore(&state, None, None).err().unwrap();
    assert!(
        e.to_string().contains("No such file"),
        "a continued fill needs its file: {e}"
    );
    std::fs::rename(&moved, &local).unwrap();
    let again = Block::restore(&state, None, None).unwrap();
    let local_now = again.fill_status().unwrap().chunks_local;
    let saved_chunks: u64 = saved.present.iter().map(|r| r[1]).sum();
    assert!(local_now >= saved_chunks, "{local_now} < {saved_chunks}");
    drop(again);

    // A fill override starts another file from nothing, uncapped.
    let fresh = FillFrom {
        nbd_uri: uri,
        ..Default::default()
    };
    let b = Block::restore(&state, other.to_str(), Some(&fresh)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while b.fill_status().unwrap().state != FillPhase::Complete {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            b.fill_status()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&other).unwrap(), data);
    let done = b.state();
    assert!(
        done.fill.is_none() && done.config.fill_from.is_none(),
        "{done:?}"
    );
}

#[test]
fn fill_config_errors() {
    use crate::vmm_config::drive::FillFrom;
    let mut cfg = config("/some/new/file");
    cfg.fill_from = Some(FillFrom {
        nbd_uri: "http://h/e".into(),
        ..Default::default()
    });
    assert!(validate_config(&cfg)
        .unwrap_err()
        .contains("bad fill_from.nbd_uri"));
    cfg.fill_from.as_mut().unwrap().nbd_uri = "nbd://h:1/disk".into();
    assert_eq!(
        validate_config(&cfg),
        Ok(()),
        "the local file need not exist yet"
    );
    cfg.fill_from.as_mut().unwrap().background_bytes_per_sec = Some(0);
    assert!(validate_config(&cfg).unwrap_err().contains("must be > 0"));
    cfg.fill_from.as_mut().unwrap().background_bytes_per_sec = None;
    cfg.nbd_uri = Some("nbd://h:1/v".into());
    assert!(validate_config(&cfg)
        .unwrap_err()
        .contains("not an nbd_uri drive"));
    cfg.nbd_uri = None;
    cfg.path_on_host.clear();
    assert!(validate_config(&cfg)
        .unwrap_err()
        .contains("needs path_on_host"));
}

/// A request whose data is over SEG_MAX x SIZE_MAX (32 MiB) is refused
/// before the device buffers it, whether the guest would read or write it.
/// Each descriptor lies in guest memory (they overlap), so without the
/// bound both requests would go through.
#[test]
fn requests_larger_than_the_device_buffers_are_refused() {
    const BIG: u32 = 12 << 20;
    const FAR_STATUS: u64 = 0xf0_0000;
    let mem = test_mem();
    let f = TempFile::new().unwrap();
    f.as_file().set_len(64 << 20).unwrap();
    let mut h = Harness::new(&mem, &config(f.as_path().to_str().unwrap()));
    let mut size_max = [0u8; 4];
    h.block.read_config(8, &mut size_max);
    assert_eq!(u32::from_le_bytes(size_max), 256 << 10);
    assert_ne!(h.block.avail_features() & (1 << 1), 0, "SIZE_MAX offered");
    let run = |h: &mut Harness<'_>, req_type: u32, bufs: &[Buf]| {
        h.header(req_type, 0);
        write_bytes(&mem, FAR_STATUS, &[0xff]);
        let before = h.vq.used_idx();
        h.vq.add_chain(bufs);
        h.block.process_queue();
        h.block.drain_in_flight();
        assert_eq!(h.vq.used_idx(), before.wrapping_add(1));
        read_bytes(&mem, FAR_STATUS, 1)[0]
    };
    // Within the bound: fine.
    let ok = [rd(HDR, 16), wr(DATA, BIG), wr(DATA, BIG), wr(FAR_STATUS, 1)];
    assert_eq!(run(&mut h, VIRTIO_BLK_T_IN, &ok), VIRTIO_BLK_S_OK);
    let over = [
        rd(HDR, 16),
        wr(DATA, BIG),
        wr(DATA, BIG),
        wr(DATA, BIG),
        wr(FAR_STATUS, 1),
    ];
    assert_eq!(run(&mut h, VIRTIO_BLK_T_IN, &over), VIRTIO_BLK_S_IOERR);
    let over = [
        rd(HDR, 16),
        rd(DATA, BIG),
        rd(DATA, BIG),
        rd(DATA, BIG),
        wr(FAR_STATUS, 1),
    ];
    assert_eq!(run(&mut h, VIRTIO_BLK_T_OUT, &over), VIRTIO_BLK_S_IOERR);
}
