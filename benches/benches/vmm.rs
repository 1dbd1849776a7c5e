//! `cargo bench -p ember-benches`: VMM start to API-ready (wall and CPU),
//! InstanceStart to agent-ready, and the VMM's own memory beyond guest
//! memory, for a 1 vCPU, 128 MiB guest. Prints numbers; asserts nothing.

use std::time::{Duration, Instant};

use ember_agent::client::bind_ready_listener;
use ember_benches::{cpu_time, percentile, rss_split};
use ember_tests::{kernel_path, rootfs_path, VmmProcess};

const STARTS: usize = 20;
const MEM_MIB: u32 = 128;

fn main() {
    // cargo passes --bench; nothing else is taken.
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..STARTS {
        let t = Instant::now();
        let vmm = VmmProcess::spawn(&[]);
        walls.push(t.elapsed());
        cpus.push(cpu_time(vmm.pid()).unwrap_or_default());
    }
    println!(
        "vmm_start_to_api_ready: n={STARTS} wall p50={:?} p99={:?}; cpu p50={:?} p99={:?}",
        percentile(&walls, 50.0),
        percentile(&walls, 99.0),
        percentile(&cpus, 50.0),
        percentile(&cpus, 99.0)
    );

    let (kernel, rootfs) = (kernel_path(), rootfs_path());
    let mut vmm = VmmProcess::spawn(&[]);
    let ready = bind_ready_listener(vmm.path("vsock.sock")).expect("ready listener");
    let t = Instant::now();
    vmm.boot(&kernel, &rootfs, 1, MEM_MIB);
    let hello = vmm.wait_agent_ready(&ready, Duration::from_secs(900));
    println!(
        "instance_start_to_agent_ready: wall={:?} guest_uptime={}ms vmm_cpu={:?}",
        t.elapsed(),
        hello.uptime_ms,
        cpu_time(vmm.pid()).unwrap_or_default()
    );
    let (total, guest) = rss_split(vmm.pid(), u64::from(MEM_MIB) << 20).expect("smaps");
    println!(
        "vmm_memory_overhead: rss_total={total}KiB guest_touched={guest}KiB overhead={}KiB",
        total - guest
    );
}
