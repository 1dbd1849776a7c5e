//! Device-level tests: guest queues in memory, the real event manager, and
//! real Unix sockets on the host side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};
use vmm_sys_util::tempdir::TempDir;

use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, Mem, VirtioDevice};
use crate::vmm_config::vsock::VsockConfig;

const GUEST_CID: u64 = 3;
const RX_POOL: u64 = 0x10_0000;
const TX_POOL: u64 = 0x40_0000;
const RX_DATA: u32 = 4096;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

struct Guest<'a> {
    mem: &'a Mem,
    rxq: TestQueue<'a>,
    txq: TestQueue<'a>,
    evq: TestQueue<'a>,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Subscriber>,
    /// RX chain head -> buffer address.
    rx_bufs: HashMap<u16, u64>,
    rx_slot: u64,
    rx_seen: u16,
    tx_slot: u64,
    uds: PathBuf,
    _dir: TempDir,
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

fn vsock_config(uds: &Path) -> VsockConfig {
    VsockConfig {
        vsock_id: None,
        guest_cid: GUEST_CID as u32,
        uds_path: uds.to_str().unwrap().to_string(),
    }
}

impl<'a> Guest<'a> {
    fn new(mem: &'a Mem) -> Guest<'a> {
        Guest::with_event_idx(mem, false)
    }

    /// A guest whose driver negotiated VIRTIO_RING_F_EVENT_IDX (as Linux's does).
    fn with_event_idx(mem: &'a Mem, event_idx: bool) -> Guest<'a> {
        let dir = TempDir::new().unwrap();
        let uds = dir.as_path().join("v.sock");
        let dev = Vsock::new(&vsock_config(&uds)).unwrap();
        Guest::build(mem, event_idx, dev, uds, dir)
    }

    /// A guest for `dev` (e.g. a restored device, listening where it was).
    fn with_device(mem: &'a Mem, event_idx: bool, dev: Vsock, dir: TempDir) -> Guest<'a> {
        let uds = dev.uds_path().to_path_buf();
        Guest::build(mem, event_idx, dev, uds, dir)
    }

    fn build(mem: &'a Mem, event_idx: bool, dev: Vsock, uds: PathBuf, dir: TempDir) -> Guest<'a> {
        let rxq = TestQueue::new(mem, 0, 64);
        let txq = TestQueue::new(mem, 0x4000, 64);
        let evq = TestQueue::new(mem, 0x8000, 64);
        let dev = Arc::new(Mutex::new(dev));
        let interrupt = Arc::new(Interrupt::new().unwrap());
        let mut queues: Vec<Queue> =
            vec![rxq.create_queue(), txq.create_queue(), evq.create_queue()];
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        dev.lock()
            .unwrap()
            .activate(mem.clone(), interrupt, queues)
            .unwrap();
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(dev.clone());
        Guest {
            mem,
            rxq,
            txq,
            evq,
            dev,
            em,
            rx_bufs: HashMap::new(),
            rx_slot: 0,
            rx_seen: 0,
            tx_slot: 0,
            uds,
            _dir: dir,
        }
    }

    fn kick(&self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
    }

    /// Runs the device thread's loop until `done` or a timeout.
    fn pump_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.em.run_with_timeout(10).unwrap();
        }
    }

    /// Runs the loop for a while without expecting anything.
    fn pump_for(&mut self, ms: u64) {
        let deadline = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < deadline {
            self.em.run_with_timeout(5).unwrap();
        }
    }

    /// Offers `n` RX buffers (header and data in separate descriptors).
    fn rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_POOL + (self.rx_slot % 32) * 0x2000;
            self.rx_slot += 1;
            let head = self
                .rxq
                .add_chain(&[wr(addr, HDR_LEN as u32), wr(addr + 64, RX_DATA)]);
            self.rx_bufs.insert(head, addr);
        }
        self.kick(RX_QUEUE);
    }

    fn send(&mut self, hdr: VsockHeader, data: &[u8]) {
        let hdr = VsockHeader {
            len: data.len() as u32,
            ..hdr
        };
        let addr = TX_POOL + (self.tx_slot % 16) * 0x1_1000;
        self.tx_slot += 1;
        write_bytes(self.mem, addr, &hdr.to_bytes());
        write_bytes(self.mem, addr + 0x100, data);
        let mut bufs = vec![rd(addr, HDR_LEN as u32)];
        if !data.is_empty() {
            bufs.push(rd(addr + 0x100, data.len() as u32));
        }
        self.send_raw(&bufs);
    }

    fn send_raw(&mut self, bufs: &[Buf]) {
        let target = self.txq.avail_idx();
        self.txq.add_chain(bufs);
        self.kick(TX_QUEUE);
        self.pump_until("TX used", |g| g.txq.used_idx() > target);
    }

    fn try_recv(&mut self) -> Option<(VsockHeader, Vec<u8>)> {
        if self.rxq.used_idx() == self.rx_seen {
            return None;
        }
        let (head, len) = self.rxq.used_elem(self.rx_seen);
        self.rx_seen += 1;
        let addr = self.rx_bufs[&(head as u16)];
        let mut b = [0u8; HDR_LEN];
        b.copy_from_slice(&read_bytes(self.mem, addr, HDR_LEN));
        let hdr = VsockHeader::from_bytes(&b);
        assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
        let data = read_bytes(self.mem, addr + 64, hdr.len as usize);
        Some((hdr, data))
    }

    fn recv(&mut self) -> (VsockHeader, Vec<u8>) {
        let mut got = None;
        self.pump_until("an RX packet", |g| {
            got = got.take().or_else(|| g.try_recv());
            got.is_some()
        });
        let (hdr, data) = got.unwrap();
        assert_eq!(hdr.src_cid, VSOCK_HOST_CID);
        assert_eq!(hdr.dst_cid, GUEST_CID);
        assert_eq!(hdr.type_, VSOCK_TYPE_STREAM);
        (hdr, data)
    }

    fn expect_no_rx(&mut self) {
        self.pump_for(50);
        if let Some((hdr, _)) = self.try_recv() {
            panic!("unexpected packet {hdr:?}");
        }
    }

    /// Runs the loop until the device has closed `host`'s peer.
    fn wait_eof(&mut self, host: &mut UnixStream) {
        host.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        self.pump_until("host EOF", |_| match host.read(&mut b) {
            Ok(0) => true,
            Ok(_) => panic!("unexpected data"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        });
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// Host connects to `port`; the guest accepts. Returns (stream, host port).
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= 1 << 30);
        assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
        self.send(guest_hdr(VSOCK_OP_RESPONSE, port, req.src_port), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn host_initiated_connection_data_and_close() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(16);
    let (mut host, hport) = g.host_connect(1234);
    assert_eq!(g.connections(), 1);

    // Host -> guest.
    host.write_all(b"hello").unwrap();
    let (pkt, data) = g.recv();
    assert_eq!(
        (pkt.op, pkt.src_port, pkt.dst_port),
        (VSOCK_OP_RW, hport, 1234)
    );
    assert_eq!(data, b"hello");

    // Guest -> host.
    g.send(guest_hdr(VSOCK_OP_RW, 1234, hport), b"world");
    assert_eq!(read_n(&mut host, 5), b"world");

    // Host half-closes: the guest is told, and can still send.
    host.shutdown(Shutdown::Write).unwrap();
    let (pkt, _) = g.recv();
    assert_eq!(
        (pkt.op, pkt.flags),
        (VSOCK_OP_SHUTDOWN, VSOCK_FLAGS_SHUTDOWN_SEND)
    );
    g.send(guest_hdr(VSOCK_OP_RW, 1234, hport), b"more");
    assert_eq!(read_n(&mut host, 4), b"more");

    // Guest closes: the device answers RST and the host sees EOF.
    let mut shut = guest_hdr(VSOCK_OP_SHUTDOWN, 1234, hport);
    shut.flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (pkt, _) = g.recv();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    g.wait_eof(&mut host);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_refusal_closes_host_stream() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 80\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    g.send(guest_hdr(VSOCK_OP_RST, 80, req.src_port), &[]);
    g.wait_eof(&mut host);
    g.expect_no_rx();
}

#[test]
fn bad_connect_line_closes_host_stream() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"HELLO 80\n").unwrap();
    g.wait_eof(&mut host);
    g.expect_no_rx();
}

#[test]
fn guest_initiated_connection() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(8);
    let listener = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    g.send(guest_hdr(VSOCK_OP_REQUEST, 777, 5000), &[]);
    let (pkt, _) = g.recv();
    assert_eq!(
        (pkt.op, pkt.src_port, pkt.dst_port),
        (VSOCK_OP_RESPONSE, 5000, 777)
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send(guest_hdr(VSOCK_OP_RW, 777, 5000), b"ping");
    assert_eq!(read_n(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (pkt, data) = g.recv();
    assert_eq!((pkt.op, data.as_slice()), (VSOCK_OP_RW, &b"pong"[..]));

    // Host closes fully, guest closes its side: RST ends it.
    drop(host);
    let (pkt, _) = g.recv();
    assert_eq!(pkt.op, VSOCK_OP_SHUTDOWN);
    let mut shut = guest_hdr(VSOCK_OP_SHUTDOWN, 777, 5000);
    shut.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (pkt, _) = g.recv();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    g.send(guest_hdr(VSOCK_OP_REQUEST, 1000, 6000), &[]);
    let (pkt, _) = g.recv();
    assert_eq!(
        (pkt.op, pkt.src_port, pkt.dst_port),
        (VSOCK_OP_RST, 6000, 1000)
    );
    // Data for a connection that does not exist is refused too.
    g.send(guest_hdr(VSOCK_OP_RW, 1000, 6000), b"x");
    assert_eq!(g.recv().0.op, VSOCK_OP_RST);
    // A RST for nothing gets no answer.
    g.send(guest_hdr(VSOCK_OP_RST, 1000, 6000), &[]);
    g.expect_no_rx();
}

#[test]
fn host_data_respects_guest_credit_and_buffers() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = g.recv();
    let hport = req.src_port;
    let mut resp = guest_hdr(VSOCK_OP_RESPONSE, 9, hport);
    resp.buf_alloc = 10;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut host), format!("OK {hport}\n"));

    host.write_all(&[7u8; 100]).unwrap();
    let (pkt, data) = g.recv();
    assert_eq!((pkt.op, data.len()), (VSOCK_OP_RW, 10));
    g.expect_no_rx();

    // The guest consumed the 10 bytes and grows its buffer.
    let mut upd = guest_hdr(VSOCK_OP_CREDIT_UPDATE, 9, hport);
    upd.buf_alloc = 50;
    upd.fwd_cnt = 10;
    g.send(upd, &[]);
    let (_, data) = g.recv();
    assert_eq!(data.len(), 50);
    g.expect_no_rx();

    // Plenty of credit: the remaining 40 bytes follow.
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 60;
    g.send(upd, &[]);
    let (pkt, data) = g.recv();
    assert_eq!((pkt.op, data.len()), (VSOCK_OP_RW, 40));
    // Every packet also carries the device's own credit.
    assert_eq!((pkt.buf_alloc, pkt.fwd_cnt), (CONN_BUF_SIZE, 0));
}

#[test]
fn host_data_waits_for_rx_buffers() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(2);
    let (mut host, _) = g.host_connect(42);
    // Use up the remaining buffer, then write with none left.
    host.write_all(b"a").unwrap();
    assert_eq!(g.recv().1, b"a");
    host.write_all(&[1u8; 10_000]).unwrap();
    g.expect_no_rx();
    g.rx_buffers(3);
    let mut got = 0;
    while got < 10_000 {
        let (pkt, data) = g.recv();
        assert_eq!(pkt.op, VSOCK_OP_RW);
        assert!(data.len() <= RX_DATA as usize);
        got += data.len();
        if g.rxq.used_idx() == g.rxq.avail_idx() && got < 10_000 {
            g.rx_buffers(3);
        }
    }
    assert_eq!(got, 10_000);
}

#[test]
fn guest_data_larger_than_host_socket_is_buffered_and_credit_returned() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(32);
    let (mut host, hport) = g.host_connect(7);
    // More than the host socket buffer takes while the host is not reading,
    // within the 256 KiB credit the device advertised.
    let chunk: Vec<u8> = (0..60_000u32).map(|i| (i % 253) as u8).collect();
    for _ in 0..4 {
        g.send(guest_hdr(VSOCK_OP_RW, 7, hport), &chunk);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < 4 * chunk.len() {
        host.set_nonblocking(true).unwrap();
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => g.pump_for(5),
            Err(e) => panic!("{e}"),
        }
    }
    for part in got.chunks(chunk.len()) {
        assert_eq!(part, &chunk[..]);
    }
    // Forwarding made the device return credit before the guest ran low:
    // its view of free space stays at least half the buffer.
    let mut last_fwd = None;
    g.pump_for(20);
    while let Some((pkt, _)) = g.try_recv() {
        if pkt.op == VSOCK_OP_CREDIT_UPDATE {
            last_fwd = Some(pkt.fwd_cnt);
        }
    }
    let last_fwd = last_fwd.expect("a credit update");
    assert!(CONN_BUF_SIZE - (240_000 - last_fwd) >= CONN_BUF_SIZE / 2);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(8);
    let (_host, hport) = g.host_connect(7);
    let chunk = vec![0u8; 60_000];
    // The host never reads; past socket buffer + 256 KiB the guest has
    // overrun the credit it was given.
    let mut reset = false;
    for _ in 0..200 {
        if g.rxq.avail_idx().wrapping_sub(g.rxq.used_idx()) < 4 {
            g.rx_buffers(8);
        }
        g.send(guest_hdr(VSOCK_OP_RW, 7, hport), &chunk);
        g.pump_for(1);
        while let Some((pkt, _)) = g.try_recv() {
            reset |= pkt.op == VSOCK_OP_RST;
        }
        if reset {
            break;
        }
    }
    assert!(reset);
    assert_eq!(g.connections(), 0);
}

#[test]
fn a_restore_ends_the_saved_connections_with_rsts_before_anything_else() {
    let mem = test_mem();
    let saved = {
        let mut g = Guest::new(&mem);
        g.rx_buffers(4);
        let none = g.dev.lock().unwrap().state().host_connections.unwrap();
        assert_eq!(none.ports, []);
        let (_host, port) = g.host_connect(5);
        let saved = g.dev.lock().unwrap().state();
        let listed = saved.host_connections.as_ref().unwrap();
        assert_eq!(listed.ports, [(port, 5)]);
        assert_eq!(listed.next_local_port, port + 1);
        saved
    };
    // The restored device: its guest still holds connection (port, 5).
    let dir = TempDir::new().unwrap();
    let uds = dir.as_path().join("clone.sock");
    let dev = Vsock::restore(&saved, uds.to_str()).unwrap();
    assert!(!dev.reset_after_restore);
    let mut g = Guest::with_device(&mem, true, dev, dir);
    g.rx_buffers(4);
    let (old_port, _) = saved.host_connections.as_ref().unwrap().ports[0];
    // A host connection made at once is answered without waiting.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 5\n").unwrap();
    let (rst, _) = g.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (VSOCK_OP_RST, old_port, 5)
    );
    let (req, _) = g.recv();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    assert_ne!(
        req.src_port, old_port,
        "a new connection reuses a saved port"
    );
    // No transport reset event.
    assert_eq!(g.evq.used_idx(), 0);
}

#[test]
fn a_restore_from_an_older_state_hands_out_host_ports_the_guest_has_not_seen() {
    let mem = test_mem();
    let mut saved = Guest::new(&mem).dev.lock().unwrap().state();
    saved.host_connections = None;
    let dir = TempDir::new().unwrap();
    let uds = dir.as_path().join("clone.sock");
    let dev = Vsock::restore(&saved, uds.to_str()).unwrap();
    assert!(dev.reset_after_restore);
    let mut g = Guest::with_device(&mem, false, dev, dir);
    g.rx_buffers(4);
    // The old VMM's first connection came from the first host port; the
    // guest may still hold its socket.
    let (_host, port) = g.host_connect(52);
    assert_ne!(port, 1 << 30);
}

#[test]
fn transport_reset_event_drops_connections() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    let (mut host, _) = g.host_connect(1);
    g.evq.add_chain(&[wr(0xA0_0000, 4)]);
    write_bytes(&mem, 0xA0_0000, &[0xff; 4]);
    g.dev.lock().unwrap().send_transport_reset();
    assert_eq!(g.evq.used_idx(), 1);
    assert_eq!(g.evq.used_elem(0).1, 4);
    assert_eq!(read_bytes(&mem, 0xA0_0000, 4), [0, 0, 0, 0]);
    assert_eq!(g.connections(), 0);
    g.wait_eof(&mut host);
    // The guest driver re-posts its event buffer once it handled the reset;
    // new connections are delivered after that.
    g.evq.add_chain(&[wr(0xA0_0000, 4)]);
    g.kick(EVT_QUEUE);
    let (_host2, _) = g.host_connect(2);
}

const RESET_GRACE_FOR_TESTS: Duration = Duration::from_millis(900);

/// Linux's `vring_need_event`: whether a driver that moved the avail index
/// from `old` to `new` kicks, given the device's `avail_event`.
fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[test]
fn the_guest_re_posting_its_event_buffer_after_a_reset_kicks_the_device() {
    let mem = test_mem();
    let mut g = Guest::with_event_idx(&mem, true);
    g.rx_buffers(4);
    // Linux's driver keeps eight event buffers posted.
    for i in 0..8 {
        g.evq.add_chain(&[wr(0xA0_0000 + 8 * i, 4)]);
    }
    g.dev.lock().unwrap().send_transport_reset();
    assert_eq!(g.evq.used_idx(), 1);
    // The guest handles the reset and re-posts the buffer, kicking only if
    // EVENT_IDX says the device asked for it (as the driver does).
    let old = g.evq.avail_idx();
    g.evq.add_chain(&[wr(0xA0_0000, 4)]);
    let kicked = vring_need_event(g.evq.avail_event(), g.evq.avail_idx(), old);
    assert!(
        kicked,
        "avail_event {} does not ask for the re-post ({old} -> {})",
        g.evq.avail_event(),
        g.evq.avail_idx()
    );
    g.kick(EVT_QUEUE);
    // A host connection is then delivered at once, not after the grace.
    let started = Instant::now();
    let (_host, _) = g.host_connect(4);
    assert!(
        started.elapsed() < RESET_GRACE_FOR_TESTS / 2,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn connection_requests_wait_for_the_guest_to_handle_a_reset() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    g.evq.add_chain(&[wr(0xA0_0000, 4)]);
    g.dev.lock().unwrap().send_transport_reset();
    // A host connection right after the reset is held back: the guest
    // would drop a request that overtook the reset.
    let started = Instant::now();
    let (_host, _) = g.host_connect(3);
    // Without the guest re-posting its event buffer, it goes out once the
    // grace period has passed.
    assert!(
        started.elapsed() >= RESET_GRACE_FOR_TESTS,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    g.rx_buffers(4);
    // Too short for a header.
    g.send_raw(&[rd(TX_POOL, 20)]);
    // Claims a payload it does not carry.
    let mut hdr = guest_hdr(VSOCK_OP_RW, 1, 2);
    hdr.len = 1000;
    write_bytes(&mem, TX_POOL, &hdr.to_bytes());
    g.send_raw(&[rd(TX_POOL, HDR_LEN as u32)]);
    // Outside guest memory.
    g.send_raw(&[rd(0x1_0000_0000, HDR_LEN as u32)]);
    // From the wrong CID: dropped silently.
    let mut hdr = guest_hdr(VSOCK_OP_REQUEST, 1, 2);
    hdr.src_cid = 9;
    g.send(hdr, &[]);
    // Not a stream: refused.
    let mut hdr = guest_hdr(VSOCK_OP_REQUEST, 1, 2);
    hdr.type_ = 2;
    g.send(hdr, &[]);
    assert_eq!(g.recv().0.op, VSOCK_OP_RST);
    g.expect_no_rx();
}

#[test]
fn bogus_tx_avail_index_needs_reset() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let interrupt = Arc::new(Interrupt::new().unwrap());
    {
        let mut dev = g.dev.lock().unwrap();
        dev.reset();
        let queues = vec![
            g.rxq.create_queue(),
            g.txq.create_queue(),
            g.evq.create_queue(),
        ];
        dev.activate(mem.clone(), interrupt.clone(), queues)
            .unwrap();
    }
    g.txq.set_avail_idx(1000);
    g.kick(TX_QUEUE);
    g.pump_for(20);
    assert!(interrupt.needs_reset());
}

#[test]
fn config_and_creation_errors() {
    let dir = TempDir::new().unwrap();
    let uds = dir.as_path().join("v.sock");
    let dev = Vsock::new(&vsock_config(&uds)).unwrap();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    // A stale socket is replaced.
    drop(dev);
    let dev = Vsock::new(&vsock_config(&uds)).unwrap();
    drop(dev);

    let file = dir.as_path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        Vsock::new(&vsock_config(&file)),
        Err(VsockError::PathInUse { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(matches!(
        Vsock::new(&vsock_config(&dir.as_path().join("no/such/dir.sock"))),
        Err(VsockError::Bind { .. })
    ));
    let mut cfg = vsock_config(&uds);
    cfg.guest_cid = 2;
    assert!(matches!(Vsock::new(&cfg), Err(VsockError::InvalidCid(2))));
    cfg.uds_path = String::new();
    cfg.guest_cid = 3;
    assert!(matches!(Vsock::new(&cfg), Err(VsockError::EmptyPath)));
}

/// Parses the TX chain at the head of a one-chain queue.
fn parse_tx(mem: &Mem, bufs: &[Buf]) -> Result<(VsockHeader, Vec<u8>), PacketError> {
    let mut tq = TestQueue::new(mem, 0xC000, 16);
    tq.add_chain(bufs);
    let mut q = tq.create_queue();
    let chain = q.iter(mem).unwrap().next().unwrap();
    let mut reader = Reader::new(mem, chain).unwrap();
    let mut payload = Vec::new();
    read_tx(&mut reader, &mut payload).map(|h| (h, payload))
}

#[test]
fn packet_header_round_trip_and_parsing() {
    let mem = test_mem();
    let mut hdr = guest_hdr(VSOCK_OP_RW, 0x1122_3344, 0x5566_7788);
    hdr.len = 6;
    hdr.flags = 0xdead_beef;
    hdr.fwd_cnt = 99;
    assert_eq!(VsockHeader::from_bytes(&hdr.to_bytes()), hdr);

    write_bytes(&mem, 0x20_0000, &hdr.to_bytes());
    write_bytes(&mem, 0x20_0100, b"abcdef");
    // Header and payload in separate descriptors.
    let (h, p) = parse_tx(&mem, &[rd(0x20_0000, 44), rd(0x20_0100, 6)]).unwrap();
    assert_eq!((h, p.as_slice()), (hdr, &b"abcdef"[..]));
    // Header split across descriptors, payload in the same buffer as the tail.
    let mut joined = hdr.to_bytes().to_vec();
    joined.extend_from_slice(b"abcdef");
    write_bytes(&mem, 0x21_0000, &joined);
    let (h, p) = parse_tx(&mem, &[rd(0x21_0000, 10), rd(0x21_000a, 40)]).unwrap();
    assert_eq!((h, p.as_slice()), (hdr, &b"abcdef"[..]));

    assert_eq!(
        parse_tx(&mem, &[rd(0x20_0000, 43)]).unwrap_err(),
        PacketError::ShortHeader(43)
    );
    assert_eq!(
        parse_tx(&mem, &[rd(0x20_0000, 44), rd(0x20_0100, 5)]).unwrap_err(),
        PacketError::ShortPayload { len: 6, avail: 5 }
    );
    hdr.len = (MAX_PKT_DATA + 1) as u32;
    write_bytes(&mem, 0x20_0000, &hdr.to_bytes());
    assert_eq!(
        parse_tx(&mem, &[rd(0x20_0000, 44)]).unwrap_err(),
        PacketError::PayloadTooLong(hdr.len)
    );
    // Non-RW packets carry no payload whatever `len` says.
    hdr.op = VSOCK_OP_REQUEST;
    write_bytes(&mem, 0x20_0000, &hdr.to_bytes());
    let (h, p) = parse_tx(&mem, &[rd(0x20_0000, 44)]).unwrap();
    assert_eq!((h.op, p.len()), (VSOCK_OP_REQUEST, 0));
}

#[test]
fn host_giving_up_before_guest_answers() {
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    // REQUEST already sent: the guest gets a RST.
    g.rx_buffers(4);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 5\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    drop(host);
    let (pkt, _) = g.recv();
    assert_eq!(
        (pkt.op, pkt.src_port, pkt.dst_port),
        (VSOCK_OP_RST, req.src_port, 5)
    );
    assert_eq!(g.connections(), 0);

    // No RX buffers yet: the pending REQUEST is simply forgotten.
    let used = g.rxq.used_idx();
    let avail = g.rxq.avail_idx();
    let spare = avail.wrapping_sub(used);
    let mut keep = Vec::new();
    for _ in 0..spare {
        // Use up the remaining buffers with a connection that stays.
        let mut h = UnixStream::connect(&g.uds).unwrap();
        h.write_all(b"CONNECT 6\n").unwrap();
        assert_eq!(g.recv().0.op, VSOCK_OP_REQUEST);
        keep.push(h);
    }
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let n = keep.len();
    g.pump_until("CONNECT 7", |g| g.connections() == n + 1);
    drop(host);
    g.pump_until("host hang-up", |g| g.connections() == n);
    g.rx_buffers(2);
    g.expect_no_rx();
}
