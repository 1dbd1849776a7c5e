//! `cargo bench -p ember-benches --bench migrate`: live migration of a
//! 128 MiB and a 1 GiB guest between two VMMs on this host (unix socket),
//! idle and while a process in the guest rewrites 64 MiB of its memory
//! over and over: downtime, total time, rounds, and the bytes sent as a
//! multiple of guest memory. Post-copy is not built yet. Prints numbers;
//! asserts nothing beyond each migration completing.

use std::time::Duration;

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_tests::artifacts::runtime_rootfs_path;
use ember_tests::migration::{migrate, receiver};
use ember_tests::snapshots::connect_restored;
use ember_tests::{kernel_path, VmmProcess};
use serde_json::Value;

/// Rewrites one byte of every page of 64 MiB, again and again, in user
/// space (native speed even on nested hosts).
/// It says so in /tmp/dirtying after its first pass (the first touch of
/// each page is a guest page fault, slow on nested hosts).
const DIRTIER: &str = "b = bytearray(64 << 20)\nn = 0\nwhile True:\n    n = (n + 1) & 255\n    for i in range(0, len(b), 4096):\n        b[i] = n\n    if n == 1:\n        open('/tmp/dirtying', 'w').close()\n";

fn report(label: &str, mem_mib: u64, s: &Value) {
    let bytes = s["bytes"].as_u64().unwrap_or(0);
    println!(
        "{label}: downtime={}ms total={}ms rounds={} bytes={} ({:.2}x guest memory) \
         bandwidth={:.1}MiB/s final_pages={}",
        s["downtime_ms"],
        s["total_ms"],
        s["rounds"],
        bytes,
        bytes as f64 / (mem_mib << 20) as f64,
        s["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
        s["final_pages"]
    );
}

fn main() {
    // Python for the dirtying workload.
    let rootfs = runtime_rootfs_path("python3");
    for mem_mib in [128u64, 1024] {
        let dir = tempfile::tempdir().unwrap();
        let mut a = VmmProcess::spawn(&[]);
        let ready = bind_ready_listener(a.path("vsock.sock")).unwrap();
        a.boot(&kernel_path(), &rootfs, 1, mem_mib as u32);
        a.wait_agent_ready(&ready, Duration::from_secs(900));
        drop(AgentClient::connect(
            a.path("vsock.sock"),
            AGENT_PORT,
            Duration::from_secs(60),
        ));

        let uri_b = format!("unix://{}", dir.path().join("b.sock").display());
        let b = receiver(&uri_b);
        let s = migrate(&a, &b, &uri_b, 300, 30);
        report(&format!("precopy_idle_{mem_mib}MiB"), mem_mib, &s);
        drop(a);

        let mut agent = connect_restored(&b);
        let r = agent
            .exec(&ExecRequest::new([
                "/bin/sh",
                "-c",
                &format!(
                    "cat > /tmp/dirtier.py <<'EOF'\n{DIRTIER}EOF\n\
                     python3 /tmp/dirtier.py </dev/null >/dev/null 2>&1 &\n\
                     i=0; while [ ! -e /tmp/dirtying ] && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done; \
                     test -e /tmp/dirtying"
                ),
            ]))
            .expect("start the dirtying workload");
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        drop(agent);
        let uri_c = format!("unix://{}", dir.path().join("c.sock").display());
        let c = receiver(&uri_c);
        let s = migrate(&b, &c, &uri_c, 300, 30);
        report(&format!("precopy_dirtying_64MiB_{mem_mib}MiB"), mem_mib, &s);
    }
    println!("postcopy: not built yet (pre-copy only)");
}
