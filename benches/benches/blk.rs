//! `cargo bench -p ember-benches --bench blk`: the in-VMM file backend
//! against vhost-user to qemu-storage-daemon and to ember-volumed's own
//! vhost-user-blk backend, and the VMM's NBD backend to qemu-nbd and to
//! ember-volumed, on one guest holding all five drives (/dev/vdb: a file,
//! /dev/vdc: qemu-storage-daemon, /dev/vdd: ember-volumed vhost-user,
//! /dev/vde: qemu-nbd, /dev/vdf: ember-volumed NBD). A Python loop in the guest does O_DIRECT 4 KiB random
//! reads and writes and 1 MiB sequential ones for a fixed time; the host
//! reads the CPU time that the VMM's own threads (not the vCPUs) and each
//! backend process spent meanwhile. Prints IOPS / bandwidth, CPU per I/O,
//! and ratios to the file backend; asserts nothing. On nested kvm_pvm hosts every guest syscall is emulated, so the
//! absolute numbers measure the guest kernel more than the backends.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_benches::cpu_time;
use ember_tests::artifacts::runtime_rootfs_path;
use ember_tests::nbd::qemu_nbd;
use ember_tests::volumed::Volumed;
use ember_tests::{kernel_path, VmmProcess};
use serde_json::json;

const DISK_MIB: u64 = 64;
const SECS: u32 = 10;

const IO_PY: &str = r#"
import mmap, os, random, sys, time
dev, mode, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
bs = 4096 if mode.startswith("rand") else 1 << 20
blocks = (64 << 20) // bs
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, bs)
buf.write(os.urandom(bs))
n, t0 = 0, time.monotonic()
while True:
    off = (random.randrange(blocks) if mode.startswith("rand") else n % blocks) * bs
    if mode.endswith("read"):
        os.preadv(fd, [buf], off)
    else:
        os.pwritev(fd, [buf], off)
    n += 1
    if n % 8 == 0 and time.monotonic() - t0 > secs:
        break
os.fsync(fd)
print(n, time.monotonic() - t0)
"#;

/// CPU time of the VMM's threads other than its vCPUs (threads that ended
/// meanwhile drop out, hence the saturating differences).
fn vmm_cpu(pid: u32) -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Ok(task) = task else { continue };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("ember_vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

struct Run {
    ops: u64,
    secs: f64,
    vmm_us_per_io: f64,
    /// CPU of the drive's backend process, if it has one.
    backend_us_per_io: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// One measurement on `dev`, whose backend process (if any) is `backend`.
fn run(agent: &mut AgentClient, vmm: &VmmProcess, backend: u32, dev: &str, mode: &str) -> Run {
    let (v0, q0) = (vmm_cpu(vmm.pid()), cpu_time(backend).unwrap_or_default());
    let r = agent
        .exec(&ExecRequest::new([
            "python3",
            "/tmp/io.py",
            dev,
            mode,
            &SECS.to_string(),
        ]))
        .unwrap_or_else(|e| panic!("{dev} {mode}: {e}; {}", vmm.logs()));
    let (v1, q1) = (vmm_cpu(vmm.pid()), cpu_time(backend).unwrap_or_default());
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let mut it = out.split_whitespace();
    let ops: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        panic!(
            "{dev} {mode}: {out:?} {}",
            String::from_utf8_lossy(&r.stderr)
        )
    });
    let secs: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
    Run {
        ops,
        secs,
        vmm_us_per_io: per(v1.saturating_sub(v0)),
        backend_us_per_io: per(q1.saturating_sub(q0)),
    }
}

fn main() {
    let kernel = kernel_path();
    let rootfs = runtime_rootfs_path("python3");
    let mut vmm = VmmProcess::spawn(&[]);
    let file_img = vmm.path("file.raw");
    let vu_img = vmm.path("vu.raw");
    let nbd_img = vmm.path("nbd.raw");
    for p in [&file_img, &vu_img, &nbd_img] {
        std::fs::File::create(p)
            .unwrap()
            .set_len(DISK_MIB << 20)
            .unwrap();
    }
    let sock = vmm.path("vu.sock");
    let qsd = KillOnDrop(start_qsd(&vu_img, &sock));
    // ember-volumed's backend: one volume attached to this host.
    let vdir = tempfile::tempdir().unwrap();
    let vu_dir = vdir.path().join("vu");
    let volumed = Volumed::start_with(vdir.path(), &["--vhost-user-dir", vu_dir.to_str().unwrap()]);
    let body = format!(r#"{{"Name":"bench","SizeBytes":{}}}"#, DISK_MIB << 20);
    assert_eq!(volumed.call("POST", "/v1/volumes", Some(&body)).0, 201);
    let (st, grant) = volumed.call("POST", "/v1/volumes/bench/attach", Some(r#"{"Host":"h"}"#));
    assert_eq!(st, 200, "{grant}");
    let ember_sock = grant["VhostUserSocket"].as_str().unwrap().to_string();
    // The NBD backend: qemu-nbd, and a second ember-volumed volume.
    let nbd_sock = vmm.path("nbd.sock");
    let qnbd = KillOnDrop(qemu_nbd(&nbd_img, &nbd_sock));
    let body = format!(r#"{{"Name":"bench-nbd","SizeBytes":{}}}"#, DISK_MIB << 20);
    assert_eq!(volumed.call("POST", "/v1/volumes", Some(&body)).0, 201);
    let (st, grant) = volumed.call(
        "POST",
        "/v1/volumes/bench-nbd/attach",
        Some(r#"{"Host":"h"}"#),
    );
    assert_eq!(st, 200, "{grant}");
    let ember_nbd = grant["UnixUri"].as_str().unwrap().to_string();
    let vsock = vmm.path("vsock.sock");
    let ready = bind_ready_listener(&vsock).unwrap();
    vmm.boot_with_drives(
        &kernel,
        &rootfs,
        1,
        256,
        &[
            json!({"drive_id": "file", "path_on_host": file_img, "is_root_device": false}),
            json!({"drive_id": "vu", "socket": sock, "is_root_device": false}),
            json!({"drive_id": "ember", "socket": ember_sock, "is_root_device": false}),
            json!({"drive_id": "qnbd", "is_root_device": false,
                   "nbd_uri": format!("nbd+unix:///?socket={}", nbd_sock.display())}),
            json!({"drive_id": "enbd", "nbd_uri": ember_nbd, "is_root_device": false}),
        ],
    );
    vmm.wait_agent_ready(&ready, Duration::from_secs(900));
    let mut agent = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(60)).unwrap();
    let write = format!("cat > /tmp/io.py <<'EOF'\n{IO_PY}\nEOF");
    let r = agent
        .exec(&ExecRequest::new(["/bin/sh", "-c", &write]))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));

    for mode in ["randread", "randwrite", "seqread", "seqwrite"] {
        let f = run(&mut agent, &vmm, 0, "/dev/vdb", mode);
        let q = run(&mut agent, &vmm, qsd.0.id(), "/dev/vdc", mode);
        let e = run(&mut agent, &vmm, volumed.pid(), "/dev/vdd", mode);
        let qn = run(&mut agent, &vmm, qnbd.0.id(), "/dev/vde", mode);
        let en = run(&mut agent, &vmm, volumed.pid(), "/dev/vdf", mode);
        let unit = if mode.starts_with("rand") {
            "IOPS (4 KiB)"
        } else {
            "MiB/s (1 MiB)"
        };
        let ratio = |r: &Run| r.rate() / f.rate().max(f64::MIN_POSITIVE);
        println!(
            "blk {mode}: file {:.1} {unit}, vmm {:.0} us/io | vhost-user qsd {:.1}, \
             vmm {:.0} us/io, qsd {:.0} us/io | vhost-user ember-volumed {:.1}, \
             vmm {:.0} us/io, volumed {:.0} us/io | ratio to file: qsd {:.2}, ember-volumed {:.2}",
            f.rate(),
            f.vmm_us_per_io,
            q.rate(),
            q.vmm_us_per_io,
            q.backend_us_per_io,
            e.rate(),
            e.vmm_us_per_io,
            e.backend_us_per_io,
            ratio(&q),
            ratio(&e),
        );
        println!(
            "blk {mode} NBD: qemu-nbd {:.1} {unit}, vmm {:.0} us/io, qemu-nbd {:.0} us/io | \
             ember-volumed {:.1}, vmm {:.0} us/io, volumed {:.0} us/io | ratio to file: \
             qemu-nbd {:.2}, ember-volumed {:.2}",
            qn.rate(),
            qn.vmm_us_per_io,
            qn.backend_us_per_io,
            en.rate(),
            en.vmm_us_per_io,
            en.backend_us_per_io,
            ratio(&qn),
            ratio(&en),
        );
    }
}

/// Ends the backend even when a measurement panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(image: &Path, sock: &Path) -> std::process::Child {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},cache.direct=off",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (package qemu-utils)");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
