//! The one booted guest of a test or benchmark run, snapshotted after its
//! agent came up, and clones restored from it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;
use ember_vmm_api::{
    CreateSnapshotParams, LoadSnapshotParams, MemBackend, MemBackendType, SnapshotType,
    VsockOverride,
};

use crate::vmm_process::path_str;
use crate::{kernel_path, kvm_available, rootfs_path, VmmProcess};

pub struct Golden {
    _dir: tempfile::TempDir,
    pub snapshot: PathBuf,
    pub mem: PathBuf,
    pub boot_time: Duration,
    pub create_time: Duration,
}

/// Boots the project's guest, writes `/tmp/marker` ("golden") in it, pauses
/// it and takes a Full snapshot.
pub fn boot_and_snapshot(vcpus: u8, mem_mib: u32) -> Golden {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    let (kernel, rootfs) = (kernel_path(), rootfs_path());
    let mut vmm = VmmProcess::spawn(&[]);
    let ready = bind_ready_listener(vmm.path("vsock.sock")).unwrap();
    let t = Instant::now();
    vmm.boot(&kernel, &rootfs, vcpus, mem_mib);
    vmm.wait_agent_ready(&ready, Duration::from_secs(600));
    let boot_time = t.elapsed();
    let mut agent =
        AgentClient::connect(vmm.path("vsock.sock"), AGENT_PORT, Duration::from_secs(30)).unwrap();
    let r = agent
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "echo golden > /tmp/marker",
        ]))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    // As emberd does: a snapshot with no connection restores with none to end.
    assert!(
        agent.close(Duration::from_secs(10)),
        "the agent did not close"
    );

    let (dir, snapshot, mem, create_time) = pause_and_snapshot(&vmm, "ember-golden-");
    Golden {
        _dir: dir,
        snapshot,
        mem,
        boot_time,
        create_time,
    }
}

/// Pauses `vmm` and takes a Full snapshot into a new temporary directory
/// (named `prefix...`). Returns the directory, the state and memory file
/// paths, and how long the create request took.
pub fn pause_and_snapshot(
    vmm: &VmmProcess,
    prefix: &str,
) -> (tempfile::TempDir, PathBuf, PathBuf, Duration) {
    pause(vmm);
    snapshot_paused(vmm, prefix)
}

/// `PATCH /vm` Paused, checked.
pub fn pause(vmm: &VmmProcess) {
    let r = vmm.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Paused");
}

/// The snapshot half of `pause_and_snapshot`, for a VM already paused.
pub fn snapshot_paused(
    vmm: &VmmProcess,
    prefix: &str,
) -> (tempfile::TempDir, PathBuf, PathBuf, Duration) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let snapshot = dir.path().join("vm.snap");
    let mem = dir.path().join("vm.mem");
    let t = Instant::now();
    let create = CreateSnapshotParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: path_str(&snapshot),
        mem_file_path: path_str(&mem),
    };
    let r = vmm.put("/snapshot/create", &create);
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    (dir, snapshot, mem, t.elapsed())
}

/// Restores `g` into a fresh VMM (File backend, running), waits for its
/// agent, and refreshes the clone's entropy and clock. Also returns the
/// time from the load request to the agent's first answer.
pub fn restore_clone(g: &Golden) -> (VmmProcess, AgentClient, Duration) {
    let (vmm, load) = load_resumed(&g.snapshot, &g.mem);
    let mut agent = connect_restored(&vmm);
    let latency = load.sent.elapsed();
    agent
        .refresh()
        .unwrap_or_else(|e| panic!("refresh after restore: {e}; {}", vmm.logs()));
    (vmm, agent, latency)
}

/// A fresh VMM that has loaded `snapshot` with `mem` (File backend) and
/// resumed it, its vsock on a socket of its own (`vsock.sock` in its
/// directory). Also returns when the load request went out (after the
/// VMM's start-up) and how long it took.
pub fn load_resumed(snapshot: &Path, mem: &Path) -> (VmmProcess, LoadTiming) {
    load_resumed_with(snapshot, mem, |_| {})
}

/// [`load_resumed`], with the load's parameters changed by `tweak` (e.g.
/// its working set or memory backing).
pub fn load_resumed_with(
    snapshot: &Path,
    mem: &Path,
    tweak: impl FnOnce(&mut LoadSnapshotParams),
) -> (VmmProcess, LoadTiming) {
    let vmm = VmmProcess::spawn(&[]);
    let mut load = file_load(snapshot, mem);
    load.vsock_override = Some(VsockOverride {
        uds_path: path_str(&vmm.path("vsock.sock")),
    });
    load.resume_vm = true;
    tweak(&mut load);
    let sent = Instant::now();
    let r = vmm.put("/snapshot/load", &load);
    let took = sent.elapsed();
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    (vmm, LoadTiming { sent, took })
}

/// `PUT /snapshot/load` of `snapshot` with `mem` (File backend), paused,
/// nothing overridden.
pub fn file_load(snapshot: &Path, mem: &Path) -> LoadSnapshotParams {
    LoadSnapshotParams::new(
        path_str(snapshot),
        MemBackend {
            backend_type: MemBackendType::File,
            backend_path: path_str(mem),
        },
    )
}

/// When a `PUT /snapshot/load` went out, and how long it took.
pub struct LoadTiming {
    pub sent: Instant,
    pub took: Duration,
}

/// An agent connection to a just-restored guest that survives the vsock
/// transport reset the restore sends: a connection made before the guest
/// handled the reset is dropped by it (sometimes without an RST), so each
/// attempt gets a short timeout and is retried until one answers.
pub fn connect_restored(vmm: &VmmProcess) -> AgentClient {
    let uds = vmm.path("vsock.sock");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = AgentClient::connect_retry(
            &uds,
            AGENT_PORT,
            Duration::from_secs(120),
            Duration::from_secs(2),
        )
        .and_then(|mut a| a.health().map(|_| a));
        match r {
            Ok(a) => return a,
            Err(e) if Instant::now() >= deadline => {
                panic!("restored agent unreachable: {e}; {}", vmm.logs())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
