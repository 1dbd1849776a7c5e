//! vhost-user block devices end to end, served by qemu-storage-daemon (an
//! external vhost-user-blk backend) and by ember-volumed's own backend: bad
//! sockets and a backend that speaks garbage are refused with 400s; then
//! one booted guest raw-writes, flushes and reads back its qemu-storage-
//! daemon drive, and formats (busybox mke2fs), writes, syncs and reads back
//! a file on its ember-volumed drive (both checked on the host files too),
//! is snapshotted and resumed, and both backends are killed mid-I/O while
//! the API and the guest agent keep answering; the snapshot is then
//! restored onto a copy of the disk behind a new qemu-storage-daemon
//! socket and onto a restarted ember-volumed on the same attachment socket,
//! and reads back the same data; finally the attachment moves away and the
//! restored guest's write fails and never reaches the volume.
//! Needs /dev/kvm, qemu-storage-daemon (package qemu-utils) and debugfs
//! (e2fsprogs).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::AGENT_PORT;
use ember_tests::guest_sh_logged as guest_sh;
use ember_tests::snapshots::{connect_restored, pause, snapshot_paused};
use ember_tests::volumed::Volumed;
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const DISK_MIB: u64 = 64;
/// What the guest writes: 1 MiB at offset 1 MiB.
const PATTERN_KIB: u64 = 1024;
/// The ember-volumed volume.
const VOL_MIB: u64 = 8;

/// A qemu-storage-daemon exporting `image` as vhost-user-blk on `sock`;
/// killed (this PID only) when dropped.
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(image: &Path, sock: &Path) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon (package qemu-utils)");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-storage-daemon never created {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Qsd { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn data_drive(sock: &Path) -> serde_json::Value {
    json!({"drive_id": "data", "socket": sock, "is_root_device": false})
}

/// Waits until the VMM logged that drive `id`'s backend went away.
fn wait_disconnect_logged(vmm: &VmmProcess, id: &str) {
    let t = Instant::now();
    let line = format!("vhost-user drive {id}: ");
    loop {
        let log = std::fs::read_to_string(&vmm.vmm_log).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains(&line) && l.contains("closed the connection"))
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no disconnect of {id} logged; {}",
            vmm.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The md5 of file `/f` in the ext2 filesystem of `image`, read on the host
/// with debugfs.
fn host_file_md5(image: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -R 'cat /f' {} 2>/dev/null | md5sum",
            image.display()
        ))
        .output()
        .expect("debugfs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A unix socket whose peer answers every connection with `reply` (then
/// keeps it open for a while, so only the protocol can fail).
fn fake_backend(path: PathBuf, reply: &'static [u8]) {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf);
            let _ = c.write_all(reply);
            std::thread::sleep(Duration::from_secs(30));
        }
    });
}

/// Configuration and start-up errors, without booting a guest.
fn bad_backends_are_refused(kernel: &Path, rootfs: &Path) {
    let vmm = VmmProcess::spawn(&[]);
    let put = |body: serde_json::Value| vmm.put("/drives/data", &body);

    let r = put(json!({"drive_id": "data", "socket": "/nonexistent/vu.sock",
        "is_root_device": false}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("/nonexistent/vu.sock"), "{}", r.fault());

    let file = vmm.path("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let r = put(data_drive(&file));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("not a unix socket"), "{}", r.fault());

    let garbage = vmm.path("garbage.sock");
    fake_backend(
        garbage.clone(),
        b"\xde\xad\xbe\xef this is not vhost-user at all.....",
    );
    let r = put(json!({"drive_id": "data", "socket": garbage,
        "path_on_host": rootfs, "is_root_device": false}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("mutually exclusive"), "{}", r.fault());

    // The drive is accepted (it is a socket); the start finds the garbage.
    let ok = |r: ember_tests::ApiReply| assert_eq!(r.status, 204, "{r:?}");
    ok(vmm.put(
        "/boot-source",
        &json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    ));
    ok(vmm.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 128}),
    ));
    ok(put(data_drive(&garbage)));
    let t = Instant::now();
    let r = vmm.put("/actions", &json!({"action_type": "InstanceStart"}));
    assert_eq!(r.status, 400, "{r:?}; {}", vmm.logs());
    assert!(
        r.fault().contains("vhost-user backend") && r.fault().contains("garbage.sock"),
        "{}",
        r.fault()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );

    // A backend that accepts and never answers: bounded by the watchdog.
    let silent = vmm.path("silent.sock");
    fake_backend(silent.clone(), b"");
    ok(put(data_drive(&silent)));
    let t = Instant::now();
    let r = vmm.put("/actions", &json!({"action_type": "InstanceStart"}));
    assert_eq!(r.status, 400, "{r:?}; {}", vmm.logs());
    assert!(r.fault().contains("silent.sock"), "{}", r.fault());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    // Still answering.
    assert_eq!(vmm.request("GET", "/", None).status, 200);
}

#[test]
fn guest_uses_vhost_user_drive_and_survives_backend_death() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    let (kernel, rootfs) = (kernel_path(), rootfs_path());
    bad_backends_are_refused(&kernel, &rootfs);

    let mut vmm = VmmProcess::spawn(&[]);
    let image = vmm.path("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let sock = vmm.path("vu.sock");
    let mut qsd = Qsd::start(&image, &sock);
    // A second drive from ember-volumed's backend, attached to this host.
    let vdir = tempfile::tempdir().unwrap();
    let vu_dir = vdir.path().join("vu");
    let vargs = ["--vhost-user-dir", vu_dir.to_str().unwrap()];
    let volumed = Volumed::start_with(vdir.path(), &vargs);
    let (st, rec) = volumed.call(
        "POST",
        "/v1/volumes",
        Some(&format!(
            r#"{{"Name":"vol","SizeBytes":{}}}"#,
            VOL_MIB << 20
        )),
    );
    assert_eq!(st, 201, "{rec}");
    let (st, grant) = volumed.call("POST", "/v1/volumes/vol/attach", Some(r#"{"Host":"this"}"#));
    assert_eq!(st, 200, "{grant}");
    let vol_sock = grant["VhostUserSocket"].as_str().unwrap().to_string();
    let vol_drive = json!({"drive_id": "vol", "socket": vol_sock, "is_root_device": false});

    let vsock = vmm.path("vsock.sock");
    let ready = bind_ready_listener(&vsock).unwrap();
    vmm.boot_with_drives(&kernel, &rootfs, 1, 256, &[data_drive(&sock), vol_drive]);
    vmm.wait_agent_ready(&ready, BOOT_TIMEOUT);
    let mut agent = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(60)).unwrap();

    // Capacity comes from the backend's config space.
    let sectors = guest_sh(&mut agent, &vmm, "cat /sys/block/vdb/size");
    assert_eq!(sectors.trim(), ((DISK_MIB << 20) / 512).to_string());

    // Raw write with fsync (a FLUSH), drop the guest's cache, read back.
    let script = format!(
        "dd if=/dev/urandom of=/tmp/p bs=1024 count={PATTERN_KIB} 2>/dev/null && \
         dd if=/tmp/p of=/dev/vdb bs=1024 seek=1024 conv=fsync 2>/dev/null && \
         blockdev --flushbufs /dev/vdb && echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb of=/tmp/r bs=1024 skip=1024 count={PATTERN_KIB} 2>/dev/null && \
         cmp /tmp/p /tmp/r && md5sum /tmp/p"
    );
    let guest_sum = guest_sh(&mut agent, &vmm, &script);
    let guest_sum = guest_sum.split_whitespace().next().unwrap().to_string();
    // The bytes are in the backend's file.
    let host_sum = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if={} bs=1024 skip=1024 count={PATTERN_KIB} 2>/dev/null | md5sum",
            image.display()
        ))
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout).into_owned();
    assert_eq!(host_sum.split_whitespace().next(), Some(guest_sum.as_str()));

    // ember-volumed's drive: its capacity, then a filesystem made, written,
    // synced (FLUSH), unmounted, and read back after a fresh mount.
    let sectors = guest_sh(&mut agent, &vmm, "cat /sys/block/vdc/size");
    assert_eq!(sectors.trim(), ((VOL_MIB << 20) / 512).to_string());
    let vol_sum = guest_sh(
        &mut agent,
        &vmm,
        "mke2fs /dev/vdc >/dev/null 2>&1 && mkdir -p /tmp/vol && \
         mount -t ext4 /dev/vdc /tmp/vol && \
         dd if=/dev/urandom of=/tmp/vol/f bs=4096 count=64 2>/dev/null && sync && \
         umount /tmp/vol && echo 3 > /proc/sys/vm/drop_caches && \
         mount -t ext4 -o ro /dev/vdc /tmp/vol && md5sum /tmp/vol/f && umount /tmp/vol",
    );
    let vol_sum = vol_sum.split_whitespace().next().unwrap().to_string();
    // The file is in the volume's image on the host.
    assert_eq!(host_file_md5(&volumed.image("vol")), vol_sum);
    let vol_readback = "echo 3 > /proc/sys/vm/drop_caches && mount -t ext4 -o ro /dev/vdc /tmp/vol && md5sum /tmp/vol/f && umount /tmp/vol";

    // Snapshot: the pause stops the backend's ring, the resume restarts
    // it. The disk is copied while paused, for the restore below.
    let readback = format!(
        "echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb bs=1024 skip=1024 count={PATTERN_KIB} 2>/dev/null | md5sum"
    );
    pause(&vmm);
    let (snap_dir, snapshot, mem, _) = snapshot_paused(&vmm, "ember-vu-");
    let image2 = snap_dir.path().join("disk2.raw");
    std::fs::copy(&image, &image2).unwrap();
    assert_eq!(
        vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
            .status,
        204
    );
    let again = guest_sh(&mut agent, &vmm, &readback);
    assert_eq!(again.split_whitespace().next(), Some(guest_sum.as_str()));

    // Backend death mid-I/O: a long write runs in the guest's background on
    // the qemu-storage-daemon drive, reads (the filesystem stays intact) on
    // ember-volumed's; both backends are killed.
    guest_sh(
        &mut agent,
        &vmm,
        "(dd if=/dev/zero of=/dev/vdb bs=65536 count=100000 conv=fsync >/dev/null 2>&1 &) ; \
         (while dd if=/dev/vdc of=/dev/null bs=65536 iflag=direct 2>/dev/null; do :; done &) ; \
         sleep 1",
    );
    qsd.kill();
    volumed.kill();
    wait_disconnect_logged(&vmm, "data");
    wait_disconnect_logged(&vmm, "vol");
    let t = Instant::now();
    assert_eq!(vmm.request("GET", "/", None).status, 200);
    assert_eq!(vmm.request("GET", "/machine-config", None).status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "API slow: {:?}",
        t.elapsed()
    );
    // The guest itself keeps running: its agent answers.
    guest_sh(&mut agent, &vmm, "echo alive");
    assert!(vmm.try_wait().is_none(), "VMM exited; {}", vmm.logs());

    drop(agent);
    drop(vmm);

    // Restore onto a copy of the disk behind a new backend and socket, and
    // onto a restarted ember-volumed serving the attachment's same socket.
    let sock2 = snap_dir.path().join("vu2.sock");
    let _qsd2 = Qsd::start(&image2, &sock2);
    let volumed = Volumed::start_with(vdir.path(), &vargs);
    assert!(Path::new(&vol_sock).exists(), "{vol_sock} not served again");
    let clone = VmmProcess::spawn(&[]);
    let r = clone.put(
        "/snapshot/load",
        &json!({"snapshot_path": snapshot,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "vsock_override": {"uds_path": clone.path("vsock.sock")},
                "vhost_user_overrides": [{"drive_id": "data", "socket": sock2}],
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", clone.logs());
    let mut agent = connect_restored(&clone);
    let restored = guest_sh(&mut agent, &clone, &readback);
    assert_eq!(restored.split_whitespace().next(), Some(guest_sum.as_str()));
    // And new I/O works on the new backend.
    guest_sh(
        &mut agent,
        &clone,
        "dd if=/dev/urandom of=/tmp/q bs=4096 count=16 2>/dev/null && \
         dd if=/tmp/q of=/dev/vdb bs=4096 seek=4096 conv=fsync 2>/dev/null && \
         echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb of=/tmp/q2 bs=4096 skip=4096 count=16 2>/dev/null && cmp /tmp/q /tmp/q2",
    );
    let restored = guest_sh(&mut agent, &clone, vol_readback);
    assert_eq!(restored.split_whitespace().next(), Some(vol_sum.as_str()));

    // The attachment moves to another host: the restored guest's token is
    // stale, its write fails, and the volume's image is untouched.
    let before = std::fs::read(volumed.image("vol")).unwrap();
    let (st, m) = volumed.call("POST", "/v1/volumes/vol/move", Some(r#"{"Host":"other"}"#));
    assert_eq!((st, m["Generation"].as_u64()), (200, Some(2)), "{m}");
    assert!(!Path::new(&vol_sock).exists(), "the stale socket remains");
    let r = agent
        .exec(&ember_agent::ExecRequest::new([
            "/bin/sh",
            "-c",
            "dd if=/dev/urandom of=/dev/vdc bs=65536 count=4 conv=fsync",
        ]))
        .unwrap();
    assert_ne!(r.exit_code, Some(0), "a fenced write must fail: {r:?}");
    assert!(
        std::fs::read(volumed.image("vol")).unwrap() == before,
        "the fenced writer changed the volume"
    );
    assert_eq!(host_file_md5(&volumed.image("vol")), vol_sum);
}
