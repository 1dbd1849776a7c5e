//! `cargo bench -p ember-benches --bench migrate`: live migration of a
//! 128 MiB and a 1 GiB guest between two VMMs on this host (unix socket),
//! idle and while a process in the guest rewrites 64 MiB of its memory
//! over and over, pre-copy and post-copy: downtime, total time, rounds,
//! and the bytes sent as a multiple of guest memory; post-copy adds the
//! time from the resume until every page is there and the pages that came
//! on demand against those pushed.
//!
//! First, host-level rows that run anywhere: the VMM's send and receive
//! loops over a unix socket between two plain memories of 128 MiB and
//! 1 GiB (`migration::plain`; the destination's is userfaultfd-registered
//! in post-copy), idle and with a thread rewriting 64 MiB over and over,
//! which on the destination keeps going after the resume (so it faults
//! pages in). `-- host` runs only these. Then the guest rows; post-copy's
//! are SKIPPED on kvm_pvm hosts, where a guest cannot run on
//! userfaultfd-served memory. Prints numbers; asserts nothing beyond each
//! migration completing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_tests::artifacts::runtime_rootfs_path;
use ember_tests::migration::{migrate, migrate_with, receiver};
use ember_tests::snapshots::connect_restored;
use ember_tests::{kernel_path, VmmProcess};
use ember_vmm::migration::plain::{self, PlainSource, PlainTarget};
use ember_vmm::migration::transport::Endpoint;
use ember_vmm::migration::{receive, send, MigrationMode, MigrationStatus, Phase, Progress, Role};
use ember_vmm::vmm_config::SendMigrationParams;
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

/// Pages of the dirtying workload: 64 MiB.
const DIRTY_PAGES: u64 = 64 << 20 >> 12;

fn report_host(label: &str, mem_mib: u64, s: &MigrationStatus, d: &MigrationStatus) {
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "{label}: mode={:?} downtime={}ms total={}ms rounds={} bytes={} ({:.2}x memory) \
         postcopy={}ms on_demand={} pushed={}",
        s.mode,
        ms(s.downtime_ms),
        ms(s.total_ms),
        s.rounds,
        s.bytes,
        s.bytes as f64 / (mem_mib << 20) as f64,
        ms(d.postcopy_ms),
        d.postcopy_pages_on_demand,
        d.postcopy_pages_pushed,
    );
}

/// One migration between plain memories over a unix socket.
fn host_row(
    mem_mib: u64,
    dirtying: bool,
    mode: MigrationMode,
) -> (MigrationStatus, MigrationStatus) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let listener = Endpoint::Unix(sock.clone()).listen().unwrap();
    let target = Progress::new(Role::Destination, "bench".into());
    target.update(|s| s.state = Phase::Listening);
    let stop = Arc::new(AtomicBool::new(false));
    let guest_b = Arc::new(std::sync::Mutex::new(None));
    let rx = {
        let (t, stop, g) = (target.clone(), stop.clone(), guest_b.clone());
        std::thread::spawn(move || {
            let mut tv = PlainTarget::new();
            if dirtying {
                // The workload goes on at the destination after the resume.
                tv.on_resume = Some(Box::new(move |mem| {
                    let h =
                        plain::dirty(mem.clone(), Arc::default(), stop.clone(), None, DIRTY_PAGES);
                    *g.lock().unwrap() = Some(h);
                }));
            }
            receive::run(&mut tv, listener, &t);
        })
    };
    let mut sv = PlainSource::new(plain::patterned_memory(mem_mib as usize).unwrap());
    let writer = dirtying.then(|| {
        plain::dirty(
            sv.mem.clone(),
            sv.paused.clone(),
            stop.clone(),
            None,
            DIRTY_PAGES,
        )
    });
    let source = Progress::new(Role::Source, "bench".into());
    source.update(|s| s.state = Phase::PreCopy);
    let stream = Endpoint::Unix(sock)
        .connect(Duration::from_secs(5))
        .unwrap();
    let params = SendMigrationParams {
        destination_uri: "unix:///unused".into(),
        downtime_ms: 300,
        max_rounds: 30,
        switch_over: Default::default(),
        switch_over_timeout_ms: 30_000,
        mode,
        postcopy_after_rounds: None,
    };
    send::run(&mut sv, stream, &params, &source);
    rx.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer {
        w.join().unwrap();
    }
    if let Some(g) = guest_b.lock().unwrap().take() {
        g.join().unwrap();
    }
    let (s, d) = (source.status(), target.status());
    assert_eq!(s.state, Phase::Completed, "{s:?}");
    assert_eq!(d.state, Phase::Completed, "{d:?}");
    (s, d)
}

fn host_rows() {
    for mem_mib in [128u64, 1024] {
        for dirtying in [false, true] {
            let work = if dirtying { "dirtying_64MiB" } else { "idle" };
            let (ps, pd) = host_row(mem_mib, dirtying, MigrationMode::PreCopy);
            report_host(
                &format!("host_precopy_{work}_{mem_mib}MiB"),
                mem_mib,
                &ps,
                &pd,
            );
            let (qs, qd) = host_row(mem_mib, dirtying, MigrationMode::PostCopy);
            report_host(
                &format!("host_postcopy_{work}_{mem_mib}MiB"),
                mem_mib,
                &qs,
                &qd,
            );
            let ratio = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) if b > 0 => format!("{:.2}", a as f64 / b as f64),
                _ => "-".into(),
            };
            println!(
                "host_{work}_{mem_mib}MiB postcopy/precopy: downtime={} total={} bytes={:.2}",
                ratio(qs.downtime_ms, ps.downtime_ms),
                ratio(qs.total_ms, ps.total_ms),
                qs.bytes as f64 / ps.bytes.max(1) as f64
            );
        }
    }
}

fn main() {
    host_rows();
    if std::env::args().any(|a| a == "host") {
        return;
    }
    let kvm_pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
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
                     echo $! > /tmp/dirtier.pid\n\
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
        drop(b);
        if kvm_pvm {
            for work in ["idle", "dirtying_64MiB"] {
                println!(
                    "postcopy_{work}_{mem_mib}MiB: SKIPPED: on kvm_pvm hosts a guest cannot run on \
                     userfaultfd-served memory (KVM_EXIT_INTERNAL_ERROR; see NESTED-KVM.md); the \
                     host_postcopy rows above measure the same loops without a guest"
                );
            }
            continue;
        }
        // C still runs the dirtying workload: post-copy it to D, then (the
        // workload stopped) post-copy D, idle, to E.
        let post = |from: &VmmProcess, name: &str| {
            let uri = format!("unix://{}", dir.path().join(name).display());
            let to = receiver(&uri);
            let params = SendMigrationParams {
                mode: ember_vmm::vmm_config::migration::MigrationMode::PostCopy,
                ..SendMigrationParams::new(uri)
            };
            let s = migrate_with(from, &to, &params);
            let d = ember_tests::migration::status(&to);
            (to, s, d)
        };
        let (d, s, st) = post(&c, "d.sock");
        report_post(
            &format!("postcopy_dirtying_64MiB_{mem_mib}MiB"),
            mem_mib,
            &s,
            &st,
        );
        drop(c);
        let mut agent = connect_restored(&d);
        let r = agent
            .exec(&ExecRequest::new([
                "/bin/sh",
                "-c",
                "kill $(cat /tmp/dirtier.pid); sleep 1",
            ]))
            .expect("stop the dirtying workload");
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        drop(agent);
        let (_e, s, st) = post(&d, "e.sock");
        report_post(&format!("postcopy_idle_{mem_mib}MiB"), mem_mib, &s, &st);
    }
}

fn report_post(label: &str, mem_mib: u64, s: &Value, d: &Value) {
    report(label, mem_mib, s);
    println!(
        "{label}: postcopy={}ms on_demand={} pushed={}",
        d["postcopy_ms"], d["postcopy_pages_on_demand"], d["postcopy_pages_pushed"]
    );
}
