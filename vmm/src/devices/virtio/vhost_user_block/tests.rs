//! Connection and negotiation against fake backends (no guest needed), and
//! against qemu-storage-daemon when it is installed.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{VhostUserBlock, VhostUserBlockError};
use crate::devices::virtio::{VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::vmm_config::drive::BlockDeviceConfig;

fn config(socket: &Path) -> BlockDeviceConfig {
    BlockDeviceConfig {
        drive_id: "data".into(),
        path_on_host: String::new(),
        socket: Some(socket.to_str().unwrap().into()),
        ..Default::default()
    }
}

/// Serves one connection on `path` with `serve`.
fn fake_backend(path: &Path, serve: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        if let Ok((c, _)) = listener.accept() {
            serve(c);
        }
    });
}

/// The reply header of vhost-user: request, flags (version 1 | reply), size.
fn reply(request: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&0x5u32.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = VhostUserBlock::new(&config(&dir.path().join("none.sock"))).err();
    assert!(
        matches!(e, Some(VhostUserBlockError::Connect { .. })),
        "{e:?}"
    );
}

#[test]
fn garbage_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    fake_backend(&sock, |mut c| {
        let mut h = [0u8; 24];
        let _ = c.read(&mut h);
        let _ = c.write_all(b"this is not a vhost-user reply at all");
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = VhostUserBlock::new(&config(&sock)).err();
    assert!(
        matches!(e, Some(VhostUserBlockError::Protocol { .. })),
        "{e:?}"
    );
}

#[test]
fn silent_backend_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    fake_backend(&sock, |c| {
        std::thread::sleep(Duration::from_secs(10));
        drop(c);
    });
    let t = Instant::now();
    let e = VhostUserBlock::new(&config(&sock)).err();
    assert!(
        matches!(e, Some(VhostUserBlockError::Protocol { .. })),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
}

#[test]
fn backend_without_version_1_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("f.sock");
    fake_backend(&sock, |mut c| {
        // SET_OWNER (no reply), then GET_FEATURES: offer only bit 30.
        let mut h = [0u8; 24];
        c.read_exact(&mut h).unwrap();
        c.write_all(&reply(1, &(1u64 << 30).to_le_bytes())).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = VhostUserBlock::new(&config(&sock))
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("lacks VIRTIO_F_VERSION_1")),
        "{e:?}"
    );
}

/// qemu-storage-daemon serving a new file of `size` bytes in `dir`; None
/// (with a SKIPPED line) when it is not installed.
fn qsd(dir: &Path, name: &str, size: u64) -> Option<(std::process::Child, std::path::PathBuf)> {
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: qemu-storage-daemon is not installed (package qemu-utils)");
        return None;
    }
    let image = dir.join(format!("{name}.raw"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, sock))
}

#[test]
fn negotiates_with_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut child, sock)) = qsd(dir.path(), "a", 4 << 20) else {
        return;
    };
    let dev = VhostUserBlock::new(&config(&sock));
    let _ = child.kill();
    let _ = child.wait();
    let dev = dev.unwrap();
    assert_eq!(dev.capacity(), (4 << 20) / 512);
    assert_eq!(dev.device_type(), TYPE_BLOCK);
    assert_ne!(dev.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    // The vhost-user-only bit never reaches the guest.
    assert_eq!(dev.avail_features() & (1 << 30), 0);
}

/// A restore reconnects to the override socket and refuses a backend whose
/// disk has another capacity.
#[test]
fn restore_checks_the_new_backend() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut a, sock_a)) = qsd(dir.path(), "a", 4 << 20) else {
        return;
    };
    let (mut b, sock_b) = qsd(dir.path(), "b", 8 << 20).unwrap();
    let (mut c, sock_c) = qsd(dir.path(), "c", 4 << 20).unwrap();
    let mut dev = VhostUserBlock::new(&config(&sock_a)).unwrap();
    dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
    let state = dev.state();
    let other = VhostUserBlock::restore(&state, sock_b.to_str()).err();
    let same = VhostUserBlock::restore(&state, sock_c.to_str());
    for p in [&mut a, &mut b, &mut c] {
        let _ = p.kill();
        let _ = p.wait();
    }
    let other = other.map(|e| e.to_string()).unwrap_or_default();
    assert!(other.contains("capacity"), "{other}");
    let same = same.unwrap();
    assert_eq!(same.acked_features(), 1 << VIRTIO_F_VERSION_1);
    assert_eq!(same.config().socket.as_deref(), sock_c.to_str());
}
