//! The client against a stand-in server on a unix socket that records the
//! request and answers as told. The VMM's real server is driven by this
//! client in `ember_vmm`'s API tests.

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;
use crate::{FillFrom, FillPhase, MemBackend, MemBackendType, SnapshotType};

/// One request as the server read it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    body: String,
}

/// Reads one HTTP/1.1 request (head, then a `Content-Length` body).
async fn read_request(c: &mut UnixStream) -> Seen {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the client hung up mid-request");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut first = head.lines().next().unwrap().split(' ');
    Seen {
        method: first.next().unwrap().to_string(),
        path: first.next().unwrap().to_string(),
        body: String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap(),
    }
}

/// Serves one request per answer in `answers` (status, body) and hands
/// back what it saw.
async fn server(
    dir: &Path,
    answers: Vec<(u16, &'static str)>,
) -> (PathBuf, tokio::task::JoinHandle<Vec<Seen>>) {
    let sock = dir.join("api.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (status, body) in answers {
            let (mut c, _) = l.accept().await.unwrap();
            seen.push(read_request(&mut c).await);
            let answer = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            c.write_all(answer.as_bytes()).await.unwrap();
        }
        seen
    });
    (sock, task)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[tokio::test]
async fn typed_requests_go_to_their_routes() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = server(dir.path(), vec![(204, ""); 12]).await;
    let c = VmmClient::new(&sock);
    c.put_boot_source(&BootSourceConfig {
        boot_args: Some("console=ttyS0".into()),
        ..BootSourceConfig::new("/vmlinux")
    })
    .await
    .unwrap();
    c.put_machine_config(&MachineConfig::new(2, 256))
        .await
        .unwrap();
    c.put_drive(&BlockDeviceConfig {
        is_root_device: true,
        is_read_only: true,
        ..BlockDeviceConfig::file("rootfs", "/r.ext4")
    })
    .await
    .unwrap();
    c.put_network_interface(&NetworkInterfaceConfig::tap("eth0", "tap0"))
        .await
        .unwrap();
    c.put_vsock(&VsockConfig {
        vsock_id: None,
        guest_cid: 3,
        uds_path: "/v.sock".into(),
    })
    .await
    .unwrap();
    c.start().await.unwrap();
    c.pause().await.unwrap();
    c.create_snapshot(&CreateSnapshotParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: "/s".into(),
        mem_file_path: "/m".into(),
    })
    .await
    .unwrap();
    c.patch_drive(&BlockDeviceUpdate {
        drive_id: "vol".into(),
        nbd_uri: Some("nbd+unix:///v?socket=/n".into()),
        ..BlockDeviceUpdate::default()
    })
    .await
    .unwrap();
    c.migrate(&SendMigrationParams {
        downtime_ms: 100,
        switch_over: crate::SwitchOver::Manual,
        ..SendMigrationParams::new("unix:///out")
    })
    .await
    .unwrap();
    c.cancel_migration().await.unwrap();
    c.resume().await.unwrap();

    let seen = seen.await.unwrap();
    let want: [(&str, &str, &str); 12] = [
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false}"#,
        ),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                "is_read_only": true}"#,
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0",
                "terminate_connections_on_pause": false}"#,
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        ),
        (
            "PATCH",
            "/drives/vol",
            r#"{"drive_id": "vol", "nbd_uri": "nbd+unix:///v?socket=/n"}"#,
        ),
        (
            "PUT",
            "/migrate/send",
            r#"{"destination_uri": "unix:///out", "downtime_ms": 100, "max_rounds": 30,
                "switch_over": "Manual", "switch_over_timeout_ms": 30000, "mode": "PreCopy"}"#,
        ),
        ("PUT", "/migrate/cancel", ""),
        ("PATCH", "/vm", r#"{"state": "Resumed"}"#),
    ];
    assert_eq!(seen.len(), want.len());
    for (s, (method, path, body)) in seen.iter().zip(want) {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            (method, path),
            "{s:?}"
        );
        if body.is_empty() {
            assert_eq!(s.body, "", "{s:?}");
        } else {
            assert_eq!(json(&s.body), json(body), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn restore_and_receive_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = server(dir.path(), vec![(204, ""); 3]).await;
    let c = VmmClient::new(&sock);
    let mut load = LoadSnapshotParams::new(
        "/snap/vm.snap",
        MemBackend {
            backend_type: MemBackendType::File,
            backend_path: "/snap/mem".into(),
        },
    );
    load.resume_vm = true;
    load.vsock_override = Some(crate::VsockOverride {
        uds_path: "/v".into(),
    });
    load.drive_overrides.push(crate::DriveOverride {
        drive_id: "tmp".into(),
        path_on_host: "/d/tmp.img".into(),
    });
    c.load_snapshot(&load).await.unwrap();
    let mut recv = ReceiveMigrationParams::new("unix:///in");
    recv.fill_overrides.push(crate::FillOverride {
        drive_id: "tmp".into(),
        fill_from: FillFrom::nbd("nbd+unix:///disk?socket=/f"),
    });
    c.receive_migration(&recv).await.unwrap();
    c.switch_over(&SwitchOverParams::default()).await.unwrap();
    let seen = seen.await.unwrap();
    assert_eq!(seen[0].path, "/snapshot/load");
    assert_eq!(
        json(&seen[0].body),
        json(
            r#"{"snapshot_path": "/snap/vm.snap",
                "mem_backend": {"backend_type": "File", "backend_path": "/snap/mem"},
                "resume_vm": true, "enable_diff_snapshots": false,
                "vsock_override": {"uds_path": "/v"},
                "drive_overrides": [{"drive_id": "tmp", "path_on_host": "/d/tmp.img"}]}"#
        )
    );
    assert_eq!(seen[1].path, "/migrate/receive");
    assert_eq!(
        json(&seen[1].body),
        json(
            r#"{"listen_uri": "unix:///in", "fill_overrides": [{"drive_id": "tmp",
                "fill_from": {"nbd_uri": "nbd+unix:///disk?socket=/f"}}]}"#
        )
    );
    assert_eq!(
        (seen[2].path.as_str(), json(&seen[2].body)),
        ("/migrate/switch-over", json(r#"{"drive_overrides": []}"#))
    );
}

#[tokio::test]
async fn typed_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _seen) = server(
        dir.path(),
        vec![
            (
                200,
                r#"{"id":"i","state":"Running","vmm_version":"0.1.0","app_name":"ember"}"#,
            ),
            (
                200,
                r#"{"role":"Source","state":"PreCopy","peer":"unix:///o","memory_bytes":1,
                   "rounds":2,"bytes":3,"pages":4,"last_dirty_pages":5,"bandwidth_mib_s":1.5,
                   "final_pages":0,"mode":"PreCopy","postcopy_pages_on_demand":0,
                   "postcopy_pages_pushed":0}"#,
            ),
            (
                200,
                r#"{"drive_id":"tmp","state":"Complete","source":"nbd://h:1/d","chunk_size":1,
                   "chunks_total":2,"chunks_local":2,"bytes_on_demand":3,"bytes_background":4,
                   "requests_waiting":0,"error":null,"elapsed_ms":5}"#,
            ),
            (200, "not json"),
        ],
    )
    .await;
    let c = VmmClient::new(&sock);
    assert_eq!(c.instance_info().await.unwrap().state, "Running");
    let m = c.migration_status().await.unwrap();
    assert_eq!(m.state, crate::migration::Phase::PreCopy);
    assert_eq!(
        (m.rounds, m.bandwidth_mib_s, m.error.as_deref()),
        (2, 1.5, None)
    );
    assert!(m.is_active());
    let f = c.drive_fill_status("tmp").await.unwrap();
    assert_eq!((f.state, f.bytes_on_demand), (FillPhase::Complete, 3));
    let e = c.machine_config().await.unwrap_err();
    assert!(matches!(e, ApiError::Decode { .. }), "{e}");
}

#[tokio::test]
async fn a_refusal_carries_the_fault_message() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _seen) = server(
        dir.path(),
        vec![(400, r#"{"fault_message":"the microVM is not started"}"#)],
    )
    .await;
    let e = VmmClient::new(&sock).pause().await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert_eq!(
        e.fault_message().as_deref(),
        Some("the microVM is not started")
    );
    assert!(matches!(e, ApiError::Status { status: 400, .. }), "{e}");
    assert!(e.to_string().contains("PATCH /vm answered 400"), "{e}");
}

#[tokio::test]
async fn no_socket_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let c = VmmClient::new(dir.path().join("none.sock"));
    let e = c.wait_ready(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(e, ApiError::NotReady(_)), "{e}");
    let e = c.start().await.unwrap_err();
    assert!(matches!(e, ApiError::Connect { .. }), "{e}");
}

#[tokio::test]
async fn wait_ready_waits_for_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        server(&path, vec![(200, "{}")]).await.1.await.unwrap()
    });
    let c = VmmClient::new(dir.path().join("api.sock"));
    c.wait_ready(Duration::from_secs(10)).await.unwrap();
    let seen = late.await.unwrap();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/")
    );
}

/// A server that reads a request and then does `then` with the connection.
async fn silent_server(
    dir: &Path,
    then: impl FnOnce(UnixStream) -> tokio::task::JoinHandle<()> + Send + 'static,
) -> PathBuf {
    let sock = dir.join("api.sock");
    let l = UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf).await;
        let _ = then(c).await;
    });
    sock
}

#[tokio::test]
async fn a_silent_vmm_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = silent_server(dir.path(), |c| {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(c);
        })
    })
    .await;
    let e = VmmClient::new(&sock)
        .with_timeout(Duration::from_millis(300))
        .instance_info()
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn an_endless_answer_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let sock = silent_server(dir.path(), |mut c| {
        tokio::spawn(async move {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n";
            if c.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            // Stops when the client hangs up.
            for _ in 0..(1 << 14) {
                if c.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
    })
    .await;
    let e = request_within(&sock, "GET", "/", &[], vec![], Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reading the answer"), "{e}");
}
