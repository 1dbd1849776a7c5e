//! `bash benches/run.sh --bench block`: the NBD backend next to the file
//! backend, on the host (no guest): 4 KiB random reads and writes (IOPS)
//! and 1 MiB sequential reads and writes (MB/s), one request at a time as
//! the device issues them, against the same file served by qemu-nbd on a
//! unix socket. Prints numbers and NBD/file ratios; asserts nothing. Says
//! why when qemu-nbd is missing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_vmm::devices::virtio::block::nbd::{Durability, NbdClient, NbdUri};

const DISK: u64 = 256 << 20;
const RUN: Duration = Duration::from_secs(2);

trait Backend {
    fn read(&mut self, buf: &mut [u8], offset: u64);
    fn write(&mut self, buf: &[u8], offset: u64);
}

impl Backend for File {
    fn read(&mut self, buf: &mut [u8], offset: u64) {
        self.read_exact_at(buf, offset).unwrap();
    }
    fn write(&mut self, buf: &[u8], offset: u64) {
        self.write_all_at(buf, offset).unwrap();
    }
}

impl Backend for NbdClient {
    fn read(&mut self, buf: &mut [u8], offset: u64) {
        self.read_at(buf, offset).unwrap();
    }
    fn write(&mut self, buf: &[u8], offset: u64) {
        self.write_at(buf, offset).unwrap();
    }
}

/// xorshift64: reproducible offsets without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Operations per second of `len`-byte requests for `RUN`; random or
/// sequential offsets.
fn ops_per_sec(b: &mut dyn Backend, write: bool, len: usize, random: bool) -> f64 {
    let mut buf = vec![0x5au8; len];
    let blocks = DISK / len as u64;
    let (mut seed, mut n, t) = (0x9e37_79b9_7f4a_7c15u64, 0u64, Instant::now());
    while t.elapsed() < RUN {
        for _ in 0..16 {
            let block = if random {
                next(&mut seed) % blocks
            } else {
                n % blocks
            };
            let offset = block * len as u64;
            if write {
                b.write(&buf, offset);
            } else {
                b.read(&mut buf, offset);
            }
            n += 1;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn qemu_nbd(image: &Path, sock: &Path) -> Option<Child> {
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
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(child)
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
    // Written out so reads hit data, not holes.
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..DISK / chunk.len() as u64 {
        file.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    let sock = dir.path().join("nbd.sock");
    let Some(mut server) = qemu_nbd(&image, &sock) else {
        println!("block: SKIPPED: qemu-nbd is not installed (apt install qemu-utils)");
        return;
    };
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    let mut nbd = NbdClient::connect(uri, Duration::from_secs(30), Durability::OnFlush).unwrap();
    let mut file = file;
    let cases: [(&str, bool, usize, bool, &str); 4] = [
        ("4k random read", false, 4096, true, "IOPS"),
        ("4k random write", true, 4096, true, "IOPS"),
        ("1M sequential read", false, 1 << 20, false, "MB/s"),
        ("1M sequential write", true, 1 << 20, false, "MB/s"),
    ];
    println!("block backend, queue depth 1, {DISK} byte disk, host page cache");
    for (name, write, len, random, unit) in cases {
        let scale = if unit == "MB/s" {
            len as f64 / 1e6
        } else {
            1.0
        };
        let f = ops_per_sec(&mut file, write, len, random) * scale;
        let n = ops_per_sec(&mut nbd, write, len, random) * scale;
        println!(
            "{name:>20}: file {f:>10.0} {unit}, nbd (qemu-nbd, unix socket) {n:>10.0} {unit}, nbd/file {:.3}",
            n / f
        );
    }
    nbd.flush().unwrap();
    drop(nbd);
    let _ = server.kill();
    let _ = server.wait();
}
