//! `cargo bench -p ember-benches --bench snapshot`: snapshot create time,
//! restore latency (load request to the agent's first answer) over many
//! restores, and the memory of N clones of one snapshot held side by side
//! (RSS and PSS per clone: PSS shows the page-cache sharing of the memory
//! file). Prints numbers; asserts nothing.

use std::time::Duration;

use ember_benches::{percentile, smaps_rollup};
use ember_tests::snapshots::{boot_and_snapshot, restore_clone};

const RESTORES: usize = 20;
const CLONES: usize = 5;
const MEM_MIB: u32 = 128;

fn main() {
    let g = boot_and_snapshot(1, MEM_MIB);
    println!(
        "boot_to_agent_ready: {:?}; snapshot_create (Full, {MEM_MIB} MiB): {:?}",
        g.boot_time, g.create_time
    );

    let mut lat = Vec::new();
    for _ in 0..RESTORES {
        let (_vmm, _agent, l) = restore_clone(&g);
        lat.push(l);
    }
    println!(
        "restore_to_agent_answer (File): n={RESTORES} p50={:?} p99={:?} min={:?} max={:?}",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.iter().min().copied().unwrap_or(Duration::ZERO),
        lat.iter().max().copied().unwrap_or(Duration::ZERO)
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        println!(
            "restore_to_agent_answer (Uffd): skipped: on kvm_pvm hosts a guest cannot run on \
             userfaultfd-served memory (see NESTED-KVM.md)"
        );
    }

    let clones: Vec<_> = (0..CLONES).map(|_| restore_clone(&g)).collect();
    let mut rss = 0;
    let mut pss = 0;
    for (vmm, _, _) in &clones {
        let (r, p) = smaps_rollup(vmm.pid()).expect("smaps_rollup");
        rss += r;
        pss += p;
    }
    println!(
        "clones_held: n={CLONES} rss_per_clone={}KiB pss_per_clone={}KiB total_pss={}KiB",
        rss / CLONES as u64,
        pss / CLONES as u64,
        pss
    );
}
