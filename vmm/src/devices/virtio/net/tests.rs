//! Device tests on fake guest queues and a real tap. Each tap lives in a
//! network namespace of its own, made for the test's thread, so the host's
//! network is untouched and the namespace (with its taps) disappears when
//! the thread ends. Tests that need a tap are skipped when not root.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, Mem, VirtioDevice};
use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::vmm_config::net::NetworkInterfaceConfig;

const GUEST_MAC: [u8; 6] = [0x06, 0, 10, 0, 0, 2];
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x80_0000;

fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread in a new network namespace holding taps `names`
/// (up; the first has 10.0.0.1/24). Skipped without root.
fn in_netns(names: &[&str], f: impl FnOnce() + Send + 'static) {
    if !can_make_taps() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        // No IPv6 chatter (router solicitations, MLD) on the taps: the
        // tests look for specific frames. Sysctls resolve to this
        // thread's namespace; a host without IPv6 has nothing to turn off.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        for (i, n) in names.iter().enumerate() {
            sh(&["ip", "tuntap", "add", "dev", n, "mode", "tap"]);
            if i == 0 {
                sh(&["ip", "addr", "add", "10.0.0.1/24", "dev", n]);
            }
            sh(&["ip", "link", "set", n, "up"]);
        }
        f();
    })
    .join()
    .unwrap();
}

fn cfg(tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
    NetworkInterfaceConfig {
        iface_id: "eth0".into(),
        host_dev_name: tap.into(),
        guest_mac: mac.map(String::from),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        terminate_connections_on_pause: false,
    }
}

/// An ARP request from the guest (10.0.0.2) for 10.0.0.1, with its vnet header.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f
}

fn is_arp_reply_to_guest(frame: &[u8]) -> bool {
    let eth = &frame[VNET_HDR_LEN..];
    eth.len() >= 42 && eth[..6] == GUEST_MAC && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2]
}

struct Harness<'a> {
    mem: &'a Mem,
    rxq: TestQueue<'a>,
    txq: TestQueue<'a>,
    net: Net,
    interrupt: Arc<Interrupt>,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a Mem, cfg: &NetworkInterfaceConfig) -> Self {
        Self::with_net(mem, Net::new(cfg).unwrap())
    }

    fn with_net(mem: &'a Mem, mut net: Net) -> Self {
        let rxq = TestQueue::new(mem, 0, 16);
        let txq = TestQueue::new(mem, 0x10000, 16);
        let interrupt = Arc::new(Interrupt::new().unwrap());
        net.activate(
            mem.clone(),
            interrupt.clone(),
            vec![rxq.create_queue(), txq.create_queue()],
        )
        .unwrap();
        Harness {
            mem,
            rxq,
            txq,
            net,
            interrupt,
        }
    }

    fn send(&mut self, frame: &[u8], slot: u64) {
        let addr = TX_BUFS + slot * 0x1000;
        write_bytes(self.mem, addr, frame);
        // Header and frame in separate descriptors, as Linux does.
        self.txq.add_chain(&[
            rd(addr, VNET_HDR_LEN as u32),
            rd(
                addr + VNET_HDR_LEN as u64,
                (frame.len() - VNET_HDR_LEN) as u32,
            ),
        ]);
    }

    fn add_rx_buffer(&mut self, slot: u64, len: u32) {
        self.rxq.add_chain(&[wr(RX_BUFS + slot * 0x1_0000, len)]);
    }

    fn rx_frame(&self, i: u16) -> Vec<u8> {
        let (id, len) = self.rxq.used_elem(i);
        // add_rx_buffer chains are one descriptor each, head == slot index.
        read_bytes(self.mem, RX_BUFS + u64::from(id) * 0x1_0000, len as usize)
    }

    /// Sends ARP requests for 10.0.0.1 (again every 200 ms: a new tap
    /// only transmits once the kernel's link watcher has run) and runs RX
    /// as tap and limiter events would, until `want` replies reached the
    /// guest or 10 s passed. Returns every frame delivered.
    fn arp_until_replies(&mut self, want: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0u64;
        let mut last_send = Instant::now() - Duration::from_secs(1);
        loop {
            self.net.process_rx();
            let frames: Vec<Vec<u8>> = (0..self.rxq.used_idx()).map(|i| self.rx_frame(i)).collect();
            let n = frames.iter().filter(|f| is_arp_reply_to_guest(f)).count();
            if n >= want || Instant::now() > deadline {
                return frames;
            }
            if last_send.elapsed() >= Duration::from_millis(200) {
                self.send(&arp_request(), sent % 8);
                self.net.process_tx();
                sent += 1;
                last_send = Instant::now();
            }
            let mut pfd = [
                libc::pollfd {
                    fd: self.net.tap().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.net.rx_limiter_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds, a bounded timeout.
            unsafe { libc::poll(pfd.as_mut_ptr(), 2, 50) };
            if pfd[1].revents & libc::POLLIN != 0 {
                self.net.on_rx_limiter_event();
            }
        }
    }

    /// Sends ARP requests until the tap has a frame for us.
    fn wait_tap(&mut self) {
        for _ in 0..50 {
            self.send(&arp_request(), 0);
            self.net.process_tx();
            let mut pfd = libc::pollfd {
                fd: self.net.tap().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, a bounded timeout.
            if unsafe { libc::poll(&mut pfd, 1, 200) } == 1 {
                return;
            }
        }
        panic!("no frame from the tap");
    }
}

#[test]
fn config_space_and_features() {
    in_netns(&["tapcfg0"], || {
        let n = Net::new(&cfg("tapcfg0", Some("06:00:0a:00:00:02"))).unwrap();
        assert_eq!(n.device_type(), crate::devices::virtio::TYPE_NET);
        assert_eq!(n.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert!(n.avail_features() & (1 << features::MAC) != 0);
        assert!(n.avail_features() & (1 << features::HOST_TSO4) != 0);
        let mut m = [0u8; 8];
        n.read_config(0, &mut m);
        assert_eq!(m, [6, 0, 10, 0, 0, 2, 0, 0]);
        drop(n);
        let n = Net::new(&cfg("tapcfg0", None)).unwrap();
        assert_eq!(n.avail_features() & (1 << features::MAC), 0);
    });
}

#[test]
fn bad_configs() {
    let e = Net::new(&cfg("embernosuch0", None)).err().unwrap();
    assert!(
        matches!(
            e,
            NetError::Tap {
                source: TapError::NoSuchDevice(_),
                ..
            }
        ),
        "{e}"
    );
    let e = Net::new(&cfg("lo", Some("06:00:0a:00:00"))).err().unwrap();
    assert!(e.to_string().contains("invalid MAC"), "{e}");
    // An interface that is not a tap.
    let e = Net::new(&cfg("lo", None)).err().unwrap();
    assert!(matches!(e, NetError::Tap { .. }), "{e}");
}

#[test]
fn tx_to_tap_and_reply_back_to_rx() {
    in_netns(&["taprx0"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &cfg("taprx0", Some("06:00:0a:00:00:02")));
        let _ = h.interrupt.irq_evt().read();
        h.send(&arp_request(), 0);
        h.net.process_tx();
        assert_eq!(h.txq.used_idx(), 1);
        assert_eq!(h.txq.used_elem(0).1, 0);
        assert_eq!(h.net.counters().tx_frames, 1);
        assert!(
            h.interrupt.irq_evt().read().is_ok(),
            "TX completion signalled"
        );

        // The kernel answers; with no receive buffer the frame is kept.
        h.wait_tap();
        h.net.process_rx();
        assert_eq!(h.rxq.used_idx(), 0);
        assert_eq!(h.net.counters().rx_frames, 0);
        assert_eq!(h.net.counters().dropped, 0);

        // Buffers arrive (the guest kicks RX): frames are delivered, the
        // ARP reply among them (IPv6 chatter may come first).
        for slot in 0..16 {
            h.add_rx_buffer(slot, 4096);
        }
        let frames = h.arp_until_replies(1);
        assert!(
            frames.iter().any(|f| is_arp_reply_to_guest(f)),
            "no ARP reply among {} frames",
            frames.len()
        );
        // num_buffers is 1 in every delivered header.
        assert!(frames.iter().all(|f| f[10..12] == [1, 0]));
        assert!(h.interrupt.irq_evt().read().is_ok(), "RX signalled");
    });
}

#[test]
fn small_rx_buffer_drops_the_frame_not_the_queue() {
    in_netns(&["tapsm0"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &cfg("tapsm0", None));
        h.wait_tap();
        h.add_rx_buffer(0, 20);
        h.net.process_rx();
        assert_eq!(h.rxq.used_idx(), 1);
        assert_eq!(h.rxq.used_elem(0).1, 0);
        assert_eq!(h.net.counters().dropped, 1);
    });
}

#[test]
fn tx_rate_limiter_delays_instead_of_dropping() {
    in_netns(&["taprl0"], || {
        let mem = test_mem();
        let mut c = cfg("taprl0", None);
        c.tx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 100,
            }),
        });
        let mut h = Harness::new(&mem, &c);
        h.send(&arp_request(), 0);
        h.send(&arp_request(), 1);
        let t0 = Instant::now();
        h.net.process_tx();
        assert_eq!(h.txq.used_idx(), 1, "second frame waits");
        assert_eq!(h.net.counters().throttled, 1);
        // A kick while blocked changes nothing.
        h.net.process_tx();
        assert_eq!(h.txq.used_idx(), 1);
        // The limiter's timer fires; the event loop then retries.
        let mut pfd = libc::pollfd {
            fd: h.net.tx_limiter_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 2000) }, 1);
        h.net.on_tx_limiter_event();
        assert_eq!(h.txq.used_idx(), 2);
        assert!(t0.elapsed() >= Duration::from_millis(90));
        assert_eq!(h.net.counters().tx_frames, 2);
        assert_eq!(h.net.counters().dropped, 0);

        // PATCH: no limit any more.
        h.net
            .update_rate_limiters(None, Some(&RateLimiterConfig::default()));
        for slot in 2..6 {
            h.send(&arp_request(), slot);
        }
        h.net.process_tx();
        assert_eq!(h.txq.used_idx(), 6);
        assert_eq!(
            h.net.config().tx_rate_limiter,
            Some(RateLimiterConfig::default())
        );
    });
}

#[test]
fn rx_rate_limiter_keeps_the_frame() {
    in_netns(&["taprr0"], || {
        let mem = test_mem();
        let mut c = cfg("taprr0", Some("06:00:0a:00:00:02"));
        c.rx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 1000,
            }),
            ops: None,
        });
        let mut h = Harness::new(&mem, &c);
        for slot in 0..16 {
            h.add_rx_buffer(slot, 4096);
        }
        // Frames are larger than the 1-byte bucket: each waits for a full
        // bucket, one at a time, none dropped.
        let frames = h.arp_until_replies(2);
        assert!(frames.iter().filter(|f| is_arp_reply_to_guest(f)).count() >= 2);
        assert!(h.net.counters().throttled >= 1);
        assert_eq!(h.net.counters().dropped, 0);
    });
}

#[test]
fn snapshot_state_and_restore_on_another_tap() {
    in_netns(&["tapsn0", "tapsn1"], || {
        let mem = test_mem();
        let mut c = cfg("tapsn0", Some("06:00:0a:00:00:02"));
        c.rx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: Some(10),
                refill_time: 100,
            }),
            ops: None,
        });
        let mut n = Net::new(&c).unwrap();
        let acked = n.avail_features() & !(1 << features::GUEST_UFO);
        n.set_acked_features(acked);
        let state = n.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(state.config, c);
        assert_eq!(state.common.acked_features, acked);

        let r = Net::restore(&state, Some("tapsn1")).unwrap();
        assert_eq!(r.config().host_dev_name, "tapsn1");
        assert_eq!(r.acked_features(), acked);
        assert_eq!(r.mac(), Some(GUEST_MAC));
        assert_eq!(r.config().rx_rate_limiter, c.rx_rate_limiter);
        drop(r);
        // Without an override, the saved tap (free again once `n` goes).
        drop(n);
        let r = Net::restore(&state, None).unwrap();
        assert_eq!(r.tap().name(), "tapsn0");
        drop(r);
        // A device on the saved configuration works on its queues.
        let mut h = Harness::new(&mem, &c);
        h.send(&arp_request(), 0);
        h.net.process_tx();
        assert_eq!(h.net.counters().tx_frames, 1);
        drop(h);

        let mut bad = state.clone();
        bad.common.acked_features |= 1 << 63;
        assert!(matches!(
            Net::restore(&bad, Some("tapsn1")),
            Err(NetError::Features { .. })
        ));
        assert!(Net::restore(&state, Some("tapsnX")).is_err());
    });
}

// --- Ending connections at a pause, against the kernel's TCP on the tap ---

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};

use super::conntrack::tests::{check_frame, tcp_frame};
use super::conntrack::{parse, Segment, TCP_ACK, TCP_RST, TCP_SYN};

const G_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
const H_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
const G_PORT: u16 = 40000;
const G_ISN: u32 = 0xffff_fff0; // wraps within the test

/// The MAC `connect_to_kernel` gives the tap (sysfs would show the host
/// namespace's taps, not this thread's).
const TAP_MAC: [u8; 6] = [0x02, 0, 0x0a, 0, 0, 1];

fn ct_cfg(tap: &str, on: bool) -> NetworkInterfaceConfig {
    let mut c = cfg(tap, Some("06:00:0a:00:00:02"));
    c.terminate_connections_on_pause = on;
    c
}

/// A frame from the guest's side of the test connection, vnet header first.
fn guest_seg(hop: [u8; 6], port: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend(tcp_frame(
        GUEST_MAC,
        hop,
        (G_IP, G_PORT),
        (H_IP, port),
        seq,
        ack,
        flags,
        data,
    ));
    f
}

/// A delivered frame as sent: num_buffers back to 0.
fn as_sent(mut f: Vec<u8>) -> Vec<u8> {
    f[10..12].fill(0);
    f
}

/// Runs RX (as tap events would) until a segment of the test connection
/// matching `want` reached the guest; `seen` counts used entries looked at.
fn wait_segment(h: &mut Harness, seen: &mut u16, want: impl Fn(&Segment) -> bool) -> Segment {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        h.net.process_rx();
        while *seen < h.rxq.used_idx() {
            let f = h.rx_frame(*seen);
            *seen += 1;
            if let Some(s) = parse(&f[VNET_HDR_LEN..]) {
                if s.dport == G_PORT && want(&s) {
                    return s;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no such segment reached the guest"
        );
        let mut pfd = libc::pollfd {
            fd: h.net.tap().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        unsafe { libc::poll(&mut pfd, 1, 50) };
    }
}

/// Plays a guest TCP client to a kernel listener on 10.0.0.1:`port`:
/// handshake, "hello" to the kernel, "hi" back. Returns the kernel's
/// accepted socket, the guest's SND.NXT and the kernel's.
fn connect_to_kernel(
    h: &mut Harness,
    tap: &str,
    port: u16,
    seen: &mut u16,
) -> (TcpStream, u32, u32) {
    // The MAC first: setting it flushes the neighbour table.
    sh(&["ip", "link", "set", tap, "address", "02:00:0a:00:00:01"]);
    let hop = TAP_MAC;
    sh(&[
        "ip",
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        "06:00:0a:00:00:02",
        "dev",
        tap,
    ]);
    let listener = TcpListener::bind(("10.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    for slot in 0..16 {
        h.add_rx_buffer(slot, 4096);
    }
    h.send(&guest_seg(hop, port, G_ISN, 0, TCP_SYN, &[]), 0);
    h.net.process_tx();
    let synack = wait_segment(h, seen, |s| s.flags == TCP_SYN | TCP_ACK);
    assert_eq!(synack.ack, G_ISN.wrapping_add(1));
    let k_isn = synack.seq;
    h.send(
        &guest_seg(
            hop,
            port,
            G_ISN.wrapping_add(1),
            k_isn.wrapping_add(1),
            TCP_ACK | 0x08,
            b"hello",
        ),
        1,
    );
    h.net.process_tx();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut s, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    // Each write goes out at once, acknowledged or not.
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    s.write_all(b"hi").unwrap();
    wait_segment(h, seen, |s| s.payload_len == 2);
    // Acknowledged, so the kernel does not retransmit it meanwhile.
    let (g_nxt, k_nxt) = (G_ISN.wrapping_add(6), k_isn.wrapping_add(3));
    h.send(&guest_seg(hop, port, g_nxt, k_nxt, TCP_ACK, &[]), 2);
    h.net.process_tx();
    (s, g_nxt, k_nxt)
}

fn expect_reset(s: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected ECONNRESET on the kernel's socket, got {other:?}"),
    }
}

#[test]
fn pause_resets_a_kernel_connection_both_ways() {
    in_netns(&["tapct0"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &ct_cfg("tapct0", true));
        let mut seen = 0;
        let (mut s, g_nxt, k_nxt) = connect_to_kernel(&mut h, "tapct0", 5001, &mut seen);
        assert_eq!(h.net.tracked_connections(), Some(1));
        let _ = h.interrupt.irq_evt().read();

        h.net.on_pause();
        // The kernel took the RST: its socket fails at once.
        expect_reset(&mut s);
        // The guest's RST is in its ring, signalled, and one it accepts:
        // SEQ is the kernel's SND.NXT (the guest's RCV.NXT).
        let rst = wait_segment(&mut h, &mut seen, |s| s.flags & TCP_RST != 0);
        let f = as_sent(h.rx_frame(seen - 1));
        assert_eq!(check_frame(&f), rst);
        assert_eq!(
            (rst.seq, rst.ack, rst.flags),
            (k_nxt, g_nxt, TCP_RST | TCP_ACK)
        );
        assert_eq!((rst.src, rst.sport, rst.dst), (H_IP, 5001, G_IP));
        assert_eq!((rst.src_mac, rst.dst_mac), (TAP_MAC, GUEST_MAC));
        assert!(h.interrupt.irq_evt().read().is_ok(), "RX signalled");
        assert_eq!(h.net.counters().connections_terminated, 1);
        assert_eq!(h.net.tracked_connections(), Some(0));
        assert_eq!(h.net.rx_inject_len(), 0);
        // A second pause finds nothing left to end.
        h.net.on_resume();
        h.net.on_pause();
        assert_eq!(h.net.counters().connections_terminated, 1);
    });
}

#[test]
fn remote_challenge_ack_gets_the_rst_it_accepts() {
    in_netns(&["tapct1"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &ct_cfg("tapct1", true));
        let mut seen = 0;
        let (mut s, g_nxt, _) = connect_to_kernel(&mut h, "tapct1", 5002, &mut seen);
        // The tracker believes the guest sent 100 more bytes than the
        // kernel got (as when a segment was lost): its RST is in the
        // window but not at RCV.NXT, so the kernel answers a challenge ACK.
        let lost = guest_seg(TAP_MAC, 5002, g_nxt, 0, TCP_ACK, &[0; 100]);
        assert!(h
            .net
            .conntrack_mut()
            .unwrap()
            .on_guest_frame(&lost[VNET_HDR_LEN..]));
        h.net.on_pause();
        s.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 16];
        loop {
            h.net.process_rx();
            match s.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("read: {other:?}"),
            }
            assert!(Instant::now() < deadline, "the kernel never took an RST");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The guest got its RST and nothing of the dead connection after it.
        let frames: Vec<Segment> = (seen..h.rxq.used_idx())
            .filter_map(|i| parse(&h.rx_frame(i)[VNET_HDR_LEN..]))
            .filter(|s| s.dport == G_PORT)
            .collect();
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].flags, TCP_RST | TCP_ACK);
    });
}

#[test]
fn switched_off_nothing_is_tracked_or_ended() {
    in_netns(&["tapct2"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &ct_cfg("tapct2", false));
        let mut seen = 0;
        let (mut s, g_nxt, k_nxt) = connect_to_kernel(&mut h, "tapct2", 5003, &mut seen);
        assert_eq!(h.net.tracked_connections(), None);
        h.net.on_pause();
        h.net.process_rx();
        assert_eq!(h.rxq.used_idx(), seen, "nothing new for the guest");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4];
        let e = s.read(&mut buf).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
        assert_eq!(h.net.counters().connections_terminated, 0);
        h.net.on_resume();

        // PATCH turns it on mid-connection: the remote's segments alone
        // make no entry, the guest's next one does.
        h.net.set_terminate_connections(true);
        assert!(h.net.config().terminate_connections_on_pause);
        s.write_all(b"more").unwrap();
        wait_segment(&mut h, &mut seen, |s| s.payload_len == 4);
        assert_eq!(h.net.tracked_connections(), Some(0));
        let ack = guest_seg(TAP_MAC, 5003, g_nxt, k_nxt.wrapping_add(4), TCP_ACK, &[]);
        h.send(&ack, 3);
        h.net.process_tx();
        assert_eq!(h.net.tracked_connections(), Some(1));
        h.net.on_pause();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        expect_reset(&mut s);
        let rst = wait_segment(&mut h, &mut seen, |s| s.flags & TCP_RST != 0);
        assert_eq!((rst.seq, rst.ack), (k_nxt.wrapping_add(4), g_nxt));
    });
}

#[test]
fn rsts_without_room_wait_in_the_snapshot() {
    in_netns(&["tapct3", "tapct4"], || {
        let mem = test_mem();
        let mut h = Harness::new(&mem, &ct_cfg("tapct3", true));
        // A guest segment makes the entry; no receive buffers exist.
        let seg = guest_seg(TAP_MAC, 9, 77, 88, TCP_ACK, b"x");
        h.send(&seg, 0);
        h.net.process_tx();
        h.net.on_pause();
        assert_eq!(h.net.rx_inject_len(), 1);
        let state = h.net.state();
        assert_eq!(state.pending_rx_frames.len(), 1);
        let json = serde_json::to_string(&state).unwrap();
        let state: NetState = serde_json::from_str(&json).unwrap();
        drop(h);

        let net = Net::restore(&state, Some("tapct4")).unwrap();
        assert!(net.config().terminate_connections_on_pause);
        let mut h = Harness::with_net(&mem, net);
        h.add_rx_buffer(0, 4096);
        h.net.process_rx();
        assert!(h.rxq.used_idx() >= 1);
        let rst = check_frame(&as_sent(h.rx_frame(0)));
        assert_eq!(
            (rst.src, rst.sport, rst.dst, rst.dport),
            (H_IP, 9, G_IP, G_PORT)
        );
        assert_eq!((rst.seq, rst.ack, rst.flags), (88, 78, TCP_RST | TCP_ACK));
        assert_eq!(h.net.rx_inject_len(), 0);
    });
}

#[test]
fn old_snapshot_state_loads() {
    let old = r#"{"config": {"iface_id": "eth0", "host_dev_name": "tap0"}, "acked_features": 3}"#;
    let s: NetState = serde_json::from_str(old).unwrap();
    assert!(!s.config.terminate_connections_on_pause);
    assert!(s.pending_rx_frames.is_empty());
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["config"]["terminate_connections_on_pause"], false);
    assert!(json.get("pending_rx_frames").is_none());
}
