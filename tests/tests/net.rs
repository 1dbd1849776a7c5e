//! virtio-net end to end: a real guest with eth0 on a tap, pinging the
//! host side and back, TCP both ways, then a snapshot of it restored onto a
//! second tap (`network_overrides`) in a second network namespace. A guest
//! connection open at the pause is ended both ways
//! (`terminate_connections_on_pause`): the host's socket fails at the
//! pause, the guest's reader with ECONNRESET once it runs again. The
//! VMMs, the taps and the host-side tools and sockets run in network
//! namespaces made for the test's threads (gone when they end), so the
//! host's network is untouched. The guest boots once for all of it. Needs
//! root (taps) and /dev/kvm.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::AGENT_PORT;
use ember_tests::guest_sh_logged as guest_sh;
use ember_tests::snapshots::{connect_restored, pause, snapshot_paused};
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// Both taps get this MAC, so the restored guest's ARP entry for the host
/// side stays right on the clone's tap (as a host would set up clones).
const HOST_MAC: &str = "02:00:ac:10:00:01";
const HOST_IP: &str = "172.16.0.1";
const GUEST_IP: &str = "172.16.0.2";
const HTTP_PORT: u16 = 8080;
/// The guest's connection that the pause ends.
const RESET_PORT: u16 = 7003;
/// Where the guest's reader of that connection reports.
const RESET_OUT: &str = "/tmp/ct.out";

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sh_out(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Moves the calling thread into a new network namespace with `lo` up and
/// a tap `tap` holding the host side's address and MAC.
fn enter_netns_with_tap(tap: &str) {
    // SAFETY: unshare only changes this thread's namespaces; children
    // spawned from this thread (the VMM, ip, ping) inherit it.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    assert!(sh(&["ip", "link", "set", "lo", "up"]));
    assert!(sh(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]));
    assert!(sh(&["ip", "link", "set", tap, "address", HOST_MAC]));
    assert!(sh(&["ip", "addr", "add", "172.16.0.1/30", "dev", tap]));
    assert!(sh(&["ip", "link", "set", tap, "up"]));
}

/// Guest → host TCP: the host listens on the tap's address (in the calling
/// thread's namespace), the guest connects with busybox `nc`, each side
/// sends a line and checks the other's.
fn tcp_guest_to_host(agent: &mut AgentClient, vmm: &VmmProcess, port: u16, tag: &str) {
    let listener = TcpListener::bind((HOST_IP, port)).unwrap();
    let host_line = format!("host-says-{tag}");
    let guest_line = format!("guest-says-{tag}");
    let hl = host_line.clone();
    let server = std::thread::spawn(move || {
        // Bounded: a guest that never connects fails the test, not hangs it.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (s, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the guest never connected");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        (&s).write_all(format!("{hl}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        // Dropping `s` closes the connection: the guest's nc sees EOF and exits.
        (peer, line)
    });
    let script = format!("echo {guest_line} | nc -w 30 {HOST_IP} {port}");
    let out = guest_sh(agent, vmm, &script);
    let (peer, line) = server.join().unwrap();
    assert_eq!(peer.ip().to_string(), GUEST_IP);
    assert_eq!(line.trim_end(), guest_line);
    assert_eq!(out.trim_end(), host_line, "guest nc output");
}

/// Host accepts a TCP connection the guest opens in the background and
/// keeps: busybox `nc -e` runs a shell on the socket that says "ready" and
/// then reads it with `cat`, whose error and exit status land in
/// `RESET_OUT`. Returns the host's socket once "ready" arrived.
fn open_guest_connection(agent: &mut AgentClient, vmm: &VmmProcess) -> TcpStream {
    let listener = TcpListener::bind((HOST_IP, RESET_PORT)).unwrap();
    guest_sh(
        agent,
        vmm,
        &format!(
            "nc {HOST_IP} {RESET_PORT} -e sh -c 'echo ready; cat >/dev/null; \
             echo cat-exit=$? >&2' </dev/null >{RESET_OUT} 2>&1 &"
        ),
    );
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the guest never connected");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    s
}

/// Waits for the guest's reader to end and checks that its read failed
/// with ECONNRESET (busybox cat: "read error: Connection reset by peer").
fn expect_guest_reset(agent: &mut AgentClient, vmm: &VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let out = guest_sh(agent, vmm, &format!("cat {RESET_OUT}"));
        if out.contains("cat-exit=") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        out.contains("Connection reset by peer") && out.contains("cat-exit=1"),
        "the guest's reader did not fail with ECONNRESET: {out:?}"
    );
}

/// Host → guest TCP: a plain HTTP/1.0 GET to the guest's busybox httpd;
/// the body must be `body`. Retries the connect while httpd comes up.
fn tcp_host_to_guest(body: &str) {
    let addr: SocketAddr = format!("{GUEST_IP}:{HTTP_PORT}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
    assert!(reply.ends_with(&format!("\r\n\r\n{body}\n")), "{reply:?}");
}

#[test]
fn guest_talks_to_host_over_tap_and_clone_on_another_tap() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: taps need root");
        return;
    }
    let (kernel, rootfs) = (kernel_path(), rootfs_path());
    let t_start = Instant::now();
    std::thread::spawn(move || {
        enter_netns_with_tap("tapvm0");

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
                    "guest_mac": GUEST_MAC,
                    "terminate_connections_on_pause": true,
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
        let script = format!(
            "ip link show eth0 && ip addr add {GUEST_IP}/30 dev eth0 && \
             ip link set eth0 up && ping -c 3 -W 10 {HOST_IP}"
        );
        let out = guest_sh(&mut agent, &vmm, &script);
        assert!(out.contains(GUEST_MAC), "{out}");

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
        guest_sh(&mut agent, &vmm, &format!("ping -c 2 -W 10 {HOST_IP}"));

        // TCP both ways. The guest's busybox must have nc and httpd.
        let list = guest_sh(&mut agent, &vmm, "busybox --list");
        let applets: Vec<&str> = list.lines().collect();
        for a in ["nc", "httpd"] {
            assert!(applets.contains(&a), "busybox has no {a}: {list}");
        }
        let t = Instant::now();
        tcp_guest_to_host(&mut agent, &vmm, 7001, "orig");
        // httpd daemonizes; it keeps serving in the snapshot's clone.
        guest_sh(
            &mut agent,
            &vmm,
            &format!(
                "mkdir -p /tmp/www && echo served-by-guest > /tmp/www/index.html && \
                 busybox httpd -p {HTTP_PORT} -h /tmp/www"
            ),
        );
        tcp_host_to_guest("served-by-guest");
        eprintln!("tcp both ways in {:?}", t.elapsed());

        // A connection open at the pause: the host's end fails right at
        // the pause, before any snapshot is taken.
        let cfg = vmm.request("GET", "/vm/config", None).json();
        assert_eq!(
            cfg["network-interfaces"][0]["terminate_connections_on_pause"], true,
            "{cfg}"
        );
        let host_end = open_guest_connection(&mut agent, &vmm);
        drop(agent);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let r = (&host_end).read(&mut buf).map_err(|e| e.kind());
            let _ = tx.send((r, Instant::now()));
        });
        pause(&vmm);
        let paused = Instant::now();
        let (r, at) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the host's socket saw nothing within 30 s of the pause");
        assert_eq!(r, Err(ErrorKind::ConnectionReset), "host's read after the pause");
        eprintln!(
            "host's socket reset {:?} after the pause request returned",
            at.saturating_duration_since(paused)
        );
        assert!(at.saturating_duration_since(paused) < Duration::from_secs(5));
        assert!(
            vmm.logs().contains("ended 1 TCP connection"),
            "{}",
            vmm.logs()
        );

        // Snapshot with the net device (and the guest's RST in its ring).
        let (dir, snapshot, mem, _) = snapshot_paused(&vmm, "ember-net-snap-");
        let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!(r.status, 204, "{r:?}");

        // The clone runs beside the original, with the same guest address
        // and MAC, on its own tap in its own namespace.
        let (s, m) = (snapshot.clone(), mem.clone());
        std::thread::spawn(move || clone_on_second_tap(&s, &m))
            .join()
            .unwrap();

        // The original, resumed, took the RST too.
        let mut agent = connect_restored(&vmm);
        expect_guest_reset(&mut agent, &vmm);
        // The original still answers on its tap (no ping on the host: TCP).
        tcp_host_to_guest("served-by-guest");
        drop(dir);
    })
    .join()
    .unwrap();
    eprintln!("net test total {:?}", t_start.elapsed());
}

fn clone_on_second_tap(snapshot: &Path, mem: &Path) {
    enter_netns_with_tap("tapvm1");
    let vmm = VmmProcess::spawn(&[]);
    let uds = vmm.path("vsock.sock");
    let load = |overrides: serde_json::Value| {
        vmm.put(
            "/snapshot/load",
            &json!({"snapshot_path": snapshot,
                    "mem_backend": {"backend_type": "File", "backend_path": mem},
                    "vsock_override": {"uds_path": uds},
                    "network_overrides": overrides,
                    "resume_vm": true}),
        )
    };
    // A malformed override: an interface the snapshot does not have.
    let r = load(json!([{"iface_id": "eth9", "host_dev_name": "tapvm1"}]));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.fault().contains("network_overrides") && r.fault().contains("eth9"),
        "{r:?}"
    );
    // An override without its tap.
    let r = load(json!([{"iface_id": "eth0"}]));
    assert_eq!(r.status, 400, "{r:?}");
    // Without an override the snapshot's tap, tapvm0, is not here.
    let r = load(json!([]));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("tapvm0"), "{r:?}");
    // Still usable: nothing was loaded, and a good load goes through.
    let r = vmm.request("GET", "/", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "Not started", "{r:?}");
    let t = Instant::now();
    let r = load(json!([{"iface_id": "eth0", "host_dev_name": "tapvm1"}]));
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let cfg = vmm.request("GET", "/vm/config", None).json();
    assert_eq!(
        cfg["network-interfaces"][0]["host_dev_name"], "tapvm1",
        "{cfg}"
    );
    assert_eq!(
        cfg["network-interfaces"][0]["guest_mac"], GUEST_MAC,
        "{cfg}"
    );
    assert_eq!(
        cfg["network-interfaces"][0]["terminate_connections_on_pause"], true,
        "{cfg}"
    );
    let mut agent = connect_restored(&vmm);
    agent
        .refresh()
        .unwrap_or_else(|e| panic!("refresh after restore: {e}; {}", vmm.logs()));
    eprintln!("clone agent up {:?} after load", t.elapsed());

    // The connection open at the snapshot: the clone's reader failed with
    // ECONNRESET, not waiting on a peer that is gone.
    expect_guest_reset(&mut agent, &vmm);

    // Same address and MAC in the guest; it reaches the host side.
    let out = guest_sh(
        &mut agent,
        &vmm,
        &format!("ip addr show eth0 && ping -c 3 -W 10 {HOST_IP}"),
    );
    assert!(out.contains(GUEST_MAC), "{out}");
    assert!(out.contains(&format!("inet {GUEST_IP}/30")), "{out}");
    // The host side learned the clone's MAC on tapvm1.
    let neigh = sh_out(&["ip", "neigh", "show", GUEST_IP, "dev", "tapvm1"]);
    assert!(neigh.contains(GUEST_MAC), "{neigh:?}");
    // TCP both ways; the httpd started before the snapshot still serves.
    tcp_guest_to_host(&mut agent, &vmm, 7002, "clone");
    tcp_host_to_guest("served-by-guest");
}
