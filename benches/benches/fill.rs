//! `cargo bench -p ember-benches --bench fill`: a `fill_from` drive's
//! engine (no guest) filling a local file from `ember-export`'s server on
//! a unix socket. The background copy of 256 MiB (all data) next to
//! `qemu-img convert` copying the same export to a file (the peer); 4 KiB
//! reads of missing chunks (each fetched on demand, the background held
//! back) next to the same reads once local. Prints numbers and ratios;
//! asserts nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use ember_benches::percentile;
use ember_vmm::devices::virtio::block::fill::{Fill, CHUNK_SIZE};
use ember_vmm::devices::virtio::block::nbd::Op;
use ember_vmm::vmm_config::drive::FillFrom;

const SIZE: u64 = 256 << 20;
const READS: u64 = 300;

fn wait_complete(f: &Fill) -> Duration {
    let t = Instant::now();
    while !f.is_complete() {
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

/// One 4 KiB read; its latency.
fn read(f: &mut Fill, id: u64, offset: u64) -> Duration {
    let t = Instant::now();
    let c = match f.submit(id, Op::Read(4096), offset) {
        Some(c) => c,
        None => {
            f.wait_idle(Duration::from_secs(60));
            f.take_completions().pop().expect("a completion")
        }
    };
    let took = t.elapsed();
    c.result.expect("read");
    took
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let sock = dir.path().join("export.sock");
    ember_volumed::nbd::export_file(&src, "disk", &format!("unix:{}", sock.display())).unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let from = |rate: Option<u64>| FillFrom {
        nbd_uri: uri.clone(),
        background_bytes_per_sec: rate,
        ..Default::default()
    };
    let mib = (SIZE >> 20) as f64;

    // Background copy, uncapped, against qemu-img convert of the export.
    let local = dir.path().join("local.img");
    let f = Fill::open(local.to_str().unwrap(), &from(None), None).unwrap();
    let fill = wait_complete(&f);
    drop(f);
    let copy = dir.path().join("copy.img");
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&copy)
        .output();
    let qemu = t.elapsed();
    let qemu_ok = out.is_ok_and(|o| o.status.success());
    println!(
        "fill: {mib} MiB in the background: {:.2} s ({:.0} MiB/s)",
        fill.as_secs_f64(),
        mib / fill.as_secs_f64()
    );
    if qemu_ok {
        println!(
            "fill: qemu-img convert of the same export: {:.2} s ({:.0} MiB/s); fill/qemu-img time {:.2}",
            qemu.as_secs_f64(),
            mib / qemu.as_secs_f64(),
            fill.as_secs_f64() / qemu.as_secs_f64()
        );
    } else {
        println!("fill: qemu-img convert: not run (qemu-utils missing or failed)");
    }

    // On-demand reads: the background gets 1 byte/s (its first batch, the
    // first 1 MiB, goes at once), so every chunk read below is missing.
    let _ = std::fs::remove_file(&local);
    let mut f = Fill::open(local.to_str().unwrap(), &from(Some(1)), None).unwrap();
    let chunks = SIZE / CHUNK_SIZE;
    // Distinct chunks spread over the disk, past the first batch.
    let offsets: Vec<u64> = (0..READS)
        .map(|i| (32 + (i * 2654435761) % (chunks - 32)) * CHUNK_SIZE + 8192)
        .collect();
    let mut on_demand = Vec::new();
    let mut id = 0;
    for &o in &offsets {
        id += 1;
        on_demand.push(read(&mut f, id, o));
    }
    let fetched = f.status("bench").bytes_on_demand;
    let mut local_reads = Vec::new();
    for &o in &offsets {
        id += 1;
        local_reads.push(read(&mut f, id, o));
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (od50, od99) = (percentile(&on_demand, 50.0), percentile(&on_demand, 99.0));
    let (l50, l99) = (
        percentile(&local_reads, 50.0),
        percentile(&local_reads, 99.0),
    );
    println!(
        "fill: 4 KiB read of a missing chunk (fetched on demand, {} KiB fetched): p50 {:.0} us, p99 {:.0} us",
        fetched >> 10,
        us(od50),
        us(od99)
    );
    println!(
        "fill: the same reads once local: p50 {:.1} us, p99 {:.1} us; on-demand/local p50 {:.1}",
        us(l50),
        us(l99),
        us(od50) / us(l50)
    );
}
