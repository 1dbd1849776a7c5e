//! emberd's instance networking end to end: real namespaces, taps, veths
//! and nftables NAT, real guests. Two clones of one snapshot run at once,
//! each with the same logical address inside and its own physical address
//! outside; guest → host and host → guest TCP go through the translation;
//! the egress policy and the fence between instances hold; an account's
//! reserved logical address is what its next snapshot gets; and every
//! namespace goes when its instance does. Needs root and /dev/kvm.
//!
//! emberd runs in a network namespace of its own (see `Emberd::start`);
//! the test's host-side sockets are made there too.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::emberd::{write_file, Emberd, HOST_SERVICE_IP};
use ember_tests::kvm_available;
use serde_json::{json, Value};

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
const GUEST_PORT: u16 = 8080;

/// Serves its view of each connection on 8080 (started at init, so it is
/// in the snapshot), and connects where the event says.
const APP: &str = r#"
import json, os, socket, threading

def serve():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080))
    s.listen(16)
    while True:
        c, peer = s.accept()
        me = c.getsockname()[0]
        c.sendall(json.dumps({"me": me, "peer": peer[0],
                              "nonce": os.urandom(8).hex()}).encode() + b"\n")
        c.close()

threading.Thread(target=serve, daemon=True).start()

def handler(event, context):
    out = {}
    for key, (host, port) in event.get("connect", {}).items():
        try:
            c = socket.create_connection((host, port), timeout=20)
            c.settimeout(20)
            out[key] = c.makefile().readline().strip()
            c.close()
        except OSError as e:
            out[key] = "error: %s" % (e.strerror or e)
    return out
"#;

/// A host-side listener in emberd's namespace that tells each client the
/// address it came from, on a thread, until the test ends.
fn host_listener(d: &Emberd, port: u16) {
    let l = d.in_netns(|| TcpListener::bind((HOST_SERVICE_IP, port)).expect("bind"));
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let peer = c
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = (&c).write_all(format!("host saw {peer}\n").as_bytes());
        }
    });
}

/// Host → guest: connects to `ip:8080` from emberd's namespace and returns
/// the guest's JSON line.
fn ask_guest(d: &Emberd, ip: Ipv4Addr) -> Value {
    let addr = SocketAddr::from((ip, GUEST_PORT));
    let line = d.in_netns(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            });
            match r {
                Ok(l) if !l.is_empty() => return l,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                other => panic!("host → guest {addr}: {other:?}"),
            }
        }
    });
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn network(d: &Emberd) -> Value {
    let r = d.get("/ember/v1/network");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The address table's rows for `function`.
fn rows(d: &Emberd, function: &str) -> Vec<Value> {
    network(d)["Instances"]
        .as_array()
        .expect("Instances")
        .iter()
        .filter(|r| r["FunctionName"] == function)
        .cloned()
        .collect()
}

/// Waits for `n` idle instances of `function` and returns their rows.
fn wait_idle(d: &Emberd, function: &str, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let pools = d.pools();
        let idle: Vec<String> = pools["Pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["FunctionName"] == function)
            .flat_map(|p| p["Idle"].as_array().cloned().unwrap_or_default())
            .map(|i| i["Id"].as_str().unwrap_or_default().to_string())
            .collect();
        if idle.len() >= n {
            let rows: Vec<Value> = rows(d, function)
                .into_iter()
                .filter(|r| idle.iter().any(|id| r["InstanceId"] == id.as_str()))
                .collect();
            assert_eq!(rows.len(), idle.len(), "every idle instance has a row");
            return rows;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "{function}: {n} idle instances never came: {pools}; log:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ip(v: &Value) -> Ipv4Addr {
    v.as_str().expect("address").parse().expect("IPv4")
}

fn put(d: &Emberd, path: &str, body: &str) -> ember_tests::emberd::Reply {
    d.request("PUT", path, &[], Some(body.as_bytes()))
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn clones_share_a_logical_address_behind_distinct_physical_ones() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: instance networking needs root");
        return;
    }
    let d = Emberd::start(&[
        "--warm-instances",
        "2",
        "--parallel-builds",
        "2",
        "--keep-connections-on-pause",
        // The host service the guests below reach: nothing of the host is
        // reachable from an instance unless the operator opens it.
        "--allow-guest-to-host",
        &format!("{HOST_SERVICE_IP}:9000-9001"),
    ]);
    let code = tempfile::tempdir().unwrap();
    write_file(&code.path().join("app.py"), APP, 0o644);
    d.create_function("netfn", "python3.11", "app.handler", code.path(), 120, &[]);

    // The first build's network exists within moments: only then reserve
    // an address, so that `netfn` keeps the default and `netfn2` gets it.
    let start = Instant::now();
    while rows(&d, "netfn").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", d.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let account = "000000000000";
    let reserve_path = format!("/ember/v1/accounts/{account}/logical-address");
    // Bad reservations: clear 4xx, nothing stored.
    for (body, status) in [
        (r#"{"Address":"10.9.0.20/24","Gateway":"10.8.0.1"}"#, 400),
        (r#"{"Address":"10.200.1.2/24","Gateway":"10.200.1.1"}"#, 400),
        (r#"{"Address":"172.16.0.2/30","Gateway":"172.16.0.1"}"#, 400),
        (r#"{"Address":"nonsense","Gateway":"10.9.0.1"}"#, 400),
        ("{not json", 400),
    ] {
        let r = put(&d, &reserve_path, body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
    }
    assert_eq!(d.get(&reserve_path).status, 404);
    let r = put(
        &d,
        &reserve_path,
        r#"{"Address":"10.9.0.20/24","Gateway":"10.9.0.1"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = put(
        &d,
        "/ember/v1/accounts/111111111111/logical-address",
        r#"{"Address":"10.9.0.20/24","Gateway":"10.9.0.1"}"#,
    );
    assert_eq!(r.status, 409, "another account's address: {}", r.text());
    d.create_function("netfn2", "python3.11", "app.handler", code.path(), 120, &[]);

    d.wait_active("netfn", "$LATEST", BUILD_TIMEOUT);
    d.wait_active("netfn2", "$LATEST", BUILD_TIMEOUT);

    // Two clones of one snapshot at once: same logical address and MAC,
    // distinct physical addresses.
    let clones = wait_idle(&d, "netfn", 2);
    for c in &clones {
        assert_eq!(c["LogicalAddress"], "172.16.0.2", "{c}");
        assert_eq!(c["LogicalMac"], "06:00:ac:10:00:02", "{c}");
        assert_eq!(c["Gateway"], "172.16.0.1", "{c}");
    }
    let (a, b) = (
        ip(&clones[0]["PhysicalAddress"]),
        ip(&clones[1]["PhysicalAddress"]),
    );
    assert_ne!(a, b, "{clones:?}");
    assert_ne!(clones[0]["Netns"], clones[1]["Netns"]);

    // Host → guest through the translation, both clones reachable at once:
    // each sees itself at the logical address, the host at its link's
    // host side, and (refreshed entropy) answers with its own nonce.
    let va = ask_guest(&d, a);
    let vb = ask_guest(&d, b);
    assert_eq!(va["me"], "172.16.0.2", "{va}");
    assert_eq!(vb["me"], "172.16.0.2", "{vb}");
    assert_eq!(va["peer"], clones[0]["HostAddress"], "{va}");
    assert_eq!(vb["peer"], clones[1]["HostAddress"], "{vb}");
    assert_ne!(va["nonce"], vb["nonce"]);

    // Guest → host: the host sees the instance's physical address; another
    // instance's physical address is out of reach.
    host_listener(&d, 9000);
    host_listener(&d, 9001);
    let ev = json!({"connect": {
        "host": [HOST_SERVICE_IP, 9000],
        "host2": [HOST_SERVICE_IP, 9001],
        "a": [a.to_string(), GUEST_PORT],
        "b": [b.to_string(), GUEST_PORT],
        "gateway": ["172.16.0.1", 9000],
    }});
    let r = d.invoke("netfn", &ev);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    let saw = out["host"].as_str().unwrap_or_default().to_string();
    assert!(
        saw == format!("host saw {a}") || saw == format!("host saw {b}"),
        "guest → host: {out}"
    );
    assert_eq!(out["host2"], saw.as_str(), "{out}");
    // Refused by the fence (not merely unanswered): instance → instance,
    // and guest → its own namespace.
    for k in ["a", "b", "gateway"] {
        let v = out[k].as_str().unwrap_or_default();
        assert_eq!(v, "error: No route to host", "{k}: {out}");
    }

    // Egress policy: port 9001 denied, applied to the running instances.
    let egress = "/ember/v1/functions/netfn/egress";
    for bad in [
        r#"{"Rules":[{"Action":"Deny","Cidr":"198.51.100.1/33"}]}"#,
        r#"{"Rules":[{"Action":"Deny","Cidr":"198.51.100.1/32","Ports":["9001"]}]}"#,
        r#"{"Rules":[{"Action":"Perhaps","Cidr":"198.51.100.1/32"}]}"#,
    ] {
        let r = put(&d, egress, bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        put(&d, "/ember/v1/functions/nosuch/egress", "{}").status,
        404
    );
    let policy = r#"{"DefaultAction":"Allow","Rules":[
        {"Action":"Deny","Cidr":"198.51.100.1/32","Protocol":"Tcp","Ports":["9001"]}]}"#;
    let r = put(&d, egress, policy);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["InstancesUpdated"].as_u64().unwrap_or(0) >= 2,
        "{}",
        r.text()
    );
    assert_eq!(d.get(egress).json()["Rules"][0]["Ports"][0], "9001");
    let r = d.invoke("netfn", &ev);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert!(
        out["host"]
            .as_str()
            .unwrap_or_default()
            .starts_with("host saw "),
        "allowed: {out}"
    );
    assert!(
        out["host2"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error:"),
        "denied: {out}"
    );
    // Deny by default, one destination allowed.
    let policy = r#"{"DefaultAction":"Deny","Rules":[
        {"Action":"Allow","Cidr":"198.51.100.0/24","Protocol":"Tcp","Ports":["9000-9000"]}]}"#;
    assert_eq!(put(&d, egress, policy).status, 200);
    let out = d.invoke("netfn", &ev).json();
    assert!(
        out["host"]
            .as_str()
            .unwrap_or_default()
            .starts_with("host saw "),
        "{out}"
    );
    assert!(
        out["host2"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error:"),
        "{out}"
    );

    // The reservation: netfn2's snapshot was built with it.
    let rows2 = wait_idle(&d, "netfn2", 1);
    assert_eq!(rows2[0]["LogicalAddress"], "10.9.0.20", "{rows2:?}");
    assert_eq!(rows2[0]["Gateway"], "10.9.0.1");
    let v = ask_guest(&d, ip(&rows2[0]["PhysicalAddress"]));
    assert_eq!(v["me"], "10.9.0.20", "{v}");
    assert_eq!(d.get(&reserve_path).json()["Address"], "10.9.0.20/24");

    // Deleting a function removes its instances' namespaces and rows.
    let namespaces: Vec<String> = rows(&d, "netfn")
        .iter()
        .map(|r| r["Netns"].as_str().unwrap().to_string())
        .collect();
    assert!(namespaces.iter().all(|n| netns_exists(n)), "{namespaces:?}");
    let r = d.request("DELETE", "/2015-03-31/functions/netfn", &[], None);
    assert_eq!(r.status, 204, "{}", r.text());
    let start = Instant::now();
    while !rows(&d, "netfn").is_empty() || namespaces.iter().any(|n| netns_exists(n)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "netfn's network outlived it: {}",
            network(&d)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = d.request("DELETE", &reserve_path, &[], None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(d.get(&reserve_path).status, 404);

    // A restarted emberd removes what the previous one left behind.
    let left: Vec<String> = network(&d)["Instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Netns"].as_str().unwrap().to_string())
        .collect();
    assert!(!left.is_empty());
    let mut d = d;
    let pid = d.pid();
    // SIGKILL: no orderly teardown, as after a crash.
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.restart();
    let start = Instant::now();
    while left.iter().any(|n| netns_exists(n)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{left:?} left behind"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
