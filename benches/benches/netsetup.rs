//! `cargo bench -p ember-benches --bench netsetup`: the time hostd spends
//! on an instance's network at restore (namespace, veth pair, tap, NAT and
//! egress rules: `NetManager::setup`) and removing it (`teardown`), with
//! no guest involved, so the number is the host's cost alone. Runs in a
//! private network namespace; needs root, `ip` and `nft`. Prints numbers;
//! asserts nothing.
//!
//! Peer: a bare `ip netns add` + `ip netns delete`, the floor any
//! namespace-per-instance design pays.

use std::process::Command;
use std::time::{Duration, Instant};

use ember_benches::percentile;
use ember_hostd::net::{EgressPolicy, LogicalNet, NetConfig, NetManager, Owner};

const ROUNDS: usize = 40;
/// Instances alive while measuring, as on a busy host.
const STANDING: usize = 20;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn run() -> Result<(), String> {
    // SAFETY: unshare only moves this thread (and the tools it spawns).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare: {}", std::io::Error::last_os_error()));
    }
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let m = NetManager::new(NetConfig {
        physical_net: "10.201.0.0/16".parse().expect("valid"),
        state_dir: state.path().to_path_buf(),
        terminate_connections: true,
        host_services: vec![],
        denied: vec![],
    })
    .map_err(|e| e.to_string())?;
    let policy: EgressPolicy = serde_json::from_str(
        r#"{"DefaultAction":"Allow","Rules":[
            {"Action":"Deny","Cidr":"169.254.0.0/16"},
            {"Action":"Allow","Cidr":"10.0.0.0/8","Protocol":"Tcp","Ports":["443","5432"]}]}"#,
    )
    .map_err(|e| e.to_string())?;
    let owner = || Owner {
        function: "bench",
        version: "$LATEST",
    };
    let mut standing = Vec::new();
    for i in 0..STANDING {
        let id = format!("bench-standing-{i}");
        standing.push(
            m.setup(&id, owner(), LogicalNet::default_net(), &policy, None)
                .map_err(|e| format!("{id}: {e}"))?,
        );
    }
    let (mut up, mut down, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let id = format!("bench-{i}");
        let t = Instant::now();
        let net = m
            .setup(&id, owner(), LogicalNet::default_net(), &policy, None)
            .map_err(|e| format!("{id}: {e}"))?;
        up.push(t.elapsed());
        let t = Instant::now();
        m.teardown(&net);
        down.push(t.elapsed());
        let name = format!("ember-bench-bare-{i}");
        let t = Instant::now();
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        let ok2 = Command::new("ip").args(["netns", "delete", &name]).status();
        bare.push(t.elapsed());
        if !ok.map(|s| s.success()).unwrap_or(false) || !ok2.map(|s| s.success()).unwrap_or(false) {
            return Err("ip netns add/delete failed".into());
        }
    }
    let egress_t = {
        let t = Instant::now();
        let n = m
            .apply_egress("bench", &EgressPolicy::default())
            .map_err(|e| e.to_string())?;
        (t.elapsed(), n)
    };
    for n in &standing {
        m.teardown(n);
    }
    let p = |s: &[Duration], q| ms(percentile(s, q));
    println!(
        "== instance network set-up (namespace + veth + tap + NAT/egress rules), {ROUNDS} rounds with {STANDING} others standing =="
    );
    println!("setup     p50 {}  p99 {}", p(&up, 50.0), p(&up, 99.0));
    println!("teardown  p50 {}  p99 {}", p(&down, 50.0), p(&down, 99.0));
    println!(
        "peer: bare `ip netns add` + `delete`  p50 {}  (setup / bare: {:.1}x)",
        p(&bare, 50.0),
        percentile(&up, 50.0).as_secs_f64() / percentile(&bare, 50.0).as_secs_f64().max(1e-9)
    );
    println!(
        "egress policy update on {} running instances: {} ({} per instance)",
        egress_t.1,
        ms(egress_t.0),
        ms(egress_t.0 / egress_t.1.max(1) as u32)
    );
    Ok(())
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("netsetup: skipped (needs root)");
        return;
    }
    // A thread of its own, so the namespace change stays there.
    match std::thread::spawn(run).join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => println!("netsetup: FAILED: {e}"),
        Err(_) => println!("netsetup: FAILED (panicked)"),
    }
}
