//! virtio-blk over NBD with a real guest, booted once: configuration errors
//! are 400s that leave the VMM running, reads survive a qemu-nbd restart,
//! every write the guest flushed is on the server after its VMM is killed
//! with SIGKILL, and a snapshot restored into a new VMM reconnects (to an
//! overriding URI) and reads them back. On the restored guest: a volume
//! grown by the volume service is seen by the guest after PATCH /drives, an
//! ops limit set at run time holds, and a drive moved to another server
//! (nbdkit) by a new URI has several guest requests in flight at once.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_tests::guest_sh as sh;
use ember_tests::nbd::qemu_nbd;
use ember_tests::snapshots;
use ember_tests::volumed::Volumed;
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};
use serde_json::json;

const DISK_SIZE: u64 = 16 << 20;

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn drive(id: &str, uri: &str) -> serde_json::Value {
    json!({"drive_id": id, "nbd_uri": uri, "is_root_device": false,
           "cache_type": "Writeback", "nbd_timeout_ms": 20000})
}

/// Bad URIs, an unreachable server and one that speaks something else are
/// refused at PUT /drives with a clear message; the VMM stays up.
fn config_errors_are_400s(vmm: &VmmProcess, dir: &Path) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let garbage = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        let _ = s.read(&mut [0u8; 64]);
    });
    let missing = format!("nbd+unix:///?socket={}", dir.join("none.sock").display());
    let cases = [
        ("http://h/e", "bad nbd_uri"),
        ("nbd+unix:///e", "socket"),
        (missing.as_str(), "NBD export"),
        (&format!("nbd://127.0.0.1:{port}/x"), "NBD"),
    ];
    for (uri, expect) in cases {
        let r = vmm.put("/drives/bad", &drive("bad", uri));
        assert_eq!(r.status, 400, "{uri}: {r:?}");
        let msg = r.json()["fault_message"].as_str().unwrap_or("").to_string();
        assert!(msg.contains(expect), "{uri}: {msg}");
    }
    garbage.join().unwrap();
    assert_eq!(vmm.request("GET", "/", None).status, 200);
}

#[test]
fn guest_on_nbd() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    let dir = tempfile::tempdir().unwrap();
    let image: PathBuf = dir.path().join("data.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut server = qemu_nbd(&image, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    // TCP NBD servers need --allow-inet (hostd's VMMs go through unix
    // sockets); without it, a clear 400 rather than a seccomp kill.
    let unix_only = VmmProcess::spawn(&[]);
    let r = unix_only.put("/drives/tcp", &drive("tcp", "nbd://127.0.0.1:1/x"));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("--allow-inet"), "{r:?}");
    assert_eq!(unix_only.request("GET", "/", None).status, 200);
    drop(unix_only);
    let mut vmm = VmmProcess::spawn(&["--allow-inet"]);
    config_errors_are_400s(&vmm, dir.path());
    let r = vmm.put("/drives/data", &drive("data", &uri));
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    // A second drive from Ember's volume service, attached to this host.
    let volumed = Volumed::start(dir.path());
    let (st, _) = volumed.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"vol","SizeBytes":8388608}"#),
    );
    assert_eq!(st, 201);
    let (st, grant) = volumed.call("POST", "/v1/volumes/vol/attach", Some(r#"{"Host":"this"}"#));
    assert_eq!(st, 200, "{grant}");
    let vol_uri = grant["UnixUri"].as_str().unwrap().to_string();
    let r = vmm.put("/drives/vol", &drive("vol", &vol_uri));
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let ready = bind_ready_listener(vmm.path("vsock.sock")).unwrap();
    let t = Instant::now();
    vmm.boot(&kernel_path(), &rootfs_path(), 1, 128);
    vmm.wait_agent_ready(&ready, Duration::from_secs(600));
    eprintln!("guest ready after {:?}", t.elapsed());
    let mut agent =
        AgentClient::connect(vmm.path("vsock.sock"), AGENT_PORT, Duration::from_secs(30)).unwrap();

    // Write and flush (conv=fsync is a virtio-blk flush, an NBD FLUSH).
    let guest_md5 = sh(
        &mut agent,
        "dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null && \
         dd if=/tmp/p of=/dev/vdb bs=65536 conv=fsync 2>/dev/null && md5sum < /tmp/p",
    );
    let guest_md5 = guest_md5.split_whitespace().next().unwrap().to_string();

    // The volume service's drive takes a flushed write; once the attachment
    // moves to another host, this VMM's token is stale: its next write is
    // refused (an I/O error in the guest) and never reaches the volume.
    sh(
        &mut agent,
        "dd if=/tmp/p of=/dev/vdc bs=65536 conv=fsync 2>/dev/null",
    );
    let on_volume = std::fs::read(volumed.image("vol")).unwrap();
    let (st, m) = volumed.call("POST", "/v1/volumes/vol/move", Some(r#"{"Host":"other"}"#));
    assert_eq!((st, m["Generation"].as_u64()), (200, Some(2)), "{m}");
    let r = agent
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/dev/vdc bs=65536 count=4 conv=fsync",
        ]))
        .unwrap();
    assert_ne!(r.exit_code, Some(0), "a fenced write must fail: {r:?}");
    assert_eq!(
        std::fs::read(volumed.image("vol")).unwrap(),
        on_volume,
        "the fenced writer changed the volume"
    );
    // What the guest wrote while it held the attachment is there.
    assert!(
        on_volume[..256 * 1024] == std::fs::read(&image).unwrap()[..256 * 1024],
        "the flushed write before the move is missing"
    );
    let moved_uri = m["UnixUri"].as_str().unwrap().to_string();

    // The server restarts while the guest reads: no guest-visible error.
    stop(server);
    let restarter = std::thread::spawn({
        let (image, sock) = (image.clone(), sock.clone());
        move || {
            std::thread::sleep(Duration::from_secs(2));
            qemu_nbd(&image, &sock)
        }
    });
    let read_md5 = sh(
        &mut agent,
        "echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb bs=65536 count=4 2>/dev/null | md5sum",
    );
    server = restarter.join().unwrap();
    assert_eq!(read_md5.split_whitespace().next().unwrap(), guest_md5);

    // A second flushed write, then SIGKILL: both are on the server.
    sh(
        &mut agent,
        "dd if=/tmp/p of=/dev/vdb bs=65536 seek=64 conv=fsync 2>/dev/null",
    );
    // Snapshot the paused guest: a restore must reconnect to the export.
    let (snap_dir, snapshot, mem, _) = snapshots::pause_and_snapshot(&vmm, "ember-nbd-");
    // SAFETY: kill(2) on the pid of the VMM child this test started.
    assert_eq!(unsafe { libc::kill(vmm.pid() as i32, libc::SIGKILL) }, 0);
    vmm.wait_exit(Duration::from_secs(10))
        .expect("VMM exits after SIGKILL");
    stop(server);
    // What a reattached drive would read: the server's file itself.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 262144 {} | md5sum", image.display()))
        .output()
        .unwrap();
    let host_md5 = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(host_md5.split_whitespace().next(), Some(guest_md5.as_str()));
    let data = std::fs::read(&image).unwrap();
    assert!(
        data[4 << 20..(4 << 20) + 256 * 1024] == data[..256 * 1024],
        "the second flushed write is missing"
    );

    // Reattach by restoring the snapshot into a new VMM, with the server
    // back on a new socket given as the drive's override.
    let sock2 = dir.path().join("nbd2.sock");
    let server = qemu_nbd(&image, &sock2);
    let vmm2 = VmmProcess::spawn(&[]);
    let r = vmm2.put(
        "/snapshot/load",
        &json!({"snapshot_path": snapshot,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "vsock_override": {"uds_path": vmm2.path("vsock.sock")},
                "drive_overrides": [{"drive_id": "data", "path_on_host":
                    format!("nbd+unix:///?socket={}", sock2.display())},
                    // The restored VM holds the moved attachment's token.
                    {"drive_id": "vol", "path_on_host": moved_uri}],
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm2.logs());
    let mut agent = snapshots::connect_restored(&vmm2);
    let back = sh(
        &mut agent,
        "echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb bs=65536 skip=64 count=4 2>/dev/null | md5sum",
    );
    assert_eq!(back.split_whitespace().next(), Some(guest_md5.as_str()));
    // With the moved attachment's token, the volume serves the restored VM.
    let vol = sh(
        &mut agent,
        "dd if=/dev/vdc bs=65536 count=4 iflag=direct 2>/dev/null | md5sum",
    );
    assert_eq!(vol.split_whitespace().next(), Some(guest_md5.as_str()));

    volume_grows_under_the_guest(&vmm2, &mut agent, &volumed, &moved_uri);
    volume_moves_under_the_guest(&vmm2, &mut agent, &volumed, dir.path(), &guest_md5);
    rate_limit_holds(&vmm2, &mut agent);
    moved_drive_keeps_requests_in_flight(&vmm2, &mut agent, dir.path(), &image);
    drop(agent);
    drop(vmm2);
    stop(server);
    drop(snap_dir);
}

/// Polls a guest command until its output (trimmed) is `want`.
fn wait_guest_output(agent: &mut AgentClient, cmd: &str, want: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if sh(agent, cmd).trim() == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

/// The volume service grows the volume; PATCH /drives makes the VMM read
/// the export's size again and tell the guest, whose block layer sees it.
fn volume_grows_under_the_guest(
    vmm: &VmmProcess,
    agent: &mut AgentClient,
    volumed: &Volumed,
    uri: &str,
) {
    assert_eq!(sh(agent, "cat /sys/block/vdc/size").trim(), "16384");
    let (st, v) = volumed.call(
        "PATCH",
        "/v1/volumes/vol",
        Some(r#"{"SizeBytes":16777216}"#),
    );
    assert_eq!(st, 200, "{v}");
    let r = vmm.patch("/drives/vol", &json!({"drive_id": "vol", "nbd_uri": uri}));
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    assert!(
        wait_guest_output(agent, "cat /sys/block/vdc/size", "32768"),
        "the guest did not see the new capacity; {}",
        vmm.logs()
    );
    // The new end of the disk is usable.
    let r = sh(
        agent,
        "dd if=/dev/vdc of=/dev/null bs=4096 skip=4095 count=1 iflag=direct 2>&1 | head -1",
    );
    assert!(r.contains("1+0 records in"), "{r}");
    // A shrunk or unknown export is refused; the drive keeps working.
    let r = vmm.patch(
        "/drives/vol",
        &json!({"drive_id": "vol", "nbd_uri": "nbd+unix:///?socket=/nonexistent"}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let r = vmm.patch("/drives/nope", &json!({"drive_id": "nope"}));
    assert_eq!(r.status, 400, "{r:?}");
}

/// The volume moves to a second ember-volumed while the guest uses it
/// (`"Fence": "Disconnect"`): a write the guest makes after the fence waits
/// in the VMM until `PATCH /drives` names the new server, then lands there,
/// not on the old one; what was flushed before is there too.
fn volume_moves_under_the_guest(
    vmm: &VmmProcess,
    agent: &mut AgentClient,
    volumed: &Volumed,
    dir: &Path,
    md5: &str,
) {
    sh(
        agent,
        "dd if=/tmp/p of=/dev/vdc bs=65536 seek=16 conv=fsync 2>/dev/null",
    );
    let bdir = dir.join("volumed-b");
    std::fs::create_dir_all(&bdir).unwrap();
    let b = Volumed::start(&bdir);
    let (st, m) = volumed.call(
        "POST",
        "/v1/volumes/vol/move-to-server",
        Some(&format!(
            r#"{{"Target":"{}","Fence":"Disconnect"}}"#,
            b.api.display()
        )),
    );
    assert_eq!(st, 200, "{m}");
    let uri = m["Attachment"]["UnixUri"].as_str().unwrap().to_string();
    let old_image = std::fs::read(volumed.image("vol")).unwrap();
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(5));
            let r = vmm.patch("/drives/vol", &json!({"drive_id": "vol", "nbd_uri": uri}));
            assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
        });
        sh(
            agent,
            "dd if=/tmp/p of=/dev/vdc bs=65536 seek=32 conv=fsync 2>/dev/null && echo ok",
        );
    });
    eprintln!("the write across the move took {:?}", t.elapsed());
    let new_image = std::fs::read(b.image("vol")).unwrap();
    let p = &old_image[1 << 20..(1 << 20) + 256 * 1024];
    assert!(
        new_image[1 << 20..(1 << 20) + 256 * 1024] == *p,
        "the write flushed before the move is not on the new server"
    );
    assert!(
        new_image[2 << 20..(2 << 20) + 256 * 1024] == *p,
        "the write made across the move is not on the new server"
    );
    assert_eq!(
        std::fs::read(volumed.image("vol")).unwrap(),
        old_image,
        "the old server applied a write after the fence"
    );
    let back = sh(
        agent,
        "dd if=/dev/vdc bs=65536 skip=32 count=4 iflag=direct 2>/dev/null | md5sum",
    );
    assert_eq!(back.split_whitespace().next(), Some(md5));
    // The drive goes on working on the new server.
    let r = agent
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/dev/vdc bs=4096 seek=1000 count=1 oflag=direct",
        ]))
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "{r:?}; {}", vmm.logs());
}

/// An ops limit of 1 per second set at run time: 30 direct 4 KiB reads
/// need at least 29 s of tokens. Asserting 20 s only fails if the limit
/// leaks (unlimited, they take 2-3 s on the nested machine); contention
/// only makes them slower.
fn rate_limit_holds(vmm: &VmmProcess, agent: &mut AgentClient) {
    let limit = json!({"drive_id": "data",
        "rate_limiter": {"ops": {"size": 1, "refill_time": 1000}}});
    let r = vmm.patch("/drives/data", &limit);
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let timed = "cat /proc/uptime; dd if=/dev/vdb of=/dev/null bs=4096 count=30 \
                 iflag=direct 2>/dev/null; cat /proc/uptime";
    let ms = guest_ms(&sh(agent, timed));
    eprintln!("30 reads under a 1 op/s limit: {ms} ms");
    assert!(ms >= 20_000, "30 reads in {ms} ms under a 1 op/s limit");
    let config = vmm.request("GET", "/vm/config", None).json();
    let drive = config["drives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["drive_id"] == "data")
        .cloned()
        .unwrap();
    assert_eq!(drive["rate_limiter"]["ops"]["size"], 1, "{drive}");
    // Lifted again.
    let r = vmm.patch(
        "/drives/data",
        &json!({"drive_id": "data", "rate_limiter": {}}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let ms = guest_ms(&sh(agent, timed));
    eprintln!("30 reads unlimited: {ms} ms");
}

/// Milliseconds between the first and the last `/proc/uptime` line.
fn guest_ms(out: &str) -> u64 {
    let secs = |l: &str| -> f64 { l.split_whitespace().next().unwrap().parse().unwrap() };
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let (first, last) = (secs(lines[0]), secs(lines[lines.len() - 1]));
    ((last - first) * 1000.0) as u64
}

/// The drive moves to another server (nbdkit on the same image, with its
/// log and pause filters) by PATCH /drives with a new URI; with that
/// server paused, four reads the guest issues at once are all at the
/// server together, and complete with the right data when it resumes.
fn moved_drive_keeps_requests_in_flight(
    vmm: &VmmProcess,
    agent: &mut AgentClient,
    dir: &Path,
    image: &Path,
) {
    let sock = dir.join("nbdkit.sock");
    let control = dir.join("pause.sock");
    let log = dir.join("requests.log");
    let mut nbdkit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=log", "--filter=pause", "file"])
        .arg(image)
        .arg(format!("logfile={}", log.display()))
        .arg(format!("pause-control={}", control.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit (tests/run.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() || !control.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = vmm.patch("/drives/data", &json!({"drive_id": "data", "nbd_uri": uri}));
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let mut ctl = std::os::unix::net::UnixStream::connect(&control).unwrap();
    let mut answer = [0u8; 1];
    ctl.write_all(b"p").unwrap();
    ctl.read_exact(&mut answer).unwrap();
    sh(
        agent,
        "rm -f /tmp/fin; (for i in 0 1 2 3; do dd if=/dev/vdb of=/tmp/r$i bs=4096 count=1 \
         skip=$((i * 16)) iflag=direct 2>/dev/null & done; wait; touch /tmp/fin) \
         >/dev/null 2>&1 </dev/null &",
    );
    let arrived = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" Read id=") && l.ends_with("..."))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrived() < 4 {
        assert!(
            Instant::now() < deadline,
            "{} of 4 guest reads reached the paused server; {}",
            arrived(),
            vmm.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl.write_all(b"r").unwrap();
    ctl.read_exact(&mut answer).unwrap();
    assert!(wait_guest_output(
        agent,
        "test -f /tmp/fin && echo yes",
        "yes"
    ));
    let got = sh(agent, "cat /tmp/r0 /tmp/r1 /tmp/r2 /tmp/r3 | md5sum");
    let data = std::fs::read(image).unwrap();
    let mut want = Vec::new();
    for i in 0..4 {
        want.extend_from_slice(&data[i * 65536..i * 65536 + 4096]);
    }
    let want_file = dir.join("want");
    std::fs::write(&want_file, &want).unwrap();
    let out = Command::new("md5sum").arg(&want_file).output().unwrap();
    let want_md5 = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        got.split_whitespace().next(),
        want_md5.split_whitespace().next()
    );
    stop_child(&mut nbdkit);
}

fn stop_child(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}
