//! Snapshots with a real guest: boot once, pause, snapshot, then restore
//! clones in fresh VMM processes and check each runs on its own; one
//! clone's root disk fills from an export of the golden's while it runs.

use std::sync::OnceLock;
use std::time::Duration;

use ember_agent::client::AgentClient;
use ember_agent::AGENT_PORT;
use ember_tests::artifacts::workspace_bin;
use ember_tests::guest_sh as sh;
use ember_tests::snapshots::{self, boot_and_snapshot, connect_restored, Golden};
use ember_tests::volumed::Export;
use ember_tests::{ApiReply, VmmProcess};
use serde_json::json;

/// The one booted guest of this test binary; every test restores from it.
fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let g = boot_and_snapshot(1, 128);
        eprintln!(
            "golden guest ready after {:?}; snapshot created in {:?}",
            g.boot_time, g.create_time
        );
        g
    })
}

fn restore_clone() -> (VmmProcess, AgentClient) {
    let (vmm, agent, latency) = snapshots::restore_clone(golden());
    eprintln!("clone answering {latency:?} after load");
    (vmm, agent)
}

#[test]
fn clones_run_side_by_side_with_their_own_state() {
    let (vmm_a, mut a) = restore_clone();
    let (vmm_b, mut b) = restore_clone();
    assert_eq!(sh(&mut a, "cat /tmp/marker").trim(), "golden");
    assert_eq!(sh(&mut b, "cat /tmp/marker").trim(), "golden");
    sh(&mut a, "echo a > /tmp/own");
    sh(&mut b, "echo b > /tmp/own");
    assert_eq!(sh(&mut a, "cat /tmp/own").trim(), "a");
    assert_eq!(sh(&mut b, "cat /tmp/own").trim(), "b");
    assert_eq!(vmm_a.request("GET", "/", None).json()["state"], "Running");
    assert_eq!(vmm_b.request("GET", "/", None).json()["state"], "Running");
}

#[test]
fn pause_and_resume_a_restored_clone() {
    let (vmm, mut agent) = restore_clone();
    let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Paused");
    // A paused guest does not answer.
    agent.set_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(agent.health().is_err(), "paused guest answered");
    let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    let uds = vmm.path("vsock.sock");
    let mut again = AgentClient::connect_retry(
        &uds,
        AGENT_PORT,
        Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(sh(&mut again, "cat /tmp/marker").trim(), "golden");
}

#[test]
fn broken_snapshots_are_refused_and_the_vmm_stays_usable() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(&g.snapshot).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "bad-magic",
            [b"NOTASNAP".as_slice(), &good[8..]].concat(),
            "not an Ember snapshot",
        ),
        (
            "wrong-version",
            {
                let mut v = good.clone();
                v[8] = 42;
                v
            },
            "version 42",
        ),
        (
            "corrupt",
            {
                let mut v = good.clone();
                let i = v.len() - 10;
                v[i] ^= 0x55;
                v
            },
            "checksum",
        ),
    ];
    let vmm = VmmProcess::spawn(&[]);
    for (name, bytes, expect) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = vmm.put(
            "/snapshot/load",
            &json!({"snapshot_path": p, "mem_backend": {"backend_type": "File", "backend_path": g.mem}}),
        );
        assert_eq!(r.status, 400, "{name}: {r:?}");
        assert!(r.fault().contains(expect), "{name}: {}", r.fault());
    }
    // A memory file of the wrong size.
    let short_mem = dir.path().join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 4096]).unwrap();
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot, "mem_backend": {"backend_type": "File", "backend_path": short_mem}}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("4096"), "{}", r.fault());
    // Still not started, still usable: a good load now works.
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Not started");
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot, "mem_backend": {"backend_type": "File", "backend_path": g.mem},
                "vsock_override": {"uds_path": vmm.path("vsock.sock")}}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Paused");
    // Without dirty tracking there is no Diff snapshot.
    let r = vmm.put(
        "/snapshot/create",
        &json!({"snapshot_type": "Diff", "snapshot_path": dir.path().join("d.snap"),
                "mem_file_path": dir.path().join("d.mem")}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("track_dirty_pages"), "{}", r.fault());

    // Load is refused once anything is configured.
    let other = VmmProcess::spawn(&[]);
    let r = other.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    assert_eq!(r.status, 204);
    let r = other.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot, "mem_backend": {"backend_type": "File", "backend_path": g.mem}}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    // And snapshot/create needs a paused, running VM.
    let r = other.put(
        "/snapshot/create",
        &json!({"snapshot_path": dir.path().join("x"), "mem_file_path": dir.path().join("y")}),
    );
    assert_eq!(r.status, 400, "{r:?}");
}

#[test]
fn clones_get_their_own_randomness_and_the_current_time() {
    let (_va, mut a) = restore_clone();
    let (_vb, mut b) = restore_clone();
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let ra = sh(&mut a, read);
    let rb = sh(&mut b, read);
    assert_eq!(ra.len(), 64, "{ra:?}");
    assert_ne!(ra, rb, "two clones produced the same random bytes");
    // The clock was set from the host at restore, not left at snapshot time.
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest: i64 = sh(&mut a, "date +%s").trim().parse().unwrap();
    assert!(
        (guest - host).abs() <= 5,
        "guest clock {guest}, host {host}"
    );
}

#[test]
fn diff_snapshot_merged_onto_its_base_restores_the_later_state() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let vmm = VmmProcess::spawn(&[]);
    let uds = vmm.path("vsock.sock");
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot,
                "mem_backend": {"backend_type": "File", "backend_path": g.mem},
                "vsock_override": {"uds_path": uds},
                "enable_diff_snapshots": true,
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let mut agent = connect_restored(&vmm);
    sh(&mut agent, "echo before > /tmp/state");

    let snap = |kind: &str, name: &str| {
        let (s, m) = (
            dir.path().join(format!("{name}.snap")),
            dir.path().join(format!("{name}.mem")),
        );
        let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(r.status, 204, "{r:?}");
        let r = vmm.put(
            "/snapshot/create",
            &json!({"snapshot_type": kind, "snapshot_path": s, "mem_file_path": m}),
        );
        assert_eq!(r.status, 204, "{kind}: {r:?}; {}", vmm.logs());
        let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!(r.status, 204, "{r:?}");
        (s, m)
    };
    let (_, base_mem) = snap("Full", "base");
    sh(
        &mut agent,
        "echo after > /tmp/state; echo new > /tmp/diff-only",
    );
    let (diff_snap, diff_mem) = snap("Diff", "diff");

    // The Diff memory file is the full size but holds few pages.
    let meta = std::fs::metadata(&diff_mem).unwrap();
    assert_eq!(meta.len(), std::fs::metadata(&base_mem).unwrap().len());
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "Diff memory file has {} of {} bytes allocated",
        meta.blocks() * 512,
        meta.len()
    );

    let out = std::process::Command::new(workspace_bin("ember-snapshot"))
        .args(["merge", "--base"])
        .arg(&base_mem)
        .arg("--diff")
        .arg(&diff_mem)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    drop(agent);
    drop(vmm);

    let restored = VmmProcess::spawn(&[]);
    let uds = restored.path("vsock.sock");
    let r = restored.put(
        "/snapshot/load",
        &json!({"snapshot_path": diff_snap,
                "mem_backend": {"backend_type": "File", "backend_path": base_mem},
                "vsock_override": {"uds_path": uds},
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", restored.logs());
    let mut agent = connect_restored(&restored);
    assert_eq!(
        sh(&mut agent, "cat /tmp/state /tmp/diff-only /tmp/marker"),
        "after\nnew\ngolden\n"
    );
}

#[test]
fn uffd_backed_clone_answers_with_the_snapshot_state() {
    // Runs on kvm_pvm hosts too: there Ember's clones run on lazily served
    // userfaultfd memory (docs/nested-kvm.md, measured 2026-12-08).
    let g = golden();
    let vmm = VmmProcess::spawn(&[]);
    let handler_sock = vmm.path("uffd.sock");
    let mut handler = start_uffd_handler(&handler_sock);
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot,
                "mem_backend": {"backend_type": "Uffd", "backend_path": handler_sock},
                "vsock_override": {"uds_path": vmm.path("vsock.sock")},
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let mut agent = connect_restored(&vmm);
    assert_eq!(sh(&mut agent, "cat /tmp/marker").trim(), "golden");
    drop(agent);
    drop(vmm);
    let _ = handler.kill();
    let _ = handler.wait();
}

/// Starts `ember-uffd-handler` for the golden memory file on `sock`.
fn start_uffd_handler(sock: &std::path::Path) -> std::process::Child {
    let child = std::process::Command::new(workspace_bin("ember-uffd-handler"))
        .arg("--socket")
        .arg(sock)
        .arg("--mem-file")
        .arg(&golden().mem)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn vm_stops_with_an_error_when_its_page_fault_handler_dies() {
    let g = golden();
    let mut vmm = VmmProcess::spawn(&[]);
    let sock = vmm.path("uffd.sock");
    let mut handler = start_uffd_handler(&sock);
    // Loaded paused: restoring devices already reads guest memory through
    // the handler, and a paused guest runs no code (which kvm_pvm hosts
    // could not do on userfaultfd memory).
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot,
                "mem_backend": {"backend_type": "Uffd", "backend_path": sock},
                "vsock_override": {"uds_path": vmm.path("vsock.sock")},
                "resume_vm": false}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Paused");
    handler.kill().unwrap();
    handler.wait().unwrap();
    let status = vmm.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "VMM kept running without its page-fault handler; {}",
            vmm.logs()
        )
    });
    assert_eq!(status.code(), Some(1), "{}", vmm.logs());
    assert!(
        vmm.logs().contains("page-fault handler closed"),
        "{}",
        vmm.logs()
    );
}

#[test]
fn a_clone_fills_its_root_disk_from_an_export_while_it_runs() {
    let g = golden();
    // The golden's root disk, served as a migration's source host would.
    let vmm = VmmProcess::spawn(&[]);
    let rootfs = ember_tests::rootfs_path();
    let export = Export::start(&rootfs, &vmm.path("export.sock"));
    let local = vmm.path("local-rootfs.ext4");
    // Capped (the 64 MiB take 32 s) so the guest reads while the last
    // chunks are still missing.
    let r = vmm.put(
        "/snapshot/load",
        &json!({"snapshot_path": g.snapshot,
                "mem_backend": {"backend_type": "File", "backend_path": g.mem},
                "vsock_override": {"uds_path": vmm.path("vsock.sock")},
                "drive_overrides": [{"drive_id": "rootfs", "path_on_host": local}],
                "fill_overrides": [{"drive_id": "rootfs", "fill_from":
                    {"nbd_uri": export.uri(), "background_bytes_per_sec": 2 << 20}}],
                "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    let fill = || vmm.request("GET", "/drives/rootfs/fill", None).json();
    let first = fill();
    assert_eq!(first["state"], "Filling", "{first}");
    assert_eq!(first["chunks_total"], 1024, "{first}");
    let mut agent = connect_restored(&vmm);
    // The disk's last 256 KiB read raw (chunks 1020-1023), and two files
    // read through ext4 with the page cache dropped first.
    let reads = "echo 3 > /proc/sys/vm/drop_caches; \
                 dd if=/dev/vda bs=65536 skip=1020 count=4 2>/dev/null | md5sum; \
                 md5sum /bin/busybox /sbin/init";
    let tail = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if={} bs=65536 skip=1020 count=4 2>/dev/null | md5sum",
            rootfs.display()
        ))
        .output()
        .unwrap();
    let tail = String::from_utf8_lossy(&tail.stdout).into_owned();
    let before = fill()["chunks_local"].as_u64().unwrap();
    let during = sh(&mut agent, reads);
    let mid = fill();
    eprintln!("{before} chunks local before the guest's reads; after: {mid}");
    assert_eq!(during.lines().next(), tail.lines().next(), "{during}");
    assert!(during.contains(" /bin/busybox"), "{during}");
    if before < 1020 {
        assert!(mid["bytes_on_demand"].as_u64().unwrap() > 0, "{mid}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while fill()["state"] != "Complete" {
        assert!(std::time::Instant::now() < deadline, "{}", fill());
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = fill();
    assert_eq!(done["chunks_local"], 1024, "{done}");
    assert!(done["error"].is_null(), "{done}");
    assert_eq!(
        sh(&mut agent, reads),
        during,
        "read back the same after the fill"
    );
    assert!(
        std::fs::read(&local).unwrap() == std::fs::read(&rootfs).unwrap(),
        "the local disk is the golden's"
    );
    // The source is let go: the export can end under a running guest.
    drop(export);
    assert_eq!(sh(&mut agent, "cat /tmp/marker").trim(), "golden");
    let r = vmm.request("GET", "/drives/nope/fill", None);
    assert_eq!(r.status, 400, "{r:?}");
}

/// The first object under `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|v| find_key(v, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

#[test]
fn a_clone_answers_its_first_connection_without_a_retry() {
    let g = golden();
    // The golden was snapshotted after its agent connection closed cleanly
    // (as emberd does): its vsock state lists no connection to end.
    let bytes = std::fs::read(&g.snapshot).unwrap();
    // The payload follows magic (8), version (4), length (8) and CRC (8).
    let state: serde_json::Value = serde_json::from_slice(&bytes[28..]).unwrap();
    let listed = find_key(&state, "host_connections").expect("vsock host_connections");
    assert_eq!(listed["ports"], json!([]), "{listed}");

    // One connection, made as soon as the load returns, and no retry: a
    // restore must neither hold it back nor let the guest refuse it.
    for _ in 0..3 {
        let (vmm, _) = snapshots::load_resumed(&g.snapshot, &g.mem);
        first_answer(&vmm, "a clone");
    }
}

/// A load of the golden (File backend) changed by `tweak`, in a fresh VMM,
/// which must refuse it with a 400 and stay unconfigured; its answer.
fn refused_load(tweak: impl FnOnce(&mut ember_vmm_api::LoadSnapshotParams)) -> ApiReply {
    let g = golden();
    let vmm = VmmProcess::spawn(&[]);
    let mut load = snapshots::file_load(&g.snapshot, &g.mem);
    tweak(&mut load);
    let r = vmm.put("/snapshot/load", &load);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        vmm.request("GET", "/", None).json()["state"],
        json!("Not started"),
        "a refused load left the VMM configured"
    );
    r
}

/// One connection to a just-loaded clone and its first answer, with no
/// retry: a failure says which clone (`what`) and shows the VMM's log.
fn first_answer(vmm: &VmmProcess, what: &str) -> AgentClient {
    let mut agent =
        AgentClient::connect(vmm.path("vsock.sock"), AGENT_PORT, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: first connection: {e}; {}", vmm.logs()));
    agent
        .health()
        .unwrap_or_else(|e| panic!("{what}: first request: {e}; {}", vmm.logs()));
    agent
}

/// The working set: one clone records the pages it touches up to its first
/// answer; later clones read those in before they run, and answer the same.
#[test]
fn a_working_set_recorded_by_one_clone_is_prefetched_by_the_next() {
    use ember_vmm_api::WorkingSetLoad;
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let ws_path = dir.path().join("working-set");

    let record = WorkingSetLoad {
        record: true,
        prefetch_path: None,
    };
    let (vmm, _) =
        snapshots::load_resumed_with(&g.snapshot, &g.mem, |l| l.working_set = Some(record));
    let mut agent = first_answer(&vmm, "the recording clone");
    let status = vmm.request("GET", "/snapshot/working-set", None).json();
    assert_eq!(status["recording"], json!(true), "{status}");
    let recorded = status["pages_recorded"].as_u64().unwrap();
    // Far fewer than the guest's 32768 pages, and more than nothing.
    assert!(recorded > 100 && recorded < 32768, "{status}");
    let r = vmm.put(
        "/snapshot/working-set",
        &json!({ "working_set_path": ws_path.to_str().unwrap() }),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // The recording clone goes on serving its memory: it still runs code.
    assert_eq!(sh(&mut agent, "echo still-here").trim(), "still-here");
    drop(agent);
    drop(vmm);

    for _ in 0..2 {
        let prefetch = WorkingSetLoad {
            record: false,
            prefetch_path: Some(ws_path.to_str().unwrap().into()),
        };
        let (vmm, _) =
            snapshots::load_resumed_with(&g.snapshot, &g.mem, |l| l.working_set = Some(prefetch));
        let mut agent = first_answer(&vmm, "a prefetching clone");
        assert_eq!(sh(&mut agent, "cat /tmp/marker").trim(), "golden");
        let status = vmm.request("GET", "/snapshot/working-set", None).json();
        assert_eq!(status["recording"], json!(false), "{status}");
        assert!(
            status["pages_prefetched"].as_u64().unwrap() >= recorded,
            "{status}"
        );
        // Only a recording clone can save one.
        let r = vmm.put(
            "/snapshot/working-set",
            &json!({ "working_set_path": "/tmp/x" }),
        );
        assert_eq!(r.status, 400, "{r:?}");
    }

    // A working set and a snapshot that do not belong together: refused,
    // the VMM left as it was.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, b"EMBERSNP not really").unwrap();
    let r = refused_load(|l| {
        l.working_set = Some(WorkingSetLoad {
            record: false,
            prefetch_path: Some(bad.to_str().unwrap().into()),
        })
    });
    assert!(
        r.body.contains("truncated") || r.body.contains("corrupt"),
        "{r:?}"
    );
}

/// The same snapshot restored into a memfd (a copy of the memory file) and
/// into 2 MiB huge pages: each clone runs and says what its memory is. On
/// a host with too few free huge pages, the load is refused at once with
/// what to set, and the VMM stays usable.
#[test]
fn clones_restore_into_a_memfd_and_into_huge_pages() {
    use ember_vmm_api::{LoadHugePages, MemoryBacking};
    let g = golden();
    let (vmm, _) = snapshots::load_resumed_with(&g.snapshot, &g.mem, |l| {
        l.memory_backing = Some(MemoryBacking::Memfd)
    });
    let mut agent = connect_restored(&vmm);
    assert_eq!(sh(&mut agent, "cat /tmp/marker").trim(), "golden");
    let mc = vmm.request("GET", "/machine-config", None).json();
    assert_eq!(mc["memory_backing"], json!("Memfd"), "{mc}");
    drop(agent);
    drop(vmm);

    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
        .unwrap_or(0);
    let huge =
        |l: &mut ember_vmm_api::LoadSnapshotParams| l.huge_pages = Some(LoadHugePages::Hugetlbfs2M);
    // The golden has 128 MiB: 64 pages of 2 MiB.
    if free >= 64 {
        let (vmm, _) = snapshots::load_resumed_with(&g.snapshot, &g.mem, huge);
        let mut agent = connect_restored(&vmm);
        assert_eq!(sh(&mut agent, "cat /tmp/marker").trim(), "golden");
        let mc = vmm.request("GET", "/machine-config", None).json();
        assert_eq!(mc["huge_pages"], json!("2M"), "{mc}");
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vmm.pid())).unwrap();
        assert!(
            smaps.contains("KernelPageSize:     2048 kB"),
            "no 2 MiB mapping"
        );
    } else {
        eprintln!("{free} free 2 MiB pages: checking the refusal");
        let r = refused_load(huge);
        assert!(r.body.contains("vm.nr_hugepages"), "{r:?}");
    }
}
