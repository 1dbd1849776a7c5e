//! virtio-net: arbitrary descriptor tables and avail rings (RX and TX)
//! over a small guest memory, run by the real device on a real tap. The
//! tap lives in a network namespace the target makes for itself at start
//! (root and /dev/net/tun needed), with 10.0.0.1/24 on it, so what the
//! guest sends reaches a kernel that may answer, and nothing else.
//!
//! Input: a config byte (bit 0: connection tracking on; bits 1-5: which
//! offload features the driver acks), a count (0-3) of frames for the
//! guest, each `len: u16 LE, frame` (vnet header first), then
//! `ember_fuzz::guest`'s layout for two queues.
#![no_main]

use std::process::Command;
use std::sync::{Arc, Once};

use ember_fuzz::{guest, Cursor};
use ember_vmm::devices::virtio::net::Net;
use ember_vmm::devices::virtio::{Interrupt, VirtioDevice};
use ember_vmm::fuzzing::set_pending_rx_frames;
use ember_vmm::vmm_config::net::NetworkInterfaceConfig;
use libfuzzer_sys::fuzz_target;

const TAP: &str = "emberfz0";

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this (the fuzzing) thread's own, with the tap.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: unshare only changes this thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "virtio_net needs root (a network namespace of its own): {}",
            std::io::Error::last_os_error()
        );
        // Sysctls resolve to this thread's namespace.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        sh(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
        sh(&["ip", "addr", "add", "10.0.0.1/24", "dev", TAP]);
        sh(&["ip", "link", "set", TAP, "up"]);
    });
}

fuzz_target!(|data: &[u8]| {
    setup();
    let mut input = Cursor::new(data);
    let conf = input.u8();
    let nframes = input.u8() % 4;
    let frames: Vec<Vec<u8>> = (0..nframes)
        .map(|_| {
            let len = usize::from(input.u16());
            input.bytes(len).to_vec()
        })
        .collect();
    let cfg = NetworkInterfaceConfig {
        iface_id: "eth0".into(),
        host_dev_name: TAP.into(),
        guest_mac: Some("06:00:0a:00:00:02".into()),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        terminate_connections_on_pause: conf & 1 != 0,
    };
    let mut net = Net::new(&cfg).expect("net device on the tap");
    set_pending_rx_frames(&mut net, &frames);
    let g = guest(&mut input, 2);
    // VERSION_1, MAC, EVENT_IDX as the queues have it, and as the input
    // says: CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4, INDIRECT_DESC.
    let mut acked = (1u64 << 32) | (1 << 5) | (u64::from(g.event_idx) << 29);
    for (i, bit) in [0u32, 1, 7, 11, 28].iter().enumerate() {
        if (conf >> (1 + i)) & 1 != 0 {
            acked |= 1 << bit;
        }
    }
    net.set_acked_features(acked & net.avail_features());
    let interrupt = Arc::new(Interrupt::new().expect("eventfd"));
    net.activate(g.mem.clone(), interrupt, g.queues)
        .expect("activate");
    for _ in 0..2 {
        net.process_tx();
        net.process_rx();
    }
    let _ = (net.counters(), net.tracked_connections());
});
