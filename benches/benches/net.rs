//! `bash benches/run.sh --bench net`: what TCP connection tracking
//! (`terminate_connections_on_pause`) costs on virtio-net's data path.
//!
//! 1. Host only: the tracker's cost per frame, for a 1500-byte and a
//!    64 KiB TCP segment each way, with 1 and 1024 connections, next to a
//!    copy of the same frame (the device copies every frame anyway).
//! 2. A guest (the `bench` root filesystem: base plus Debian's iperf3) on
//!    a tap: iperf3 throughput guest->host and host->guest, and TCP
//!    request/response round trips, with tracking off and on (switched by
//!    PATCH on the one booted VM), interleaved over two rounds.
//!
//! Prints numbers; asserts nothing. Part 2 needs root, /dev/kvm and
//! iperf3 on the host (run.sh installs it), and says why when it skips.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_benches::percentile;
use ember_tests::artifacts::runtime_rootfs_path;
use ember_tests::{kernel_path, kvm_available, VmmProcess};
use ember_vmm::devices::virtio::net::conntrack::ConnTracker;
use ember_vmm::vmm_config::NetworkInterfaceConfig;

const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];
const HOST_MAC: [u8; 6] = [0x02, 0, 0xac, 0x10, 0, 1];
const HOST_IP: &str = "172.16.0.1";
const GUEST_IP: &str = "172.16.0.2";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7100;
const IPERF_SECONDS: u32 = 10;
const ROUND_TRIPS: usize = 300;
const ROUNDS: usize = 2;

fn main() {
    microbench();
    match guest_skip_reason() {
        Some(why) => println!("net guest benchmarks: skipped: {why}"),
        None => std::thread::spawn(guest_bench)
            .join()
            .expect("guest benchmark"),
    }
}

// --- 1. The tracker alone ------------------------------------------------

/// An Ethernet/IPv4/TCP frame with `payload` bytes (checksums are not
/// looked at by the tracker). `port` is the guest's.
fn frame(payload: usize, from_guest: bool, port: u16) -> Vec<u8> {
    let (guest, remote) = ([172, 16, 0, 2], [172, 16, 0, 1]);
    let mut f = Vec::with_capacity(54 + payload);
    let (dst, src) = if from_guest {
        (HOST_MAC, GUEST_MAC)
    } else {
        (GUEST_MAC, HOST_MAC)
    };
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((40 + payload).min(65535) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    let (s, d, sp, dp) = if from_guest {
        (guest, remote, port, 80u16)
    } else {
        (remote, guest, 80, port)
    };
    f.extend_from_slice(&s);
    f.extend_from_slice(&d);
    f.extend_from_slice(&sp.to_be_bytes());
    f.extend_from_slice(&dp.to_be_bytes());
    f.extend_from_slice(&[0; 8]); // seq, ack: set per frame
    f.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(54 + payload, 0xab);
    f
}

/// ns per call of `step(i)`, best of 5 runs of `n`.
fn ns_per(n: u32, mut step: impl FnMut(u32)) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                step(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

fn set_seq(f: &mut [u8], seq: u32, ack: u32) {
    f[38..42].copy_from_slice(&seq.to_be_bytes());
    f[42..46].copy_from_slice(&ack.to_be_bytes());
}

fn microbench() {
    for (label, payload) in [("1500B", 1500 - 40), ("64KiB", 65535 - 40)] {
        for conns in [1u16, 1024] {
            let mut outs: Vec<Vec<u8>> = (0..conns).map(|p| frame(payload, true, p)).collect();
            let mut ins: Vec<Vec<u8>> = (0..conns).map(|p| frame(payload, false, p)).collect();
            let mut ct = ConnTracker::default();
            let n = if payload > 2000 { 200_000 } else { 1_000_000 };
            let step = payload as u32;
            let out_ns = ns_per(n, |i| {
                let f = &mut outs[(i % u32::from(conns)) as usize];
                set_seq(f, i.wrapping_mul(step), i);
                black_box(ct.on_guest_frame(black_box(f)));
            });
            let in_ns = ns_per(n, |i| {
                let f = &mut ins[(i % u32::from(conns)) as usize];
                set_seq(f, i.wrapping_mul(step), i);
                ct.on_remote_frame(black_box(f));
            });
            let check_ns = ns_per(n, |i| {
                let f = &ins[(i % u32::from(conns)) as usize];
                black_box(ct.check_remote_frame(black_box(f)));
            });
            let mut buf = vec![0u8; outs[0].len()];
            let copy_ns = ns_per(n, |i| {
                buf.copy_from_slice(&outs[(i % u32::from(conns)) as usize]);
                black_box(&mut buf);
            });
            println!(
                "conntrack_per_frame: {label} conns={conns} guest->remote={out_ns:.1}ns \
                 remote->guest={in_ns:.1}ns (+ delivery check {check_ns:.1}ns) \
                 frame_copy={copy_ns:.1}ns tracked={}",
                ct.len()
            );
        }
    }
}

// --- 2. A guest on a tap --------------------------------------------------

fn guest_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (taps, network namespaces)".into());
    }
    if !kvm_available() {
        return Some("needs /dev/kvm".into());
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        return Some("no iperf3 on the host (benches/run.sh installs it)".into());
    }
    None
}

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{args:?} failed");
}

fn guest_sh(agent: &mut AgentClient, script: &str) -> String {
    let r = agent
        .exec(&ExecRequest::new(["/bin/sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        Some(0),
        "guest `{script}`: {out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// Kills the host's iperf3 server (our child, by its pid) on every exit.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Results {
    up_mbps: Vec<f64>,
    down_mbps: Vec<f64>,
    rtts: Vec<Duration>,
}

fn guest_bench() {
    // This thread's own network namespace (gone when it ends).
    // SAFETY: unshare only changes this thread's namespaces; children
    // spawned from it (the VMM, iperf3, ip) inherit them.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "tuntap", "add", "dev", "tapbench0", "mode", "tap"]);
    sh(&[
        "ip",
        "link",
        "set",
        "tapbench0",
        "address",
        "02:00:ac:10:00:01",
    ]);
    sh(&["ip", "addr", "add", "172.16.0.1/30", "dev", "tapbench0"]);
    sh(&["ip", "link", "set", "tapbench0", "up"]);

    let (kernel, rootfs) = (kernel_path(), runtime_rootfs_path("bench"));
    let mut vmm = VmmProcess::spawn(&[]);
    let iface = NetworkInterfaceConfig {
        guest_mac: Some("06:00:ac:10:00:02".into()),
        ..NetworkInterfaceConfig::tap("eth0", "tapbench0")
    };
    let r = vmm.put("/network-interfaces/eth0", &iface);
    assert_eq!(r.status, 204, "{r:?}");
    let ready = bind_ready_listener(vmm.path("vsock.sock")).expect("ready listener");
    let t = Instant::now();
    vmm.boot(&kernel, &rootfs, 1, 256);
    vmm.wait_agent_ready(&ready, Duration::from_secs(900));
    println!("net bench guest up in {:?}", t.elapsed());
    let mut agent =
        AgentClient::connect(vmm.path("vsock.sock"), AGENT_PORT, Duration::from_secs(60))
            .expect("agent");
    guest_sh(
        &mut agent,
        &format!(
            "ip addr add {GUEST_IP}/30 dev eth0 && ip link set eth0 up && \
             ping -c 1 -W 30 {HOST_IP} >/dev/null && iperf3 --version | head -n1"
        ),
    );
    let _server = Server(
        Command::new("iperf3")
            .args(["-s", "-B", HOST_IP, "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s"),
    );

    let mut off = Results::default();
    let mut on = Results::default();
    for round in 0..ROUNDS {
        for tracking in [false, true] {
            let r = vmm.request(
                "PATCH",
                "/network-interfaces/eth0",
                Some(&format!(
                    r#"{{"iface_id": "eth0", "terminate_connections_on_pause": {tracking}}}"#
                )),
            );
            assert_eq!(r.status, 204, "{r:?}");
            let res = if tracking { &mut on } else { &mut off };
            let up = iperf(&mut agent, false);
            let down = iperf(&mut agent, true);
            let rtts = round_trips(&mut agent);
            println!(
                "  round {round} tracking={tracking}: guest->host {up:.1} Mbit/s, \
                 host->guest {down:.1} Mbit/s, rtt p50 {:?}",
                percentile(&rtts, 50.0)
            );
            res.up_mbps.push(up);
            res.down_mbps.push(down);
            res.rtts.extend(rtts);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for (name, a, b) in [
        ("guest->host", mean(&off.up_mbps), mean(&on.up_mbps)),
        ("host->guest", mean(&off.down_mbps), mean(&on.down_mbps)),
    ] {
        println!(
            "net_throughput {name} (iperf3, {IPERF_SECONDS}s x {ROUNDS}): off={a:.1} Mbit/s \
             on={b:.1} Mbit/s on/off={:.3}",
            b / a
        );
    }
    for p in [50.0, 99.0] {
        let (a, b) = (percentile(&off.rtts, p), percentile(&on.rtts, p));
        println!(
            "net_tcp_rtt p{p} (1-byte ping-pong, n={}): off={a:?} on={b:?} on/off={:.3}",
            off.rtts.len(),
            b.as_secs_f64() / a.as_secs_f64()
        );
    }
}

/// One iperf3 run from the guest's client; `reverse`: host->guest. The
/// receiver's rate in Mbit/s.
fn iperf(agent: &mut AgentClient, reverse: bool) -> f64 {
    let out = guest_sh(
        agent,
        &format!(
            "iperf3 -c {HOST_IP} -p {IPERF_PORT} -t {IPERF_SECONDS} -J {}",
            if reverse { "-R" } else { "" }
        ),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no receiver rate in {out}"))
        / 1e6
}

/// Round trips of one byte to a `cat` echoing on a guest socket.
fn round_trips(agent: &mut AgentClient) -> Vec<Duration> {
    guest_sh(
        agent,
        &format!("nc -l -p {ECHO_PORT} -e cat </dev/null >/dev/null 2>&1 &"),
    );
    let addr: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    let mut b = [0u8; 1];
    for i in 0..ROUND_TRIPS + 10 {
        let t = Instant::now();
        s.write_all(b"x").expect("write");
        s.read_exact(&mut b).expect("echo");
        // The first few warm the guest's paths (page faults) up.
        if i >= 10 {
            rtts.push(t.elapsed());
        }
    }
    rtts
}
