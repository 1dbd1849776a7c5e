//! A closed host, tried from a real guest as an attacker would: from inside
//! a jailed, networked microVM, connect to every address of every network
//! namespace Ember uses (emberd's, this instance's, the other instance's)
//! on every TCP port anything listens on there (emberd's TCP API, the
//! volume service's NBD port, and decoys the test opens on well-known
//! ports), and count the connections that succeed: 0. Two controls show
//! that the probe can succeed: the one service the operator opened to
//! guests (`--allow-guest-to-host`), and an address beyond the host (a
//! namespace routed through emberd's). A function's egress policy that allows the
//! host's addresses explicitly does not re-open them, the operator's
//! denied network stays shut, and nothing the instance's namespace itself
//! sends (as a compromised VMM would) leaves it. Needs root and /dev/kvm.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_tests::artifacts::workspace_bin;
use ember_tests::emberd::{write_file, Emberd, HOST_SERVICE_IP};
use ember_tests::{in_named_netns, ip, is_root, kvm_available};
use serde_json::{json, Value};

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// The one service opened to guests: the control.
const OPEN_PORT: u16 = 9000;
/// emberd's TCP API and the volume service's NBD port.
const API_PORT: u16 = 7411;
const NBD_PORT: u16 = 10809;
/// Decoys listening on every address of emberd's namespace, so that a
/// refusal is the firewall's and not an empty port's.
const DECOY_PORTS: [u16; 8] = [22, 53, 80, 443, 2379, 8080, 9001, 10810];
/// A network the operator denies to guests, beyond this host, with a decoy
/// address in it; and an address beyond this host that guests may reach.
const DENIED_NET: &str = "192.0.2.0/24";
const DENIED_ADDR: &str = "192.0.2.7";
const OUTSIDE_ADDR: &str = "203.0.113.7";
const OUTSIDE_PORT: u16 = 80;

/// Connects to each `[host, port]` of the event in turn and reports what
/// happened: "connected" or the error.
const PROBE: &str = r#"
import socket

def handler(event, context):
    out = []
    for host, port in event["targets"]:
        try:
            c = socket.create_connection((host, port), timeout=3)
            c.close()
            out.append("connected")
        except OSError as e:
            out.append(e.strerror or str(e) or type(e).__name__)
    return out
"#;

/// Accepts and closes connections on `addr` until the test ends.
fn decoy(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = (&c).write_all(b"decoy\n");
        }
    });
}

/// `ip -j addr` of a namespace: its IPv4 addresses, loopback excluded (a
/// guest's 127.0.0.1 is its own).
fn addresses(netns: &str) -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "addr"])
        .output()
        .expect("ip -j addr");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j addr JSON");
    let mut found = vec![];
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["family"] == "inet" {
                if let Ok(ip) = a["local"].as_str().unwrap_or_default().parse::<Ipv4Addr>() {
                    if !ip.is_loopback() {
                        found.push(ip);
                    }
                }
            }
        }
    }
    found
}

/// The TCP ports anything listens on in a namespace (`ss -Hltn`).
fn listening_ports(netns: &str) -> BTreeSet<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Hltn"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse().ok())
        .collect()
}

fn instance_namespaces(d: &Emberd) -> Vec<String> {
    d.get("/ember/v1/network").json()["Instances"]
        .as_array()
        .expect("Instances")
        .iter()
        .map(|r| r["Netns"].as_str().expect("Netns").to_string())
        .collect()
}

/// Invokes the prober with `targets`; (target, outcome) pairs.
fn probe(d: &Emberd, targets: &[(Ipv4Addr, u16)]) -> Vec<((Ipv4Addr, u16), String)> {
    let ev = json!({"targets": targets.iter().map(|(a, p)| json!([a.to_string(), p])).collect::<Vec<_>>()});
    let r = d.invoke("prober", &ev);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-amz-function-error").is_none(), "{}", r.text());
    let out: Vec<String> = serde_json::from_value(r.json()).expect("a list of outcomes");
    assert_eq!(out.len(), targets.len());
    targets.iter().copied().zip(out).collect()
}

fn table(title: &str, rows: &[((Ipv4Addr, u16), String)], owner: &BTreeMap<Ipv4Addr, String>) {
    println!("\n{title}\n| address | namespace | port | outcome |\n|---|---|---|---|");
    for ((a, p), o) in rows {
        let ns = owner.get(a).map(String::as_str).unwrap_or("-");
        println!("| {a} | {ns} | {p} | {o} |");
    }
}

/// A network namespace of the test's, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// One probe from the guest: every control must connect (or the probe
/// proves nothing), and none of the targets may; prints the table and the
/// count.
fn probe_round(
    d: &Emberd,
    title: &str,
    controls: &[(Ipv4Addr, u16)],
    targets: &[(Ipv4Addr, u16)],
    owner: &BTreeMap<Ipv4Addr, String>,
) {
    let rows = probe(d, &[controls, targets].concat());
    table(title, &rows, owner);
    for (target, outcome) in &rows[..controls.len()] {
        assert_eq!(outcome, "connected", "the control {target:?}");
    }
    let reached: Vec<_> = rows[controls.len()..]
        .iter()
        .filter(|(_, o)| o == "connected")
        .collect();
    println!(
        "{} attempts, {} succeeded (the controls aside)",
        targets.len(),
        reached.len()
    );
    assert!(reached.is_empty(), "reached: {reached:?}");
}

struct Volumed(Child);

impl Drop for Volumed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_guest_reaches_the_host_or_another_instance() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    if !is_root() {
        eprintln!("skipped: instance networking needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    write_file(&token, "isolation-test-token\n", 0o600);
    let tls_dir = tmp.path().join("tls");
    let open = format!("{HOST_SERVICE_IP}:{OPEN_PORT}");
    let listen = format!("{HOST_SERVICE_IP}:{API_PORT}");
    // "The outside": a namespace beyond emberd's, routed through it, with
    // a reachable address and one in the operator's denied network.
    let outside = Netns::new(&format!("ember-iso-out-{}", std::process::id()));
    let d = Emberd::start_with(
        &[
            "--warm-instances",
            "2",
            "--listen-tcp",
            &listen,
            "--api-token-file",
            token.to_str().unwrap(),
            "--tls-dev-dir",
            tls_dir.to_str().unwrap(),
            "--allow-guest-to-host",
            &open,
            "--deny-guest-net",
            DENIED_NET,
        ],
        |ns| {
            let o = &outside.0;
            for args in [
                vec![
                    "-n", ns, "link", "add", "out0", "type", "veth", "peer", "name", "out1",
                    "netns", o,
                ],
                vec!["-n", ns, "addr", "add", "192.0.2.1/24", "dev", "out0"],
                vec!["-n", ns, "link", "set", "out0", "up"],
                vec![
                    "-n",
                    ns,
                    "route",
                    "add",
                    "203.0.113.0/24",
                    "via",
                    DENIED_ADDR,
                ],
                vec![
                    "-n",
                    o,
                    "addr",
                    "add",
                    &format!("{DENIED_ADDR}/24"),
                    "dev",
                    "out1",
                ],
                vec![
                    "-n",
                    o,
                    "addr",
                    "add",
                    &format!("{OUTSIDE_ADDR}/32"),
                    "dev",
                    "out1",
                ],
                vec!["-n", o, "link", "set", "out1", "up"],
                vec!["-n", o, "link", "set", "lo", "up"],
                vec!["-n", o, "route", "add", "default", "via", "192.0.2.1"],
                vec![
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            ] {
                ip(&args);
            }
        },
    );
    let ns = d
        .netns
        .clone()
        .expect("emberd runs in a namespace of its own");

    // The volume service on every address of emberd's namespace, as an
    // operator running both on one host would have it.
    let vdir = tmp.path().join("volumed");
    std::fs::create_dir_all(&vdir).unwrap();
    let _volumed = Volumed(
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(workspace_bin("ember-volumed"))
            .arg("--nbd-listen")
            .arg(format!("0.0.0.0:{NBD_PORT}"))
            // (In the clear on purpose: what is tried is reaching the port.)
            .arg("--nbd-insecure-plaintext")
            .arg("--data-dir")
            .arg(vdir.join("data"))
            .arg("--api-socket")
            .arg(vdir.join("api.sock"))
            .arg("--nbd-socket")
            .arg(vdir.join("nbd.sock"))
            .stderr(Stdio::null())
            .spawn()
            .expect("ember-volumed"),
    );
    d.in_netns(|| {
        for port in DECOY_PORTS.iter().copied().chain([OPEN_PORT]) {
            decoy(SocketAddr::from(([0, 0, 0, 0], port)));
        }
    });
    in_named_netns(&outside.0, || {
        decoy(SocketAddr::from(([0, 0, 0, 0], OUTSIDE_PORT)))
    });

    let code = tempfile::tempdir().unwrap();
    write_file(&code.path().join("app.py"), PROBE, 0o644);
    d.create_function("prober", "python3.11", "app.handler", code.path(), 120, &[]);
    d.wait_active("prober", "$LATEST", BUILD_TIMEOUT);
    // Two instances: the one that runs the probe and another tenant's
    // stand-in (whichever of the two answers, the other is the victim).
    let start = std::time::Instant::now();
    while instance_namespaces(&d).len() < 2 {
        assert!(start.elapsed() < BUILD_TIMEOUT, "{}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = std::time::Instant::now();
    while !listening_ports(&ns).contains(&NBD_PORT) || !listening_ports(&ns).contains(&API_PORT) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "volumed or emberd's TCP API is not listening: {:?}",
            listening_ports(&ns)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every address of every namespace Ember uses, on every port anything
    // listens on in any of them, plus the decoys.
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut ports: BTreeSet<u16> = DECOY_PORTS.into_iter().collect();
    let namespaces: Vec<String> = std::iter::once(ns.clone())
        .chain(instance_namespaces(&d))
        .collect();
    for n in &namespaces {
        for a in addresses(n) {
            owner.insert(a, n.clone());
        }
        ports.extend(listening_ports(n));
    }
    ports.remove(&OPEN_PORT);
    let denied: Ipv4Addr = DENIED_ADDR.parse().unwrap();
    owner.insert(denied, format!("{} (denied network)", outside.0));
    let outside_addr: Ipv4Addr = OUTSIDE_ADDR.parse().unwrap();
    owner.insert(outside_addr, format!("{} (the outside)", outside.0));
    assert!(owner.len() >= 8, "too few addresses found: {owner:?}");
    let targets: Vec<(Ipv4Addr, u16)> = owner
        .keys()
        .filter(|a| **a != outside_addr)
        .flat_map(|a| ports.iter().map(move |p| (*a, *p)))
        .collect();
    let host: Ipv4Addr = HOST_SERVICE_IP.parse().unwrap();
    // What guests may reach: the opened service, and the outside.
    let controls = [(host, OPEN_PORT), (outside_addr, OUTSIDE_PORT)];

    probe_round(
        &d,
        "guest → host and instances (default egress policy)",
        &controls,
        &targets,
        &owner,
    );

    // An egress policy that allows every address it found explicitly,
    // first, then everything: nothing re-opens.
    let mut rules: Vec<Value> = owner
        .keys()
        .map(|a| json!({"Action": "Allow", "Cidr": format!("{a}/32")}))
        .collect();
    rules.push(json!({"Action": "Allow", "Cidr": "0.0.0.0/0"}));
    let policy = json!({"DefaultAction": "Allow", "Rules": rules});
    let r = d.request(
        "PUT",
        "/ember/v1/functions/prober/egress",
        &[("Content-Type", "application/json")],
        Some(policy.to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    probe_round(
        &d,
        "the same with an egress policy allowing each address",
        &controls,
        &targets,
        &owner,
    );

    // The instance's namespace itself (where a compromised VMM's sockets
    // would be): nothing it starts leaves, not even to the opened service.
    let mut attempts = 0;
    let mut reached = vec![];
    for n in instance_namespaces(&d) {
        for target in [
            (host, OPEN_PORT),
            (host, API_PORT),
            (outside_addr, OUTSIDE_PORT),
        ] {
            attempts += 1;
            let addr = SocketAddr::from(target);
            let r = in_named_netns(&n, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            });
            println!("| {n} (the namespace itself) | {addr} | {r:?} |");
            if r.is_ok() {
                reached.push((n.clone(), addr));
            }
        }
    }
    println!(
        "{attempts} attempts from instance namespaces, {} succeeded",
        reached.len()
    );
    assert!(reached.is_empty(), "reached: {reached:?}");
}
