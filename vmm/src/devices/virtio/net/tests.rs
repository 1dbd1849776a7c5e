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
        let rxq = TestQueue::new(mem, 0, 16);
        let txq = TestQueue::new(mem, 0x10000, 16);
        let mut net = Net::new(cfg).unwrap();
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
        assert_eq!(state.acked_features, acked);

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
        bad.acked_features |= 1 << 63;
        assert!(matches!(
            Net::restore(&bad, Some("tapsn1")),
            Err(NetError::Features { .. })
        ));
        assert!(Net::restore(&state, Some("tapsnX")).is_err());
    });
}
