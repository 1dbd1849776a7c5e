//! `bash benches/run.sh --bench block`: the VMM's block backends on the
//! host (no guest), driven as the virtio-blk device drives them: the file
//! backend (pread/pwrite on the VMM thread, one request at a time) and the
//! NBD engine (the device's per-drive I/O threads) to qemu-nbd and to
//! Ember's volume service (`ember-volumed`), both on unix sockets, at
//! queue depth 1 and 16. 4 KiB random reads and writes (IOPS, and p50/p99
//! latency at depth 1) and 1 MiB sequential reads and writes (MB/s), as
//! ratios to the file backend. Then 4 KiB read latency under a flood of
//! 64 KiB writes (64 wanted in flight) through the device's write
//! scheduler, off and on. Prints numbers; asserts nothing. Says why when
//! a server is missing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_benches::{percentile, volumed_with_volume, wait_for, Proc};
use ember_vmm::devices::virtio::block::nbd::{Durability, NbdEngine, NbdUri, Op};
use ember_vmm::devices::virtio::block::{IoSchedulerConfig, WriteScheduler};

const DISK: u64 = 256 << 20;
const RUN: Duration = Duration::from_secs(2);

/// xorshift64: reproducible offsets without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Case {
    write: bool,
    len: usize,
    random: bool,
}

struct Offsets {
    seed: u64,
    n: u64,
    len: u64,
    random: bool,
}

impl Offsets {
    fn new(len: usize, random: bool) -> Offsets {
        Offsets {
            seed: 0x9e37_79b9_7f4a_7c15,
            n: 0,
            len: len as u64,
            random,
        }
    }
    fn next(&mut self) -> u64 {
        let blocks = DISK / self.len;
        self.n += 1;
        let b = if self.random {
            next(&mut self.seed) % blocks
        } else {
            self.n % blocks
        };
        b * self.len
    }
}

/// Operations per second and per-operation latencies on the file.
fn file_run(f: &File, c: &Case) -> (f64, Vec<Duration>) {
    let mut buf = vec![0x5au8; c.len];
    let mut at = Offsets::new(c.len, c.random);
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed() < RUN {
        let s = Instant::now();
        let off = at.next();
        if c.write {
            f.write_all_at(&buf, off).unwrap();
        } else {
            f.read_exact_at(&mut buf, off).unwrap();
        }
        lat.push(s.elapsed());
    }
    (lat.len() as f64 / t.elapsed().as_secs_f64(), lat)
}

/// Waits until the engine has completions (or 10 ms).
fn wait_completions(e: &NbdEngine) {
    let mut pfd = libc::pollfd {
        fd: e.completion_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 10) };
}

/// The same through the NBD engine with `depth` operations kept in flight.
fn nbd_run(e: &NbdEngine, c: &Case, depth: usize) -> (f64, Vec<Duration>) {
    let data = vec![0x5au8; c.len];
    let mut at = Offsets::new(c.len, c.random);
    let mut started: HashMap<u64, Instant> = HashMap::new();
    let mut lat = Vec::new();
    let mut id = 0u64;
    let t = Instant::now();
    loop {
        let running = t.elapsed() < RUN;
        while running && started.len() < depth {
            id += 1;
            let op = if c.write {
                Op::Write(data.clone())
            } else {
                Op::Read(c.len)
            };
            started.insert(id, Instant::now());
            e.submit(id, op, at.next());
        }
        if started.is_empty() {
            break;
        }
        wait_completions(e);
        for done in e.take_completions() {
            done.result.expect("NBD I/O");
            if let Some(s) = started.remove(&done.id) {
                lat.push(s.elapsed());
            }
        }
    }
    (lat.len() as f64 / t.elapsed().as_secs_f64(), lat)
}

/// Read latencies (p50, p99) and write MB/s while a writer wants 64
/// writes of 64 KiB in flight and a reader keeps one 4 KiB read in flight;
/// writes go out only when `scheduler` lets them, as in the device.
fn flood(e: &NbdEngine, config: Option<IoSchedulerConfig>) -> (Duration, Duration, f64) {
    let mut sched = WriteScheduler::new(config);
    let data = vec![0xc3u8; 64 * 1024];
    let mut reads = Offsets::new(4096, true);
    let mut writes = Offsets::new(data.len(), true);
    let mut started: HashMap<u64, (bool, Instant)> = HashMap::new();
    let (mut id, mut read_out, mut writes_out, mut written) = (0u64, false, 0usize, 0u64);
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed() < RUN * 2 || !started.is_empty() {
        let running = t.elapsed() < RUN * 2;
        if running && !read_out {
            id += 1;
            started.insert(id, (false, Instant::now()));
            e.submit(id, Op::Read(4096), reads.next());
            read_out = true;
        }
        while running && writes_out < 64 && sched.may_send_write() {
            id += 1;
            started.insert(id, (true, Instant::now()));
            sched.write_sent();
            e.submit(id, Op::Write(data.clone()), writes.next());
            writes_out += 1;
        }
        wait_completions(e);
        for done in e.take_completions() {
            done.result.expect("NBD I/O");
            let Some((write, s)) = started.remove(&done.id) else {
                continue;
            };
            if write {
                sched.write_done(s.elapsed());
                writes_out -= 1;
                written += data.len() as u64;
            } else {
                lat.push(s.elapsed());
                read_out = false;
            }
        }
    }
    let mbps = written as f64 / 1e6 / t.elapsed().as_secs_f64();
    (percentile(&lat, 50.0), percentile(&lat, 99.0), mbps)
}

fn qemu_nbd(image: &Path, sock: &Path) -> Option<Proc> {
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--persistent",
            "--shared=0",
            "--cache=writeback",
            "-k",
        ])
        .arg(sock)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proc(child);
    wait_for(sock).ok().map(|()| p)
}

/// ember-volumed with one attached volume; returns it and the export's URI.
fn volumed(dir: &Path) -> Result<(Proc, String), String> {
    let (p, sock, export) = volumed_with_volume(dir, DISK)?;
    Ok((p, format!("nbd+unix:///{export}?socket={}", sock.display())))
}

fn engine(uri: &str) -> NbdEngine {
    let uri = NbdUri::parse(uri).unwrap();
    NbdEngine::connect(uri, Duration::from_secs(30), Durability::OnFlush).unwrap()
}

/// Fills an export so reads hit data, not holes.
fn fill(e: &NbdEngine) {
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..DISK / chunk.len() as u64 {
        e.submit(i, Op::Write(chunk.clone()), i * chunk.len() as u64);
    }
    e.wait_idle(Duration::from_secs(120));
    e.take_completions();
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..DISK / chunk.len() as u64 {
        file.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    let sock = dir.path().join("nbd.sock");
    let Some(_qemu) = qemu_nbd(&image, &sock) else {
        println!("block: SKIPPED: qemu-nbd is not installed (apt install qemu-utils)");
        return;
    };
    let mut targets: Vec<(String, NbdEngine)> = vec![(
        "qemu-nbd".into(),
        engine(&format!("nbd+unix:///?socket={}", sock.display())),
    )];
    let _volumed = match volumed(dir.path()) {
        Ok((p, uri)) => {
            let e = engine(&uri);
            fill(&e);
            targets.push(("ember-volumed".into(), e));
            Some(p)
        }
        Err(e) => {
            println!("block: ember-volumed SKIPPED: {e} (cargo build --release --bins)");
            None
        }
    };
    let cases = [
        ("4k random read", false, 4096, true, "IOPS"),
        ("4k random write", true, 4096, true, "IOPS"),
        ("1M sequential read", false, 1 << 20, false, "MB/s"),
        ("1M sequential write", true, 1 << 20, false, "MB/s"),
    ];
    println!("block backends on the host, {DISK} byte disk in the page cache, unix sockets");
    for (name, write, len, random, unit) in cases {
        let c = Case { write, len, random };
        let scale = if unit == "MB/s" {
            len as f64 / 1e6
        } else {
            1.0
        };
        let (f, flat) = file_run(&file, &c);
        let mut line = format!("{name:>20}: file {:>8.0} {unit}", f * scale);
        if unit == "IOPS" {
            line += &format!(
                " (p50 {}, p99 {})",
                ms(percentile(&flat, 50.0)),
                ms(percentile(&flat, 99.0))
            );
        }
        println!("{line}");
        for (server, e) in &targets {
            for depth in [1, 16] {
                let (n, lat) = nbd_run(e, &c, depth);
                let mut line = format!(
                    "{:>20}  nbd to {server:<13} QD{depth:<2} {:>8.0} {unit}, /file {:.3}",
                    "",
                    n * scale,
                    n / f
                );
                if unit == "IOPS" && depth == 1 {
                    line += &format!(
                        " (p50 {}, p99 {})",
                        ms(percentile(&lat, 50.0)),
                        ms(percentile(&lat, 99.0))
                    );
                }
                println!("{line}");
            }
        }
    }
    let on = IoSchedulerConfig {
        max_outstanding_writes: Some(4),
        max_write_latency_us: Some(2000),
    };
    println!(
        "4k read latency under a 64 KiB write flood (64 wanted in flight); scheduler on = \
         max_outstanding_writes 4, max_write_latency_us 2000"
    );
    for (server, e) in &targets {
        let (p50_off, p99_off, w_off) = flood(e, None);
        let (p50_on, p99_on, w_on) = flood(e, Some(on));
        println!(
            "{server:>14}: scheduler off: read p50 {}, p99 {}, writes {w_off:.0} MB/s; \
             on: read p50 {}, p99 {}, writes {w_on:.0} MB/s; read p99 on/off {:.3}",
            ms(p50_off),
            ms(p99_off),
            ms(p50_on),
            ms(p99_on),
            p99_on.as_secs_f64() / p99_off.as_secs_f64().max(1e-9)
        );
    }
}
