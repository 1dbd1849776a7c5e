//! One real guest per run (booting is slow on nested KVM): boot the
//! project's kernel and rootfs to the agent, then check vsock both ways, a
//! block device written and read back, the serial console, and a clean
//! VMM exit when the guest reboots.

use std::io::Read;
use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::{ExecRequest, ExecResult};
use ember_agent::AGENT_PORT;
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Two vCPUs, so SMP bring-up (MP table, IOAPIC routing) is exercised.
fn vcpus() -> u8 {
    2
}

fn sh(client: &mut AgentClient, script: &str) -> ExecResult {
    client
        .exec(&ExecRequest::new(["/bin/sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
}

fn sh_ok(client: &mut AgentClient, script: &str) -> String {
    let r = sh(client, script);
    assert_eq!(
        r.exit_code,
        Some(0),
        "{script:?} failed: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

#[test]
fn boot_to_agent_then_devices_and_clean_exit() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    let kernel = kernel_path();
    let rootfs = rootfs_path();
    let vcpus = vcpus();
    let mut vmm = VmmProcess::spawn(&[]);

    // A writable data drive, pre-filled so reads of untouched blocks are checkable.
    let data = vmm.path("data.img");
    std::fs::write(&data, vec![0x5au8; 8 << 20]).unwrap();
    let r = vmm.put(
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": data, "is_root_device": false,
                "is_read_only": false, "serial": "ember-data-1"}),
    );
    assert_eq!(r.status, 204, "{r:?}");

    let metrics = vmm.path("metrics.json");
    let r = vmm.put("/metrics", &json!({"metrics_path": metrics}));
    assert_eq!(r.status, 204, "{r:?}");

    // The agent's guest-initiated hello arrives on <uds>_53.
    let vsock = vmm.path("vsock.sock");
    let ready = bind_ready_listener(&vsock).unwrap();
    let t0 = Instant::now();
    vmm.boot(&kernel, &rootfs, vcpus, 128);
    let hello = vmm.wait_agent_ready(&ready, BOOT_TIMEOUT);
    eprintln!(
        "agent ready after {:?} (guest uptime {} ms)",
        t0.elapsed(),
        hello.uptime_ms
    );
    assert!(hello.uptime_ms > 0);
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Running");

    // Configuration is refused once the VM runs.
    let r = vmm.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    assert_eq!(r.status, 400, "{r:?}");

    // Host-initiated vsock: health and exec.
    let mut agent = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("connect to agent: {e}; {}", vmm.logs()));
    let health = agent.health().unwrap();
    assert!(health.uptime_ms >= hello.uptime_ms);
    let r = sh(&mut agent, "echo out; echo err >&2; exit 7");
    assert_eq!(r.exit_code, Some(7));
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");

    // The guest sees the configured vCPUs.
    let cpus = sh_ok(&mut agent, "grep -c ^processor /proc/cpuinfo");
    assert_eq!(cpus.trim(), vcpus.to_string());

    // A larger payload both ways exercises vsock flow control.
    let payload: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let r = agent
        .exec(&ExecRequest::new(["/bin/cat"]).stdin(payload.clone()))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert!(
        r.stdout == payload,
        "3 MiB echoed through the guest came back different"
    );

    // Several connections at once.
    let mut second = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(60)).unwrap();
    assert!(second.health().is_ok());
    assert!(agent.health().is_ok());
    drop(second);

    // Block: the root drive is read-only, the data drive reads its host
    // contents, takes writes, and they reach the host file after a flush.
    let r = sh(
        &mut agent,
        "echo x | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>&1",
    );
    assert_ne!(r.exit_code, Some(0), "write to read-only root succeeded");
    let serial = sh_ok(&mut agent, "cat /sys/block/vdb/serial 2>/dev/null || true");
    let size = sh_ok(&mut agent, "cat /sys/block/vdb/size");
    assert_eq!(size.trim(), (8u64 << 20 >> 9).to_string());
    let first = sh_ok(
        &mut agent,
        "dd if=/dev/vdb bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1",
    );
    assert!(first.split_whitespace().all(|b| b == "5a"), "{first}");
    sh_ok(
        &mut agent,
        "i=0; while [ $i -lt 64 ]; do printf 'ember-block-%04d\\n' $i; i=$((i+1)); done > /tmp/pat && \
         dd if=/tmp/pat of=/dev/vdb bs=4096 seek=256 conv=fsync 2>/dev/null && \
         echo 3 > /proc/sys/vm/drop_caches; true",
    );
    let back = sh_ok(&mut agent, "dd if=/dev/vdb bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | head -c 1088 | md5sum; md5sum < /tmp/pat");
    let sums: Vec<&str> = back
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(sums.len(), 2, "{back}");
    assert_eq!(sums[0], sums[1], "read-back differs from what was written");
    let mut host = Vec::new();
    std::fs::File::open(&data)
        .unwrap()
        .read_to_end(&mut host)
        .unwrap();
    let at = 256 * 4096;
    assert_eq!(&host[at..at + 17], b"ember-block-0000\n");
    assert_eq!(&host[at + 16 * 17..at + 17 * 17], b"ember-block-0016\n");
    eprintln!("vdb serial: {:?}", serial.trim());

    // The console shows the kernel booting.
    let console = std::fs::read_to_string(&vmm.serial_log).unwrap();
    assert!(
        console.contains("Linux version"),
        "no boot log on the serial console"
    );

    // Metrics count what happened: exits, block and vsock bytes.
    let r = vmm.put("/actions", &json!({"action_type": "FlushMetrics"}));
    assert_eq!(r.status, 204, "{r:?}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(m["block"]["write_bytes"].as_u64().unwrap() >= 4096, "{m}");
    assert!(m["block"]["read_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["vsock"]["tx_bytes"].as_u64().unwrap() >= 3 << 20, "{m}");
    assert!(m["vsock"]["rx_bytes"].as_u64().unwrap() >= 3 << 20, "{m}");
    assert!(m["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{m}");

    // Ctrl-Alt-Del reboots the guest; a guest reboot ends the VMM cleanly.
    let r = vmm.put("/actions", &json!({"action_type": "SendCtrlAltDel"}));
    assert_eq!(r.status, 204, "{r:?}");
    let status = vmm
        .wait_exit(Duration::from_secs(300))
        .unwrap_or_else(|| panic!("VMM did not exit after Ctrl-Alt-Del; {}", vmm.logs()));
    assert!(status.success(), "VMM exit status {status}; {}", vmm.logs());
}
