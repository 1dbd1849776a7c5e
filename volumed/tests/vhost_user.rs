//! ember-volumed's vhost-user-blk backend at host level: the real binary,
//! driven by the rust-vmm `vhost` crate's frontend over the attachment's
//! socket, with a virtqueue laid out by hand in shared memory (a file the
//! backend maps by descriptor). Negotiation and config capacity, writes,
//! flushes and reads through the ring, and fencing: after a move the old
//! socket is gone and the old connection's write fails and never lands.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::volumed::Volumed;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const FLUSH: u64 = 1 << 9;
const QUEUE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Request headers, status bytes and data buffers.
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const DATA: u64 = 0x10000;
const MEM_SIZE: usize = 1 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// A frontend with one split virtqueue in memory it shares with the backend.
struct Driver {
    /// Held for the connection; dropping it disconnects.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    /// Next free avail-ring slot (and the used index to wait for).
    next: u16,
}

impl Driver {
    /// Connects and negotiates; returns the driver and the capacity in
    /// sectors from the config space.
    fn connect(socket: &Path, dir: &Path) -> (Driver, u64) {
        let mut frontend = Frontend::connect(socket, 1).expect("connect");
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        for (bit, what) in [
            (VERSION_1, "VERSION_1"),
            (PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
            (FLUSH, "FLUSH"),
            (EVENT_IDX, "EVENT_IDX"),
        ] {
            assert!(features & bit != 0, "{what} offered: {features:#x}");
        }
        frontend
            .set_features(PROTOCOL_FEATURES | VERSION_1)
            .unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        let (_, config) = frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());

        let file = tempfile::tempfile_in(dir).unwrap();
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend
            .set_features(PROTOCOL_FEATURES | VERSION_1 | FLUSH)
            .unwrap();
        frontend.set_mem_table(&regions).unwrap();
        let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        frontend.set_vring_num(0, QUEUE).unwrap();
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE,
                    queue_size: QUEUE,
                    flags: 0,
                    desc_table_addr: host(DESC),
                    used_ring_addr: host(USED),
                    avail_ring_addr: host(AVAIL),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        let d = Driver {
            _frontend: frontend,
            mem,
            kick,
            call,
            next: 0,
        };
        (d, capacity)
    }

    /// One request (header, optional data, status) through the ring; waits
    /// for it to be used and returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u32) {
        let m = &self.mem;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        // (address, length, device-writable)
        let mut descs = vec![(HDR, 16u32, false)];
        if let Some((buf, writable)) = data {
            m.write_slice(buf, GuestAddress(DATA)).unwrap();
            descs.push((DATA, buf.len() as u32, writable));
        }
        descs.push((STATUS, 1, true));
        for (i, (addr, len, writable)) in descs.iter().enumerate() {
            let at = GuestAddress(DESC + 16 * i as u64);
            let last = i + 1 == descs.len();
            let flags: u16 = (if last { 0 } else { 1 }) | (if *writable { 2 } else { 0 });
            m.write_obj(*addr, at).unwrap();
            m.write_obj(*len, at.unchecked_add(8)).unwrap();
            m.write_obj(flags, at.unchecked_add(12)).unwrap();
            m.write_obj(if last { 0u16 } else { i as u16 + 1 }, at.unchecked_add(14))
                .unwrap();
        }
        let slot = self.next % QUEUE;
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.next = self.next.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(self.next, GuestAddress(AVAIL + 2)).unwrap();
        self.kick.write(1).unwrap();
        let start = Instant::now();
        while m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != self.next {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "request {kind} never used"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The backend signalled the call eventfd (no EVENT_IDX acked).
        assert!(self.call.read().is_ok(), "no used-buffer notification");
        let elem = USED + 4 + 8 * u64::from(slot);
        let id: u32 = m.read_obj(GuestAddress(elem)).unwrap();
        assert_eq!(id, 0, "the chain's head");
        let len: u32 = m.read_obj(GuestAddress(elem + 4)).unwrap();
        (m.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let (st, used) = self.request(T_IN, sector, Some((&vec![0u8; len], true)));
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        if st == S_OK {
            assert_eq!(used as usize, len + 1, "data and status written");
        }
        (st, buf)
    }
}

fn attach(v: &Volumed, op: &str, vol: &str, host: &str) -> String {
    let (st, g) = v.call(
        "POST",
        &format!("/v1/volumes/{vol}/{op}"),
        Some(&format!(r#"{{"Host":"{host}"}}"#)),
    );
    assert_eq!(st, 200, "{op}: {g}");
    g["VhostUserSocket"]
        .as_str()
        .unwrap_or_else(|| panic!("no VhostUserSocket in {g}"))
        .to_string()
}

#[test]
fn vhost_user_blk_with_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("vu");
    let args = ["--vhost-user-dir", sockets.to_str().unwrap()];
    let v = Volumed::start_with(dir.path(), &args);
    let (st, rec) = v.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"vol1","SizeBytes":1048576}"#),
    );
    assert_eq!(st, 201, "{rec}");
    let sock1 = attach(&v, "attach", "vol1", "host-a");
    // The socket's name is a secret (from the credential), in a directory
    // others may not list.
    let name = Path::new(&sock1).file_name().unwrap().to_str().unwrap();
    assert_eq!(name.len(), 32 + ".sock".len(), "{sock1}");
    assert!(!name.contains("vol1"), "{sock1}");
    assert!(Path::new(&sock1).exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sockets).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711, "{mode:o}");
    }

    // Garbage on the socket ends that connection only.
    {
        use std::io::Write;
        let mut s = UnixStream::connect(&sock1).unwrap();
        let _ = s.write_all(&[0xa5; 64]);
    }

    let (mut d, capacity) = Driver::connect(Path::new(&sock1), dir.path());
    assert_eq!(capacity, 2048, "1 MiB in 512-byte sectors");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(d.request(T_OUT, 8, Some((&pattern, false))), (S_OK, 1));
    assert_eq!(d.request(T_FLUSH, 0, None), (S_OK, 1));
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(v.image("vol1"))
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern, "the flushed write is in the volume file");
    assert_eq!(d.read(8, 4096), (S_OK, pattern.clone()));
    // Past the end, and an unknown request type.
    assert_eq!(d.read(2047, 1024).0, S_IOERR);
    assert_eq!(d.request(99, 0, None).0, S_UNSUPP);
    let (st, used) = d.request(T_GET_ID, 0, Some((&[0u8; 20], true)));
    assert_eq!((st, used), (S_OK, 21));
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    // The disk's id (the guest's serial) is the volume's name, no secret.
    assert!(id.starts_with(b"vol1\0"), "{id:?}");

    // WRITE_ZEROES and DISCARD: one segment (sector, count, flags).
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = sector.to_le_bytes().to_vec();
        b.extend(n.to_le_bytes());
        b.extend(flags.to_le_bytes());
        b
    };
    assert_eq!(d.request(T_OUT, 64, Some((&pattern, false))).0, S_OK);
    assert_eq!(d.request(T_OUT, 128, Some((&pattern, false))).0, S_OK);
    assert_eq!(
        d.request(T_WRITE_ZEROES, 64, Some((&seg(64, 8, 0), false)))
            .0,
        S_OK
    );
    assert_eq!(
        d.request(T_DISCARD, 128, Some((&seg(128, 8, 0), false))).0,
        S_OK
    );
    assert_eq!(d.read(64, 4096), (S_OK, vec![0u8; 4096]));
    assert_eq!(d.read(128, 4096), (S_OK, vec![0u8; 4096]));
    // DISCARD takes no flags; a segment past the end is refused.
    let bad = d.request(T_DISCARD, 0, Some((&seg(0, 8, 1), false))).0;
    assert_eq!(bad, S_UNSUPP);
    let past = d
        .request(T_WRITE_ZEROES, 0, Some((&seg(2044, 8, 1), false)))
        .0;
    assert_eq!(past, S_IOERR);
    assert_eq!(d.read(8, 4096), (S_OK, pattern.clone()), "untouched");

    // The attachment moves: the old socket goes, the old connection is fenced.
    let sock2 = attach(&v, "move", "vol1", "host-b");
    assert_ne!(sock2, sock1, "a new grant, a new socket");
    assert!(!Path::new(&sock1).exists(), "the stale socket is removed");
    assert!(UnixStream::connect(&sock1).is_err());
    let stale = vec![0x5au8; 4096];
    assert_eq!(d.request(T_OUT, 8, Some((&stale, false))).0, S_IOERR);
    assert_eq!(d.request(T_FLUSH, 0, None).0, S_IOERR);
    assert_eq!(d.read(8, 4096).0, S_IOERR);
    std::fs::File::open(v.image("vol1"))
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern, "the fenced write never landed");
    drop(d);

    // The volume grows; the new holder connects (and sees the new size),
    // goes, and connects again (as a VMM does at a restore).
    let (st, r) = v.call(
        "PATCH",
        "/v1/volumes/vol1",
        Some(r#"{"SizeBytes":2097152}"#),
    );
    assert_eq!(st, 200, "{r}");
    for _ in 0..2 {
        let (mut d2, capacity) = Driver::connect(Path::new(&sock2), dir.path());
        assert_eq!(capacity, 4096);
        assert_eq!(d2.read(8, 4096), (S_OK, pattern.clone()));
    }

    // Connections that come and go leave no threads behind.
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", v.pid()))
            .unwrap()
            .count()
    };
    // Between two clients the socket's next daemon starts its worker, so
    // the count settles only once no connection is being torn down.
    let settled = || {
        let mut last = threads();
        let mut same = 0;
        while same < 3 {
            std::thread::sleep(Duration::from_millis(100));
            let now = threads();
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        last
    };
    let before = settled();
    for _ in 0..20 {
        let f = Frontend::connect(&sock2, 1).unwrap();
        f.set_owner().unwrap();
        assert!(f.get_features().unwrap() & VERSION_1 != 0);
    }
    let start = Instant::now();
    while settled() > before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} threads, {before} before 20 connections",
            threads()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A restarted service serves the current attachment on the same path.
    v.kill();
    let v = Volumed::start_with(dir.path(), &args);
    let start = Instant::now();
    while !Path::new(&sock2).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut d3, _) = Driver::connect(Path::new(&sock2), dir.path());
    assert_eq!(d3.read(8, 4096), (S_OK, pattern.clone()));

    // Detached: the socket goes, and the open connection is fenced.
    assert_eq!(v.call("POST", "/v1/volumes/vol1/detach", None).0, 204);
    assert!(!Path::new(&sock2).exists());
    assert_eq!(d3.read(8, 4096).0, S_IOERR);
    // The API still answers.
    assert_eq!(v.call("GET", "/v1/volumes/vol1", None).0, 200);
}
