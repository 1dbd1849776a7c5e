//! virtio-net end to end: a real guest with eth0 on a tap, pinging the
//! host side and back. The VMM, the tap and the host-side tools run in a
//! network namespace made for the test's thread (gone when it ends), so the
//! host's network is untouched. Needs root (taps) and /dev/kvm.

use std::process::Command;
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn guest_pings_host_over_tap_and_back() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: taps need root");
        return;
    }
    let (kernel, rootfs) = (kernel_path(), rootfs_path());
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces; children
        // spawned from this thread (the VMM, ip, ping) inherit it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        assert!(sh(&["ip", "link", "set", "lo", "up"]));
        assert!(sh(&["ip", "tuntap", "add", "dev", "tapvm0", "mode", "tap"]));
        assert!(sh(&["ip", "addr", "add", "172.16.0.1/30", "dev", "tapvm0"]));
        assert!(sh(&["ip", "link", "set", "tapvm0", "up"]));

        let mut vmm = VmmProcess::spawn(&[]);
        // Errors are 400s and leave the VMM usable.
        let r = vmm.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "host_dev_name": "nosuchtap0"}),
        );
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.fault().contains("nosuchtap0"), "{r:?}");
        let r = vmm.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "host_dev_name": "tapvm0", "guest_mac": "06:00:ac"}),
        );
        assert_eq!(r.status, 400, "{r:?}");
        let r = vmm.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "host_dev_name": "tapvm0",
                    "guest_mac": "06:00:ac:10:00:02",
                    "tx_rate_limiter": {"bandwidth": {"size": 10000000, "refill_time": 100}}}),
        );
        assert_eq!(r.status, 204, "{r:?}");

        let vsock = vmm.path("vsock.sock");
        let ready = bind_ready_listener(&vsock).unwrap();
        let t0 = Instant::now();
        vmm.boot(&kernel, &rootfs, 1, 128);
        vmm.wait_agent_ready(&ready, BOOT_TIMEOUT);
        eprintln!("agent ready after {:?}", t0.elapsed());
        let mut agent = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(60)).unwrap();
        let script = "ip link show eth0 && ip addr add 172.16.0.2/30 dev eth0 && \
                      ip link set eth0 up && ping -c 3 -W 10 172.16.0.1";
        let r = agent
            .exec(&ExecRequest::new(["/bin/sh", "-c", script]))
            .unwrap();
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        assert_eq!(r.exit_code, Some(0), "guest: {out} {err}; {}", vmm.logs());
        assert!(out.contains("06:00:ac:10:00:02"), "{out}");

        // Limiters change at run time.
        let r = vmm.request(
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 100}}}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
        let r = vmm.request(
            "PATCH",
            "/network-interfaces/eth9",
            Some(r#"{"iface_id": "eth9", "rx_rate_limiter": {}}"#),
        );
        assert_eq!(r.status, 400, "{r:?}");
        let r = agent
            .exec(&ExecRequest::new(["/bin/sh", "-c", "ping -c 2 -W 10 172.16.0.1"]))
            .unwrap();
        assert_eq!(r.exit_code, Some(0), "{r:?}");
    })
    .join()
    .unwrap();
}
