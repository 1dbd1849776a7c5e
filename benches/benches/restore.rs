//! `cargo bench -p ember-benches --bench restore`: restore to the guest's
//! first answer, as a caller of a cold start sees it (issue "Restore to
//! first answer"). One guest is booted and snapshotted twice:
//! - *with a host connection open*: the restore must reset the guest's
//!   vsock transport, and connections wait until the guest has handled it;
//! - *quiet* (taken 2 s after the last connection closed, as emberd's
//!   pools do): there is nothing to reset;
//! - *quiet, working set prefetched*: one recording clone of the quiet
//!   snapshot saved the pages it touched up to its first answer, and each
//!   restore reads those in before the guest runs;
//! - *quiet, copied into a memfd*: guest memory is a memfd filled with a
//!   copy of the memory file, against the private mapping of the rest.
//!
//! Each case restores `RESTORES` times (File backend, resumed by the load)
//! with a plain client: it connects to the vsock socket once (`CONNECT 52`)
//! right after `PUT /snapshot/load` returns and asks the agent for
//! `health`; only a connection that gets no answer within 1 s is retried.
//! With `EMBER_BENCH_BASELINE_VMM=<path>` (e.g. an older ember-vmm build),
//! each case is also restored by that binary, alternating, and the table
//! gives the ratio. `EMBER_BENCH_VSOCK_LOG=1` prints each restore's vsock
//! log lines (the transport reset's trace). Prints a table; asserts nothing.

use std::time::Duration;

use ember_agent::client::AgentClient;
use ember_agent::AGENT_PORT;
use ember_benches::{own_anonymous, percentile, rss_split};
use ember_tests::snapshots::{
    boot_and_snapshot, load_resumed, load_resumed_with, pause, snapshot_paused,
};
use ember_vmm_api::{LoadSnapshotParams, MemoryBacking, WorkingSetLoad};

const RESTORES: usize = 20;
const MEM_MIB: u32 = 128;
const ATTEMPT: Duration = Duration::from_secs(1);

struct Sample {
    load: Duration,
    answer: Duration,
    retries: u32,
    /// Resident beyond guest memory, code included.
    vmm_kib: u64,
    /// Anonymous beyond guest memory: the VMM's own per-process cost.
    anon_kib: u64,
    /// Host page faults of the VMM from the load to the answer (`None`
    /// from a VMM without `GET /snapshot/working-set`).
    faults: Option<u64>,
}

/// A change to the load's parameters.
type Tweak<'a> = dyn Fn(&mut LoadSnapshotParams) + 'a;

fn restore_once(snapshot: &std::path::Path, mem: &std::path::Path, tweak: &Tweak) -> Sample {
    let (vmm, timing) = load_resumed_with(snapshot, mem, |l| tweak(l));
    let uds = vmm.path("vsock.sock");
    let mut retries = 0;
    loop {
        let answered = AgentClient::connect(&uds, AGENT_PORT, ATTEMPT).and_then(|mut a| a.health());
        if answered.is_ok() {
            break;
        }
        retries += 1;
        assert!(
            timing.sent.elapsed() < Duration::from_secs(60),
            "no answer: {answered:?}"
        );
    }
    let load = timing.took;
    let answer = timing.sent.elapsed() - load;
    if std::env::var_os("EMBER_BENCH_VSOCK_LOG").is_some() {
        for l in vmm.logs().lines().filter(|l| l.contains("vsock")) {
            eprintln!("  vmm: {l}");
        }
    }
    let guest_bytes = u64::from(MEM_MIB) << 20;
    let vmm_kib = rss_split(vmm.pid(), guest_bytes).map_or(0, |(all, guest)| all - guest);
    let anon_kib = own_anonymous(vmm.pid(), guest_bytes).unwrap_or(0);
    let status = vmm.request("GET", "/snapshot/working-set", None);
    let faults = (status.status == 200)
        .then(|| status.json()["host_faults_since_load"].as_u64())
        .flatten();
    Sample {
        faults,
        load,
        answer,
        retries,
        vmm_kib,
        anon_kib,
    }
}

/// A table row; with `ours`, the last column is this row's p50 over ours.
fn row(case: &str, samples: &[Sample], ours: Option<&[Sample]>) -> String {
    let load: Vec<_> = samples.iter().map(|s| s.load).collect();
    let answer: Vec<_> = samples.iter().map(|s| s.answer).collect();
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let retries: u32 = samples.iter().map(|s| s.retries).sum();
    let median = |f: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = samples.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1024.0
    };
    let answer_p50 = percentile(&answer, 50.0);
    let ratio = ours.map_or("1".to_string(), |o| {
        let theirs: Vec<_> = o.iter().map(|s| s.answer).collect();
        let base = percentile(&theirs, 50.0).as_secs_f64().max(1e-9);
        format!("{:.2}", answer_p50.as_secs_f64() / base)
    });
    let faults = {
        let mut v: Vec<u64> = samples.iter().filter_map(|s| s.faults).collect();
        v.sort_unstable();
        v.get(v.len() / 2).map_or("-".to_string(), u64::to_string)
    };
    format!(
        "| {case} | {} | {} | {} | {} | {} | {retries} | {faults} | {:.1} | {:.2} | {ratio} |",
        ms(percentile(&load, 50.0)),
        ms(answer_p50),
        ms(percentile(&answer, 99.0)),
        ms(answer.iter().min().copied().unwrap_or_default()),
        ms(answer.iter().max().copied().unwrap_or_default()),
        median(|s| s.vmm_kib),
        median(|s| s.anon_kib),
    )
}

fn main() {
    let g = boot_and_snapshot(1, MEM_MIB);
    // boot_and_snapshot's VM is gone; restore it once more to take the two
    // snapshots this bench compares.
    let (vmm, _) = load_resumed(&g.snapshot, &g.mem);
    let mut agent = ember_tests::snapshots::connect_restored(&vmm);
    agent.health().expect("health");
    pause(&vmm);
    let (_d1, open_snap, open_mem, _) = snapshot_paused(&vmm, "ember-restore-open-");
    let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    agent.health().expect("health after resume");
    drop(agent);
    std::thread::sleep(Duration::from_secs(2));
    pause(&vmm);
    let (_d2, quiet_snap, quiet_mem, _) = snapshot_paused(&vmm, "ember-restore-quiet-");
    drop(vmm);

    // One recording clone of the quiet snapshot, up to its first answer.
    let ws_path = _d2.path().join("working-set");
    let record = WorkingSetLoad {
        record: true,
        prefetch_path: None,
    };
    let (vmm, _) = load_resumed_with(&quiet_snap, &quiet_mem, |l| l.working_set = Some(record));
    ember_tests::snapshots::connect_restored(&vmm);
    let r = vmm.put(
        "/snapshot/working-set",
        &serde_json::json!({ "working_set_path": ws_path }),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let recorded =
        vmm.request("GET", "/snapshot/working-set", None).json()["pages_recorded"].clone();
    drop(vmm);
    let prefetch = |l: &mut LoadSnapshotParams| {
        l.working_set = Some(WorkingSetLoad {
            record: false,
            prefetch_path: Some(ws_path.display().to_string()),
        })
    };
    let memfd = |l: &mut LoadSnapshotParams| l.memory_backing = Some(MemoryBacking::Memfd);
    let plain = |_: &mut LoadSnapshotParams| {};

    let ours = ember_tests::artifacts::workspace_bin("ember-vmm");
    let baseline = std::env::var_os("EMBER_BENCH_BASELINE_VMM").map(std::path::PathBuf::from);
    let mut rows = Vec::new();
    // (case, snapshot, memory file, load tweak, Ember-only: no baseline row)
    let cases: [(&str, _, _, &Tweak<'_>, bool); 4] = [
        (
            "host connection open at snapshot",
            &open_snap,
            &open_mem,
            &plain,
            false,
        ),
        (
            "no connection at snapshot",
            &quiet_snap,
            &quiet_mem,
            &plain,
            false,
        ),
        (
            "no connection, working set prefetched",
            &quiet_snap,
            &quiet_mem,
            &prefetch,
            true,
        ),
        (
            "no connection, copied into a memfd",
            &quiet_snap,
            &quiet_mem,
            &memfd,
            true,
        ),
    ];
    for (case, snap, mem, tweak, ours_only) in cases {
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..RESTORES {
            std::env::set_var("EMBER_EMBER_VMM_BIN", &ours);
            mine.push(restore_once(snap, mem, tweak));
            // A baseline VMM may not know these load fields.
            if let (Some(b), false) = (&baseline, ours_only) {
                std::env::set_var("EMBER_EMBER_VMM_BIN", b);
                theirs.push(restore_once(snap, mem, tweak));
            }
        }
        rows.push(row(&format!("{case}: this ember-vmm"), &mine, None));
        if !theirs.is_empty() {
            rows.push(row(&format!("{case}: baseline"), &theirs, Some(&mine)));
        }
    }
    println!(
        "\nrestore to first answer: {RESTORES} restores per case, 1 vCPU, {MEM_MIB} MiB, File \
         backend, connect once (retry after {ATTEMPT:?} without an answer); working set: \
         {recorded} pages recorded\n"
    );
    println!(
        "| case | load p50 ms | load->answer p50 ms | p99 | min | max | retries | host faults load->answer p50 | VMM RSS beyond guest MiB | of it anonymous MiB | answer p50 / ours |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
