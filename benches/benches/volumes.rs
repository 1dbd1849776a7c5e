//! `cargo bench -p ember-benches --bench volumes`: Ember's volume service
//! (`ember-volumed`) against qemu-nbd as NBD servers, side by side in one
//! run, driven from the host by one NBD client over unix sockets (no guest,
//! so the numbers are the servers' and not the nested guest's): 4k random
//! reads and writes at queue depth 1 (IOPS, p50/p99 latency) and 16 (IOPS),
//! and 1 MiB sequential writes and reads (MB/s), on a 256 MiB volume in the
//! page cache. Prints numbers and volumed/qemu-nbd ratios; asserts nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_benches::{percentile, volumed_with_volume, wait_for, Proc};
use ember_nbd::{CMD_READ, CMD_WRITE};
use ember_volumed::nbd::client::Client;

const SIZE: u64 = 256 << 20;
const OPS: usize = 4000;
const DEPTH: usize = 16;

/// Deterministic 4k-aligned offsets.
fn offsets(n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % (SIZE / 4096)) * 4096
        })
        .collect()
}

#[derive(Default)]
struct Numbers {
    rand_read_iops: f64,
    rand_read_p50: Duration,
    rand_read_p99: Duration,
    rand_write_iops: f64,
    rand_write_p50: Duration,
    rand_write_p99: Duration,
    rand_read_qd_iops: f64,
    seq_write_mbs: f64,
    seq_read_mbs: f64,
}

fn check(r: ember_volumed::nbd::client::Reply) -> Result<(), String> {
    if r.error == 0 {
        Ok(())
    } else {
        Err(format!("NBD error {}", r.error))
    }
}

fn run(c: &mut Client) -> Result<Numbers, String> {
    let e = |e: ember_volumed::nbd::client::ClientError| e.to_string();
    let mut n = Numbers::default();
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for i in 0..SIZE / (1 << 20) {
        check(c.write(i << 20, &chunk).map_err(e)?)?;
    }
    check(c.flush().map_err(e)?)?;
    n.seq_write_mbs = SIZE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..SIZE / (1 << 20) {
        check(c.read(i << 20, 1 << 20).map_err(e)?)?;
    }
    n.seq_read_mbs = SIZE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    let mut lat = Vec::with_capacity(OPS);
    let t = Instant::now();
    for off in offsets(OPS, 1) {
        let s = Instant::now();
        check(c.read(off, 4096).map_err(e)?)?;
        lat.push(s.elapsed());
    }
    n.rand_read_iops = OPS as f64 / t.elapsed().as_secs_f64();
    (n.rand_read_p50, n.rand_read_p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));

    let block = [0xa5u8; 4096];
    lat.clear();
    let t = Instant::now();
    for off in offsets(OPS, 2) {
        let s = Instant::now();
        check(c.write(off, &block).map_err(e)?)?;
        lat.push(s.elapsed());
    }
    n.rand_write_iops = OPS as f64 / t.elapsed().as_secs_f64();
    (n.rand_write_p50, n.rand_write_p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));

    // Queue depth 16: keep 16 reads in flight.
    let offs = offsets(OPS * 4, 3);
    let t = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    while done < offs.len() {
        while sent < offs.len() && sent - done < DEPTH {
            c.send(CMD_READ, 0, offs[sent], 4096, &[])
                .map_err(|x| x.to_string())?;
            sent += 1;
        }
        check(c.receive(|_| 4096).map_err(e)?)?;
        done += 1;
    }
    n.rand_read_qd_iops = offs.len() as f64 / t.elapsed().as_secs_f64();
    let _ = CMD_WRITE;
    Ok(n)
}

fn volumed(dir: &Path) -> Result<(Proc, Client), String> {
    let (p, sock, export) = volumed_with_volume(dir, SIZE)?;
    let c = Client::connect_unix(&sock, &export).map_err(|e| e.to_string())?;
    Ok((p, c))
}

fn qemu_nbd(dir: &Path) -> Result<(Proc, Client), String> {
    let img = dir.join("qemu.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SIZE))
        .map_err(|e| e.to_string())?;
    let sock = dir.join("qemu.sock");
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "bench", "--persistent", "-k"])
        .arg(&sock)
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-nbd: {e}"))?;
    let p = Proc(child);
    wait_for(&sock)?;
    let c = Client::connect_unix(&sock, "bench").map_err(|e| e.to_string())?;
    Ok((p, c))
}

/// A table row: its name, how a result shows, and the value ratios use.
type Row = (&'static str, fn(&Numbers) -> String, fn(&Numbers) -> f64);

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    println!("== NBD servers: ember-volumed vs qemu-nbd (one host-side client, unix sockets, {} MiB volume) ==", SIZE >> 20);
    let ours = volumed(&dir.path().join("v")).and_then(|(_p, mut c)| run(&mut c));
    let peer = qemu_nbd(dir.path()).and_then(|(_p, mut c)| run(&mut c));
    let rows: [Row; 9] = [
        (
            "4k random read QD1 IOPS",
            |n| format!("{:.0}", n.rand_read_iops),
            |n| n.rand_read_iops,
        ),
        (
            "4k random read QD1 p50",
            |n| ms(n.rand_read_p50),
            |n| n.rand_read_p50.as_secs_f64(),
        ),
        (
            "4k random read QD1 p99",
            |n| ms(n.rand_read_p99),
            |n| n.rand_read_p99.as_secs_f64(),
        ),
        (
            "4k random write QD1 IOPS",
            |n| format!("{:.0}", n.rand_write_iops),
            |n| n.rand_write_iops,
        ),
        (
            "4k random write QD1 p50",
            |n| ms(n.rand_write_p50),
            |n| n.rand_write_p50.as_secs_f64(),
        ),
        (
            "4k random write QD1 p99",
            |n| ms(n.rand_write_p99),
            |n| n.rand_write_p99.as_secs_f64(),
        ),
        (
            "4k random read QD16 IOPS",
            |n| format!("{:.0}", n.rand_read_qd_iops),
            |n| n.rand_read_qd_iops,
        ),
        (
            "1 MiB sequential write MB/s",
            |n| format!("{:.0}", n.seq_write_mbs),
            |n| n.seq_write_mbs,
        ),
        (
            "1 MiB sequential read MB/s",
            |n| format!("{:.0}", n.seq_read_mbs),
            |n| n.seq_read_mbs,
        ),
    ];
    match (&ours, &peer) {
        (Ok(o), Ok(p)) => {
            println!(
                "{:<30} {:>14} {:>14} {:>8}",
                "", "ember-volumed", "qemu-nbd", "ratio"
            );
            for (name, show, val) in rows {
                println!(
                    "{name:<30} {:>14} {:>14} {:>7.2}x",
                    show(o),
                    show(p),
                    val(o) / val(p).max(1e-12)
                );
            }
        }
        _ => {
            if let Err(e) = &ours {
                println!("ember-volumed: FAILED: {e}");
            }
            if let Err(e) = &peer {
                println!("qemu-nbd: FAILED: {e}");
            }
        }
    }
}
